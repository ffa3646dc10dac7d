package selection

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
)

func TestSelects(t *testing.T) {
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "worker-pool-y", Labels: map[string]string{
		"doks.digitalocean.com/node-pool": "worker-pool", "cpu-count": "4",
	}}}
	req := func(key string, op corev1.NodeSelectorOperator, values ...string) corev1.NodeSelectorRequirement {
		return corev1.NodeSelectorRequirement{Key: key, Operator: op, Values: values}
	}
	terms := func(terms ...corev1.NodeSelectorTerm) *corev1.NodeSelector {
		return &corev1.NodeSelector{NodeSelectorTerms: terms}
	}
	labels := func(reqs ...corev1.NodeSelectorRequirement) corev1.NodeSelectorTerm {
		return corev1.NodeSelectorTerm{MatchExpressions: reqs}
	}
	fields := func(reqs ...corev1.NodeSelectorRequirement) corev1.NodeSelectorTerm {
		return corev1.NodeSelectorTerm{MatchFields: reqs}
	}
	tests := []struct {
		name     string
		selector *corev1.NodeSelector
		want     bool
	}{
		{"absent selects every node", nil, true},
		{"seed: pool In", terms(labels(req("doks.digitalocean.com/node-pool", corev1.NodeSelectorOpIn, "worker-pool"))), true},
		{"pool In other", terms(labels(req("doks.digitalocean.com/node-pool", corev1.NodeSelectorOpIn, "other"))), false},
		{"NotIn", terms(labels(req("doks.digitalocean.com/node-pool", corev1.NodeSelectorOpNotIn, "other"))), true},
		{"Exists", terms(labels(req("cpu-count", corev1.NodeSelectorOpExists))), true},
		{"DoesNotExist", terms(labels(req("cpu-count", corev1.NodeSelectorOpDoesNotExist))), false},
		{"Gt", terms(labels(req("cpu-count", corev1.NodeSelectorOpGt, "2"))), true},
		{"Lt", terms(labels(req("cpu-count", corev1.NodeSelectorOpLt, "2"))), false},
		{"requirements in a term are ANDed", terms(labels(req("cpu-count", corev1.NodeSelectorOpExists), req("missing", corev1.NodeSelectorOpExists))), false},
		{"terms are ORed", terms(labels(req("missing", corev1.NodeSelectorOpExists)), labels(req("cpu-count", corev1.NodeSelectorOpExists))), true},
		{"seed: matchFields metadata.name", terms(fields(req("metadata.name", corev1.NodeSelectorOpIn, "worker-pool-y"))), true},
		{"matchFields other name", terms(fields(req("metadata.name", corev1.NodeSelectorOpIn, "worker-pool-x"))), false},
		{"an empty term selects nothing", terms(corev1.NodeSelectorTerm{}), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			route := &v1alpha1.Route{Spec: v1alpha1.RouteSpec{NodeSelector: tt.selector}}
			got, err := Selects(route, node)
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Errorf("Selects = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestFilterReportsUnevaluableSelectors(t *testing.T) {
	bad := &v1alpha1.Route{ObjectMeta: metav1.ObjectMeta{Name: "bad"}, Spec: v1alpha1.RouteSpec{NodeSelector: &corev1.NodeSelector{
		NodeSelectorTerms: []corev1.NodeSelectorTerm{{MatchExpressions: []corev1.NodeSelectorRequirement{{Key: "k", Operator: "Matches"}}}},
	}}}
	good := &v1alpha1.Route{ObjectMeta: metav1.ObjectMeta{Name: "good"}}
	selected, errs := Filter([]*v1alpha1.Route{bad, good}, &corev1.Node{})
	if len(selected) != 1 || selected[0].Name != "good" || errs["bad"] == nil {
		t.Errorf("selected %v, errs %v", selected, errs)
	}
}
