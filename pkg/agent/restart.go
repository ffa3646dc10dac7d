package agent

import (
	"net/netip"
	"slices"

	"github.com/routing-agent/routing-agent/pkg/applier"
	"github.com/routing-agent/routing-agent/pkg/planner"
)

// gatewaysOutOfUse returns the gateways that plan (computed with every
// gateway healthy) routes through but that the kernel's installed routes
// leave out: the agent before this one took them out because they were
// down, and it takes a down gateway out of every route that uses it. A
// restarted agent starts them Down, so a restart or a rolling update never
// sends traffic to a gateway its predecessor found dead, and rewrites
// nothing that did not change.
//
// A gateway counts as out of use when some installed route keeps other
// planned gateways but not it, and no installed route that plans it has it.
// known, when not nil, lists the gateways the previous agent reported (its
// NodeRouting): one it never knew was added to a Route while no agent ran,
// is not out of use but new, and is used at once like any new gateway.
func gatewaysOutOfUse(plan planner.Plan, kernel *applier.State, known map[netip.Addr]bool) []netip.Addr {
	missing, present := map[netip.Addr]bool{}, map[netip.Addr]bool{}
	for _, want := range plan.Routes {
		if want.Throw {
			continue
		}
		have, ok := kernel.Route(want.Table, want.Dst)
		if !ok || have.Throw {
			continue
		}
		installed := map[netip.Addr]bool{}
		for _, nh := range have.Nexthops {
			installed[nh.Gateway] = true
		}
		var kept, left []netip.Addr
		for _, nh := range want.Nexthops {
			if installed[nh.Gateway] {
				kept = append(kept, nh.Gateway)
				present[nh.Gateway] = true
			} else {
				left = append(left, nh.Gateway)
			}
		}
		if len(kept) > 0 {
			for _, gw := range left {
				missing[gw] = true
			}
		}
	}
	var out []netip.Addr
	for gw := range missing {
		if !present[gw] && (known == nil || known[gw]) {
			out = append(out, gw)
		}
	}
	slices.SortFunc(out, func(a, b netip.Addr) int { return a.Compare(b) })
	return out
}
