// Package selection decides whether a Route applies to a Node, with the
// semantics of a Pod's required node affinity (k8s.io/component-helpers):
// terms are ORed, requirements inside a term ANDed, matchFields only on
// metadata.name; an absent selector selects every node.
package selection

import (
	corev1 "k8s.io/api/core/v1"
	"k8s.io/component-helpers/scheduling/corev1/nodeaffinity"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
)

// Selects reports whether route applies to node. An error means the
// selector cannot be evaluated (admission normally prevents that); the
// Route is then not selected.
func Selects(route *v1alpha1.Route, node *corev1.Node) (bool, error) {
	if route.Spec.NodeSelector == nil {
		return true, nil
	}
	return nodeaffinity.NewLazyErrorNodeSelector(route.Spec.NodeSelector).Match(node)
}

// Filter returns the Routes that apply to node, and the errors of those
// whose selectors could not be evaluated, by Route name.
func Filter(routes []*v1alpha1.Route, node *corev1.Node) (selected []*v1alpha1.Route, errs map[string]error) {
	for _, r := range routes {
		ok, err := Selects(r, node)
		if err != nil {
			if errs == nil {
				errs = map[string]error{}
			}
			errs[r.Name] = err
			continue
		}
		if ok {
			selected = append(selected, r)
		}
	}
	return selected, errs
}
