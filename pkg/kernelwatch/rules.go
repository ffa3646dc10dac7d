package kernelwatch

import (
	"fmt"
	"syscall"

	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/routing-agent/routing-agent/pkg/nlbatch"
)

// RuleUpdate is one ip rule notification: its type and the rule, as
// nlbatch reads it (Other set for a rule with more than nlbatch.Rule holds).
type RuleUpdate struct {
	// Type is unix.RTM_NEWRULE or unix.RTM_DELRULE.
	Type uint16
	nlbatch.Rule
}

// subscribeRules is a subscribeFunc, with a receive buffer of rcvbuf, for
// RTNLGRP_IPV4_RULE and RTNLGRP_IPV6_RULE in ns: the library has none.
// A kernel refusing the IPv6 group cannot cost the IPv4 rules.
func subscribeRules(ns netns.NsHandle, rcvbuf int, ch chan<- RuleUpdate, done <-chan struct{}, onErr func(error)) error {
	return subscribeGroups(ns, rcvbuf, []group{{unix.RTNLGRP_IPV4_RULE, "RTNLGRP_IPV4_RULE", false}, {unix.RTNLGRP_IPV6_RULE, "RTNLGRP_IPV6_RULE", true}},
		parseRule, ch, done, onErr)
}

// group is a netlink multicast group to join; an optional one that the
// kernel refuses is reported to onErr, not failed on.
type group struct {
	id       int
	name     string
	optional bool
}

// subscribeGroups is a subscribeFunc for raw netlink groups, whose
// messages parse decodes.
func subscribeGroups[T any](ns netns.NsHandle, rcvbuf int, groups []group, parse func(syscall.NetlinkMessage) (T, error), ch chan<- T, done <-chan struct{}, onErr func(error)) error {
	// Bound to no group: they are joined one by one below (setsockopt also
	// reaches groups above 31, which a bind cannot).
	s, err := nl.SubscribeAt(ns, netns.None(), unix.NETLINK_ROUTE)
	if err != nil {
		return err
	}
	if err := s.SetReceiveBufferSize(rcvbuf, true); err != nil {
		s.Close()
		return fmt.Errorf("setting SO_RCVBUFFORCE: %w", err)
	}
	for _, g := range groups {
		err := unix.SetsockoptInt(s.GetFd(), unix.SOL_NETLINK, unix.NETLINK_ADD_MEMBERSHIP, g.id)
		switch {
		case err != nil && g.optional:
			onErr(fmt.Errorf("not watching %s: %w", g.name, err))
		case err != nil:
			s.Close()
			return fmt.Errorf("joining %s: %w", g.name, err)
		}
	}
	go func() {
		<-done
		s.Close()
	}()
	go func() {
		defer close(ch)
		for {
			msgs, from, err := s.Receive()
			if err != nil {
				onErr(fmt.Errorf("receiving notifications: %w", err))
				return
			}
			if from.Pid != nl.PidKernel { // not a notification: CAP_NET_ADMIN may send to the group too
				continue
			}
			for _, m := range msgs {
				u, err := parse(m)
				if err != nil {
					onErr(err)
					continue
				}
				ch <- u
			}
		}
	}()
	return nil
}

// parseRule decodes an RTM_NEWRULE or RTM_DELRULE message.
func parseRule(m syscall.NetlinkMessage) (RuleUpdate, error) {
	if m.Header.Type != unix.RTM_NEWRULE && m.Header.Type != unix.RTM_DELRULE {
		return RuleUpdate{}, fmt.Errorf("unexpected message type %d on the rule groups", m.Header.Type)
	}
	r, err := nlbatch.ParseRule(m.Data)
	if err != nil {
		return RuleUpdate{}, fmt.Errorf("rule message: %w", err)
	}
	return RuleUpdate{Type: m.Header.Type, Rule: r}, nil
}
