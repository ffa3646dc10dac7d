package main

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"
)

func TestValidateSeedExamples(t *testing.T) {
	files, _ := filepath.Glob("../../test/testdata/seed/*.yaml")
	if len(files) != 6 {
		t.Fatalf("want 6 seed examples, found %d", len(files))
	}
	var stdout, stderr bytes.Buffer
	if code := run(append([]string{"validate"}, files...), nil, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	if got := strings.TrimSpace(stdout.String()); got != "6 Route(s) valid" {
		t.Errorf("stdout = %q", got)
	}
}

func TestValidateReportsFileRouteAndField(t *testing.T) {
	input := `apiVersion: networking.doks.digitalocean.com/v1alpha1
kind: Route
metadata:
  name: fine
spec:
  destinations: ["1.2.3.4/5"]
  gateways: ["10.114.0.3"]
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: ignored
---
apiVersion: networking.doks.digitalocean.com/v1alpha1
kind: Route
metadata:
  name: broken
spec:
  destinations: ["1.2.3.4/5", "not-a-cidr"]
  gateways: ["127.0.0.1"]
`
	var stdout, stderr bytes.Buffer
	code := run([]string{"validate", "-"}, strings.NewReader(input), &stdout, &stderr)
	if code != 1 {
		t.Fatalf("exit %d, want 1; stderr:\n%s", code, stderr.String())
	}
	lines := strings.Split(strings.TrimSpace(stderr.String()), "\n")
	want := []string{
		`-: Route "broken": spec.destinations[1]: Invalid value: "not-a-cidr"`,
		`-: Route "broken": spec.gateways[0]: Invalid value: "127.0.0.1": "127.0.0.1" is a loopback address`,
	}
	if len(lines) != len(want) {
		t.Fatalf("stderr has %d lines, want %d:\n%s", len(lines), len(want), stderr.String())
	}
	for i := range want {
		if !strings.HasPrefix(lines[i], want[i]) {
			t.Errorf("line %d = %q, want prefix %q", i, lines[i], want[i])
		}
	}
}

func TestUsage(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run(nil, nil, &stdout, &stderr); code != 2 || !strings.Contains(stderr.String(), "--node-name (or NODE_NAME) is required") {
		t.Errorf("no arguments (the agent, without a node name): exit %d, stderr %q", code, stderr.String())
	}
	stderr.Reset()
	if code := run([]string{"--node-name", "n1", "--resync-period", "0s"}, nil, &stdout, &stderr); code != 2 || !strings.Contains(stderr.String(), "--resync-period") {
		t.Errorf("bad resync: exit %d, stderr %q", code, stderr.String())
	}
	if code := run([]string{"frobnicate"}, nil, &stdout, &stderr); code != 2 {
		t.Errorf("unknown command: exit %d", code)
	}
}
