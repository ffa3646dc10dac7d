// Command celcost prints what the Route CRD's CEL rules cost, computed by the
// API server's own code (k8s.io/apiextensions-apiserver, the version of the
// lab's kube-apiserver): each rule's estimated cost as checked when the CRD
// is installed, the largest spec.destinations maxItems those estimates
// allow, and the runtime cost of Routes at the limit. It is a module of its
// own so that the agent does not depend on apiextensions-apiserver.
//
//	cd hack/celcost && go run . ../../manifests/crds/networking.doks.digitalocean.com_routes.yaml
//
// test/admission checks the same limits against the real API server.
package main

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strings"

	"k8s.io/apiextensions-apiserver/pkg/apis/apiextensions"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apiextensions-apiserver/pkg/apiserver/schema"
	"k8s.io/apiextensions-apiserver/pkg/apiserver/schema/cel"
	"k8s.io/apiextensions-apiserver/pkg/apiserver/schema/cel/model"
	"k8s.io/apimachinery/pkg/util/validation/field"
	celconfig "k8s.io/apiserver/pkg/apis/cel"
	"k8s.io/apiserver/pkg/cel/environment"
	"sigs.k8s.io/yaml"
)

// The limits kube-apiserver enforces (k8s.io/apiextensions-apiserver
// validation.StaticEstimatedCostLimit and StaticEstimatedCRDCostLimit;
// celconfig.RuntimeCELCostBudget is the per-request runtime budget).
const (
	perRuleLimit = 10_000_000
	perCRDLimit  = 100_000_000
)

type ruleCost struct {
	path, rule string
	cost       uint64
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: celcost <Route CRD YAML>")
		os.Exit(2)
	}
	s, err := routeSchema(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	destinations := s.Properties["spec"].Properties["destinations"]
	maxItems := *destinations.ValueValidation.MaxItems

	costs, total := staticCosts(s)
	fmt.Printf("estimated cost at spec.destinations maxItems %d (per-rule limit %d, per-CRD limit %d):\n", maxItems, perRuleLimit, perCRDLimit)
	for _, c := range costs {
		fmt.Printf("  %10d  %5.2f%%  %-40s %s\n", c.cost, 100*float64(c.cost)/perRuleLimit, c.path, c.rule)
	}
	fmt.Printf("  %10d  %5.2f%% of the per-CRD limit: whole schema\n", total, 100*float64(total)/perCRDLimit)

	// The largest maxItems every estimate allows: binary search.
	fits := func(n int64) bool {
		withMaxItems(s, n)
		costs, total := staticCosts(s)
		return total <= perCRDLimit && costs[0].cost <= perRuleLimit
	}
	lo, hi := maxItems, int64(1)<<30
	for hi-lo > 1 {
		if m := (lo + hi) / 2; fits(m) {
			lo = m
		} else {
			hi = m
		}
	}
	withMaxItems(s, hi)
	costs, _ = staticCosts(s)
	fmt.Printf("largest maxItems the estimates allow: %d (at %d, %s is estimated at %d)\n", lo, hi, costs[0].path, costs[0].cost)
	withMaxItems(s, maxItems)

	v := cel.NewValidator(s, true, celconfig.PerCallLimit)
	fmt.Printf("runtime cost of a Route of %d destinations (budget %d per request):\n", maxItems, celconfig.RuntimeCELCostBudget)
	for _, shape := range []struct {
		name     string
		gateways []any
		dest     func(i, n int) string
	}{
		{"IPv4 /24s", []any{"10.114.0.3"}, func(i, _ int) string { return fmt.Sprintf("10.%d.%d.0/24", 128+i/256, i%256) }},
		{"longest entries (49 characters), all IPv6 but the last", []any{"10.114.0.3", "2001:db8::3"}, func(i, n int) string {
			if i == n-1 {
				return "198.51.100.255/32"
			}
			return fmt.Sprintf("2001:0db8:ffff:ffff:%04x:%04x:255.255.255.255/128", 0x1000+i/65536, i%65536)
		}},
	} {
		n := int(maxItems)
		dests := make([]any, n)
		for i := range n {
			dests[i] = shape.dest(i, n)
		}
		obj := map[string]any{"apiVersion": "networking.doks.digitalocean.com/v1alpha1", "kind": "Route",
			"metadata": map[string]any{"name": "limit"},
			"spec":     map[string]any{"gateways": shape.gateways, "destinations": dests}}
		errs, remaining := v.Validate(context.Background(), nil, s, obj, nil, celconfig.RuntimeCELCostBudget)
		used := celconfig.RuntimeCELCostBudget - remaining
		fmt.Printf("  %10d  %5.2f%%  %.1f per destination: %s%s\n", used, 100*float64(used)/celconfig.RuntimeCELCostBudget, float64(used)/float64(n), shape.name, errorsIfAny(errs))
	}
}

func errorsIfAny(errs field.ErrorList) string {
	if len(errs) == 0 {
		return ""
	}
	return fmt.Sprintf(" (REFUSED: %v)", errs.ToAggregate())
}

func routeSchema(file string) (*schema.Structural, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	var crd apiextensionsv1.CustomResourceDefinition
	if err := yaml.UnmarshalStrict(data, &crd); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	var internal apiextensions.JSONSchemaProps
	if err := apiextensionsv1.Convert_v1_JSONSchemaProps_To_apiextensions_JSONSchemaProps(crd.Spec.Versions[0].Schema.OpenAPIV3Schema, &internal, nil); err != nil {
		return nil, err
	}
	return schema.NewStructural(&internal)
}

func withMaxItems(s *schema.Structural, n int64) {
	spec := s.Properties["spec"]
	d := spec.Properties["destinations"]
	d.ValueValidation.MaxItems = &n
	spec.Properties["destinations"] = d
	s.Properties["spec"] = spec
}

// staticCosts is every rule's estimated cost as the CRD's validation
// computes it (the rule's maximum cost times the number of times it can run:
// the product of the maxItems above it), costliest first, and their sum.
func staticCosts(s *schema.Structural) ([]ruleCost, uint64) {
	var costs []ruleCost
	var walk func(s *schema.Structural, path string, cardinality uint64, root bool)
	walk = func(s *schema.Structural, path string, cardinality uint64, root bool) {
		if len(s.XValidations) > 0 {
			results, err := cel.Compile(s, model.SchemaDeclType(s, root), celconfig.PerCallLimit, environment.MustBaseEnvSet(environment.DefaultCompatibilityVersion()), cel.NewExpressionsEnvLoader())
			if err != nil {
				panic(err)
			}
			for i, r := range results {
				if r.Error != nil {
					panic(fmt.Sprintf("%s: %v", path, r.Error))
				}
				rule := strings.Join(strings.Fields(s.XValidations[i].Rule), " ")
				if len(rule) > 60 {
					rule = rule[:60] + "…"
				}
				costs = append(costs, ruleCost{path: fmt.Sprintf("%s[%d]", path, i), rule: rule, cost: r.MaxCost * cardinality})
			}
		}
		for name, p := range s.Properties {
			walk(&p, path+"."+name, cardinality, false)
		}
		if s.Items != nil {
			n := uint64(1) << 40
			if s.ValueValidation != nil && s.ValueValidation.MaxItems != nil {
				n = uint64(*s.ValueValidation.MaxItems)
			}
			walk(s.Items, path+"[*]", cardinality*n, false)
		}
	}
	walk(s, "", 1, true)
	sort.Slice(costs, func(i, j int) bool { return costs[i].cost > costs[j].cost })
	var total uint64
	for _, c := range costs {
		total += c.cost
	}
	return costs, total
}
