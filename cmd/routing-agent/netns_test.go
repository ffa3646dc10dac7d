package main

import (
	vnetns "github.com/vishvananda/netns"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/go-logr/logr"

	"github.com/routing-agent/routing-agent/pkg/applier"
	"github.com/routing-agent/routing-agent/pkg/connmark"
	"github.com/routing-agent/routing-agent/pkg/lab/netns"
	"github.com/routing-agent/routing-agent/pkg/lab/topology"
	"github.com/routing-agent/routing-agent/pkg/nodefacts"
	"github.com/routing-agent/routing-agent/pkg/planner"
	"github.com/routing-agent/routing-agent/pkg/selection"
)

// The test binary doubles as routing-agent, so that the real command can be
// run inside a lab namespace with `ip netns exec`.
const asCommand = "ROUTING_AGENT_TEST_AS_COMMAND"

func TestMain(m *testing.M) {
	if os.Getenv(asCommand) == "1" {
		os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// command runs routing-agent with args inside namespace ns.
func command(t *testing.T, ns string, args ...string) (string, error) {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns, self}, args...)...)
	cmd.Env = append(os.Environ(), asCommand+"=1")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestPlanAndCleanupInNamespace: plan reads a real node's namespace; what
// it prints is what the applier installs; cleanup removes exactly that.
func TestPlanAndCleanupInNamespace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test builds network namespaces and must run as root (make test runs it as root)")
	}
	if err := netns.RemoveStale(); err != nil {
		t.Fatal(err)
	}
	lab, err := topology.New(topology.Options{Purpose: "cmd"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lab.Close() })

	resolv := t.TempDir() + "/resolv.conf"
	if err := os.WriteFile(resolv, []byte("nameserver 198.51.100.53\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := command(t, lab.Node, "plan", "--resolv-conf", resolv, "--control-plane", "203.0.113.100", seedFile("03-default-override.yaml"))
	if err != nil {
		t.Fatalf("plan: %v\n%s", err, out)
	}
	for _, want := range []string{
		"# Route basic: Applied, table ",
		"ip -4 rule add priority 30010 to 198.51.100.53/32 lookup main protocol 245",
		"ip -4 rule add priority 30100 from 203.0.113.10/32 lookup main protocol 245",
		"ip -4 rule add priority 30100 fwmark 0x2000/0x2000 lookup main protocol 245",
		"ip nexthop replace id 4110417921 via 10.114.0.3 dev vpc0 protocol 245",
		"ip nexthop replace id 4110417922 via 10.114.0.4 dev vpc0 protocol 245",
		" proto 245 nhid 4110",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("plan output lacks %q:\n%s", want, out)
		}
	}

	// Install what plan printed, through the applier, then add a foreign rule.
	h, closeHandle, err := netns.NetlinkHandle(lab.Node)
	if err != nil {
		t.Fatal(err)
	}
	defer closeHandle()
	node, err := nodefacts.Read(h)
	if err != nil {
		t.Fatal(err)
	}
	routes, err := loadRoutes([]string{seedFile("03-default-override.yaml")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	selected, _ := selection.Filter(routes, nil)
	nsFile, err := os.Open(filepath.Join("/run/netns", lab.Node))
	if err != nil {
		t.Fatal(err)
	}
	defer nsFile.Close()
	marks, err := connmark.New(int(nsFile.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	ap := applier.New(h, planner.DefaultConfig(), logr.Discard())
	if err := ap.SetNamespace(vnetns.NsHandle(nsFile.Fd())); err != nil {
		t.Fatal(err)
	}
	defer ap.Close()
	ap.SetMarker(connmark.Planned{Table: marks})
	if rep, err := ap.Apply(planner.Compute(planner.Input{Config: planner.DefaultConfig(), Node: node, Routes: selected})); err != nil || !rep.Marking {
		t.Fatalf("apply: %v, marking %v (%v)", err, rep.Marking, rep.MarkingErr)
	}
	if out, err := lab.Exec(lab.Node, "ip", "rule", "add", "priority", "30400", "lookup", "777"); err != nil {
		t.Fatalf("%v: %s", err, out)
	}

	out, err = command(t, lab.Node, "cleanup")
	if err != nil {
		t.Fatalf("cleanup: %v\n%s", err, out)
	}
	if !strings.Contains(out, "removed 8 rules and 2 routes and the nftables table inet routing-agent, and 3 nexthop objects") || !strings.Contains(out, "lookup 777") {
		t.Errorf("cleanup said:\n%s", out)
	}
	if tables, _ := lab.Exec(lab.Node, "nft", "list", "tables"); strings.Contains(tables, "routing-agent") {
		t.Errorf("after cleanup the nftables table is still there:\n%s", tables)
	}
	rules, _ := lab.Exec(lab.Node, "ip", "rule")
	if strings.Contains(rules, "proto 245") || !strings.Contains(rules, "lookup 777") {
		t.Errorf("after cleanup:\n%s", rules)
	}
	if routes, _ := lab.Exec(lab.Node, "ip", "route", "show", "table", "all", "proto", "245"); routes != "" {
		t.Errorf("routes left: %s", routes)
	}
}
