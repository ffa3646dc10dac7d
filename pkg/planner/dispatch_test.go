package planner

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
)

// kernelSim walks one family's rules the way the kernel's fib_rules_lookup
// does, from the dispatch's first priority on: a skip whose target has no
// rule is a no-op, a nop passes, a lookup in a table ends the walk unless
// the table's best match is a throw or there is none.
type kernelSim struct {
	rules  []Rule      // sorted by priority, stable (the kernel's list order)
	first  map[int]int // priority -> index of its first rule
	tables map[uint32][]Route
}

func newSim(rules []Rule, routes []Route, ipv6 bool, from int) *kernelSim {
	k := &kernelSim{tables: map[uint32][]Route{}}
	for _, r := range rules {
		if r.IPv6 == ipv6 && r.Priority >= from {
			k.rules = append(k.rules, r)
		}
	}
	slices.SortStableFunc(k.rules, func(a, b Rule) int { return a.Priority - b.Priority })
	k.first = map[int]int{}
	for i := len(k.rules) - 1; i >= 0; i-- {
		k.first[k.rules[i].Priority] = i
	}
	for _, r := range routes {
		k.tables[r.Table] = append(k.tables[r.Table], r)
	}
	return k
}

// lookup returns the table that takes addr (0: it walked past every rule,
// to main's default route) and how many rules it evaluated.
func (k *kernelSim) lookup(addr netip.Addr) (table uint32, visited int) {
	for i := 0; i < len(k.rules); {
		r := k.rules[i]
		visited++
		match := !r.Dst.IsValid() || r.Dst.Contains(addr)
		if r.Invert {
			match = !match
		}
		switch {
		case !match || r.Nop:
			i++
		case r.IsSkip():
			if j, ok := k.first[r.Goto]; ok {
				i = j
			} else {
				i++ // unresolved: the kernel carries on
			}
		default:
			best := -1
			var hit Route
			for _, rt := range k.tables[r.Table] {
				if rt.Dst.Contains(addr) && rt.Dst.Bits() > best {
					best, hit = rt.Dst.Bits(), rt
				}
			}
			if best >= 0 && !hit.Throw {
				return r.Table, visited
			}
			i++
		}
	}
	return 0, visited
}

// owner is the table longest-prefix match across all Routes gives addr.
func owner(routes []Route, addr netip.Addr) uint32 {
	best, table := -1, uint32(0)
	for _, r := range routes {
		if !r.Throw && r.Dst.Contains(addr) && r.Dst.Bits() > best {
			best, table = r.Dst.Bits(), r.Table
		}
	}
	return table
}

// randomRoutes makes n Routes of 1-4 destinations from a few ranges, some
// nested in others, the odd one a /0, through gateways of testNode.
func randomRoutes(rng *rand.Rand, n int, prefix string) []*routeT {
	var out []*routeT
	for i := range n {
		var dsts []string
		for range 1 + rng.IntN(4) {
			switch rng.IntN(10) {
			case 0:
				dsts = append(dsts, fmt.Sprintf("172.%d.0.0/16", 16+rng.IntN(16)))
			case 1:
				dsts = append(dsts, fmt.Sprintf("192.168.%d.%d/28", rng.IntN(256), 16*rng.IntN(16)))
			case 2:
				dsts = append(dsts, fmt.Sprintf("%d.0.0.0/8", 1+rng.IntN(9)))
			default:
				dsts = append(dsts, fmt.Sprintf("172.%d.%d.0/24", 16+rng.IntN(16), rng.IntN(256)))
			}
		}
		if rng.IntN(50) == 0 {
			dsts = append(dsts, "0.0.0.0/0")
		}
		out = append(out, &routeT{name: fmt.Sprintf("%s-%04d", prefix, i), age: i, dsts: dsts})
	}
	return out
}

type routeT struct {
	name string
	age  int
	dsts []string
}

func computeT(routes []*routeT, layout Layout) Plan {
	in := Input{Config: DefaultConfig(), Node: testNode(), Layout: layout}
	for _, r := range routes {
		in.Routes = append(in.Routes, route(r.name, r.age, r.dsts, list("10.114.0.3", "10.114.0.4")))
	}
	return Compute(in)
}

// probes are addresses to look up: inside every destination, and random.
func probes(rng *rand.Rand, plan Plan, random int) []netip.Addr {
	var out []netip.Addr
	for _, r := range plan.Routes {
		if r.Dst.Addr().Is4() {
			out = append(out, r.Dst.Addr(), randomIn(rng, r.Dst))
		}
	}
	for range random {
		out = append(out, netip.AddrFrom4([4]byte{byte(rng.IntN(224)), byte(rng.IntN(256)), byte(rng.IntN(256)), byte(rng.IntN(256))}))
	}
	return out
}

func randomIn(rng *rand.Rand, p netip.Prefix) netip.Addr {
	b := p.Addr().As4()
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	if host := 32 - p.Bits(); host > 0 {
		v |= rng.Uint32() & (1<<host - 1)
	}
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// TestDispatchFindsEveryRoute: every address reaches the table that
// longest-prefix match across Routes gives it, or main when no Route holds
// it, for layouts from a handful to a thousand Routes.
func TestDispatchFindsEveryRoute(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, n := range []int{1, 3, 9, 40, 300, 1000} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			plan := computeT(randomRoutes(rng, n, "r"), nil)
			sim := newSim(plan.Rules, plan.Routes, false, DefaultConfig().PriorityBase+OffsetRoutes)
			for _, a := range probes(rng, plan, 500) {
				if got, want := lookupTable(sim, a), owner(plan.Routes, a); got != want {
					t.Fatalf("%s went to table %d, want %d", a, got, want)
				}
			}
		})
	}
}

func lookupTable(k *kernelSim, a netip.Addr) uint32 {
	t, _ := k.lookup(a)
	return t
}

// TestDispatchCost: the rules a packet evaluates do not grow with the
// number of Routes (the datapath benchmark in pkg/applier measures what
// that is worth in packets per second).
func TestDispatchCost(t *testing.T) {
	worst := map[int][2]int{}
	for _, n := range []int{10, 100, 1000, 4000} {
		var routes []*routeT
		for i := range n {
			routes = append(routes, &routeT{name: fmt.Sprintf("r-%05d", i), age: i, dsts: []string{fmt.Sprintf("172.%d.%d.0/24", 16+i/256, i%256)}})
		}
		plan := computeT(routes, nil)
		// The whole band: the gate, then bypass, symmetric and main's
		// suppress rules (each counts as one rule), then the trie.
		sim := newSim(plan.Rules, plan.Routes, false, DefaultConfig().PriorityBase)
		var w [2]int // unmatched, matched
		for i := range n {
			_, v := sim.lookup(netip.AddrFrom4([4]byte{172, byte(16 + i/256), byte(i % 256), 9}))
			w[1] = max(w[1], v)
		}
		for _, a := range []string{"198.51.100.7", "8.8.8.8", "172.15.0.1", "172.31.255.1", "192.168.1.1"} {
			_, v := sim.lookup(netip.MustParseAddr(a))
			w[0] = max(w[0], v)
		}
		worst[n] = w
		t.Logf("%d Routes: %d rules; a packet evaluates at most %d rules when no Route holds it, %d to reach its Route", n, len(plan.Rules), w[0], w[1])
	}
	// Up to 1,000 Routes the trie's blocks hold 8 rules; beyond, the band's
	// 698 priorities make them larger, and the cost grows slowly. Traffic
	// outside every Route meets the gate only: one compare per region and
	// the nop it lands on; traffic to a Route also the landing, testNode's
	// 5 bypass rules, 2 symmetric ones and main's suppress rule.
	for n, w := range worst {
		if n <= 1000 && (w[0] > dispatchGate+1 || w[1] > 40) {
			t.Errorf("%d Routes: a packet evaluates up to %d (unmatched) and %d (matched) rules; want at most %d and 40, whatever the number of Routes up to 1,000", n, w[0], w[1], dispatchGate+1)
		}
	}
}

// TestDispatchStable: a plan computed with the layout the kernel holds
// rewrites nothing (a restart), and one Route more or less among 1,000
// rewrites a few rules, not the rules after it.
func TestDispatchStable(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	routes := randomRoutes(rng, 1000, "r")
	before := computeT(routes, nil)
	if again := computeT(routes, LayoutOf(before.Rules, DefaultConfig().PriorityBase)); !slices.Equal(again.Rules, before.Rules) {
		t.Fatalf("the same Routes over their own layout moved rules: %d rules differ", len(ruleDiff(before.Rules, again.Rules)))
	}
	changes := []struct {
		name string
		edit func([]*routeT) []*routeT
	}{
		{"one Route added", func(rs []*routeT) []*routeT {
			return append(slices.Clone(rs), &routeT{name: "new", age: 5000, dsts: []string{"172.20.77.0/24"}})
		}},
		{"one Route deleted", func(rs []*routeT) []*routeT { return slices.Delete(slices.Clone(rs), 500, 501) }},
		{"one destination edited", func(rs []*routeT) []*routeT {
			out := slices.Clone(rs)
			out[700] = &routeT{name: rs[700].name, age: rs[700].age, dsts: []string{"172.30.1.0/24"}}
			return out
		}},
	}
	for _, c := range changes {
		t.Run(c.name, func(t *testing.T) {
			after := computeT(c.edit(routes), LayoutOf(before.Rules, DefaultConfig().PriorityBase))
			diff := ruleDiff(before.Rules, after.Rules)
			t.Logf("%d of %d rules written or removed", len(diff), len(after.Rules))
			if len(diff) > 12 {
				t.Errorf("%d rules change, want a few: %v", len(diff), diff)
			}
		})
	}
}

func ruleDiff(a, b []Rule) []string {
	in := func(rs []Rule) map[string]bool {
		m := map[string]bool{}
		for _, r := range rs {
			m[fmt.Sprint(r.IPv6, r.Batch(0))] = true
		}
		return m
	}
	ma, mb := in(a), in(b)
	var out []string
	for k := range ma {
		if !mb[k] {
			out = append(out, "- "+k)
		}
	}
	for k := range mb {
		if !ma[k] {
			out = append(out, "+ "+k)
		}
	}
	slices.Sort(out)
	return out
}

// TestDispatchTransitions replays the applier's order of rule writes
// (stale skips and exits out first, new gate entries in, then other new
// rules in, stale rules out, stale gate entries out, new skips and exits
// in last) one write at a time between random layouts: after every
// single write, an address a Route holds before and after the change still
// reaches a Route's table, never main.
func TestDispatchTransitions(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	for round := range 20 {
		old := randomRoutes(rng, 20+rng.IntN(100), "r")
		next := slices.Clone(old)
		for range 1 + rng.IntN(40) {
			switch i := rng.IntN(len(next)); rng.IntN(3) {
			case 0:
				next = slices.Delete(next, i, i+1)
			case 1:
				next = append(next, randomRoutes(rng, 1, fmt.Sprintf("n%d-%d", round, i))...)
			default:
				edited := *next[i]
				edited.dsts = randomRoutes(rng, 1, "x")[0].dsts
				next[i] = &edited
			}
		}
		p1 := computeT(old, nil)
		layout := LayoutOf(p1.Rules, DefaultConfig().PriorityBase)
		if round%2 == 1 {
			layout = nil // a layout from nothing: every slot may move
		}
		p2 := computeT(next, layout)
		// Both plans' routes are in the tables while rules change (the
		// applier fills tables first and empties them last), throws too.
		routes := append(slices.Clone(p1.Routes), p2.Routes...)
		var stable []netip.Addr
		for _, a := range probes(rng, p1, 50) {
			if o := owner(p1.Routes, a); o != 0 && o == owner(p2.Routes, a) {
				stable = append(stable, a)
			}
		}
		check := func(rules []Rule, step string) {
			sim := newSim(rules, routes, false, 0)
			for _, a := range stable {
				if lookupTable(sim, a) == 0 {
					t.Fatalf("round %d, %s: %s (a Route's before and after) went to main", round, step, a)
				}
			}
		}
		for _, step := range transition(p1.Rules, p2.Rules) {
			check(step.rules, step.what)
		}
	}
}

type ruleStep struct {
	what  string
	rules []Rule
}

// transition lists the rule sets the applier passes through from a to b,
// one write at a time, in its order.
func transition(a, b []Rule) []ruleStep {
	key := func(r Rule) string { return fmt.Sprint(r.IPv6, r.Batch(0)) }
	want, have := map[string]bool{}, map[string]bool{}
	for _, r := range b {
		want[key(r)] = true
	}
	for _, r := range a {
		have[key(r)] = true
	}
	cur := slices.Clone(a)
	var steps []ruleStep
	kind := func(r Rule) int {
		switch {
		case r.Narrows():
			return 1
		case r.Widens():
			return 2
		}
		return 0
	}
	remove := func(k int) {
		for _, r := range slices.Clone(cur) {
			if kind(r) == k && !want[key(r)] {
				cur = slices.DeleteFunc(cur, func(x Rule) bool { return key(x) == key(r) })
				steps = append(steps, ruleStep{"del " + key(r), slices.Clone(cur)})
			}
		}
	}
	add := func(k int) {
		for _, r := range b {
			if kind(r) == k && !have[key(r)] {
				cur = append(cur, r)
				steps = append(steps, ruleStep{"add " + key(r), slices.Clone(cur)})
			}
		}
	}
	const plain, narrowing, widening = 0, 1, 2
	remove(narrowing)
	add(widening)
	add(plain)
	remove(plain)
	remove(widening)
	add(narrowing)
	return steps
}

// TestDispatchOneRulePerRoute: Routes of many destinations each get one
// lookup rule for the lot where their destinations share a prefix no other
// Route's falls in, also when the trie's blocks grow past dispatchLeaf
// (500 Routes of 8 /24s: 4,000 destinations).
func TestDispatchOneRulePerRoute(t *testing.T) {
	var routes []*routeT
	i := 0
	for r := range 500 {
		rt := &routeT{name: fmt.Sprintf("r-%04d", r), age: r}
		for range 8 {
			rt.dsts = append(rt.dsts, fmt.Sprintf("172.%d.%d.0/24", 16+i/256, i%256))
			i++
		}
		routes = append(routes, rt)
	}
	plan := computeT(routes, nil)
	lookups := 0
	for _, r := range plan.Rules {
		if !r.IsSkip() && !r.Nop && r.Table != MainTable {
			lookups++
		}
	}
	if lookups != 500 {
		t.Errorf("%d lookup rules for 500 Routes of 8 adjacent destinations, want 500", lookups)
	}
	sim := newSim(plan.Rules, plan.Routes, false, DefaultConfig().PriorityBase+OffsetGate)
	for _, a := range probes(rand.New(rand.NewPCG(7, 8)), plan, 200) {
		if got, want := lookupTable(sim, a), owner(plan.Routes, a); got != want {
			t.Fatalf("%s went to table %d, want %d", a, got, want)
		}
	}
}

// TestGateRegions: the gate covers the Routes' destinations with as few
// regions as keep it tight; a split that removes no address space is not
// made.
func TestGateRegions(t *testing.T) {
	consecutive := func(n int) []string {
		var out []string
		for i := range n {
			out = append(out, fmt.Sprintf("172.%d.%d.0/24", 16+i/256, i%256))
		}
		return out
	}
	for _, tc := range []struct {
		name string
		dsts []string
		want []string
	}{
		{"one destination", list("192.0.2.0/24"), list("192.0.2.0/24")},
		{"1,000 consecutive /24s: one region, not four /16s", consecutive(1000), list("172.16.0.0/14")},
		{"two far apart: no /0", list("10.0.0.0/8", "198.51.100.0/24"), list("10.0.0.0/8", "198.51.100.0/24")},
		{"a /0: no gate", list("0.0.0.0/0", "10.0.0.0/8"), nil},
		{"a small outlier beside a wide one: kept apart while regions last", list("0.0.0.0/5", "10.244.1.0/24", "198.18.0.0/15", "203.0.113.0/25"),
			list("0.0.0.0/5", "10.244.1.0/24", "198.18.0.0/15", "203.0.113.0/25")},
		{"neighbours that a split would not thin: one region", list("10.0.0.0/9", "10.128.0.0/10", "10.192.0.0/10"), list("10.0.0.0/8")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var items []dispatchItem
			for i, d := range tc.dsts {
				items = append(items, dispatchItem{dst: netip.MustParsePrefix(d), table: uint32(100 + i)})
			}
			slices.SortFunc(items, func(a, b dispatchItem) int { return comparePrefix(a.dst, b.dst) })
			var got []string
			for _, p := range gateRegions(items) {
				got = append(got, p.String())
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("regions %v, want %v", got, tc.want)
			}
		})
	}
}
