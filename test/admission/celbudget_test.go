package admission

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"sigs.k8s.io/yaml"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
)

// BenchmarkCELBudget measures, against the real API server, the largest
// spec.destinations maxItems for which it accepts the Route CRD's CEL rules
// (their estimated cost within the per-rule and per-CRD budgets): it
// installs copies of the CRD, each under a group of its own, binary
// searching maxItems, and reports the answer and the error just above it.
// hack/celcost shows the per-rule estimates behind it.
//
//	go test -run '^$' -bench CELBudget -benchtime 1x -v ./test/admission
func BenchmarkCELBudget(b *testing.B) {
	ctx := context.Background()
	dyn, err := dynamic.NewForConfig(cp.Config)
	if err != nil {
		b.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(repoRoot(), "manifests", "crds", "networking.doks.digitalocean.com_routes.yaml"))
	if err != nil {
		b.Fatal(err)
	}
	crds := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	variant := 0
	install := func(maxItems int64) error {
		variant++
		crd := &unstructured.Unstructured{}
		if err := yaml.Unmarshal(data, &crd.Object); err != nil {
			b.Fatal(err)
		}
		group := fmt.Sprintf("v%d.celbudget.test", variant)
		crd.SetName("routes." + group)
		versions, _, _ := unstructured.NestedSlice(crd.Object, "spec", "versions")
		if err := unstructured.SetNestedField(versions[0].(map[string]any), maxItems, "schema", "openAPIV3Schema", "properties", "spec", "properties", "destinations", "maxItems"); err != nil {
			b.Fatal(err)
		}
		if err := unstructured.SetNestedSlice(crd.Object, versions, "spec", "versions"); err != nil {
			b.Fatal(err)
		}
		if err := unstructured.SetNestedField(crd.Object, group, "spec", "group"); err != nil {
			b.Fatal(err)
		}
		if _, err := dyn.Resource(crds).Create(ctx, crd, metav1.CreateOptions{}); err != nil {
			return err
		}
		return dyn.Resource(crds).Delete(ctx, crd.GetName(), metav1.DeleteOptions{})
	}
	for range b.N {
		lo, hi := int64(v1alpha1.MaxDestinations), int64(1)<<24
		if err := install(lo); err != nil {
			b.Fatalf("the CRD at maxItems %d: %v", lo, err)
		}
		if install(hi) == nil {
			b.Fatalf("the CRD at maxItems %d was accepted: the search needs a higher bound", hi)
		}
		for hi-lo > 1 {
			if m := (lo + hi) / 2; install(m) == nil {
				lo = m
			} else {
				hi = m
			}
		}
		err := install(hi)
		if err == nil || !strings.Contains(err.Error(), "cost") {
			b.Fatalf("maxItems %d: want a refusal for cost, got %v", hi, err)
		}
		b.Logf("largest spec.destinations maxItems the API server's CEL budget accepts: %d (%.1f x the limit %d); at %d: %v", lo, float64(lo)/v1alpha1.MaxDestinations, v1alpha1.MaxDestinations, hi, err)
		b.ReportMetric(float64(lo), "maxItems")
	}
}
