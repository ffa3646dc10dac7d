package applier

import (
	"maps"
	"slices"

	"github.com/routing-agent/routing-agent/pkg/planner"
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
	// byTable indexes the keys of the state's routes by table (the view's):
	// the stale routes of a few tables are found without a walk of all.
	byTable map[uint32][]routeKey
}

func (s *scope) table(t uint32) bool { return s == nil || s.tables[t] }
func (s *scope) hasRules() bool      { return s == nil || s.rules }

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

// changedTables marks in out each table whose routes differ between a and
// b, both sorted by planner.CompareRoutes (table first).
func changedTables(a, b []planner.Route, out map[uint32]bool) {
	for len(a) > 0 || len(b) > 0 {
		var t uint32
		switch {
		case len(a) == 0:
			t = b[0].Table
		case len(b) == 0:
			t = a[0].Table
		default:
			t = min(a[0].Table, b[0].Table)
		}
		i := run(a, t)
		j := run(b, t)
		if i != j || !slices.EqualFunc(a[:i], b[:j], func(x, y planner.Route) bool { return x.Dst == y.Dst && sameRoute(x, y) }) {
			out[t] = true
		}
		a, b = a[i:], b[j:]
	}
}

// run is how many routes at the start of rs are of table t.
func run(rs []planner.Route, t uint32) int {
	n := 0
	for n < len(rs) && rs[n].Table == t {
		n++
	}
	return n
}
