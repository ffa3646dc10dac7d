package planner

import (
	"fmt"
	"net/netip"
	"testing"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
)

// routeAtLimit is a Route of v1alpha1.MaxDestinations distinct /24s of
// 10.128.0.0/9 (none inside testNode's main routes) through vpc0's two
// ECMP gateways.
func routeAtLimit(name string, age int) *v1alpha1.Route {
	r := route(name, age, nil, list("10.114.0.3", "10.114.0.4"))
	for i := range v1alpha1.MaxDestinations {
		r.Spec.Destinations = append(r.Spec.Destinations, fmt.Sprintf("10.%d.%d.0/24", 128+i/256, i%256))
	}
	return r
}

// TestComputeAtLimit: a Route at the API's limit is applied whole (each
// destination and its backstop), and a younger Route holding the same
// destinations is a conflict that reports every one of them; the agent
// writes at most v1alpha1.MaxReportedDestinations of them into the
// NodeRouting, with the count.
func TestComputeAtLimit(t *testing.T) {
	big := routeAtLimit("big", 0)
	plan := Compute(Input{Config: DefaultConfig(), Node: testNode(), Routes: []*v1alpha1.Route{big}})
	if r := plan.Results[0]; r.Phase != Applied || r.Reason != ReasonApplied || len(r.NotApplied) != 0 {
		t.Fatalf("Route at the limit: %s %s %s, %d not applied", r.Phase, r.Reason, r.Message, len(r.NotApplied))
	}
	if got, want := len(plan.Routes), 2*v1alpha1.MaxDestinations; got != want {
		t.Errorf("%d routes, want %d (one live and one backstop per destination)", got, want)
	}

	twin := routeAtLimit("twin", 1)
	plan = Compute(Input{Config: DefaultConfig(), Node: testNode(), Routes: []*v1alpha1.Route{big, twin}})
	if r := plan.Results[1]; r.Phase != Conflict || len(r.NotApplied) != v1alpha1.MaxDestinations {
		t.Errorf("younger twin: %s %s, %d not applied, want Conflict with %d", r.Phase, r.Reason, len(r.NotApplied), v1alpha1.MaxDestinations)
	}
	if got, want := len(plan.Routes), 2*v1alpha1.MaxDestinations; got != want {
		t.Errorf("with the twin: %d routes, want %d", got, want)
	}
}

// BenchmarkComputeAtLimit is the planner for one Route at the API's limit
// of destinations, on testNode and on a node whose main table also holds
// 1,000 routes (as with a pod CIDR route per node of a 1,000-node cluster):
// each destination is checked against every main route.
func BenchmarkComputeAtLimit(b *testing.B) {
	routes := []*v1alpha1.Route{routeAtLimit("big", 0)}
	busy := testNode()
	for i := range 1000 {
		busy.MainRoutes = append(busy.MainRoutes, MainRoute{Dst: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i >> 2), byte(i%4) * 64}), 26), Gateway: netip.MustParseAddr("10.114.0.1"), LinkIndex: 3})
	}
	for _, n := range []struct {
		name string
		node Node
	}{{"main-6", testNode()}, {"main-1006", busy}} {
		b.Run(fmt.Sprintf("%d-destinations-%s", v1alpha1.MaxDestinations, n.name), func(b *testing.B) {
			for b.Loop() {
				plan := Compute(Input{Config: DefaultConfig(), Node: n.node, Routes: routes})
				if plan.Results[0].Phase != Applied {
					b.Fatal(plan.Results[0].Message)
				}
			}
		})
	}
}
