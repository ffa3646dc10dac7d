package agent_test

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
	"github.com/routing-agent/routing-agent/pkg/lab/topology"
	"github.com/routing-agent/routing-agent/pkg/planner"
)

// TestFailClosed: while a Route stands, none of its traffic leaves through
// the node's own uplink, whatever happens on the node. Every case runs
// steady UDP to the external host and counts, on the router's end of the
// node's uplink, each packet for the external network: the wrong path.
// The resync is 30 s, so only the agent's netlink notifications can make
// a case pass in time.
func TestFailClosed(t *testing.T) {
	e := newEnvOpts(t, topology.Options{Purpose: "closed", NAT: true}, "30s")
	if err := e.lab.CountUplinkTraffic(0); err != nil {
		t.Fatal(err)
	}
	// leaked counts what reached the wrong path since the last call.
	var seen uint64
	leaked := func() uint64 {
		n, err := e.lab.UplinkPackets(0)
		if err != nil {
			e.t.Fatal(err)
		}
		d := n - seen
		seen = n
		return d
	}
	noLeak := func(what string) {
		e.t.Helper()
		if n := leaked(); n != 0 {
			e.t.Errorf("%s: %d packets for the external network left through the node's own uplink", what, n)
		}
	}
	state := func(name string) *v1alpha1.RouteState { return routeState(e.nodeRouting(0), name) }
	// cleanupRoute deletes a case's Route even when the case failed half-way,
	// so the next case starts from the default override alone.
	cleanupRoute := func(t *testing.T, name string) {
		t.Cleanup(func() {
			err := e.client.NetworkingV1alpha1().Routes().Delete(context.Background(), name, metav1.DeleteOptions{})
			if err != nil && !apierrors.IsNotFound(err) {
				t.Error(err)
			}
		})
	}
	stopWhoami, err := e.c.StartWhoami()
	if err != nil {
		t.Fatal(err)
	}
	defer stopWhoami()

	e.applyRoute(newRoute("default", []string{"0.0.0.0/0"}, []string{"10.114.0.3", "10.114.0.4"}))
	e.waitNexthops("default", "10.114.0.3,10.114.0.4", 10*time.Second)
	table := func(name string) string {
		e.t.Helper()
		var s *v1alpha1.RouteState
		e.eventually(10*time.Second, "table of "+name, func() (bool, string) {
			s = state(name)
			return s != nil && s.Table != 0, fmt.Sprintf("%+v", s)
		})
		return fmt.Sprint(s.Table)
	}
	defaultTable := table("default")

	t.Run("the node's interface towards the gateways goes down and up", func(t *testing.T) {
		e.t = t
		leaked()
		tr := startTraffic(t, e.lab, e.ns(0), 16, 10*time.Millisecond)
		time.Sleep(300 * time.Millisecond)
		if out, err := e.lab.Exec(e.ns(0), "ip", "link", "set", topology.VPCIf, "down"); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		// The kernel flushed the gateway routes and refuses them back;
		// what is left is the backstop.
		e.eventually(5*time.Second, "the Route reports the kernel's refusal", func() (bool, string) {
			s := state("default")
			return s != nil && s.Reason == "KernelRejected", fmt.Sprintf("%+v", s)
		})
		// (ip leaves out the proto it filters on.)
		if got := strings.TrimSpace(e.routesOn(0)); got != "unreachable default table "+defaultTable+" metric 4294967295" {
			t.Errorf("with vpc0 down the agent's routes are\n%s\nwant only the backstop", got)
		}
		time.Sleep(time.Second)
		if out, err := e.lab.Exec(e.ns(0), "ip", "link", "set", topology.VPCIf, "up"); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		back := e.waitNexthops("default", "10.114.0.3,10.114.0.4", 10*time.Second)
		t.Logf("gateway routes back %s after the link came up", back.Round(time.Millisecond))
		e.eventually(10*time.Second, "the refusal is cleared", func() (bool, string) {
			s := state("default")
			return s != nil && s.Reason == "" && len(s.NotAppliedDestinations) == 0, fmt.Sprintf("%+v", s)
		})
		time.Sleep(500 * time.Millisecond)
		sent, lost := tr.Finish()
		var total, missing int64
		for port := range sent {
			total += sent[port]
			missing += lost[port]
		}
		if missing == total {
			t.Fatal("no datagram arrived at all; the test proves nothing")
		}
		t.Logf("%d datagrams sent, %d lost; while the link was down the kernel refused the sends (no route to host)", total, missing)
		noLeak("interface down and up")
	})

	t.Run("the node loses its address towards the gateways", func(t *testing.T) {
		e.t = t
		leaked()
		tr := startTraffic(t, e.lab, e.ns(0), 16, 10*time.Millisecond)
		time.Sleep(300 * time.Millisecond)
		vpcAddr := e.lab.NodeVPC.String() + "/20"
		// A lost DHCP lease, or an interface re-created without its
		// addresses yet: the gateways are on no connected network now.
		if out, err := e.lab.Exec(e.ns(0), "ip", "addr", "del", vpcAddr, "dev", topology.VPCIf); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		e.eventually(5*time.Second, "the Route stays, stranded", func() (bool, string) {
			s := state("default")
			return s != nil && s.Phase == v1alpha1.RouteApplied && s.Reason == "GatewayNotConnected", fmt.Sprintf("%+v", s)
		})
		if got := strings.TrimSpace(e.routesOn(0)); got != "unreachable default table "+defaultTable+" metric 4294967295" {
			t.Errorf("without the VPC address the agent's routes are\n%s\nwant only the backstop", got)
		}
		time.Sleep(time.Second)
		if out, err := e.lab.Exec(e.ns(0), "ip", "addr", "add", vpcAddr, "dev", topology.VPCIf); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		e.waitNexthops("default", "10.114.0.3,10.114.0.4", 10*time.Second)
		e.eventually(10*time.Second, "the Route is whole again", func() (bool, string) {
			s := state("default")
			return s != nil && s.Reason == "", fmt.Sprintf("%+v", s)
		})
		tr.Finish()
		noLeak("address lost and back")
	})

	t.Run("a gateway the kernel would refuse is a node-level reason", func(t *testing.T) {
		e.t = t
		leaked()
		cleanupRoute(t, "bcast")
		e.applyRoute(newRoute("bcast", []string{"198.51.100.80/32"}, []string{"10.114.15.255"}))
		e.eventually(10*time.Second, "the broadcast gateway is refused on the node", func() (bool, string) {
			s := state("bcast")
			return s != nil && s.Phase == v1alpha1.RouteInvalid && s.Reason == "GatewayNotUsable", fmt.Sprintf("%+v", s)
		})
		if routes := e.routesOn(0); strings.Contains(routes, "198.51.100.80") {
			t.Errorf("the refused Route left routes (a throw would send its traffic to main):\n%s", routes)
		}
		if out, _ := e.lab.Exec(e.ns(0), "ip", "route", "get", "198.51.100.80"); !strings.Contains(out, "table "+defaultTable) {
			t.Errorf("ip route get 198.51.100.80: %s, want the default override's table %s", out, defaultTable)
		}
		if s := state("default"); s == nil || s.Reason != "" {
			t.Errorf("the default override was disturbed: %+v", s)
		}
		for range 5 {
			_ = topology.SendUDP(e.ns(0), netip.MustParseAddrPort("198.51.100.80:9200"), []byte("x"))
		}
		noLeak("traffic to the refused Route's destination")
		e.deleteRoute("bcast")
	})

	t.Run("a conflicting prefix is left out alone", func(t *testing.T) {
		e.t = t
		leaked()
		cleanupRoute(t, "younger")
		e.applyRoute(newRoute("younger", []string{"0.0.0.0/0", "198.51.100.0/24"}, []string{"10.114.0.4"}))
		e.eventually(10*time.Second, "the younger Route applies all but the prefix the older one owns", func() (bool, string) {
			s := state("younger")
			return s != nil && s.Phase == v1alpha1.RouteApplied && s.Reason == "DestinationsNotApplied" && s.NotAppliedCount == 1 &&
					len(s.NotAppliedDestinations) == 1 && s.NotAppliedDestinations[0].Destination == "0.0.0.0/0" && s.NotAppliedDestinations[0].Reason == "EqualPrefix",
				fmt.Sprintf("%+v", s)
		})
		e.waitNexthops("198.51.100.0/24", "10.114.0.4", 5*time.Second)
		if got := e.egress(0); got != e.lab.GatewayUplink[1].String() {
			t.Errorf("the external host saw %s, want gateway 10.114.0.4's %s", got, e.lab.GatewayUplink[1])
		}
		e.deleteRoute("younger")
		e.waitNexthops("198.51.100.0/24", "", 5*time.Second)
		noLeak("a Route with one conflicting prefix")
	})

	t.Run("nested Routes added and removed in a tight loop", func(t *testing.T) {
		e.t = t
		leaked()
		tr := startTraffic(t, e.lab, e.ns(0), 16, 5*time.Millisecond)
		via := func() string {
			out, _ := e.lab.Exec(e.ns(0), "ip", "route", "get", e.lab.ExternalAddr.String())
			return out
		}
		const rounds = 10
		cleanupRoute(t, "inner")
		for i := range rounds {
			e.applyRoute(newRoute("inner", []string{"198.51.100.0/24"}, []string{"10.114.0.4"}))
			e.eventually(5*time.Second, fmt.Sprintf("round %d: the nested Route takes over", i), func() (bool, string) {
				out := via()
				return !strings.Contains(out, "table "+defaultTable) && strings.Contains(out, "via 10.114.0.4"), out
			})
			e.deleteRoute("inner")
			e.eventually(5*time.Second, fmt.Sprintf("round %d: the default override takes it back", i), func() (bool, string) {
				out := via()
				return strings.Contains(out, "table "+defaultTable), out
			})
		}
		sent, lost := tr.Finish()
		var total, missing int64
		for port := range sent {
			total += sent[port]
			missing += lost[port]
		}
		t.Logf("%d rounds of add and delete: %d of %d datagrams lost", rounds, missing, total)
		noLeak("nested Routes added and removed")
	})

	t.Run("agent restart with one gateway dead", func(t *testing.T) {
		e.t = t
		leaked()
		if err := e.lab.CountExternalTraffic(0); err != nil {
			t.Fatal(err)
		}
		e.silence(0, true)
		defer e.silence(0, false)
		e.waitNexthops("default", "10.114.0.4", 15*time.Second)
		tr := startTraffic(t, e.lab, e.ns(0), 16, 10*time.Millisecond)
		time.Sleep(300 * time.Millisecond)
		before, err := e.lab.ExternalPackets(0)
		if err != nil {
			t.Fatal(err)
		}
		e.stopAgent(0, syscall.SIGTERM)
		time.Sleep(time.Second)
		e.startAgent(0)
		e.waitReady(0)
		time.Sleep(time.Second)
		after, err := e.lab.ExternalPackets(0)
		if err != nil {
			t.Fatal(err)
		}
		sent, lost := tr.Finish()
		var total, missing int64
		for port := range sent {
			total += sent[port]
			missing += lost[port]
		}
		t.Logf("restart with gateway 10.114.0.3 dead: %d packets reached it, %d of %d datagrams lost", after-before, missing, total)
		if after != before {
			t.Errorf("%d packets were sent to the dead gateway across the restart", after-before)
		}
		if missing != 0 {
			t.Errorf("%d datagrams lost across the restart", missing)
		}
		if got := e.nexthops("default"); got != "10.114.0.4" {
			t.Errorf("after the restart the route holds %q, want only the live gateway", got)
		}
		noLeak("restart with a dead gateway")
	})

	t.Run("a main-table route appears inside a destination", func(t *testing.T) {
		e.t = t
		e.deleteRoute("default")
		cleanupRoute(t, "part")
		t.Cleanup(func() { // the cases after this one need the default override back
			e.applyRoute(newRoute("default", []string{"0.0.0.0/0"}, []string{"10.114.0.3", "10.114.0.4"}))
			e.waitNexthops("default", "10.114.0.3,10.114.0.4", 10*time.Second)
		})
		e.applyRoute(newRoute("part", []string{"198.51.100.0/24", "172.17.0.0/16"}, []string{"10.114.0.3"}))
		e.waitNexthops("198.51.100.0/24", "10.114.0.3", 10*time.Second)
		leaked()
		tr := startTraffic(t, e.lab, e.ns(0), 16, 10*time.Millisecond)
		time.Sleep(300 * time.Millisecond)
		// docker0, a VPN client or a CNI bridge appearing on the node.
		for _, args := range [][]string{{"link", "add", "docker0", "type", "veth", "peer", "name", "docker1"}, {"addr", "add", "172.17.0.1/16", "dev", "docker0"}, {"link", "set", "docker1", "up"}, {"link", "set", "docker0", "up"}} {
			if out, err := e.lab.Exec(e.ns(0), append([]string{"ip"}, args...)...); err != nil {
				t.Fatalf("%v: %s", err, out)
			}
		}
		e.eventually(5*time.Second, "the shadowed destination is reported alone", func() (bool, string) {
			s := state("part")
			return s != nil && s.Phase == v1alpha1.RouteApplied && s.Reason == "DestinationsNotApplied" && s.NotAppliedCount == 1 &&
				slices.ContainsFunc(s.NotAppliedDestinations, func(d v1alpha1.DestinationState) bool {
					return d.Destination == "172.17.0.0/16" && d.Reason == "DestinationShadowed"
				}), fmt.Sprintf("%+v", s)
		})
		time.Sleep(500 * time.Millisecond)
		sent, lost := tr.Finish()
		for port := range sent {
			if lost[port] != 0 {
				t.Errorf("flow %d lost %d of %d datagrams while a main route appeared in another destination", port, lost[port], sent[port])
			}
		}
		if got := e.nexthops("198.51.100.0/24"); got != "10.114.0.3" {
			t.Errorf("the Route's other destination holds %q, want it kept via 10.114.0.3", got)
		}
		noLeak("a main route inside a destination")
		if out, err := e.lab.Exec(e.ns(0), "ip", "link", "del", "docker0"); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		e.eventually(5*time.Second, "the destination is back in effect", func() (bool, string) {
			s := state("part")
			return s != nil && s.Reason == "" && s.NotAppliedCount == 0, fmt.Sprintf("%+v", s)
		})
	})

	t.Run("a hand-deleted rule is back within a second", func(t *testing.T) {
		e.t = t
		// The default Route's /0 is two rules, 0.0.0.0/1 and 128.0.0.0/1.
		rule := "to 0.0.0.0/1 lookup " + table("default")
		var worst time.Duration
		for range 5 {
			if out, err := e.lab.Exec(e.ns(0), append([]string{"ip", "rule", "del"}, strings.Fields(rule)...)...); err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			deleted := time.Now()
			for !strings.Contains(e.kernel(0), "from all to 0.0.0.0/1 lookup "+defaultTable+" proto 245") {
				if time.Since(deleted) > 5*time.Second {
					t.Fatalf("rule %q not restored within 5 s (resync is 30 s)\n%s", rule, tail(e.logs(0), 20))
				}
				time.Sleep(2 * time.Millisecond)
			}
			worst = max(worst, time.Since(deleted))
		}
		t.Logf("hand-deleted lookup rule restored after at most %s (5 trials)", worst.Round(time.Millisecond))
		if worst > time.Second {
			t.Errorf("a hand-deleted rule took %s to come back, want within a second", worst)
		}
		leaked() // the window while the rule was gone is the deleter's doing
	})

	// Deleting a nexthop group deletes the IPv4 routes through it without
	// a route notification: only the nexthop one tells the agent.
	t.Run("a hand-deleted nexthop group is back within a second, nothing leaks meanwhile", func(t *testing.T) {
		e.t = t
		leaked()
		tr := startTraffic(t, e.lab, e.ns(0), 16, 10*time.Millisecond)
		time.Sleep(300 * time.Millisecond)
		var worst time.Duration
		for range 5 {
			line := strings.SplitN(e.routesOn(0), "\n", 2)[0]
			f := strings.Fields(line)
			if len(f) < 3 || f[0] != "default" || f[1] != "nhid" {
				t.Fatalf("the default Route's route does not use a nexthop group: %q", line)
			}
			if out, err := e.lab.Exec(e.ns(0), "ip", "nexthop", "del", "id", f[2]); err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			deleted := time.Now()
			if strings.Contains(e.routesOn(0), "nhid "+f[2]) {
				t.Fatal("the group's deletion left its route: the test proves nothing")
			}
			for !strings.Contains(e.routesOn(0), "default nhid "+f[2]) {
				if time.Since(deleted) > 5*time.Second {
					t.Fatalf("group %s and its route not restored within 5 s (resync is 30 s)\n%s\n%s", f[2], e.routesOn(0), tail(e.logs(0), 20))
				}
				time.Sleep(2 * time.Millisecond)
			}
			worst = max(worst, time.Since(deleted))
		}
		t.Logf("hand-deleted nexthop group and its route restored after at most %s (5 trials)", worst.Round(time.Millisecond))
		if worst > time.Second {
			t.Errorf("a hand-deleted nexthop group took %s to come back, want within a second", worst)
		}
		time.Sleep(300 * time.Millisecond)
		if sent, lost := tr.Finish(); sumPorts(lost) == sumPorts(sent) {
			t.Fatal("no datagram arrived at all; the test proves nothing")
		}
		// Meanwhile the backstop held the destination: nothing took main.
		noLeak("a nexthop group deleted by hand")
	})

	t.Run("a deleted NodeRouting is recreated with its tables", func(t *testing.T) {
		e.t = t
		before := table("default")
		if err := e.client.NetworkingV1alpha1().NodeRoutings().Delete(context.Background(), e.name(0), metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		e.eventually(10*time.Second, "NodeRouting recreated", func() (bool, string) {
			s := state("default")
			return s != nil && fmt.Sprint(s.Table) == before, fmt.Sprintf("%+v", s)
		})
	})

	t.Run("a restart with another band removes the old one", func(t *testing.T) {
		e.t = t
		leaked()
		tr := startTraffic(t, e.lab, e.ns(0), 16, 10*time.Millisecond)
		time.Sleep(300 * time.Millisecond)
		for _, base := range []int{31000, 30000} {
			e.stopAgent(0, syscall.SIGTERM)
			if err := e.c.StartAgent(0, "--resync-period", e.resync, "--priority-base", fmt.Sprint(base)); err != nil {
				t.Fatal(err)
			}
			e.waitReady(0)
			e.eventually(10*time.Second, fmt.Sprintf("only the band at %d holds the agent's rules", base), func() (bool, string) {
				k := e.kernel(0)
				for _, l := range strings.Split(k, "\n") {
					priority, _, isRule := strings.Cut(l, ":\t")
					if n, err := strconv.Atoi(priority); isRule && err == nil && strings.Contains(l, "proto 245") && (n < base || n >= base+1000) {
						return false, k
					}
				}
				return strings.Contains(k, fmt.Sprintf("%d:\tfrom all to 0.0.0.0/1 lookup %s proto 245", base+planner.OffsetDispatch, defaultTable)), k
			})
		}
		sent, lost := tr.Finish()
		for port := range sent {
			if lost[port] != 0 {
				t.Errorf("flow %d lost %d of %d datagrams while the band moved", port, lost[port], sent[port])
			}
		}
		noLeak("band moved")
	})
}

func sumPorts(m map[int]int64) int64 {
	var n int64
	for _, v := range m {
		n += v
	}
	return n
}
