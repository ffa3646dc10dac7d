package agent

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
	"github.com/routing-agent/routing-agent/pkg/applier"
	"github.com/routing-agent/routing-agent/pkg/bypass"
	"github.com/routing-agent/routing-agent/pkg/planner"
)

// TestStatusAtDestinationLimit: two Routes at the API's limit of
// destinations, the younger holding the same ones (each of its 16,384
// destinations a conflict), make a NodeRouting status of a few KiB: the
// conflicting Route lists v1alpha1.MaxReportedDestinations of them, with
// the count.
func TestStatusAtDestinationLimit(t *testing.T) {
	atLimit := func(name string, age time.Duration) *v1alpha1.Route {
		r := &v1alpha1.Route{
			ObjectMeta: metav1.ObjectMeta{Name: name, Generation: 1, CreationTimestamp: metav1.NewTime(time.Unix(0, 0).Add(age))},
			Spec:       v1alpha1.RouteSpec{Gateways: []string{"10.114.0.3"}},
		}
		for i := range v1alpha1.MaxDestinations {
			r.Spec.Destinations = append(r.Spec.Destinations, fmt.Sprintf("10.%d.%d.0/24", 128+i/256, i%256))
		}
		return r
	}
	node := planner.Node{
		Links:     []planner.Link{{Index: 2, Name: "vpc0"}},
		Addresses: []planner.Address{{LinkIndex: 2, Prefix: netip.MustParsePrefix("10.114.0.10/20")}},
	}
	plan := planner.Compute(planner.Input{Config: planner.DefaultConfig(), Node: node, Routes: []*v1alpha1.Route{atLimit("older", 0), atLimit("younger", time.Minute)}})
	a := &Agent{opts: Options{Planner: planner.DefaultConfig(), Learned: bypass.NewLearned(bypass.DefaultRetention)}}
	status := a.buildStatus(plan, nil, applier.Report{}, nil, nil)

	data, err := json.Marshal(status)
	if err != nil {
		t.Fatal(err)
	}
	if len(data) > 16<<10 {
		t.Errorf("status of two %d-destination Routes is %d bytes, want a few KiB", v1alpha1.MaxDestinations, len(data))
	}
	t.Logf("status: %d bytes", len(data))
	for _, r := range status.Routes {
		switch *r.Name {
		case "older":
			if *r.Phase != v1alpha1.RouteApplied || r.NotAppliedCount != nil {
				t.Errorf("older: %s, %v not applied", *r.Phase, r.NotAppliedCount)
			}
		case "younger":
			if r.NotAppliedCount == nil || *r.NotAppliedCount != v1alpha1.MaxDestinations || len(r.NotAppliedDestinations) != v1alpha1.MaxReportedDestinations {
				t.Errorf("younger: count %v, %d listed; want %d and %d", r.NotAppliedCount, len(r.NotAppliedDestinations), v1alpha1.MaxDestinations, v1alpha1.MaxReportedDestinations)
			}
		}
	}
}
