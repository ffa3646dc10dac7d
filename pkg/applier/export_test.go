package applier

import (
	"net/netip"

	"github.com/routing-agent/routing-agent/pkg/planner"
)

// DisableNexthopObjects makes a behave as on a kernel without nexthop
// objects: routes name their gateways (the fallback path).
func (a *Applier) DisableNexthopObjects() { a.nexthopsOff.Store(true) }

// NexthopObjectsOff says whether a writes routes that name their gateways.
func (a *Applier) NexthopObjectsOff() bool { return a.nexthopsOff.Load() }

// ViewRoute is the live route for dst in table as v's state holds it.
func (v *View) ViewRoute(table uint32, dst netip.Prefix) (planner.Route, bool) {
	if v.st == nil {
		return planner.Route{}, false
	}
	return v.st.Route(table, dst)
}
