package agent

import (
	"reflect"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
)

func TestSlimForCache(t *testing.T) {
	managed := []metav1.ManagedFieldsEntry{{Manager: "kubectl-client-side-apply", Operation: metav1.ManagedFieldsOperationUpdate}}
	meta := func(annotations map[string]string) metav1.ObjectMeta {
		return metav1.ObjectMeta{Name: "vpn", UID: "u1", ResourceVersion: "7", Labels: map[string]string{"team": "a"},
			Annotations: annotations, ManagedFields: managed, CreationTimestamp: metav1.Unix(100, 0)}
	}
	spec := v1alpha1.RouteSpec{Destinations: []string{"192.0.2.0/24"}, Gateways: []string{"10.114.0.3"}}

	// A Route keeps everything the planner and Events read, and the
	// user's other annotations.
	route := &v1alpha1.Route{ObjectMeta: meta(map[string]string{lastApplied: `{"spec":{}}`, "owner": "net-team"}), Spec: spec}
	got, err := slimForCache(route)
	if err != nil {
		t.Fatal(err)
	}
	want := &v1alpha1.Route{ObjectMeta: meta(map[string]string{"owner": "net-team"}), Spec: spec}
	want.ManagedFields = nil
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Route:\n got %+v\nwant %+v", got, want)
	}
	// Only kubectl's annotation: none left, as if there never was one.
	got, _ = slimForCache(&v1alpha1.Route{ObjectMeta: meta(map[string]string{lastApplied: "{}"})})
	if a := got.(*v1alpha1.Route).Annotations; a != nil {
		t.Errorf("annotations left: %v", a)
	}

	// A Node keeps its labels, taints and addresses, not its images.
	node := &corev1.Node{ObjectMeta: meta(nil),
		Spec:   corev1.NodeSpec{Taints: []corev1.Taint{{Key: "routing-agent/not-ready", Effect: corev1.TaintEffectNoSchedule}}},
		Status: corev1.NodeStatus{Images: []corev1.ContainerImage{{Names: []string{"registry.k8s.io/pause:3.10"}}}, Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "10.114.0.10"}}}}
	got, _ = slimForCache(node)
	n := got.(*corev1.Node)
	if n.Status.Images != nil || n.ManagedFields != nil || len(n.Spec.Taints) != 1 || len(n.Status.Addresses) != 1 || n.Labels["team"] != "a" {
		t.Errorf("Node: %+v", n)
	}

	// The NodeRouting informer only watches for deletion: name and
	// identity are all it keeps.
	nr := &v1alpha1.NodeRouting{ObjectMeta: meta(map[string]string{"a": "b"}),
		Status: v1alpha1.NodeRoutingStatus{Routes: []v1alpha1.RouteState{{Name: "vpn", Table: 10001}}}}
	nr.OwnerReferences = []metav1.OwnerReference{{Kind: "Node", Name: "vpn"}}
	got, _ = slimForCache(nr)
	want2 := &v1alpha1.NodeRouting{ObjectMeta: metav1.ObjectMeta{Name: "vpn", UID: "u1", ResourceVersion: "7", CreationTimestamp: metav1.Unix(100, 0)}}
	if !reflect.DeepEqual(got, want2) {
		t.Errorf("NodeRouting:\n got %+v\nwant %+v", got, want2)
	}

	// A tombstone of a deletion the watch missed is slimmed inside.
	got, _ = slimForCache(cache.DeletedFinalStateUnknown{Key: "vpn", Obj: &v1alpha1.Route{ObjectMeta: meta(nil)}})
	if r := got.(cache.DeletedFinalStateUnknown).Obj.(*v1alpha1.Route); r.ManagedFields != nil || r.Name != "vpn" {
		t.Errorf("tombstone: %+v", r)
	}
	// Anything else passes through.
	if got, err := slimForCache("not an object"); got != "not an object" || err != nil {
		t.Errorf("non-object: %v %v", got, err)
	}
}
