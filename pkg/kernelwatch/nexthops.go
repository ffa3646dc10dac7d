package kernelwatch

import (
	"fmt"
	"syscall"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/routing-agent/routing-agent/pkg/nlbatch"
)

// NexthopUpdate is one nexthop object notification.
type NexthopUpdate struct {
	// Type is unix.RTM_NEWNEXTHOP or unix.RTM_DELNEXTHOP.
	Type uint16
	nlbatch.NexthopObject
}

// subscribeNexthops is a subscribeFunc for RTNLGRP_NEXTHOP in ns: the
// library has none. A kernel without nexthop objects (before Linux 5.3)
// has no such group either: the stream is then up and silent, which is
// all there is to see.
func subscribeNexthops(ns netns.NsHandle, rcvbuf int, ch chan<- NexthopUpdate, done <-chan struct{}, onErr func(error)) error {
	return subscribeGroups(ns, rcvbuf, []group{{unix.RTNLGRP_NEXTHOP, "RTNLGRP_NEXTHOP", true}}, parseNexthop, ch, done, onErr)
}

func parseNexthop(m syscall.NetlinkMessage) (NexthopUpdate, error) {
	if m.Header.Type != unix.RTM_NEWNEXTHOP && m.Header.Type != unix.RTM_DELNEXTHOP {
		return NexthopUpdate{}, fmt.Errorf("unexpected message type %d on the nexthop group", m.Header.Type)
	}
	n, err := nlbatch.ParseNexthop(m.Data)
	if err != nil {
		return NexthopUpdate{}, fmt.Errorf("nexthop message: %w", err)
	}
	return NexthopUpdate{Type: m.Header.Type, NexthopObject: n}, nil
}
