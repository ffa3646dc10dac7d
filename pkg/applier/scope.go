package applier

import (
	"cmp"
	"maps"
	"slices"

	"github.com/routing-agent/routing-agent/pkg/planner"
	"github.com/routing-agent/routing-agent/pkg/runs"
)

// scope is what an apply through a View diffs: the routes of some tables,
// and the rules or not. A nil scope is everything, as without a view.
//
// An apply that wrote all it had to leaves the kernel as its plan says.
// Until the view reads a part of it again (a notification, the agent's
// own writes, a resync), that part is still as that plan said; so the next
// plan needs comparing with the kernel only where it differs from that
// plan, or where the view read the kernel again. With one Route changed
// among 1,000 that is one table instead of 4,000 routes.
type scope struct {
	tables map[uint32]bool
	rules  bool
	// rulesDelta, when the view has read no rule since the settled apply
	// (the kernel holds that plan's rules still), is how the plan's rules
	// differ from them: the rules diffed are these alone, not every rule
	// of the band. nil: every rule.
	rulesDelta *ruleDelta
	// byTable indexes the keys of the state's routes by table (the view's):
	// the stale routes of a few tables are found without a walk of all.
	byTable map[uint32][]routeKey
}

func (s *scope) table(t uint32) bool { return s == nil || s.tables[t] }
func (s *scope) hasRules() bool      { return s == nil || s.rules }

// delta is the scope's rule delta, if any (only with the rules in scope).
func (s *scope) delta() *ruleDelta {
	if s == nil {
		return nil
	}
	return s.rulesDelta
}

// settled is the last apply through the view that wrote everything it had
// to: its plan's routes and rules, and the groups its tables used.
type settled struct {
	routes []planner.Route
	rules  []planner.Rule
	groups map[planner.TableFamily]uint32
}

// reread is what the view read of the kernel for an apply: everything, or
// some tables, and the rules or not.
type reread struct {
	all    bool
	tables map[uint32]bool
	rules  bool
}

// diffScope is the scope of an apply of plan, given the last settled apply
// (nil: none) and what the view read again.
func diffScope(last *settled, plan planner.Plan, nhs *nexthopState, read reread) *scope {
	if last == nil || read.all {
		return nil
	}
	var groups map[planner.TableFamily]uint32
	if nhs != nil {
		groups = nhs.groups
	}
	if !maps.Equal(groups, last.groups) {
		return nil // routes move between their groups and their gateways
	}
	s := &scope{tables: maps.Clone(read.tables), rules: read.rules || !sameRules(plan.Rules, last.rules)}
	if s.rules && !read.rules {
		s.rulesDelta = diffRules(last.rules, plan.Rules)
	}
	if s.tables == nil {
		s.tables = map[uint32]bool{}
	}
	changedTables(last.routes, plan.Routes, s.tables)
	return s
}

// sameRules says whether a and b hold the same rules: at once when they
// are one slice, as when the planner hands out its last plan's again.
func sameRules(a, b []planner.Rule) bool {
	if len(a) == len(b) && (len(a) == 0 || &a[0] == &b[0]) {
		return true
	}
	return slices.Equal(a, b)
}

// ruleDelta is what differs between two lists of rules: the rules of the
// second that the first lacks, and the keys of the first that the second
// lacks (or holds fewer times: kept says which it holds once).
type ruleDelta struct {
	added []planner.Rule // in the second's order
	stale []ruleKey
	kept  map[ruleKey]bool
}

// diffRules is the delta from a to b, two plans' rules, in one pass: a
// plan lists its rules in band order, by family (IPv4 first), then
// priority, and rules of one priority are a few (a leaf of the dispatch,
// the bypass), compared among themselves. nil when either list is not in
// that order.
func diffRules(a, b []planner.Rule) *ruleDelta {
	d := &ruleDelta{}
	sorted := runs.Pair(a, b, compareBandOrder, func(was, is []planner.Rule) {
		if !slices.Equal(was, is) {
			d.add(was, is)
		}
	})
	if !sorted {
		return nil
	}
	return d
}

// add records how the rules of one priority differ, from was to is.
func (d *ruleDelta) add(was, is []planner.Rule) {
	left := make([]ruleKey, len(was)) // was's keys that is has not matched
	for i, r := range was {
		left[i] = keyOfRule(r)
	}
	for _, r := range is {
		if i := slices.Index(left, keyOfRule(r)); i >= 0 {
			left = slices.Delete(left, i, i+1)
			continue
		}
		d.added = append(d.added, r)
	}
	for _, k := range left {
		if slices.Contains(d.stale, k) {
			continue
		}
		d.stale = append(d.stale, k)
		// A rule was held twice and is wanted once.
		if slices.ContainsFunc(is, func(r planner.Rule) bool { return keyOfRule(r) == k }) {
			if d.kept == nil {
				d.kept = map[ruleKey]bool{}
			}
			d.kept[k] = true
		}
	}
}

// compareBandOrder orders rules as a plan lists them: by family, IPv4
// first, then priority.
func compareBandOrder(a, b planner.Rule) int {
	if a.IPv6 != b.IPv6 {
		if b.IPv6 {
			return -1
		}
		return 1
	}
	return cmp.Compare(a.Priority, b.Priority)
}

// changedTables marks in out each table whose routes differ between a and
// b, both sorted by planner.CompareRoutes (table first).
func changedTables(a, b []planner.Route, out map[uint32]bool) {
	byTable := func(x, y planner.Route) int { return cmp.Compare(x.Table, y.Table) }
	runs.Pair(a, b, byTable, func(was, is []planner.Route) {
		if slices.EqualFunc(was, is, func(x, y planner.Route) bool { return x.Dst == y.Dst && sameRoute(x, y) }) {
			return
		}
		if len(was) > 0 {
			out[was[0].Table] = true
		} else {
			out[is[0].Table] = true
		}
	})
}
