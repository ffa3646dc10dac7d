package agent

import (
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/client-go/tools/cache"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
)

// lastApplied is the annotation `kubectl apply` (client-side) writes: a
// copy of the whole object as applied, which about doubles a Route.
const lastApplied = "kubectl.kubernetes.io/last-applied-configuration"

// slimForCache is the transform of every informer of the agent: before an
// object enters the cache (and reaches the event handlers) it drops what
// the agent never reads, so the cache holds about what the planner needs.
//   - every object: managedFields (server-side apply's field ownership,
//     often larger than the spec) and kubectl's last-applied annotation;
//   - a Node: its image list (up to 50 images with every tag and digest);
//   - this node's NodeRouting: its status and labels and annotations — that
//     informer only notices the object being deleted, and the status of a
//     node with 10,000 Routes is megabytes.
//
// The agent never writes back what it read from a cache (the Node's taint
// is removed with a patch tested against a fresh Get), so nothing dropped
// here can be lost on the server. It edits obj in place, as informers
// allow: obj is freshly decoded and not yet shared.
func slimForCache(obj any) (any, error) {
	if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		slimmed, err := slimForCache(tomb.Obj)
		tomb.Obj = slimmed
		return tomb, err
	}
	m, err := meta.Accessor(obj)
	if err != nil {
		return obj, nil // not an object: leave it alone
	}
	m.SetManagedFields(nil)
	if a := m.GetAnnotations(); a != nil {
		if _, ok := a[lastApplied]; ok {
			delete(a, lastApplied)
			if len(a) == 0 {
				a = nil
			}
			m.SetAnnotations(a)
		}
	}
	switch o := obj.(type) {
	case *corev1.Node:
		o.Status.Images = nil
	case *v1alpha1.NodeRouting:
		o.Status = v1alpha1.NodeRoutingStatus{}
		o.Labels, o.Annotations, o.OwnerReferences = nil, nil, nil
	}
	return obj, nil
}

// slimCaches sets slimForCache on informers not started yet.
func slimCaches(informers ...cache.SharedIndexInformer) {
	for _, i := range informers {
		// Only fails on a started informer, which New never has.
		_ = i.SetTransform(slimForCache)
	}
}
