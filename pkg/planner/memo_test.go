package planner

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"testing"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
	"github.com/routing-agent/routing-agent/pkg/lab/vpcnode"
)

// TestMemoChangesNothing plans a random sequence of changes twice, with a
// Memo and without, each from the layout its previous plan left (as the
// agent does): the plans are the same, and a change that leaves every
// destination and table alone (gateways edited or down) reuses the
// dispatch instead of laying it out again.
func TestMemoChangesNothing(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	routes := randomRoutes(rng, 200, "r")
	gateways := func(i int) []string {
		return [][]string{list("10.114.0.3", "10.114.0.4"), list("10.114.0.3"), list("10.114.0.4")}[i%3]
	}
	gw := map[string]int{}
	var down map[netip.Addr]bool
	var memo Memo
	var plain Plan
	reused, throws := 0, 0
	objects := map[string]*v1alpha1.Route{}
	version := 0
	for step := range 60 {
		sameDestinations := step > 0 && step%2 == 0
		switch {
		case step == 0:
		case sameDestinations && step%4 == 0:
			gw[routes[rng.IntN(len(routes))].name]++
		case sameDestinations:
			down = map[netip.Addr]bool{netip.MustParseAddr([]string{"10.114.0.3", "10.114.0.4"}[rng.IntN(2)]): rng.IntN(2) == 0}
		default:
			i := rng.IntN(len(routes))
			switch rng.IntN(3) {
			case 0:
				routes = slices.Delete(slices.Clone(routes), i, i+1)
			case 1:
				routes = append(slices.Clone(routes), randomRoutes(rng, 1, fmt.Sprintf("n%d", step))...)
			default:
				edited := *routes[i]
				edited.dsts = randomRoutes(rng, 1, "x")[0].dsts
				routes = slices.Clone(routes)
				routes[i] = &edited
			}
		}
		// As an informer hands them out: the same object while a Route
		// stays as it is, a new one at a new version when it changes.
		var objs []*v1alpha1.Route
		for _, r := range routes {
			o := route(r.name, r.age, r.dsts, gateways(gw[r.name]))
			if have, ok := objects[r.name]; ok && reflect.DeepEqual(have.Spec, o.Spec) {
				o = have
			} else {
				version++
				o.ResourceVersion = fmt.Sprint(version)
				objects[r.name] = o
			}
			objs = append(objs, o)
		}
		// Now and then the node changes under the Routes: a main route
		// over some of their destinations, the gateways' network gone
		// (the Routes with a table then stranded), and gone still with
		// the tables forgotten (a restart: the Routes then refused).
		node := testNode()
		tables := map[string]uint32{}
		for _, r := range plain.Results {
			if r.Table != 0 {
				tables[r.Name] = r.Table
			}
		}
		switch step % 7 {
		case 5:
			node.MainRoutes = append(node.MainRoutes, MainRoute{Dst: netip.MustParsePrefix("172.20.0.0/14"), Gateway: netip.MustParseAddr("10.114.0.1"), LinkIndex: 3})
		case 6, 0:
			if step > 0 { // gone, below
				node.Addresses = slices.DeleteFunc(node.Addresses, func(a Address) bool { return a.LinkIndex == 3 })
			}
			if step%7 == 0 {
				clear(tables)
			}
		}
		// And now and then a table range too small for them all: the
		// Routes claim what they did, but not all of them get a table.
		cfg := DefaultConfig()
		if step%11 == 4 {
			cfg.TableMax = cfg.TableMin + uint32(len(objs)/2)
		}
		input := func(layout Layout, memo *Memo) Input {
			return Input{Config: cfg, Node: node, Down: down, Layout: layout, Memo: memo, Routes: objs, Tables: tables}
		}
		before := memo.dispatch[0]
		withMemo := Compute(input(memo.Layout(), &memo))
		plain = Compute(input(LayoutOf(plain.Rules, cfg.PriorityBase), nil))
		if !reflect.DeepEqual(withMemo, plain) {
			for i := range min(len(withMemo.Results), len(plain.Results)) {
				if !reflect.DeepEqual(withMemo.Results[i], plain.Results[i]) {
					t.Errorf("step %d: result %d with a Memo %+v, without %+v", step, i, withMemo.Results[i], plain.Results[i])
					break
				}
			}
			t.Fatalf("step %d: the plan with a Memo differs from the plan without:\nrules %d vs %d, routes %d vs %d", step, len(withMemo.Rules), len(plain.Rules), len(withMemo.Routes), len(plain.Routes))
		}
		// The layout the Memo moved along is the one its plan's rules
		// give.
		if got, want := memo.Layout(), LayoutOf(withMemo.Rules, cfg.PriorityBase); !maps.Equal(got, want) {
			t.Fatalf("step %d: the Memo's layout has %d slots, its plan's rules %d", step, len(got), len(want))
		}
		// Sorted and without two routes of one key, as the applier and
		// its view search them; throws among them.
		for i := 1; i < len(plain.Routes); i++ {
			if CompareRoutes(plain.Routes[i-1], plain.Routes[i]) >= 0 {
				t.Fatalf("step %d: routes %d and %d out of order: %+v, %+v", step, i-1, i, plain.Routes[i-1], plain.Routes[i])
			}
		}
		throws += len(slices.DeleteFunc(slices.Clone(plain.Routes), func(r Route) bool { return !r.Throw }))
		// Unless the network was gone or the table range too small, now
		// or for the last plan, which then had other Routes applied.
		unlike := func(step int) bool { return step > 0 && (step%7 == 6 || step%7 == 0 || step%11 == 4) }
		if sameDestinations && !unlike(step) && !unlike(step-1) {
			if memo.dispatch[0] != before {
				t.Errorf("step %d: the destinations did not change, but the dispatch was laid out again", step)
			}
			reused++
		}
		if len(memo.parsed) != len(objs) {
			t.Errorf("step %d: the Memo keeps %d specs for %d Routes", step, len(memo.parsed), len(objs))
		}
	}
	if reused == 0 || throws == 0 {
		t.Fatalf("%d steps reused the dispatch, %d throws were planned: the test proves nothing", reused, throws)
	}
}

// BenchmarkComputeOneOf1000 is the agent's plan, with its Memo, after one
// Route among 1,000 (2 destinations each) changed: its gateways, or one of
// its destinations (the dispatch laid out again).
//
//	go test -run '^$' -bench ComputeOneOf1000 ./pkg/planner
func BenchmarkComputeOneOf1000(b *testing.B) {
	for _, destination := range []bool{false, true} {
		name := map[bool]string{false: "gateways", true: "destination"}[destination]
		b.Run(name, func(b *testing.B) {
			routes := vpcnode.Routes(1000, 2)
			var memo Memo
			in := Input{Config: DefaultConfig(), Node: testNode(), Routes: routes, Memo: &memo, Tables: map[string]uint32{}}
			plan := Compute(in)
			for _, r := range plan.Results {
				in.Tables[r.Name] = r.Table
			}
			own := routes[500].Spec.Destinations[1]
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				r := routes[500].DeepCopy()
				if destination {
					r.Spec.Destinations[1] = []string{own, "172.23.250.0/24"}[i%2]
				} else {
					r.Spec.Gateways = [][]string{{"10.114.0.3"}, {"10.114.0.3", "10.114.0.4"}}[i%2]
				}
				r.Generation++
				routes[500] = r
				in.Layout = memo.Layout()
				if plan = Compute(in); plan.Results[500].Phase != Applied {
					b.Fatal(plan.Results[500].Message)
				}
				i++
			}
		})
	}
}

// TestRuleBuilder: the rules built are the ones added, the last plan's own
// slice when they are all of it, and never a slice that shares the last
// one's array otherwise (the last plan's rules are read-only).
func TestRuleBuilder(t *testing.T) {
	a, b, c := Rule{Priority: 1}, Rule{Priority: 2}, Rule{Priority: 3}
	last := []Rule{a, b, c}
	for _, tc := range []struct {
		name  string
		added []Rule
		same  bool
	}{
		{"the same", []Rule{a, b, c}, true},
		{"a prefix", []Rule{a, b}, false},
		{"one changed", []Rule{a, c, c}, false},
		{"one more", []Rule{a, b, c, a}, false},
		{"none", nil, false},
	} {
		rb := ruleBuilder{last: last}
		for _, r := range tc.added {
			rb.add(r)
		}
		got := rb.rules()
		if !slices.Equal(got, tc.added) || (got == nil) != (tc.added == nil) {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.added)
		}
		if shares := len(got) > 0 && &got[0] == &last[0]; shares != tc.same {
			t.Errorf("%s: shares the last plan's array %v, want %v", tc.name, shares, tc.same)
		}
	}
	if !slices.Equal(last, []Rule{a, b, c}) {
		t.Errorf("the last plan's rules were changed: %v", last)
	}
}
