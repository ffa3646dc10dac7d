package planner

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"testing"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
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
	reused := 0
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
		input := func(layout Layout, memo *Memo) Input {
			return Input{Config: DefaultConfig(), Node: testNode(), Down: down, Layout: layout, Memo: memo, Routes: objs}
		}
		before := memo.dispatch[0]
		withMemo := Compute(input(memo.Layout(), &memo))
		plain = Compute(input(LayoutOf(plain.Rules, DefaultConfig().PriorityBase), nil))
		if !reflect.DeepEqual(withMemo, plain) {
			t.Fatalf("step %d: the plan with a Memo differs from the plan without:\nrules %d vs %d, routes %d vs %d", step, len(withMemo.Rules), len(plain.Rules), len(withMemo.Routes), len(plain.Routes))
		}
		if sameDestinations {
			if memo.dispatch[0] != before {
				t.Errorf("step %d: the destinations did not change, but the dispatch was laid out again", step)
			}
			reused++
		}
		if len(memo.parsed) != len(objs) {
			t.Errorf("step %d: the Memo keeps %d specs for %d Routes", step, len(memo.parsed), len(objs))
		}
	}
	if reused == 0 {
		t.Fatal("no step reused the dispatch: the test proves nothing")
	}
}
