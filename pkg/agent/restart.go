package agent

import (
	"net/netip"
	"slices"

	"github.com/routing-agent/routing-agent/pkg/applier"
	"github.com/routing-agent/routing-agent/pkg/planner"
)

// gatewaysOutOfUse returns the gateways the agent before this one had
// taken out of the kernel's nexthops because they were down, inferred from
// the installed routes and plan (computed with every gateway healthy). A
// restarted agent starts them Down, so a restart or a rolling update never
// sends traffic to a gateway its predecessor found dead, and rewrites
// nothing that did not change.
//
// The previous agent took a down gateway out of every route that has a live
// one, and kept every gateway of a route whose gateways were all down (fail
// closed). So an installed route that holds some of its planned gateways
// but not all says exactly which were down (those missing) and which were
// not (those present); one that holds them all says they were all up or all
// down, and whichever of its gateways is known decides for the others. A
// gateway found both down and up (its Route changed while no agent ran) is
// not out of use.
//
// known, when not nil, lists the gateways the previous agent reported (its
// NodeRouting): one it never knew was added to a Route while no agent ran;
// it is new, and used at once like any new gateway.
func gatewaysOutOfUse(plan planner.Plan, kernel *applier.State, known map[netip.Addr]bool) []netip.Addr {
	down, up := map[netip.Addr]bool{}, map[netip.Addr]bool{}
	var whole [][]netip.Addr // routes installed with every planned gateway
	for _, want := range plan.Routes {
		if want.Throw || want.Backstop {
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
		var present, missing []netip.Addr
		for _, nh := range want.Nexthops {
			if installed[nh.Gateway] {
				present = append(present, nh.Gateway)
			} else {
				missing = append(missing, nh.Gateway)
			}
		}
		switch {
		case len(present) == 0: // a different set of gateways: the Route changed
		case len(missing) == 0:
			whole = append(whole, present)
		default:
			for _, gw := range present {
				up[gw] = true
			}
			for _, gw := range missing {
				down[gw] = true
			}
		}
	}
	// All up or all down: spread what is known through such routes.
	for changed := true; changed; {
		changed = false
		for _, gws := range whole {
			for _, mark := range []map[netip.Addr]bool{up, down} {
				if !slices.ContainsFunc(gws, func(gw netip.Addr) bool { return mark[gw] }) {
					continue
				}
				for _, gw := range gws {
					if !mark[gw] {
						mark[gw], changed = true, true
					}
				}
			}
		}
	}
	var out []netip.Addr
	for gw := range down {
		if !up[gw] && (known == nil || known[gw]) {
			out = append(out, gw)
		}
	}
	slices.SortFunc(out, func(a, b netip.Addr) int { return a.Compare(b) })
	return out
}
