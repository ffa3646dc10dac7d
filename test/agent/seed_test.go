package agent_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
	"github.com/routing-agent/routing-agent/pkg/lab/cluster"
	"github.com/routing-agent/routing-agent/pkg/lab/topology"
)

// TestSeedExamplesThroughAgents applies each of the announcement's examples
// with kubectl, verbatim, to two nodes — worker-pool-x in pool worker-pool,
// worker-pool-y in another — and checks which node's kernel gets the route.
func TestSeedExamplesThroughAgents(t *testing.T) {
	e := newEnvNodes(t, topology.Options{Purpose: "seed", Nodes: 2}, []cluster.NodeSpec{
		{Name: "worker-pool-x", Labels: map[string]string{"doks.digitalocean.com/node-pool": "worker-pool"}},
		{Name: "worker-pool-y", Labels: map[string]string{"doks.digitalocean.com/node-pool": "other-pool"}},
	}, "5s")
	for _, tc := range []struct {
		file    string
		dst     string
		gateway string // how the route reads in ip route show
		on      [2]bool
	}{
		{"01-basic.yaml", "0.0.0.0/5", "via 10.114.0.3 dev vpc0", [2]bool{true, true}},
		{"02-ecmp.yaml", "0.0.0.0/5", "nexthop via 10.114.0.4 dev vpc0", [2]bool{true, true}},
		{"03-default-override.yaml", "default", "nexthop via 10.114.0.4 dev vpc0", [2]bool{true, true}},
		{"04-node-selector.yaml", "0.0.0.0/5", "via 10.114.0.3 dev vpc0", [2]bool{true, false}},
		{"05-match-fields.yaml", "0.0.0.0/5", "via 10.114.0.3 dev vpc0", [2]bool{false, true}},
		{"06-single-gateway-default.yaml", "default", "via 10.114.0.3 dev vpc0", [2]bool{true, true}},
	} {
		t.Run(tc.file, func(t *testing.T) {
			e.t = t
			file := filepath.Join(repoRoot(), "test", "testdata", "seed", tc.file)
			if out, err := e.cp.Kubectl("apply", "-f", file).CombinedOutput(); err != nil {
				t.Fatalf("kubectl apply: %v\n%s", err, out)
			}
			data, _ := os.ReadFile(file)
			var want v1alpha1.Route
			if err := yaml.Unmarshal(data, &want); err != nil {
				t.Fatal(err)
			}
			for i, selected := range tc.on {
				e.eventually(5*time.Second, tc.file+" on "+e.name(i), func() (bool, string) {
					out := e.routesOn(i)
					has := strings.HasPrefix(out, tc.dst+" ") && strings.Contains(out, tc.gateway)
					return has == selected && (selected || out == ""), out
				})
			}
		})
	}
}
