package kernelwatch

import (
	"fmt"
	"syscall"

	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// RuleUpdate is one ip rule notification.
type RuleUpdate struct {
	// Type is unix.RTM_NEWRULE or unix.RTM_DELRULE.
	Type uint16
	// Family is unix.AF_INET or unix.AF_INET6.
	Family int
	// Priority is the rule's preference; 0 when it has none.
	Priority int
	// Table is the table the rule looks up; 0 for rules without one.
	Table int
	// Protocol is the rule's originator (`protocol` in ip rule).
	Protocol uint8
	// Mark and Mask are the rule's fwmark and its mask; 0 when it has
	// none (the kernel reports the mask of every fwmark rule).
	Mark, Mask uint32
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

// fibRuleHdrLen is the size of struct fib_rule_hdr
// (include/uapi/linux/fib_rules.h), which leads every rule message: family,
// dst_len, src_len, tos, table, res1, res2, action (one byte each), flags
// (four).
const fibRuleHdrLen = 12

// parseRule decodes an RTM_NEWRULE or RTM_DELRULE message.
func parseRule(m syscall.NetlinkMessage) (RuleUpdate, error) {
	if m.Header.Type != unix.RTM_NEWRULE && m.Header.Type != unix.RTM_DELRULE {
		return RuleUpdate{}, fmt.Errorf("unexpected message type %d on the rule groups", m.Header.Type)
	}
	if len(m.Data) < fibRuleHdrLen {
		return RuleUpdate{}, fmt.Errorf("rule message of %d bytes, shorter than its header", len(m.Data))
	}
	u := RuleUpdate{Type: m.Header.Type, Family: int(m.Data[0]), Table: int(m.Data[4])}
	attrs, err := nl.ParseRouteAttr(m.Data[fibRuleHdrLen:])
	if err != nil {
		return RuleUpdate{}, fmt.Errorf("rule message attributes: %w", err)
	}
	native := nl.NativeEndian()
	for _, a := range attrs {
		switch {
		case a.Attr.Type == unix.FRA_PRIORITY && len(a.Value) == 4:
			u.Priority = int(native.Uint32(a.Value))
		case a.Attr.Type == unix.FRA_TABLE && len(a.Value) == 4:
			// The header's byte holds only tables below 256.
			u.Table = int(native.Uint32(a.Value))
		case a.Attr.Type == unix.FRA_PROTOCOL && len(a.Value) == 1:
			u.Protocol = a.Value[0]
		case a.Attr.Type == unix.FRA_FWMARK && len(a.Value) == 4:
			u.Mark = native.Uint32(a.Value)
		case a.Attr.Type == unix.FRA_FWMASK && len(a.Value) == 4:
			u.Mask = native.Uint32(a.Value)
		}
	}
	return u, nil
}
