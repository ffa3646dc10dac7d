// Package applier makes the kernel match a planner.Plan over netlink: it
// reads what the agent owns (its protocol number, in its table range and
// rule band), diffs it against the plan and writes only the difference, in
// an order that never opens a gap: routes are replaced in place
// (RouteReplace, never delete+add), new rules are added before stale ones
// are removed, and a table is emptied only after its rule is gone.
package applier

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"

	"github.com/go-logr/logr"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/routing-agent/routing-agent/pkg/nlutil"
	"github.com/routing-agent/routing-agent/pkg/planner"
)

// Applier writes plans into one network namespace through a netlink handle.
type Applier struct {
	h     *netlink.Handle
	cfg   planner.Config
	log   logr.Logger
	marks Marker
	// Writes counts every netlink write since the Applier was made.
	Writes Counters
	// view, when set (UseView), is what Apply diffs against.
	view *View
}

// Counters count netlink writes by kind.
type Counters struct {
	RouteReplace, RouteDelete, RuleAdd, RuleDelete atomic.Int64
	// Nftables counts writes of the connection-marking table (each one
	// netlink batch).
	Nftables atomic.Int64
}

// Total is the number of writes of every kind.
func (c *Counters) Total() int64 {
	return c.RouteReplace.Load() + c.RouteDelete.Load() + c.RuleAdd.Load() + c.RuleDelete.Load() + c.Nftables.Load()
}

// Marker keeps the agent's nftables table (pkg/connmark) as a plan says:
// nil removes it. Apply reports whether it wrote anything.
type Marker interface {
	Apply(m *planner.ConnMark) (changed bool, err error)
}

// SetMarker makes the Applier manage the connection-marking table through
// m, which must write into the same network namespace as its handle.
// Without one, Apply leaves nftables alone.
func (a *Applier) SetMarker(m Marker) { a.marks = m }

// New returns an Applier that writes through h with the table range, band
// and protocol of cfg.
func New(h *netlink.Handle, cfg planner.Config, log logr.Logger) *Applier {
	return &Applier{h: h, cfg: cfg, log: log}
}

// Report says what one Apply found and did.
type Report struct {
	// Changes is the number of netlink writes made.
	Changes int
	// Foreign are rules inside the band the agent did not create; they are
	// left alone.
	Foreign []string
	// Rejected holds, by table, the routes the kernel refused to install.
	// Their destinations fail closed behind their backstops; they are the
	// Route's problem, reported on it, not the node's.
	Rejected map[uint32][]Rejection
	// MarkCollisions are rules of others that use the connection mark bit.
	MarkCollisions []string
	// Marking is whether the connection-marking table is in place (with a
	// Marker, and a plan that has one).
	Marking bool
	// MarkingErr is why it is not, when writing it failed.
	MarkingErr error
}

// Rejection is one route the kernel refused.
type Rejection struct {
	Route planner.Route
	Err   error
}

// Apply makes the kernel match plan. It keeps going past a failed write so
// one bad route cannot hold back the others. Routes the kernel refuses to
// install are in the Report; every other failure is in the error.
//
// The order never lets a Route's traffic through main's default route:
//
//  1. tables are filled (live routes and their backstops) before a rule
//     points at them;
//  2. missing rules are added;
//  3. only then throw routes, which hand a more specific prefix from one
//     Route's table on to the rules after it: the table that holds it is
//     reachable by now;
//  4. throws that hand over to a Route that is going go before its rule;
//  5. stale and doubled rules go;
//  6. last, the routes nobody wants (live ones before their backstops, a
//     supernet before the throws carved out of it), among them the
//     routes of tables no rule leads to any more.
func (a *Applier) Apply(plan planner.Plan) (Report, error) {
	if a.view != nil {
		return a.view.apply(plan)
	}
	actual, err := a.Read()
	if err != nil {
		return Report{}, err
	}
	return a.applyTo(plan, actual)
}

func (a *Applier) applyTo(plan planner.Plan, actual *State) (Report, error) {
	rep := Report{Foreign: actual.Foreign, MarkCollisions: actual.MarkUsers}
	// The marks first: the fwmark rule added below is of use at once. A
	// table that cannot be written leaves replies to the source rules and
	// is reported; it holds back nothing else.
	if a.marks != nil {
		changed, err := a.marks.Apply(plan.ConnMark)
		switch {
		case err != nil:
			rep.MarkingErr = err
			a.log.Error(err, "writing the connection-marking table")
		case changed:
			rep.Changes++
			a.Writes.Nftables.Add(1)
			a.log.Info("kernel change", "op", "nftables table "+planner.ConnMarkTable, "marking", plan.ConnMark != nil)
		}
		rep.Marking = err == nil && plan.ConnMark != nil
	}
	var errs []error
	do := func(what string, op func() error, counter *atomic.Int64) error {
		if err := op(); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		counter.Add(1)
		rep.Changes++
		a.log.Info("kernel change", "op", what)
		return nil
	}
	replace := func(r planner.Route) {
		if have, ok := actual.Routes[keyOf(r)]; ok && sameRoute(have, r) {
			return
		}
		nl := a.toNetlinkRoute(r)
		if err := do(r.Batch(a.cfg.Protocol), func() error { return a.h.RouteReplace(nl) }, &a.Writes.RouteReplace); err != nil {
			if rep.Rejected == nil {
				rep.Rejected = map[uint32][]Rejection{}
			}
			rep.Rejected[r.Table] = append(rep.Rejected[r.Table], Rejection{Route: r, Err: err})
		}
	}
	remove := func(key routeKey) {
		nl := a.toNetlinkRoute(actual.Routes[key])
		nl.Priority = actual.metrics[key]
		what := fmt.Sprintf("route del %s table %d", key.Dst, key.Table)
		if key.Backstop {
			what = fmt.Sprintf("route del unreachable %s table %d metric %d", key.Dst, key.Table, uint32(planner.BackstopMetric))
		}
		if err := do(what, func() error { return a.h.RouteDel(nl) }, &a.Writes.RouteDelete); err != nil {
			errs = append(errs, err)
		}
	}

	wanted := make(map[routeKey]bool, len(plan.Routes))
	for _, r := range plan.Routes {
		wanted[keyOf(r)] = true
	}
	// 1. Fill and repair tables.
	for _, r := range plan.Routes {
		if !r.Throw {
			replace(r)
		}
	}
	// 2. Add missing rules.
	wantedRules := map[string]bool{}
	for _, r := range plan.Rules {
		key := a.ruleKey(r)
		wantedRules[key] = true
		if len(actual.Rules[key]) > 0 {
			continue
		}
		nl := a.toNetlinkRule(r)
		if err := do(key, func() error { return a.h.RuleAdd(nl) }, &a.Writes.RuleAdd); err != nil {
			errs = append(errs, err)
		}
	}
	// 3. Throws, now that the tables they hand over to are reachable.
	for _, r := range plan.Routes {
		if r.Throw {
			replace(r)
		}
	}
	// A stale throw whose prefix no wanted table holds any more hands over
	// to a Route that is going: it goes first (step 4), or its prefix would
	// be thrown on to main once that Route's rule is gone. Every other
	// stale throw goes with the stale routes (step 6), after the supernet
	// it carves out of (sortedRouteKeys puts a supernet first) or after
	// its own table's rule, so longest-prefix match holds throughout.
	held := map[netip.Prefix]bool{}
	for _, r := range plan.Routes {
		if !r.Throw && !r.Backstop {
			held[r.Dst] = true
		}
	}
	var early, late []routeKey
	for _, key := range sortedRouteKeys(actual.Routes, wanted) {
		switch {
		case actual.Routes[key].Throw && !held[key.Dst]:
			early = append(early, key)
		default:
			late = append(late, key)
		}
	}
	// 4. Throws that hand over to a Route that is going.
	for _, key := range early {
		remove(key)
	}
	// 5. Stale and doubled rules.
	for _, key := range sortedKeys(actual.Rules) {
		have := actual.Rules[key]
		extra := have
		if wantedRules[key] {
			extra = have[1:]
		}
		for _, r := range extra {
			nl := a.toNetlinkRule(r)
			if err := do(strings.Replace(key, "rule add", "rule del", 1), func() error { return a.h.RuleDel(nl) }, &a.Writes.RuleDelete); err != nil {
				errs = append(errs, err)
			}
		}
	}
	// 6. Routes nobody wants any more, live before backstop
	// (sortedRouteKeys), and the remaining throws.
	for _, key := range late {
		remove(key)
	}
	return rep, errors.Join(errs...)
}

// Cleanup removes everything the agent owns, and nothing else.
func (a *Applier) Cleanup() (Report, error) {
	return a.Apply(planner.Plan{})
}

// RemoveLayout removes what an agent running with the table range, band
// and protocol of old left in the kernel, except what this Applier owns
// itself: after --priority-base, --protocol or the table range change, the
// previous agent's rules and routes would otherwise stay for good. Call it
// once the current plan is applied, so the new rules are in place before
// the old ones go; like Apply, it removes rules before the routes of their
// tables.
func (a *Applier) RemoveLayout(old planner.Config) (Report, error) {
	prev := &Applier{h: a.h, cfg: old, log: a.log}
	st, err := prev.Read()
	if err != nil {
		return Report{}, err
	}
	ours := old.Protocol == a.cfg.Protocol
	for key, rules := range st.Rules {
		if ours && rules[0].Priority >= a.cfg.PriorityBase && rules[0].Priority < a.cfg.PriorityBase+planner.BandWidth {
			delete(st.Rules, key)
		}
	}
	for key := range st.Routes {
		if ours && key.Table >= a.cfg.TableMin && key.Table <= a.cfg.TableMax {
			delete(st.Routes, key)
		}
	}
	rep, err := prev.applyTo(planner.Plan{}, st)
	a.Writes.RuleDelete.Add(prev.Writes.RuleDelete.Load())
	a.Writes.RouteDelete.Add(prev.Writes.RouteDelete.Load())
	rep.Foreign = nil // the old band's strangers are not this band's
	if a.view != nil && rep.Changes > 0 {
		a.view.Invalidate() // rare: the old band may overlap this one
	}
	return rep, err
}

func sameRoute(have, want planner.Route) bool {
	if have.Throw != want.Throw || have.Backstop != want.Backstop || len(have.Nexthops) != len(want.Nexthops) {
		return false
	}
	for i := range have.Nexthops {
		if have.Nexthops[i].Gateway != want.Nexthops[i].Gateway || have.Nexthops[i].LinkIndex != want.Nexthops[i].LinkIndex {
			return false
		}
	}
	return true
}

func (a *Applier) toNetlinkRoute(r planner.Route) *netlink.Route {
	nl := &netlink.Route{
		Table:    int(r.Table),
		Dst:      nlutil.IPNet(r.Dst),
		Protocol: netlink.RouteProtocol(a.cfg.Protocol),
		Family:   family(r.Dst.Addr()),
	}
	switch {
	case r.Throw:
		nl.Type = unix.RTN_THROW
	case r.Backstop:
		nl.Type, nl.Priority = unix.RTN_UNREACHABLE, int(planner.BackstopMetric)
	case len(r.Nexthops) == 1:
		nl.Gw, nl.LinkIndex = net.IP(r.Nexthops[0].Gateway.AsSlice()), r.Nexthops[0].LinkIndex
	default:
		for _, nh := range r.Nexthops {
			nl.MultiPath = append(nl.MultiPath, &netlink.NexthopInfo{LinkIndex: nh.LinkIndex, Gw: net.IP(nh.Gateway.AsSlice())})
		}
	}
	return nl
}

func (a *Applier) toNetlinkRule(r planner.Rule) *netlink.Rule {
	nl := netlink.NewRule()
	nl.Priority = r.Priority
	nl.Table = int(r.Table)
	nl.Protocol = a.cfg.Protocol
	nl.SuppressPrefixlen = r.SuppressPrefixlen
	nl.Family = netlink.FAMILY_V4
	if r.IPv6 {
		nl.Family = netlink.FAMILY_V6
	}
	if r.Src.IsValid() {
		nl.Src = nlutil.IPNet(r.Src)
	}
	if r.Dst.IsValid() {
		nl.Dst = nlutil.IPNet(r.Dst)
	}
	if r.Mask != 0 {
		mask := r.Mask
		nl.Mark, nl.Mask = r.Mark, &mask
	}
	if r.IsSkip() {
		nl.Table, nl.Goto, nl.Invert = -1, r.Goto, r.Invert
	}
	return nl
}

func family(a netip.Addr) int {
	if a.Is6() {
		return netlink.FAMILY_V6
	}
	return netlink.FAMILY_V4
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// sortedRouteKeys are the keys of m less those of skip, sorted: only
// those are sorted, so a diff with little to remove costs little.
func sortedRouteKeys(m map[routeKey]planner.Route, skip map[routeKey]bool) []routeKey {
	var keys []routeKey
	for k := range m {
		if !skip[k] {
			keys = append(keys, k)
		}
	}
	slices.SortFunc(keys, func(a, b routeKey) int {
		return planner.CompareRoutes(planner.Route{Table: a.Table, Dst: a.Dst, Backstop: a.Backstop}, planner.Route{Table: b.Table, Dst: b.Dst, Backstop: b.Backstop})
	})
	return keys
}

// EnsureBypass adds, without touching anything else, the bypass rule
// (`to <addr> lookup main`, first in the band) of each address of a family
// in which the agent already has rules: what a newly learned control-plane
// address needs before the agent dials it, also before its caches have
// synced, when Apply may not yet run. It never removes anything; the next
// Apply keeps the rules when the plan has them and removes them otherwise.
func (a *Applier) EnsureBypass(addrs []netip.Addr) (added int, err error) {
	st, err := a.Read()
	if err != nil {
		return 0, err
	}
	inUse := map[bool]bool{}
	for _, rules := range st.Rules {
		inUse[rules[0].IPv6] = true
	}
	var errs []error
	for _, addr := range addrs {
		dst, ok := planner.BypassPrefix(addr)
		if !ok {
			continue
		}
		r := planner.Rule{Priority: a.cfg.PriorityBase + planner.OffsetBypass, IPv6: dst.Addr().Is6(), Dst: dst, Table: planner.MainTable, SuppressPrefixlen: -1}
		if !inUse[r.IPv6] || len(st.Rules[a.ruleKey(r)]) > 0 {
			continue
		}
		what := r.Batch(a.cfg.Protocol)
		if err := a.h.RuleAdd(a.toNetlinkRule(r)); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", what, err))
			continue
		}
		a.Writes.RuleAdd.Add(1)
		a.log.Info("kernel change", "op", what, "why", "control-plane address learned")
		added++
	}
	if added > 0 && a.view != nil {
		a.view.rulesWritten()
	}
	return added, errors.Join(errs...)
}
