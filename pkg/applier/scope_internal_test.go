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
			// Rules read again are compared whole; others, the plans'
			// difference alone.
			if delta := sc.delta() != nil; delta != (sc.rules && !tc.read.rules) {
				t.Errorf("a rule delta: %v, want %v", delta, sc.rules && !tc.read.rules)
			}
		})
	}
}

// TestDiffRules: the delta between two plans' rules is what one holds and
// the other does not, priority by priority, whatever else moved; a rule
// held twice and wanted once stays once; lists out of band order give no
// delta (every rule is compared).
func TestDiffRules(t *testing.T) {
	rule := func(prio int, dst string, table uint32) planner.Rule {
		return planner.Rule{Priority: prio, Dst: netip.MustParsePrefix(dst), Table: table, SuppressPrefixlen: -1}
	}
	v6 := func(r planner.Rule) planner.Rule { r.IPv6 = true; return r }
	a := rule(30010, "192.0.2.53/32", planner.MainTable)
	b := rule(30301, "192.0.2.0/25", 100)
	c := rule(30301, "192.0.2.128/25", 101)
	d := rule(30400, "198.51.100.0/24", 102)
	e := v6(rule(30301, "2001:db8::/48", 103))
	// The same rule as the kernel reads it back: no mark without a mask.
	cMarked := c
	cMarked.Mark = 7
	for _, tc := range []struct {
		name         string
		from, to     []planner.Rule
		added, stale []planner.Rule
		kept         []planner.Rule
		none         bool
	}{
		{name: "the same", from: []planner.Rule{a, b, c, d, e}, to: []planner.Rule{a, b, c, d, e}},
		{name: "one in a priority's rules replaced", from: []planner.Rule{a, b, c, d}, to: []planner.Rule{a, b, rule(30301, "203.0.113.0/24", 101), d},
			added: []planner.Rule{rule(30301, "203.0.113.0/24", 101)}, stale: []planner.Rule{c}},
		{name: "a priority's rules in another order", from: []planner.Rule{a, b, c, d}, to: []planner.Rule{a, c, b, d}},
		{name: "equal but for what the key ignores", from: []planner.Rule{a, b, c}, to: []planner.Rule{a, b, cMarked}},
		{name: "a priority gone, one new", from: []planner.Rule{a, b, c, d, e}, to: []planner.Rule{a, b, c, rule(30500, "198.51.100.0/24", 102), e},
			added: []planner.Rule{rule(30500, "198.51.100.0/24", 102)}, stale: []planner.Rule{d}},
		{name: "the other family", from: []planner.Rule{a, e}, to: []planner.Rule{a}, stale: []planner.Rule{e}},
		{name: "held twice, wanted once", from: []planner.Rule{a, b, b}, to: []planner.Rule{a, b}, stale: []planner.Rule{b}, kept: []planner.Rule{b}},
		{name: "from nothing", to: []planner.Rule{a, e}, added: []planner.Rule{a, e}},
		{name: "out of band order", from: []planner.Rule{d, a}, to: []planner.Rule{a}, none: true},
		{name: "families out of order", from: []planner.Rule{a}, to: []planner.Rule{e, a}, none: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := diffRules(tc.from, tc.to)
			if tc.none {
				if got != nil {
					t.Fatalf("a delta of lists out of band order: %+v", got)
				}
				return
			}
			if got == nil {
				t.Fatal("no delta")
			}
			keys := func(rs []planner.Rule) []ruleKey {
				var out []ruleKey
				for _, r := range rs {
					out = append(out, keyOfRule(r))
				}
				return out
			}
			if !slices.Equal(got.added, tc.added) {
				t.Errorf("added %v, want %v", got.added, tc.added)
			}
			if !slices.Equal(got.stale, keys(tc.stale)) {
				t.Errorf("stale %v, want %v", got.stale, keys(tc.stale))
			}
			wantKept := map[ruleKey]bool{}
			for _, k := range keys(tc.kept) {
				wantKept[k] = true
			}
			if len(got.kept) != len(wantKept) || !maps.Equal(got.kept, wantKept) {
				t.Errorf("kept %v, want %v", got.kept, wantKept)
			}
		})
	}
}
