package agent_test

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/routing-agent/routing-agent/pkg/lab/topology"
)

// TestRepliesLeaveTheWayTheyCame proves with packets, under the seed's
// default override through the NAT gateways (and its IPv6 twin), that
// connections from the external host are answered — a NodePort DNATed to a
// pod on the node, with and without kube-proxy's masquerade, and a
// host-network server on the public address — while what the node and its
// pod open still leaves through the gateways. Then the same on a node with
// a single NIC holding its public and its VPC address.
func TestRepliesLeaveTheWayTheyCame(t *testing.T) {
	for _, layout := range []struct {
		name   string
		single bool
	}{{"two NICs", false}, {"one NIC with a public and a VPC address", true}} {
		t.Run(layout.name, func(t *testing.T) {
			purpose := "symm"
			if layout.single {
				purpose = "symm1"
			}
			e := newEnvOpts(t, topology.Options{Purpose: purpose, Nodes: 1, NAT: true, IPv6: true, SingleNIC: layout.single}, "30s")
			s := newServices(t, e)
			e.applyRoute(newRoute("basic", []string{"0.0.0.0/0"}, []string{"10.114.0.3", "10.114.0.4"}))
			e.applyRoute(newRoute("basic6", []string{"::/0"}, []string{"fd00:114::3", "fd00:114::4"}))
			e.eventually(15*time.Second, "both overrides in the kernel", func() (bool, string) {
				out := e.routesOn(0)
				return strings.Contains(out, "default") && strings.Count(out, "nexthop via") >= 4, out
			})
			s.checkInbound(t, "under the override")
			s.checkEgress(t)
			e.eventually(10*time.Second, "the NodeRouting and the metric say marking is active", func() (bool, string) {
				nr := e.nodeRouting(0)
				if nr == nil || nr.Status.ConnectionMarking == nil {
					return false, "no connectionMarking"
				}
				m := nr.Status.ConnectionMarking
				unmarked := "lo,vpc0"
				if layout.single {
					unmarked = "lo"
				}
				ok := m.Active && m.Mark == "0x2000" && strings.Join(m.Unmarked, ",") == unmarked && e.metric(0, "routing_agent_connection_marking_active") == 1
				return ok, fmt.Sprintf("%+v", *m)
			})

			if layout.single {
				return
			}
			// The same with marking off: IPv4 replies of the host still
			// leave by the source rule; the pod's, DNATed, take the
			// override, and the NAT gateway re-sources them. That is the
			// failure the marks exist for, shown here to happen.
			e.stopAgent(0, syscall.SIGTERM)
			e.args = []string{"--connmark=0"}
			e.startAgent(0)
			e.waitReady(0)
			if answered := s.answered(s.external, netip.AddrPortFrom(e.lab.NodePublic, 30080), 6); answered != 0 {
				t.Errorf("with --connmark=0, %d of 6 NodePort connections answered: the test cannot tell marks from no marks", answered)
			}
			if out := e.exec(0, "nft", "list", "tables"); strings.Contains(out, "routing-agent") {
				t.Errorf("with --connmark=0 the agent's table stays:\n%s", out)
			}
			if m := e.nodeRouting(0).Status.ConnectionMarking; m == nil || m.Active {
				t.Errorf("with --connmark=0 the NodeRouting says %+v", m)
			}
			e.stopAgent(0, syscall.SIGTERM)
			e.args = nil
			e.startAgent(0)
			e.waitReady(0)
			s.checkInbound(t, "marking back on")
		})
	}
}

// services are the servers and the pod of node 0.
type services struct {
	e        *env
	pod      *topology.Pod
	external string // the external host's namespace
}

func newServices(t *testing.T, e *env) *services {
	pod, err := e.lab.AddPod(0)
	if err != nil {
		t.Fatal(err)
	}
	s := &services{e: e, pod: pod, external: e.lab.External}
	serve := func(ns string, addr netip.AddrPort) {
		ln, err := topology.ListenTCP(ns, addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go topology.ServeEcho(ln)
	}
	for _, a := range []netip.Addr{pod.Addr, pod.Addr6} {
		serve(pod.NS, netip.AddrPortFrom(a, 80))
	}
	for _, a := range []netip.Addr{e.lab.NodePublic, e.lab.NodePublic6} {
		serve(e.ns(0), netip.AddrPortFrom(a, 7000))
	}
	// The external host answers with the address it saw: egress checks.
	for _, a := range []netip.Addr{e.lab.ExternalAddr, e.lab.ExternalAddr6} {
		serve(e.lab.External, netip.AddrPortFrom(a, 7100))
	}
	if err := e.lab.AddNodePort(0, 30080, pod, 80, false); err != nil {
		t.Fatal(err)
	}
	if err := e.lab.AddNodePort(0, 30081, pod, 80, true); err != nil {
		t.Fatal(err)
	}
	return s
}

// answered counts the connections from ns to target, out of n, that the
// server answered.
func (s *services) answered(ns string, target netip.AddrPort, n int) int {
	ok := 0
	for range n {
		if _, err := topology.DialTCP(ns, target, time.Second); err == nil {
			ok++
		}
	}
	return ok
}

// checkInbound: every connection from the external host answered, and
// the pod sees the external host (no masquerade) or the node (masquerade).
func (s *services) checkInbound(t *testing.T, when string) {
	t.Helper()
	e := s.e
	const n = 10
	for _, tc := range []struct {
		what   string
		target netip.AddrPort
		sees   netip.Addr // the source address the server must see
	}{
		{"NodePort to the pod", netip.AddrPortFrom(e.lab.NodePublic, 30080), e.lab.ExternalAddr},
		{"NodePort to the pod, masqueraded", netip.AddrPortFrom(e.lab.NodePublic, 30081), s.pod.NodeAddr},
		{"host-network server", netip.AddrPortFrom(e.lab.NodePublic, 7000), e.lab.ExternalAddr},
		{"IPv6 NodePort to the pod", netip.AddrPortFrom(e.lab.NodePublic6, 30080), e.lab.ExternalAddr6},
		{"IPv6 NodePort to the pod, masqueraded", netip.AddrPortFrom(e.lab.NodePublic6, 30081), s.pod.NodeAddr6},
		{"IPv6 host-network server", netip.AddrPortFrom(e.lab.NodePublic6, 7000), e.lab.ExternalAddr6},
	} {
		answered, seen := 0, map[string]int{}
		for range n {
			remote, err := topology.DialTCP(s.external, tc.target, time.Second)
			if err != nil {
				continue
			}
			answered++
			seen[strings.TrimSpace(remote)]++
		}
		t.Logf("%s, %s: %d of %d connections from the external host answered; the server saw %v", when, tc.what, answered, n, seen)
		if answered != n {
			t.Errorf("%s, %s (%s): %d of %d connections answered", when, tc.what, tc.target, answered, n)
		}
		if answered > 0 && seen[tc.sees.String()] != answered {
			t.Errorf("%s, %s: the server saw %v, want %s", when, tc.what, seen, tc.sees)
		}
	}
}

// checkEgress: what the node and its pod open leaves through a NAT
// gateway, IPv4 and IPv6 (the external host sees a gateway's address).
func (s *services) checkEgress(t *testing.T) {
	t.Helper()
	e := s.e
	gateways := append(slices.Clone(e.lab.GatewayUplink), e.lab.GatewayUplink6...)
	for _, tc := range []struct {
		what string
		ns   string
		dst  netip.Addr
	}{
		{"node", e.ns(0), e.lab.ExternalAddr},
		{"pod", s.pod.NS, e.lab.ExternalAddr},
		{"node, IPv6", e.ns(0), e.lab.ExternalAddr6},
		{"pod, IPv6", s.pod.NS, e.lab.ExternalAddr6},
	} {
		remote, err := topology.DialTCP(tc.ns, netip.AddrPortFrom(tc.dst, 7100), 2*time.Second)
		if err != nil {
			t.Errorf("%s to the external host: %v", tc.what, err)
			continue
		}
		seen, _ := netip.ParseAddr(strings.TrimSpace(remote))
		if !slices.Contains(gateways, seen) {
			t.Errorf("%s egress: the external host saw %q, not a NAT gateway (%v)", tc.what, remote, gateways)
		} else {
			t.Logf("%s egress: the external host saw %s", tc.what, fmt.Sprint(seen))
		}
	}
}
