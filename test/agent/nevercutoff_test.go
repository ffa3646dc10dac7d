package agent_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
	"github.com/routing-agent/routing-agent/pkg/lab/cluster"
	"github.com/routing-agent/routing-agent/pkg/lab/netns"
	"github.com/routing-agent/routing-agent/pkg/lab/topology"
)

// TestNeverCutOff proves with packets that a default override does not cut
// the node off the control plane it really uses, when the gateways drop
// control-plane traffic (an API server that allow-lists node addresses):
// the agent reaches its API server by name through the lab's load
// balancer, the kubelet's kubeconfig names another VIP, neither is the
// EndpointSlice's address. The subtests run in order on one lab.
func TestNeverCutOff(t *testing.T) {
	dir := t.TempDir()
	resolv := filepath.Join(dir, "resolv.conf")
	kubeletKubeconfig := filepath.Join(dir, "kubelet.conf")
	writeFile(t, resolv, "nameserver 198.51.100.53\n")
	vip1, vip2, vip3, vip4 := cluster.APIVIPs[0], cluster.APIVIPs[1], cluster.APIVIPs[2], cluster.APIVIPs[3]

	e := newEnvCluster(t, cluster.Options{
		Topology:    topology.Options{Purpose: "cutoff", Nodes: 1, NAT: true},
		AgentServer: "https://" + cluster.APIName + ":6443",
	}, "30s", "--resolv-conf", resolv, "--kubelet-kubeconfig", kubeletKubeconfig, "--resolve-interval", "1s")
	// The gateways drop whatever is for the API server's port, wherever
	// it goes: a control-plane connection that takes the override dies.
	if err := e.lab.DropAPIPortAtGateways(); err != nil {
		t.Fatal(err)
	}
	guardDrops := func() uint64 {
		n, err := e.lab.APIPortDrops()
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	bypassed := func(a netip.Addr) bool { return slices.Contains(e.bypassRules(0), a) }

	t.Run("kubeconfig servers by name and by VIP stay reachable under 0.0.0.0/0", func(t *testing.T) {
		e.t = t
		e.applyRoute(newRoute("override", []string{"0.0.0.0/0"}, []string{"10.114.0.3", "10.114.0.4"}))
		e.eventually(15*time.Second, "the override applied", func() (bool, string) {
			s := routeState(e.nodeRouting(0), "override")
			return s != nil && s.Phase == v1alpha1.RouteApplied && strings.Contains(e.routesOn(0), "nexthop via 10.114.0.4"), fmt.Sprintf("%+v\n%s", s, e.routesOn(0))
		})
		if !bypassed(vip1) {
			t.Fatalf("%s, the address of %s in the agent's kubeconfig, is not bypassed: %v", vip1, cluster.APIName, e.bypassRules(0))
		}

		// The kubelet's server, a VIP the agent does not know yet: the
		// override takes it, and the gateways drop it. That is what this
		// test guards against, shown here to happen.
		if err := e.lab.AddAPIVIP(vip2); err != nil {
			t.Fatal(err)
		}
		drops := guardDrops()
		if err := e.dialAPI(0, vip2.String()); err == nil {
			t.Fatalf("%s reached under the override before it was bypassed: the gateways do not drop control-plane traffic, this test proves nothing", vip2)
		}
		if guardDrops() == drops {
			t.Fatal("the failed dial was not dropped by a gateway")
		}
		writeFile(t, kubeletKubeconfig, kubeconfigNaming("https://"+vip2.String()+":6443"))
		begin := time.Now()
		e.eventually(5*time.Second, "the kubelet kubeconfig's server bypassed", func() (bool, string) {
			return bypassed(vip2), fmt.Sprint(e.bypassRules(0))
		})
		t.Logf("kubelet kubeconfig written: its server bypassed %s later (--resolve-interval 1s)", time.Since(begin).Round(time.Millisecond))

		drops = guardDrops()
		for _, server := range []string{cluster.APIName, vip1.String(), vip2.String()} {
			if err := e.dialAPI(0, server); err != nil {
				t.Errorf("under the override, the API server at %s: %v", server, err)
			}
		}
		if d := guardDrops() - drops; d != 0 {
			t.Errorf("%d control-plane packets went to the gateways", d)
		}
		e.checkBypassStatus(map[netip.Addr]string{vip1: "dns " + cluster.APIName, vip2: "kubelet-kubeconfig", e.lab.ControlPlaneAddr: "endpointslice default/kubernetes"})
		e.checkAgentConnected("probe-1")
	})

	t.Run("a failed lookup keeps the old bypass", func(t *testing.T) {
		e.t = t
		for _, fail := range []struct {
			what   string
			break_ func()
			want   string
		}{
			{"the DNS server fails (SERVFAIL)", func() { e.c.DNS.SetFailing(true) }, "no DNS server answered"},
			{"the name is gone (NXDOMAIN)", func() { e.c.DNS.SetFailing(false); e.c.DNS.Delete(cluster.APIName) }, "no such host"},
		} {
			fail.break_()
			e.eventually(10*time.Second, fail.what+": the NodeRouting says so", func() (bool, string) {
				c := bypassCondition(e.nodeRouting(0))
				return c != nil && c.Status == metav1.ConditionFalse && c.Reason == "NameUnresolved" && strings.Contains(c.Message, fail.want), fmt.Sprintf("%+v", c)
			})
			time.Sleep(3 * time.Second) // three lookups more
			if !bypassed(vip1) {
				t.Errorf("%s: %s no longer bypassed: %v", fail.what, vip1, e.bypassRules(0))
			}
			if err := e.dialAPI(0, vip1.String()); err != nil {
				t.Errorf("%s: the API server at %s: %v", fail.what, vip1, err)
			}
		}
		e.c.DNS.Set(cluster.APIName, vip1)
		e.eventually(10*time.Second, "BypassComplete again once the name resolves", func() (bool, string) {
			c := bypassCondition(e.nodeRouting(0))
			return c != nil && c.Status == metav1.ConditionTrue, fmt.Sprintf("%+v", c)
		})
	})

	t.Run("resolv.conf replaced by rename: the new server is bypassed within a second", func(t *testing.T) {
		e.t = t
		h, closeHandle, err := netns.NetlinkHandle(e.ns(0))
		if err != nil {
			t.Fatal(err)
		}
		defer closeHandle()
		var took []time.Duration
		var previous netip.Addr
		for k := range 5 {
			server := netip.AddrFrom4([4]byte{192, 0, 2, byte(53 + k)})
			next := resolv + ".new"
			writeFile(t, next, fmt.Sprintf("# written by dhclient\nnameserver 198.51.100.53\nnameserver %s\n", server))
			begin := time.Now()
			if err := os.Rename(next, resolv); err != nil {
				t.Fatal(err)
			}
			for !ruleTo(t, h, server) {
				if time.Since(begin) > 5*time.Second {
					t.Fatalf("the new DNS server %s not bypassed 5 s after resolv.conf was replaced: %v", server, e.bypassRules(0))
				}
				time.Sleep(time.Millisecond)
			}
			took = append(took, time.Since(begin))
			if previous.IsValid() {
				// Removed by the same apply, after the new rule is in.
				e.eventually(time.Second, previous.String()+", no longer in resolv.conf, no longer bypassed", func() (bool, string) {
					return !slices.Contains(e.bypassRules(0), previous), fmt.Sprint(e.bypassRules(0))
				})
			}
			previous = server
		}
		slices.Sort(took)
		t.Logf("resolv.conf renamed to the new server's bypass rule, 5 times: min %s, median %s, max %s", took[0], took[2], took[4])
		if took[4] > time.Second {
			t.Errorf("the slowest took %s, more than a second", took[4])
		}
		if route := e.exec(0, "ip", "route", "get", previous.String()); !strings.Contains(route, "via 203.0.113.1") {
			t.Errorf("the DNS server leaves through %s, not main's default route", route)
		}
	})

	t.Run("the API server moves during an outage: caught up, no deadlock", func(t *testing.T) {
		e.t = t
		ctx := context.Background()
		e.cp.StopAPIServer()
		if err := e.lab.RemoveAPIVIP(vip1); err != nil {
			t.Fatal(err)
		}
		if err := e.lab.AddAPIVIP(vip3); err != nil {
			t.Fatal(err)
		}
		e.c.DNS.Set(cluster.APIName, vip3)
		time.Sleep(5 * time.Second)
		if err := e.cp.StartAPIServer(ctx); err != nil {
			t.Fatal(err)
		}
		begin := time.Now()
		e.applyRoute(newRoute("after-move", []string{"192.0.2.64/26"}, []string{"10.114.0.3"}))
		e.eventually(90*time.Second, "a Route created once the moved API server answers reaches the kernel", func() (bool, string) {
			return strings.Contains(e.routesOn(0), "192.0.2.64/26"), tail(e.logs(0), 20)
		})
		t.Logf("API server back at %s (moved from %s during a 5 s outage): a new Route reached the kernel %s later", vip3, vip1, time.Since(begin).Round(time.Millisecond))
		for _, a := range []netip.Addr{vip1, vip3} {
			if !bypassed(a) {
				t.Errorf("%s not bypassed (the old address is sticky, the new one learned): %v", a, e.bypassRules(0))
			}
		}
		// Learned during the outage, recorded soon after it: the restart
		// below reads it back from there.
		e.checkBypassStatus(map[netip.Addr]string{vip3: "dns " + cluster.APIName})
	})

	t.Run("restarted during an outage, the API server moved again: no deadlock", func(t *testing.T) {
		e.t = t
		ctx := context.Background()
		e.stopAgent(0, syscall.SIGTERM)
		e.cp.StopAPIServer()
		if err := e.lab.RemoveAPIVIP(vip3); err != nil {
			t.Fatal(err)
		}
		if err := e.lab.AddAPIVIP(vip4); err != nil {
			t.Fatal(err)
		}
		e.c.DNS.Set(cluster.APIName, vip4)
		e.startAgent(0)
		// Its caches cannot sync, but the new address is bypassed at once:
		// without that, its first list would take the override and be
		// dropped, for ever.
		e.eventually(5*time.Second, "the new address bypassed before the caches sync", func() (bool, string) {
			return bypassed(vip4), fmt.Sprint(e.bypassRules(0))
		})
		if err := e.cp.StartAPIServer(ctx); err != nil {
			t.Fatal(err)
		}
		begin := time.Now()
		e.waitReady(0)
		e.applyRoute(newRoute("after-restart", []string{"192.0.2.32/27"}, []string{"10.114.0.3"}))
		e.eventually(90*time.Second, "a Route created after the restart reaches the kernel", func() (bool, string) {
			return strings.Contains(e.routesOn(0), "192.0.2.32/27"), tail(e.logs(0), 20)
		})
		t.Logf("agent restarted during the outage: ready and a new Route in the kernel %s after the API server came back at %s", time.Since(begin).Round(time.Millisecond), vip4)
		// What it learned before the restart stays: the NodeRouting kept it.
		for _, a := range []netip.Addr{vip1, vip2, vip3, vip4} {
			if !bypassed(a) {
				t.Errorf("%s not bypassed after the restart: %v", a, e.bypassRules(0))
			}
		}
		e.checkBypassStatus(map[netip.Addr]string{vip1: "dns " + cluster.APIName, vip3: "dns " + cluster.APIName, vip4: "dns " + cluster.APIName})
		// The addresses the name no longer gives say since when, so that
		// restarts do not keep them past --bypass-retention.
		e.eventually(5*time.Second, "unlistedSince on the addresses no source lists, only on them", func() (bool, string) {
			var wrong []string
			for _, b := range e.nodeRouting(0).Status.Bypass {
				unlisted := b.Address == vip1.String() || b.Address == vip3.String()
				if unlisted != (b.UnlistedSince != nil) {
					wrong = append(wrong, fmt.Sprintf("%s: unlistedSince %v, want it set: %v", b.Address, b.UnlistedSince, unlisted))
				}
			}
			return len(wrong) == 0, strings.Join(wrong, "\n")
		})
	})

	// Without a /0 the band starts with the dispatch's gate, ahead of the
	// bypass rules: traffic inside a Route's destinations must still meet
	// them before the Route's rule.
	t.Run("a Route over the API server's range, behind the gate: still bypassed", func(t *testing.T) {
		e.t = t
		e.deleteRoute("override")
		e.applyRoute(newRoute("api-range", []string{"198.51.100.0/24"}, []string{"10.114.0.3", "10.114.0.4"}))
		e.eventually(15*time.Second, "the Route applied without an override, behind the gate", func() (bool, string) {
			rules, _ := e.lab.Exec(e.ns(0), "ip", "-4", "rule")
			s := routeState(e.nodeRouting(0), "api-range")
			return s != nil && s.Phase == v1alpha1.RouteApplied && !strings.Contains(e.routesOn(0), "default") &&
				strings.Contains(rules, "to 198.51.100.0/24 goto "), fmt.Sprintf("%+v\n%s\n%s", s, rules, e.routesOn(0))
		})
		// The range itself takes the Route: a dial of an address there that
		// is not bypassed goes to the gateways, which drop it.
		drops := guardDrops()
		if err := e.dialAPI(0, "198.51.100.200"); err == nil {
			t.Fatal("198.51.100.200:6443 answered: the Route does not take its range, this test proves nothing")
		}
		if guardDrops() == drops {
			t.Fatal("the dial of 198.51.100.200 was not dropped by a gateway: the Route does not take its range")
		}
		drops = guardDrops()
		for _, server := range []string{cluster.APIName, vip4.String()} {
			if err := e.dialAPI(0, server); err != nil {
				t.Errorf("with a Route over its range, the API server at %s: %v", server, err)
			}
		}
		if d := guardDrops() - drops; d != 0 {
			t.Errorf("%d control-plane packets went to the gateways", d)
		}
	})
}

func writeFile(t testing.TB, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// kubeconfigNaming is a kubeconfig such as a kubelet's, naming server.
func kubeconfigNaming(server string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: lab
  cluster: {server: %q}
contexts:
- name: kubelet
  context: {cluster: lab, user: kubelet}
current-context: kubelet
users:
- name: kubelet
  user: {}
`, server)
}

// bypassRules lists the addresses of node i's bypass rules (`to <ip>
// lookup main` in the agent's band).
func (e *env) bypassRules(i int) []netip.Addr {
	e.t.Helper()
	h, closeHandle, err := netns.NetlinkHandle(e.ns(i))
	if err != nil {
		e.t.Fatal(err)
	}
	defer closeHandle()
	var out []netip.Addr
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rules, err := h.RuleList(family)
		if err != nil {
			e.t.Fatal(err)
		}
		for _, r := range rules {
			if r.Protocol == 245 && r.Table == 254 && r.Dst != nil {
				if a, ok := netip.AddrFromSlice(r.Dst.IP); ok {
					out = append(out, a.Unmap())
				}
			}
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}

func ruleTo(t testing.TB, h *netlink.Handle, a netip.Addr) bool {
	rules, err := h.RuleList(netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rules {
		if r.Protocol == 245 && r.Dst != nil && r.Dst.IP.Equal(a.AsSlice()) {
			return true
		}
	}
	return false
}

// dialAPI makes an HTTPS request to the API server at server (a name or
// a VIP) from inside node i, verifying its certificate: any HTTP answer
// means the path works. It gives up after 3 s.
func (e *env) dialAPI(i int, server string) error {
	ca, err := os.ReadFile(e.cp.CAFile)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	dial := netns.Dialer(e.ns(i))
	transport := &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: server},
		DialContext: func(ctx context.Context, network, address string) (net.Conn, error) {
			if host, port, _ := net.SplitHostPort(address); host == cluster.APIName {
				// As the node resolves it: its resolver, asked from inside it.
				res := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
					return dial(ctx, network, netip.AddrPortFrom(e.lab.ExternalDNS, 53).String())
				}}
				addrs, err := res.LookupNetIP(ctx, "ip4", host+".")
				if err != nil || len(addrs) == 0 {
					return nil, fmt.Errorf("%s: %v", host, err)
				}
				address = net.JoinHostPort(addrs[0].String(), port)
			}
			return dial(ctx, network, address)
		},
	}
	defer transport.CloseIdleConnections()
	client := &http.Client{Transport: transport, Timeout: 3 * time.Second}
	resp, err := client.Get("https://" + net.JoinHostPort(server, "6443") + "/healthz")
	if err != nil {
		return err
	}
	resp.Body.Close()
	return nil
}

// checkBypassStatus checks that node 0's NodeRouting lists each address
// with the source given.
func (e *env) checkBypassStatus(want map[netip.Addr]string) {
	e.t.Helper()
	e.eventually(10*time.Second, "the NodeRouting lists each bypass address with its source", func() (bool, string) {
		nr := e.nodeRouting(0)
		if nr == nil {
			return false, "no NodeRouting"
		}
		for a, source := range want {
			found := false
			for _, b := range nr.Status.Bypass {
				found = found || b.Address == a.String() && slices.Contains(b.Sources, source)
			}
			if !found {
				return false, fmt.Sprintf("%s from %q missing in %+v", a, source, nr.Status.Bypass)
			}
		}
		return true, ""
	})
}

// checkAgentConnected shows node 0's agent still hears from the API
// server: a new Route reaches its kernel.
func (e *env) checkAgentConnected(name string) {
	e.t.Helper()
	e.applyRoute(newRoute(name, []string{"192.0.2.128/25"}, []string{"10.114.0.3"}))
	e.eventually(15*time.Second, "a new Route reaches the kernel", func() (bool, string) {
		return strings.Contains(e.routesOn(0), "192.0.2.128/25"), tail(e.logs(0), 20)
	})
	e.deleteRoute(name)
}

func bypassCondition(nr *v1alpha1.NodeRouting) *metav1.Condition {
	if nr == nil {
		return nil
	}
	for i := range nr.Status.Conditions {
		if nr.Status.Conditions[i].Type == "BypassComplete" {
			return &nr.Status.Conditions[i]
		}
	}
	return nil
}

func (e *env) exec(i int, args ...string) string {
	e.t.Helper()
	out, err := e.lab.Exec(e.ns(i), args...)
	if err != nil {
		e.t.Fatalf("%v: %v: %s", args, err, out)
	}
	return out
}
