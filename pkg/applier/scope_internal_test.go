package applier

import (
	"maps"
	"net/netip"
	"slices"
	"testing"

	"github.com/routing-agent/routing-agent/pkg/planner"
)

// TestDiffScope: an apply after a settled one compares only the tables
// whose planned routes changed or that the view read again; anything it
// cannot vouch for (no settled apply, everything read, groups moved)
// makes it compare everything.
func TestDiffScope(t *testing.T) {
	gw := []planner.Nexthop{{Gateway: netip.MustParseAddr("10.114.0.3"), LinkIndex: 2}}
	gw2 := []planner.Nexthop{{Gateway: netip.MustParseAddr("10.114.0.4"), LinkIndex: 2}}
	r := func(table uint32, dst string, nhs []planner.Nexthop) planner.Route {
		return planner.Route{Table: table, Dst: netip.MustParsePrefix(dst), Nexthops: nhs}
	}
	backstop := func(table uint32, dst string) planner.Route {
		return planner.Route{Table: table, Dst: netip.MustParsePrefix(dst), Backstop: true}
	}
	rule := planner.Rule{Priority: 30301, Dst: netip.MustParsePrefix("192.0.2.0/24"), Table: 100, SuppressPrefixlen: -1}
	base := []planner.Route{r(100, "192.0.2.0/24", gw), backstop(100, "192.0.2.0/24"), r(101, "198.51.100.0/24", gw), backstop(101, "198.51.100.0/24"), r(102, "203.0.113.0/24", gw)}
	last := &settled{routes: base, rules: []planner.Rule{rule}}
	sorted := func(rs []planner.Route) []planner.Route {
		rs = slices.Clone(rs)
		slices.SortFunc(rs, planner.CompareRoutes)
		return rs
	}
	for _, tc := range []struct {
		name     string
		last     *settled
		routes   []planner.Route
		rules    []planner.Rule
		read     reread
		groups   map[planner.TableFamily]uint32
		want     []uint32 // nil: everything
		rulesToo bool
	}{
		{"nothing changed, nothing read", last, base, last.rules, reread{}, nil, []uint32{}, false},
		{"one table's gateway changed", last, sorted(append(slices.Clone(base[:2]), r(101, "198.51.100.0/24", gw2), backstop(101, "198.51.100.0/24"), base[4])), last.rules, reread{}, nil, []uint32{101}, false},
		{"a table gone, one new", last, sorted(append(slices.Clone(base[:4]), r(103, "203.0.113.0/24", gw))), last.rules, reread{}, nil, []uint32{102, 103}, false},
		{"a route added to a table", last, sorted(append(slices.Clone(base), backstop(102, "203.0.113.0/24"))), last.rules, reread{}, nil, []uint32{102}, false},
		{"a table read again, the rules changed", last, base, nil, reread{tables: map[uint32]bool{100: true}}, nil, []uint32{100}, true},
		{"the rules read again", last, base, last.rules, reread{rules: true}, nil, []uint32{}, true},
		{"no settled apply", nil, base, last.rules, reread{}, nil, nil, true},
		{"every route read again", last, base, last.rules, reread{all: true}, nil, nil, true},
		{"a table's group changed", last, base, last.rules, reread{}, map[planner.TableFamily]uint32{{Table: 100}: 7}, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var nhs *nexthopState
			if tc.groups != nil {
				nhs = &nexthopState{groups: tc.groups}
			}
			sc := diffScope(tc.last, planner.Plan{Routes: tc.routes, Rules: tc.rules}, nhs, tc.read)
			if tc.want == nil {
				if sc != nil {
					t.Fatalf("scope %v, want everything", sc.tables)
				}
				return
			}
			if sc == nil {
				t.Fatalf("scope everything, want tables %v", tc.want)
			}
			if got := slices.Sorted(maps.Keys(sc.tables)); !slices.Equal(got, tc.want) {
				t.Errorf("tables %v, want %v", got, tc.want)
			}
			if sc.rules != tc.rulesToo {
				t.Errorf("rules in scope: %v, want %v", sc.rules, tc.rulesToo)
			}
		})
	}
}
