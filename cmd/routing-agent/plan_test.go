package main

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"
)

const cloudNode = "../../test/testdata/node/cloud-node.yaml"

func seedFile(name string) string { return filepath.Join("../../test/testdata/seed", name) }

func TestPlanSeedExampleOnDescribedNode(t *testing.T) {
	var stdout, stderr bytes.Buffer
	code := run([]string{"plan", "--node", cloudNode, "--table-min", "100", "--table-max", "100", seedFile("02-ecmp.yaml")}, nil, &stdout, &stderr)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	want := `# 1 of 1 Route(s) selected for this node
# Route basic: Applied, table 100
# bypass 10.114.0.3/32: gateway
# bypass 10.114.0.4/32: gateway
# bypass 169.254.169.254/32: metadata
# bypass 198.51.100.53/32: dnsServers
# bypass 203.0.113.100/32: controlPlane
ip nexthop replace id 4110417921 via 10.114.0.3 dev eth1 protocol 245
ip nexthop replace id 4110417922 via 10.114.0.4 dev eth1 protocol 245
ip nexthop replace id 4110483656 group 4110417921/4110417922 protocol 245
ip -4 rule add priority 30001 not to 0.0.0.0/5 goto 30999 protocol 245
ip -4 rule add priority 30010 to 10.114.0.3/32 lookup main protocol 245
ip -4 rule add priority 30010 to 10.114.0.4/32 lookup main protocol 245
ip -4 rule add priority 30010 to 169.254.169.254/32 lookup main protocol 245
ip -4 rule add priority 30010 to 198.51.100.53/32 lookup main protocol 245
ip -4 rule add priority 30010 to 203.0.113.100/32 lookup main protocol 245
ip -4 rule add priority 30100 from 203.0.113.10/32 lookup main protocol 245
ip -4 rule add priority 30100 fwmark 0x2000/0x2000 lookup main protocol 245
ip -4 rule add priority 30200 lookup main suppress_prefixlength 0 protocol 245
ip -4 rule add priority 30301 to 0.0.0.0/5 lookup 100 protocol 245
ip -4 rule add priority 30999 nop protocol 245
ip -4 route replace 0.0.0.0/5 table 100 proto 245 nhid 4110483656
ip -4 route replace unreachable 0.0.0.0/5 table 100 proto 245 metric 4294967295
nft -f - <<'EOF'
table inet routing-agent {
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		iifname != "eth1" iifname != "lo" ct direction original ct mark set ct mark | 0x00002000 comment "routing-agent:034bb68c1ddfb7d6"
		ct direction reply ct mark & 0x00002000 == 0x00002000 meta mark set meta mark | 0x00002000 comment "routing-agent:034bb68c1ddfb7d6"
	}

	chain output {
		type route hook output priority mangle; policy accept;
		ct direction reply ct mark & 0x00002000 == 0x00002000 meta mark set meta mark | 0x00002000 comment "routing-agent:034bb68c1ddfb7d6"
	}
}
EOF
`
	if got := stdout.String(); got != want {
		t.Errorf("plan output:\n%s\nwant:\n%s", got, want)
	}

	// Without nexthop objects, each route names its gateways.
	stdout.Reset()
	if code := run([]string{"plan", "--per-route", "--node", cloudNode, "--table-min", "100", "--table-max", "100", seedFile("02-ecmp.yaml")}, nil, &stdout, &stderr); code != 0 {
		t.Fatalf("--per-route: exit %d: %s", code, stderr.String())
	}
	if got := stdout.String(); strings.Contains(got, "nexthop replace") ||
		!strings.Contains(got, "ip -4 route replace 0.0.0.0/5 table 100 proto 245 nexthop via 10.114.0.3 dev eth1 weight 1 nexthop via 10.114.0.4 dev eth1 weight 1\n") {
		t.Errorf("plan --per-route output:\n%s", got)
	}
}

func TestPlanReportsSelectionAndNodeLevelErrors(t *testing.T) {
	routes := `apiVersion: networking.doks.digitalocean.com/v1alpha1
kind: Route
metadata: {name: other-pool}
spec:
  destinations: ["192.0.2.0/24"]
  gateways: ["10.114.0.3"]
  nodeSelector:
    nodeSelectorTerms:
      - matchExpressions: [{key: doks.digitalocean.com/node-pool, operator: In, values: [gpu-pool]}]
---
apiVersion: networking.doks.digitalocean.com/v1alpha1
kind: Route
metadata: {name: off-link}
spec:
  destinations: ["198.51.100.0/24"]
  gateways: ["10.99.0.1"]
`
	var stdout, stderr bytes.Buffer
	code := run([]string{"plan", "--node", cloudNode, "-", seedFile("05-match-fields.yaml"), seedFile("04-node-selector.yaml")}, strings.NewReader(routes), &stdout, &stderr)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	out := stdout.String()
	for _, want := range []string{
		"# 3 of 4 Route(s) selected for this node",
		"# Route off-link: Invalid (GatewayNotConnected): gateway 10.99.0.1 is not on a directly connected network of this node",
		"# Route other-pool: not selected by its nodeSelector",
		"# Route basic: Conflict (EqualPrefix)", // both seed files are named basic and claim 0.0.0.0/5
		`#   destination 0.0.0.0/5 not in effect (EqualPrefix): destination 0.0.0.0/5 is also in Route "basic", which is older and wins`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

func TestPlanRejectsBadFlagsAndFiles(t *testing.T) {
	for _, args := range [][]string{
		{"plan", "--table-min", "200", "--table-max", "300", seedFile("01-basic.yaml")},
		{"plan", "--priority-base", "32000", seedFile("01-basic.yaml")},
		{"plan", "--protocol", "2", seedFile("01-basic.yaml")},
		{"plan", "--node", cloudNode},
	} {
		var stdout, stderr bytes.Buffer
		if code := run(args, nil, &stdout, &stderr); code != 2 {
			t.Errorf("%v: exit %d, want 2 (stderr %q)", args, code, stderr.String())
		}
	}
	var stdout, stderr bytes.Buffer
	if code := run([]string{"plan", "--node", "missing.yaml", seedFile("01-basic.yaml")}, nil, &stdout, &stderr); code != 1 || !strings.Contains(stderr.String(), "missing.yaml") {
		t.Errorf("missing node file: exit %d, stderr %q", code, stderr.String())
	}
}
