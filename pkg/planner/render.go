package planner

import (
	"fmt"
	"strconv"
	"strings"
)

// Commands renders the plan as the ip commands that would build it from
// nothing: rules first as the kernel lists them, then each table's routes.
// The applier makes the same state with netlink; this is for review.
func (p Plan) Commands(protocol uint8) []string {
	var out []string
	for _, r := range p.Rules {
		out = append(out, "ip "+familyFlag(r.IPv6)+" "+r.Batch(protocol))
	}
	for _, r := range p.Routes {
		out = append(out, "ip "+familyFlag(r.Dst.Addr().Is6())+" "+r.Batch(protocol))
	}
	return out
}

// Batch renders the rule as an `ip -batch` line (without the family flag).
func (r Rule) Batch(protocol uint8) string {
	var b strings.Builder
	fmt.Fprintf(&b, "rule add priority %d", r.Priority)
	if r.Src.IsValid() {
		fmt.Fprintf(&b, " from %s", r.Src)
	}
	if r.Invert {
		b.WriteString(" not")
	}
	if r.Dst.IsValid() {
		fmt.Fprintf(&b, " to %s", r.Dst)
	}
	if r.Mask != 0 {
		fmt.Fprintf(&b, " fwmark %#x/%#x", r.Mark, r.Mask)
	}
	switch {
	case r.IsSkip():
		fmt.Fprintf(&b, " goto %d protocol %d", r.Goto, protocol)
		return b.String()
	case r.Nop:
		fmt.Fprintf(&b, " nop protocol %d", protocol)
		return b.String()
	}
	fmt.Fprintf(&b, " lookup %s", tableName(r.Table))
	if r.SuppressPrefixlen >= 0 {
		fmt.Fprintf(&b, " suppress_prefixlength %d", r.SuppressPrefixlen)
	}
	fmt.Fprintf(&b, " protocol %d", protocol)
	return b.String()
}

// Batch renders the route as an `ip -batch` line (without the family flag).
func (r Route) Batch(protocol uint8) string {
	var b strings.Builder
	b.WriteString("route replace ")
	switch {
	case r.Throw:
		b.WriteString("throw ")
	case r.Backstop:
		b.WriteString("unreachable ")
	}
	fmt.Fprintf(&b, "%s table %d proto %d", r.Dst, r.Table, protocol)
	switch {
	case r.Backstop:
		fmt.Fprintf(&b, " metric %d", uint32(BackstopMetric))
	case r.Throw:
	case len(r.Nexthops) == 1:
		fmt.Fprintf(&b, " via %s dev %s", r.Nexthops[0].Gateway, r.Nexthops[0].LinkName)
	default:
		for _, nh := range r.Nexthops {
			fmt.Fprintf(&b, " nexthop via %s dev %s weight 1", nh.Gateway, nh.LinkName)
		}
	}
	return b.String()
}

func familyFlag(ipv6 bool) string {
	if ipv6 {
		return "-6"
	}
	return "-4"
}

func tableName(t uint32) string {
	if t == MainTable {
		return "main"
	}
	return strconv.FormatUint(uint64(t), 10)
}
