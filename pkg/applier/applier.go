// Package applier makes the kernel match a planner.Plan over netlink: it
// reads what the agent owns (its protocol number, in its table range and
// rule band), diffs it against the plan and writes only the difference, in
// an order that never opens a gap: routes are replaced in place
// (RouteReplace, never delete+add), new rules are added before stale ones
// are removed, and a table is emptied only after its rule is gone.
package applier

import (
	"cmp"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/routing-agent/routing-agent/pkg/nlbatch"
	"github.com/routing-agent/routing-agent/pkg/nlutil"
	"github.com/routing-agent/routing-agent/pkg/planner"
)

// Applier writes plans into one network namespace through a netlink handle.
type Applier struct {
	h     *netlink.Handle
	cfg   planner.Config
	log   logr.Logger
	marks Marker
	// conn, set by SetNamespace, sends requests in batches.
	conn *nlbatch.Conn
	// nexthopsOff: the kernel has no nexthop objects (or a test says so).
	nexthopsOff atomic.Bool
	// Writes counts every netlink write since the Applier was made.
	Writes Counters
	// view, when set (UseView), is what Apply diffs against; settled is
	// the last apply through it that wrote all it had to (scope.go).
	view    *View
	settled *settled
	// gateways interns the gateway lists of the routes read.
	gateways gatewaySets
}

// Counters count netlink writes by kind.
type Counters struct {
	RouteReplace, RouteDelete, RuleAdd, RuleDelete atomic.Int64
	// NexthopReplace and NexthopDelete count writes of nexthop objects
	// (gateways and groups; see planner.Nexthops).
	NexthopReplace, NexthopDelete atomic.Int64
	// Nftables counts writes of the connection-marking table (each one
	// netlink batch).
	Nftables atomic.Int64
}

// Total is the number of writes of every kind.
func (c *Counters) Total() int64 {
	return c.RouteReplace.Load() + c.RouteDelete.Load() + c.RuleAdd.Load() + c.RuleDelete.Load() + c.Nftables.Load() +
		c.NexthopReplace.Load() + c.NexthopDelete.Load()
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
	// NexthopsIn is how long after Apply was called the nexthop groups
	// held the plan's live gateways: a gateway going down or coming back
	// is complete in the kernel then. 0 without nexthop objects.
	NexthopsIn time.Duration
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
//  0. stale skips and exits of the dispatch go, new gate entries come (a
//     packet then walks more rules, never past its Route's);
//  1. tables are filled (live routes and their backstops) before a rule
//     points at them;
//  2. missing rules are added;
//  3. only then throw routes, which hand a more specific prefix from one
//     Route's table on to the rules after it: the table that holds it is
//     reachable by now;
//  4. throws that hand over to a Route that is going go before its rule;
//  5. stale and doubled rules go, stale gate entries last, and only then
//     missing skips and exits are added;
//  6. last, the routes nobody wants (live ones before their backstops, a
//     supernet before the throws carved out of it), among them the
//     routes of tables no rule leads to any more.
//
// With nexthop objects (SetNamespace, on a kernel that has them) a phase
// comes before all of this, and before reading the kernel: the gateway
// objects the plan needs are made and each table's group gets the plan's
// live gateways (syncNexthops); the routes of step 1 then point at the
// groups. Last, objects the plan no longer uses go (collectNexthops).
// Every step's writes go to the kernel together (writer); no step starts
// before the previous one's are done.
func (a *Applier) Apply(plan planner.Plan) (Report, error) {
	begin := time.Now()
	v := a.view
	if v != nil {
		v.planned(plan) // before any write: their notifications compare with it
	}
	var pre Report
	var preErrs []error
	nhs := a.syncNexthops(plan, &writer{a: a, rep: &pre, errs: &preErrs})
	if nhs != nil {
		pre.NexthopsIn = time.Since(begin)
	}
	var actual *State
	var sc *scope
	var err error
	if v != nil {
		// The tables of the groups just written are read again: their
		// routes now resolve to other gateways, with or without a route
		// notification (the kernel sends those only in
		// net.ipv4.nexthop_compat_mode).
		v.nexthopsWritten(nhs, 0)
		var read reread
		actual, read, err = v.state(nhs)
		if sc = diffScope(a.settled, plan, nhs, read); sc != nil {
			sc.byTable = v.byTable
		}
	} else {
		actual, err = a.Read()
	}
	a.settled = nil // until this apply has written all it had to
	if err != nil {
		return pre, errors.Join(append(preErrs, err)...)
	}
	w := &a.Writes
	routeWrites := w.RouteReplace.Load() + w.RouteDelete.Load()
	rep, err := a.applyTo(plan, actual, nhs, sc)
	if v != nil {
		// A write that failed changed nothing: only successful ones (which
		// the counters count) make the view stale.
		v.wrote(plan, actual, nhs, sc, w.RouteReplace.Load()+w.RouteDelete.Load() != routeWrites)
	}
	rep.Changes += pre.Changes
	rep.NexthopsIn = pre.NexthopsIn
	if err == nil && len(rep.Rejected) == 0 && len(preErrs) == 0 {
		// Only after a clean apply: a route that failed to move off an
		// object would go with it.
		synced := 0
		if nhs != nil {
			synced = len(nhs.changed)
		}
		a.collectNexthops(nhs, &writer{a: a, rep: &rep, errs: &preErrs}, outsideRange(a.cfg), false)
		if v != nil {
			// Deleting an object deletes the routes through it, IPv4 ones
			// without a notification.
			v.nexthopsWritten(nhs, synced)
		}
	}
	if v != nil && nhs != nil {
		v.wroteNexthops(nhs.all)
	}
	if v != nil && err == nil && len(rep.Rejected) == 0 && len(preErrs) == 0 {
		var groups map[planner.TableFamily]uint32
		if nhs != nil {
			groups = nhs.groups // this apply's own, done with: no copy
		}
		a.settled = &settled{routes: plan.Routes, rules: plan.Rules, groups: groups}
	}
	return rep, errors.Join(append(preErrs, err)...)
}

// applyTo writes what it takes to make actual plan, within sc (nil: all).
func (a *Applier) applyTo(plan planner.Plan, actual *State, nhs *nexthopState, sc *scope) (Report, error) {
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
	w := &writer{a: a, rep: &rep, errs: &errs}
	replace := func(r planner.Route) {
		nhid := nhs.groupOf(r)
		if actual.installed(r, nhid) {
			return
		}
		x := a.routeWrite(r, nhid)
		x.failed = func(err error) {
			if rep.Rejected == nil {
				rep.Rejected = map[uint32][]Rejection{}
			}
			rep.Rejected[r.Table] = append(rep.Rejected[r.Table], Rejection{Route: r, Err: err})
		}
		w.add(x)
	}
	remove := func(key routeKey) {
		w.add(a.routeRemoval(actual.Routes[key], actual.attrs[key].metric))
	}

	// Only the routes of the tables in scope are compared.
	routes := plan.Routes
	if sc != nil {
		routes = make([]planner.Route, 0, 16)
		for _, r := range plan.Routes {
			if sc.table(r.Table) {
				routes = append(routes, r)
			}
		}
	}
	wanted := make(map[routeKey]bool, len(routes))
	for _, r := range routes {
		wanted[keyOf(r)] = true
	}
	var wantedRules map[ruleKey]bool
	// The rules to remove, in a stable order: those the plan does not
	// want, and duplicates. Only they are sorted, so a diff with little to
	// remove costs little.
	var stale []ruleKey
	// The rules to add if missing: the plan's, or only those it has more
	// than the settled plan whose rules the kernel holds.
	toAdd := plan.Rules
	switch d := sc.delta(); {
	case d != nil:
		stale, wantedRules, toAdd = d.stale, d.kept, d.added // this apply's own
	case sc.hasRules():
		wantedRules = make(map[ruleKey]bool, len(plan.Rules))
		for _, r := range plan.Rules {
			wantedRules[keyOfRule(r)] = true
		}
		for key, have := range actual.Rules {
			if !wantedRules[key] || len(have) > 1 {
				stale = append(stale, key)
			}
		}
	}
	slices.SortFunc(stale, compareRuleKeys)
	// Rules come in three kinds for the order they are written in: jumps
	// that take packets past rules (the dispatch's skips, the gate's exit)
	// go first and come last; the gate's entries, which let packets in,
	// come first and go last; the rest in between.
	kind := func(r planner.Rule) int {
		switch {
		case r.Narrows():
			return narrowing
		case r.Widens():
			return widening
		}
		return plain
	}
	removeAll := func(k int) {
		for _, key := range stale {
			have := actual.Rules[key]
			// Through a view, actual takes each write as it is done: a key
			// removed in an earlier step has nothing left.
			if len(have) == 0 || kind(have[0]) != k {
				continue
			}
			extra := have
			if wantedRules[key] {
				extra = have[1:]
			}
			for _, r := range extra {
				w.add(a.ruleWrite(r, false))
			}
		}
		w.flush()
	}
	addRules := func(k int) {
		if !sc.hasRules() {
			return
		}
		for _, r := range toAdd {
			if kind(r) != k || len(actual.Rules[keyOfRule(r)]) > 0 {
				continue
			}
			w.add(a.ruleWrite(r, true))
		}
		w.flush()
	}
	// 0. Stale skips and exits go before anything moves: they only ever
	// jump over rules that cannot match, and a stale one might jump over a
	// rule added below. Without them a packet walks more rules, never
	// fewer. New gate entries come at once, for the same reason.
	removeAll(narrowing)
	addRules(widening)
	// 1. Fill and repair tables.
	for _, r := range routes {
		if !r.Throw {
			replace(r)
		}
	}
	w.flush()
	// 2. Add missing rules, jumps aside.
	addRules(plain)
	// 3. Throws, now that the tables they hand over to are reachable.
	for _, r := range routes {
		if r.Throw {
			replace(r)
		}
	}
	w.flush()
	// A stale throw whose prefix no wanted table holds any more hands over
	// to a Route that is going: it goes first (step 4), or its prefix would
	// be thrown on to main once that Route's rule is gone. Every other
	// stale throw goes with the stale routes (step 6), after the supernet
	// it carves out of (sortedRouteKeys puts a supernet first) or after
	// its own table's rule, so longest-prefix match holds throughout.
	var held map[netip.Prefix]bool // built when a stale throw needs it
	heldBy := func(p netip.Prefix) bool {
		if held == nil {
			held = map[netip.Prefix]bool{}
			for _, r := range plan.Routes {
				if !r.Throw && !r.Backstop {
					held[r.Dst] = true
				}
			}
		}
		return held[p]
	}
	var early, late []routeKey
	for _, key := range sortedRouteKeys(actual.Routes, wanted, sc) {
		switch {
		case actual.Routes[key].Throw && !heldBy(key.Dst):
			early = append(early, key)
		default:
			late = append(late, key)
		}
	}
	// 4. Throws that hand over to a Route that is going.
	for _, key := range early {
		remove(key)
	}
	w.flush()
	// 5. Stale and doubled rules, stale gate entries last, then the
	// missing skips and exit, now that every rule they jump over is the
	// plan's.
	removeAll(plain)
	removeAll(widening)
	addRules(narrowing)
	// 6. Routes nobody wants any more, live before backstop
	// (sortedRouteKeys), and the remaining throws.
	for _, key := range late {
		remove(key)
	}
	w.flush()
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
	prev := &Applier{h: a.h, cfg: old, log: a.log, conn: a.conn}
	prev.nexthopsOff.Store(a.nexthopsOff.Load())
	ours := old.Protocol == a.cfg.Protocol
	// The old layout's nexthop objects go after its routes. With the same
	// protocol the ids are this Applier's too: only the groups of old
	// tables outside its range go, and the gateways are its own to keep
	// or collect.
	nhs := prev.syncNexthops(planner.Plan{}, &writer{a: prev, rep: &Report{}, errs: new([]error)})
	spare := outsideRange(old)
	if ours {
		spare = func(t uint32) bool { return outsideRange(old)(t) || !outsideRange(a.cfg)(t) }
	}
	st, err := prev.Read()
	if err != nil {
		return Report{}, err
	}
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
	rep, err := prev.applyTo(planner.Plan{}, st, nil, nil)
	if err == nil {
		var errs []error
		prev.collectNexthops(nhs, &writer{a: prev, rep: &rep, errs: &errs}, spare, ours)
		err = errors.Join(errs...)
	}
	a.Writes.RuleDelete.Add(prev.Writes.RuleDelete.Load())
	a.Writes.RouteDelete.Add(prev.Writes.RouteDelete.Load())
	a.Writes.NexthopDelete.Add(prev.Writes.NexthopDelete.Load())
	rep.Foreign = nil // the old band's strangers are not this band's
	if a.view != nil && rep.Changes > 0 {
		a.view.Invalidate() // rare: the old band may overlap this one
	}
	return rep, err
}

// groupOf is the nexthop group r is to use, 0 for none.
func (st *nexthopState) groupOf(r planner.Route) uint32 {
	if st == nil || r.Throw || r.Backstop {
		return 0
	}
	return st.groups[planner.TableFamily{Table: r.Table, IPv6: r.Dst.Addr().Is6()}]
}

// installed says whether s holds r as planned, through the nexthop object
// nhid (0: naming its gateways).
func (s *State) installed(r planner.Route, nhid uint32) bool {
	have, ok := s.Routes[keyOf(r)]
	return ok && s.attrs[keyOf(r)].nhid == nhid && (nhid != 0 || sameRoute(have, r)) && have.Throw == r.Throw && have.Backstop == r.Backstop
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
	switch {
	case r.IsSkip():
		nl.Table, nl.Goto, nl.Invert = -1, r.Goto, r.Invert
	case r.Nop:
		nl.Table, nl.Type = -1, nlFRActNop
	}
	return nl
}

// The kinds of rules for the order of writes (applyTo).
const (
	plain = iota
	narrowing
	widening
)

// nlFRActNop is FR_ACT_NOP, a rule that does nothing.
const nlFRActNop = 3

func family(a netip.Addr) int {
	if a.Is6() {
		return netlink.FAMILY_V6
	}
	return netlink.FAMILY_V4
}

// compareRuleKeys orders rules by family, priority, then rendering.
func compareRuleKeys(a, b ruleKey) int {
	switch {
	case a.IPv6 != b.IPv6:
		if b.IPv6 {
			return -1
		}
		return 1
	case a.Priority != b.Priority:
		return cmp.Compare(a.Priority, b.Priority)
	}
	return strings.Compare(planner.Rule(a).Batch(0), planner.Rule(b).Batch(0))
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// sortedRouteKeys are the keys of m in sc's tables less those of skip,
// sorted: only those are sorted, so a diff with little to remove costs
// little.
func sortedRouteKeys(m map[routeKey]planner.Route, skip map[routeKey]bool, sc *scope) []routeKey {
	var keys []routeKey
	if sc != nil && sc.byTable != nil {
		for t := range sc.tables {
			for _, k := range sc.byTable[t] {
				if !skip[k] {
					keys = append(keys, k)
				}
			}
		}
	} else {
		for k := range m {
			if sc.table(k.Table) && !skip[k] {
				keys = append(keys, k)
			}
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
		if !inUse[r.IPv6] || len(st.Rules[keyOfRule(r)]) > 0 {
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
