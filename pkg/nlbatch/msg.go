// Package nlbatch serializes the rtnetlink requests the applier makes
// (routes, rules, nexthop objects) and sends many of them per sendmsg on a
// socket of its own, collecting the kernel's answers afterwards and
// mapping each error back to the request that caused it. It also dumps
// routes and nexthop objects with the attributes package netlink v1.3.1
// does not parse (RTA_NH_ID, RTM_NEWNEXTHOP).
//
// Rules and nexthop objects are built with package netlink/nl's helpers
// (RtMsg, RtAttr; struct nhmsg by hand); routes, the bulk of a cold apply,
// are appended straight into one buffer each. Parsing uses nl's attribute
// parser. mdlayher/netlink was not used: its Receive turns an error answer
// into an error without the sequence number it answers, and this package
// needs exactly that mapping.
package nlbatch

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"unsafe"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// Attributes and constants golang.org/x/sys/unix lacks or names
// differently (include/uapi/linux/nexthop.h, fib_rules.h, rtnetlink.h).
const (
	rtaNHID = 30 // RTA_NH_ID

	nhaID        = 1 // NHA_ID
	nhaGroup     = 2 // NHA_GROUP
	nhaGroupType = 3 // NHA_GROUP_TYPE
	nhaBlackhole = 4 // NHA_BLACKHOLE
	nhaOIF       = 5 // NHA_OIF
	nhaGateway   = 6 // NHA_GATEWAY

	nexthopGrpTypeMpath = 0 // NEXTHOP_GRP_TYPE_MPATH

	fibRuleUnresolved = 0x4 // FIB_RULE_UNRESOLVED
	fibRuleInvert     = 0x2 // FIB_RULE_INVERT
	frActToTbl        = 1   // FR_ACT_TO_TBL
	frActGoto         = 2   // FR_ACT_GOTO
	frActNop          = 3   // FR_ACT_NOP

	sizeofNhmsg = 8
)

var native = binary.NativeEndian

// Msg is one request, without its netlink header's length and sequence
// number (set when it is sent).
type Msg struct {
	Type  uint16
	Flags uint16
	Body  []byte
}

// Marshal is the request as sent, with sequence number seq.
func (m Msg) Marshal(seq uint32) []byte {
	b := make([]byte, unix.SizeofNlMsghdr+len(m.Body))
	m.marshalInto(b, seq)
	return b
}

func (m Msg) len() int { return unix.SizeofNlMsghdr + len(m.Body) }

func (m Msg) marshalInto(b []byte, seq uint32) {
	native.PutUint32(b[0:4], uint32(m.len()))
	native.PutUint16(b[4:6], m.Type)
	native.PutUint16(b[6:8], m.Flags|unix.NLM_F_REQUEST)
	native.PutUint32(b[8:12], seq)
	native.PutUint32(b[12:16], 0)
	copy(b[unix.SizeofNlMsghdr:], m.Body)
}

func body(parts ...nl.NetlinkRequestData) []byte {
	var b []byte
	for _, p := range parts {
		b = append(b, p.Serialize()...)
	}
	return b
}

func u32(v uint32) []byte {
	b := make([]byte, 4)
	native.PutUint32(b, v)
	return b
}

func attr(t int, data []byte) *nl.RtAttr { return nl.NewRtAttr(t, data) }

// Nexthop is a gateway and the link it is reached through.
type Nexthop struct {
	Gateway   netip.Addr
	LinkIndex int
}

// Route is a route as the applier writes it: a gateway route (one
// nexthop, several for ECMP, or a nexthop object by NHID), a throw or an
// unreachable route.
type Route struct {
	Family   uint8 // unix.AF_INET or unix.AF_INET6
	Table    uint32
	Dst      netip.Prefix
	Protocol uint8
	Type     uint8 // unix.RTN_UNICAST, RTN_THROW, RTN_UNREACHABLE
	// Priority is the metric; 0 leaves it to the kernel.
	Priority uint32
	// NHID points the route at a nexthop object or group instead of
	// Nexthops.
	NHID     uint32
	Nexthops []Nexthop
}

// appendBody appends struct rtmsg and r's attributes to b. Routes are
// the bulk of a cold apply: written straight into one buffer, no
// intermediate attribute objects.
func (r Route) appendBody(b []byte, withNexthops bool) []byte {
	table := uint8(unix.RT_TABLE_UNSPEC)
	if r.Table < 256 {
		table = uint8(r.Table)
	}
	// family, dst_len, src_len, tos, table, protocol, scope, type, flags
	b = append(b, r.Family, uint8(r.Dst.Bits()), 0, 0, table, r.Protocol, unix.RT_SCOPE_UNIVERSE, r.Type, 0, 0, 0, 0)
	b = appendU32(b, unix.RTA_TABLE, r.Table)
	b = appendAddr(b, unix.RTA_DST, r.Dst.Addr())
	if r.Priority != 0 {
		b = appendU32(b, unix.RTA_PRIORITY, r.Priority)
	}
	if !withNexthops {
		return b
	}
	switch {
	case r.NHID != 0:
		b = appendU32(b, rtaNHID, r.NHID)
	case len(r.Nexthops) == 1:
		b = appendAddr(b, unix.RTA_GATEWAY, r.Nexthops[0].Gateway)
		b = appendU32(b, unix.RTA_OIF, uint32(r.Nexthops[0].LinkIndex))
	case len(r.Nexthops) > 1:
		at := len(b)
		b = append(b, 0, 0, 0, 0)
		for _, nh := range r.Nexthops {
			gwLen := 4 + len(nh.Gateway.AsSlice())
			// struct rtnexthop: len, flags, hops (weight 1), ifindex
			b = native.AppendUint16(b, uint16(unix.SizeofRtNexthop+gwLen))
			b = append(b, 0, 0)
			b = native.AppendUint32(b, uint32(nh.LinkIndex))
			b = appendAddr(b, unix.RTA_GATEWAY, nh.Gateway)
		}
		native.PutUint16(b[at:], uint16(len(b)-at))
		native.PutUint16(b[at+2:], unix.RTA_MULTIPATH)
	}
	return b
}

func appendU32(b []byte, typ uint16, v uint32) []byte {
	b = native.AppendUint16(b, 8)
	b = native.AppendUint16(b, typ)
	return native.AppendUint32(b, v)
}

// appendAddr appends an address attribute (4 or 16 bytes: no padding).
func appendAddr(b []byte, typ uint16, a netip.Addr) []byte {
	if a.Is4() {
		v := a.As4()
		b = native.AppendUint16(b, 8)
		b = native.AppendUint16(b, typ)
		return append(b, v[:]...)
	}
	v := a.As16()
	b = native.AppendUint16(b, 20)
	b = native.AppendUint16(b, typ)
	return append(b, v[:]...)
}

// ReplaceRoute is `ip route replace`.
func ReplaceRoute(r Route) Msg {
	return Msg{Type: unix.RTM_NEWROUTE, Flags: unix.NLM_F_CREATE | unix.NLM_F_REPLACE, Body: r.appendBody(make([]byte, 0, 64), true)}
}

// DeleteRoute deletes the route of r's table, destination, type, metric
// and protocol, whatever its nexthops: naming them would miss a route that
// uses a nexthop object (and the reverse).
func DeleteRoute(r Route) Msg {
	return Msg{Type: unix.RTM_DELROUTE, Body: r.appendBody(make([]byte, 0, 48), false)}
}

// Rule is an ip rule with every field the agent's rules use.
type Rule struct {
	Family   uint8
	Priority uint32
	// Table is looked up unless Goto is set.
	Table    uint32
	Protocol uint8
	Src, Dst netip.Prefix
	// Mark and Mask are sent when Mask is not 0.
	Mark, Mask uint32
	// SuppressPrefixlen is -1 when unset.
	SuppressPrefixlen int
	// Goto, when > 0, makes the rule a jump to that priority.
	Goto   uint32
	Invert bool
	// Nop makes the rule do nothing (`nop`): a place for gotos to land.
	Nop bool
	// Other, in a parsed rule, says it has what Rule does not hold: a
	// selector (iif, oif, tos, ports, uid range, ...), another action
	// (blackhole, ...), or a flag but invert. Never one the agent wrote.
	Other bool
}

func (r Rule) msg() []byte {
	// struct fib_rule_hdr has struct rtmsg's layout: table, then
	// res1/res2 where rtmsg has protocol/scope, then action in type.
	hdr := nl.NewRtMsg()
	hdr.Family = r.Family
	hdr.Protocol, hdr.Scope = 0, 0
	hdr.Type = frActToTbl
	hdr.Table = unix.RT_TABLE_UNSPEC
	var attrs []nl.NetlinkRequestData
	if r.Invert {
		hdr.Flags |= fibRuleInvert
	}
	if r.Dst.IsValid() {
		hdr.Dst_len = uint8(r.Dst.Bits())
		attrs = append(attrs, attr(nl.FRA_DST, r.Dst.Addr().AsSlice()))
	}
	if r.Src.IsValid() {
		hdr.Src_len = uint8(r.Src.Bits())
		attrs = append(attrs, attr(nl.FRA_SRC, r.Src.Addr().AsSlice()))
	}
	attrs = append(attrs, attr(nl.FRA_PRIORITY, u32(r.Priority)))
	if r.Mask != 0 {
		attrs = append(attrs, attr(nl.FRA_FWMARK, u32(r.Mark)), attr(nl.FRA_FWMASK, u32(r.Mask)))
	}
	switch {
	case r.Goto > 0:
		hdr.Type = frActGoto
		attrs = append(attrs, attr(nl.FRA_GOTO, u32(r.Goto)))
	case r.Nop:
		hdr.Type = frActNop
	default:
		if r.Table < 256 {
			hdr.Table = uint8(r.Table)
		}
		attrs = append(attrs, attr(nl.FRA_TABLE, u32(r.Table)))
		if r.SuppressPrefixlen >= 0 {
			attrs = append(attrs, attr(nl.FRA_SUPPRESS_PREFIXLEN, u32(uint32(r.SuppressPrefixlen))))
		}
	}
	attrs = append(attrs, attr(nl.FRA_PROTOCOL, []byte{r.Protocol}))
	return body(append([]nl.NetlinkRequestData{hdr}, attrs...)...)
}

// AddRule is `ip rule add`.
func AddRule(r Rule) Msg {
	return Msg{Type: unix.RTM_NEWRULE, Flags: unix.NLM_F_CREATE | unix.NLM_F_EXCL, Body: r.msg()}
}

// DeleteRule is `ip rule del` of a rule with every field of r.
func DeleteRule(r Rule) Msg { return Msg{Type: unix.RTM_DELRULE, Body: r.msg()} }

// NexthopObject is a kernel nexthop object: a gateway on a link, or a
// group (multipath, equal weights) of other objects.
type NexthopObject struct {
	ID       uint32
	Protocol uint8
	// Family is AF_INET or AF_INET6 for a gateway, AF_UNSPEC for a group.
	Family    uint8
	Gateway   netip.Addr
	LinkIndex int
	Group     []uint32
	Blackhole bool
	// Flags are the kernel's nexthop flags (RTNH_F_DEAD, ...), when read.
	Flags uint32
}

type nhmsg struct {
	family, scope, protocol uint8
	flags                   uint32
}

func (m nhmsg) Len() int { return sizeofNhmsg }
func (m nhmsg) Serialize() []byte {
	b := make([]byte, sizeofNhmsg)
	b[0], b[1], b[2] = m.family, m.scope, m.protocol
	native.PutUint32(b[4:8], m.flags)
	return b
}

// ReplaceNexthop creates the nexthop object n, or replaces the one with
// its id (`ip nexthop replace`).
func ReplaceNexthop(n NexthopObject) Msg {
	parts := []nl.NetlinkRequestData{nhmsg{family: n.Family, protocol: n.Protocol}, attr(nhaID, u32(n.ID))}
	switch {
	case len(n.Group) > 0:
		grp := make([]byte, 8*len(n.Group))
		for i, id := range n.Group {
			native.PutUint32(grp[8*i:], id) // weight 0 means 1
		}
		parts = append(parts, attr(nhaGroup, grp), attr(nhaGroupType, []byte{nexthopGrpTypeMpath, 0}))
	case n.Blackhole:
		parts = append(parts, attr(nhaBlackhole, nil))
	default:
		parts = append(parts, attr(nhaOIF, u32(uint32(n.LinkIndex))), attr(nhaGateway, n.Gateway.AsSlice()))
	}
	return Msg{Type: unix.RTM_NEWNEXTHOP, Flags: unix.NLM_F_CREATE | unix.NLM_F_REPLACE, Body: body(parts...)}
}

// DeleteNexthop removes the nexthop object id; the kernel removes it from
// its groups and deletes the routes that use it.
func DeleteNexthop(id uint32) Msg {
	return Msg{Type: unix.RTM_DELNEXTHOP, Body: body(nhmsg{}, attr(nhaID, u32(id)))}
}

// ParseRoute reads an RTM_NEWROUTE message (without its netlink header).
func ParseRoute(b []byte) (Route, error) {
	if len(b) < unix.SizeofRtMsg {
		return Route{}, fmt.Errorf("route message of %d bytes", len(b))
	}
	m := nl.DeserializeRtMsg(b)
	r := Route{Family: m.Family, Table: uint32(m.Table), Protocol: m.Protocol, Type: m.Type}
	attrs, err := nl.ParseRouteAttr(b[unix.SizeofRtMsg:])
	if err != nil {
		return Route{}, err
	}
	var gw netip.Addr
	oif := 0
	for _, a := range attrs {
		switch a.Attr.Type {
		case unix.RTA_TABLE:
			r.Table = native.Uint32(a.Value)
		case unix.RTA_DST:
			addr, _ := netip.AddrFromSlice(a.Value)
			r.Dst = netip.PrefixFrom(addr, int(m.Dst_len))
		case unix.RTA_PRIORITY:
			r.Priority = native.Uint32(a.Value)
		case rtaNHID:
			r.NHID = native.Uint32(a.Value)
		case unix.RTA_GATEWAY:
			gw, _ = netip.AddrFromSlice(a.Value)
		case unix.RTA_OIF:
			oif = int(native.Uint32(a.Value))
		case unix.RTA_MULTIPATH:
			nhs, err := parseMultipath(a.Value)
			if err != nil {
				return Route{}, err
			}
			r.Nexthops = append(r.Nexthops, nhs...)
		}
	}
	if !r.Dst.IsValid() {
		zero := netip.IPv4Unspecified()
		if r.Family == unix.AF_INET6 {
			zero = netip.IPv6Unspecified()
		}
		r.Dst = netip.PrefixFrom(zero, int(m.Dst_len))
	}
	if gw.IsValid() {
		r.Nexthops = append(r.Nexthops, Nexthop{Gateway: gw, LinkIndex: oif})
	}
	return r, nil
}

func parseMultipath(b []byte) ([]Nexthop, error) {
	var out []Nexthop
	for len(b) >= unix.SizeofRtNexthop {
		l := int(native.Uint16(b[0:2]))
		if l < unix.SizeofRtNexthop || l > len(b) {
			return nil, fmt.Errorf("RTA_MULTIPATH entry of %d bytes in %d", l, len(b))
		}
		nh := Nexthop{LinkIndex: int(native.Uint32(b[4:8]))}
		attrs, err := nl.ParseRouteAttr(b[unix.SizeofRtNexthop:l])
		if err != nil {
			return nil, err
		}
		for _, a := range attrs {
			if a.Attr.Type == unix.RTA_GATEWAY {
				nh.Gateway, _ = netip.AddrFromSlice(a.Value)
			}
		}
		out = append(out, nh)
		b = b[rtaAlign(l):]
	}
	return out, nil
}

func rtaAlign(l int) int { return (l + unix.RTA_ALIGNTO - 1) &^ (unix.RTA_ALIGNTO - 1) }

// ParseRule reads an RTM_NEWRULE or RTM_DELRULE message (without its
// netlink header): struct fib_rule_hdr, which has struct rtmsg's layout,
// then attributes.
func ParseRule(b []byte) (Rule, error) {
	if len(b) < unix.SizeofRtMsg {
		return Rule{}, fmt.Errorf("rule message of %d bytes", len(b))
	}
	m := nl.DeserializeRtMsg(b)
	r := Rule{Family: m.Family, Table: uint32(m.Table), Invert: m.Flags&fibRuleInvert != 0, SuppressPrefixlen: -1}
	// FIB_RULE_UNRESOLVED is the kernel's note on a goto whose target is
	// missing, not part of the rule.
	r.Other = m.Tos != 0 || m.Flags&^(fibRuleInvert|fibRuleUnresolved) != 0
	attrs, err := nl.ParseRouteAttr(b[unix.SizeofRtMsg:])
	if err != nil {
		return Rule{}, err
	}
	u32 := func(v []byte) (uint32, error) {
		if len(v) != 4 {
			return 0, fmt.Errorf("rule attribute of %d bytes, want 4", len(v))
		}
		return native.Uint32(v), nil
	}
	for _, a := range attrs {
		var v uint32
		switch a.Attr.Type {
		case nl.FRA_DST, nl.FRA_SRC:
			addr, ok := netip.AddrFromSlice(a.Value)
			if !ok {
				return Rule{}, fmt.Errorf("rule address of %d bytes", len(a.Value))
			}
			if a.Attr.Type == nl.FRA_DST {
				r.Dst = netip.PrefixFrom(addr, int(m.Dst_len))
			} else {
				r.Src = netip.PrefixFrom(addr, int(m.Src_len))
			}
		case nl.FRA_PROTOCOL:
			if len(a.Value) != 1 {
				return Rule{}, fmt.Errorf("rule protocol of %d bytes", len(a.Value))
			}
			r.Protocol = a.Value[0]
		case nl.FRA_PRIORITY, nl.FRA_TABLE, nl.FRA_FWMARK, nl.FRA_FWMASK, nl.FRA_SUPPRESS_PREFIXLEN, nl.FRA_GOTO, nl.FRA_SUPPRESS_IFGROUP:
			if v, err = u32(a.Value); err != nil {
				return Rule{}, err
			}
			switch a.Attr.Type {
			case nl.FRA_PRIORITY:
				r.Priority = v
			case nl.FRA_TABLE:
				r.Table = v
			case nl.FRA_FWMARK:
				r.Mark = v
			case nl.FRA_FWMASK:
				r.Mask = v
			case nl.FRA_SUPPRESS_PREFIXLEN:
				r.SuppressPrefixlen = int(int32(v))
			case nl.FRA_GOTO:
				r.Goto = v
			case nl.FRA_SUPPRESS_IFGROUP:
				// The kernel sends it only when set (not -1).
				r.Other = r.Other || int32(v) != -1
			}
		default:
			r.Other = true
		}
	}
	switch m.Type {
	case frActToTbl:
	case frActGoto:
		r.Table = 0
	case frActNop:
		r.Table, r.Nop = 0, true
	default:
		r.Other = true
	}
	return r, nil
}

// ParseNexthop reads an RTM_NEWNEXTHOP message (without its netlink
// header).
func ParseNexthop(b []byte) (NexthopObject, error) {
	if len(b) < sizeofNhmsg {
		return NexthopObject{}, fmt.Errorf("nexthop message of %d bytes", len(b))
	}
	n := NexthopObject{Family: b[0], Protocol: b[2], Flags: native.Uint32(b[4:8])}
	attrs, err := nl.ParseRouteAttr(b[sizeofNhmsg:])
	if err != nil {
		return NexthopObject{}, err
	}
	for _, a := range attrs {
		switch a.Attr.Type &^ unix.NLA_F_NESTED {
		case nhaID:
			n.ID = native.Uint32(a.Value)
		case nhaGroup:
			for i := 0; i+8 <= len(a.Value); i += 8 {
				n.Group = append(n.Group, native.Uint32(a.Value[i:]))
			}
		case nhaBlackhole:
			n.Blackhole = true
		case nhaOIF:
			n.LinkIndex = int(native.Uint32(a.Value))
		case nhaGateway:
			n.Gateway, _ = netip.AddrFromSlice(a.Value)
		}
	}
	return n, nil
}

// parseHeader splits one netlink message off b.
func parseHeader(b []byte) (unix.NlMsghdr, []byte, []byte, error) {
	if len(b) < unix.SizeofNlMsghdr {
		return unix.NlMsghdr{}, nil, nil, fmt.Errorf("netlink message of %d bytes", len(b))
	}
	h := *(*unix.NlMsghdr)(unsafe.Pointer(&b[0]))
	if int(h.Len) < unix.SizeofNlMsghdr || int(h.Len) > len(b) {
		return unix.NlMsghdr{}, nil, nil, fmt.Errorf("netlink message length %d of %d bytes", h.Len, len(b))
	}
	next := (int(h.Len) + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1)
	if next > len(b) {
		next = len(b)
	}
	return h, b[unix.SizeofNlMsghdr:h.Len], b[next:], nil
}
