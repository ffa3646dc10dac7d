package topology

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/routing-agent/routing-agent/pkg/lab/netns"
)

const port = 40000

// TestMain removes namespaces a killed earlier run left behind. Tests do not
// skip without root: a lab that cannot be built is a failure.
func TestMain(m *testing.M) {
	if os.Geteuid() == 0 {
		if err := netns.RemoveStale(); err != nil {
			fmt.Fprintln(os.Stderr, "removing stale namespaces:", err)
		}
	}
	os.Exit(m.Run())
}

// newLab builds a lab that is torn down when the test ends, pass or fail.
func newLab(t *testing.T, opts Options) *Lab {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("these tests build network namespaces and must run as root")
	}
	start := time.Now()
	l, err := New(opts)
	if err != nil {
		t.Fatalf("New(%+v): %v", opts, err)
	}
	t.Logf("lab built in %v", time.Since(start).Round(time.Millisecond))
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return l
}

// deliver sends n datagrams from ns to dst and checks that all of them
// reach a listener opened on dst inside recvNS.
func deliver(t *testing.T, ns, recvNS string, dst netip.Addr, n int) {
	t.Helper()
	to := netip.AddrPortFrom(dst, port)
	conn, err := ListenUDP(recvNS, to)
	if err != nil {
		t.Fatalf("listening on %v in %s: %v", to, recvNS, err)
	}
	defer conn.Close()

	want := map[string]bool{}
	var payloads [][]byte
	for i := range n {
		p := fmt.Sprintf("datagram %d from %s", i, ns)
		want[p] = true
		payloads = append(payloads, []byte(p))
	}
	if err := SendUDP(ns, to, payloads...); err != nil {
		t.Fatalf("sending to %v from %s: %v", to, ns, err)
	}

	buf := make([]byte, 1500)
	for len(want) > 0 {
		conn.SetReadDeadline(time.Now().Add(3 * time.Second))
		k, from, err := conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatalf("%d of %d datagrams from %s to %v did not arrive in %s: %v", len(want), n, ns, to, recvNS, err)
		}
		if !want[string(buf[:k])] {
			t.Fatalf("%s got unexpected %q from %v", recvNS, buf[:k], from)
		}
		delete(want, string(buf[:k]))
	}
	t.Logf("%d datagrams from %s reached %v in %s", n, ns, to, recvNS)
}

// lost sends a datagram from ns to dst and checks that it does not reach a
// listener on dst inside recvNS.
func lost(t *testing.T, ns, recvNS string, dst netip.Addr) {
	t.Helper()
	to := netip.AddrPortFrom(dst, port)
	conn, err := ListenUDP(recvNS, to)
	if err != nil {
		t.Fatalf("listening on %v in %s: %v", to, recvNS, err)
	}
	defer conn.Close()
	if err := SendUDP(ns, to, []byte("should be lost")); err != nil {
		t.Fatalf("sending to %v from %s: %v", to, ns, err)
	}
	conn.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	if k, from, err := conn.ReadFromUDPAddrPort(make([]byte, 1500)); err == nil {
		t.Fatalf("%s got %d bytes from %v, want nothing", recvNS, k, from)
	}
}

func TestNodeReachesExternalViaDefaultRoute(t *testing.T) {
	l := newLab(t, Options{Purpose: "t1"})
	deliver(t, l.Node, l.External, l.ExternalAddr, 1)
}

func TestNodeRoutesAndVPC(t *testing.T) {
	l := newLab(t, Options{Purpose: "t2"})
	out, err := l.Exec(l.Node, "ip", "route", "get", l.ExternalAddr.String())
	if err != nil {
		t.Fatal(err)
	}
	if want := "via " + l.RouterPublic.String() + " dev " + NodePublicIf; !strings.Contains(out, want) {
		t.Errorf("ip route get %v = %q, want it to contain %q", l.ExternalAddr, out, want)
	}
	deliver(t, l.Node, l.Gateways[0], l.GatewayVPC[0], 1)
}

// TestPolicyRouteThroughGateway does what the agent does, by hand: a route
// in a non-main table plus a rule, sending External-bound traffic through
// gateway 0, and checks the traffic is forwarded there (and not via gw 1).
func TestPolicyRouteThroughGateway(t *testing.T) {
	l := newLab(t, Options{Purpose: "t3"})
	for _, args := range [][]string{
		{"route", "add", "198.51.100.0/24", "via", l.GatewayVPC[0].String(), "table", "100"},
		{"rule", "add", "to", "198.51.100.0/24", "lookup", "100", "priority", "100"},
	} {
		if _, err := l.Exec(l.Node, append([]string{"ip"}, args...)...); err != nil {
			t.Fatal(err)
		}
	}
	out, err := l.Exec(l.Node, "ip", "route", "get", l.ExternalAddr.String())
	if err != nil {
		t.Fatal(err)
	}
	if want := "via " + l.GatewayVPC[0].String() + " dev " + VPCIf; !strings.Contains(out, want) {
		t.Errorf("ip route get %v = %q, want it to contain %q", l.ExternalAddr, out, want)
	}

	const n = 20
	before0, before1 := counters(t, l)
	deliver(t, l.Node, l.External, l.ExternalAddr, n)
	after0, after1 := counters(t, l)
	t.Logf("gateway 0 received %d packets, gateway 1 %d", after0-before0, after1-before1)
	if after0-before0 < n {
		t.Errorf("gateway 0 received %d packets on %s, want at least %d", after0-before0, VPCIf, n)
	}
	if after1-before1 >= n {
		t.Errorf("gateway 1 received %d packets on %s, want fewer than %d", after1-before1, VPCIf, n)
	}

	// With gateway 0's VPC link down the route's nexthop is unreachable:
	// nothing arrives. Back up, traffic flows again.
	if err := l.SetGatewayLink(0, false); err != nil {
		t.Fatal(err)
	}
	if out, _ := l.Exec(l.Gateways[0], "ip", "-br", "link", "show", VPCIf); !strings.Contains(out, "DOWN") {
		t.Errorf("after SetGatewayLink(0, false): %q, want DOWN", out)
	}
	lost(t, l.Node, l.External, l.ExternalAddr)
	if err := l.SetGatewayLink(0, true); err != nil {
		t.Fatal(err)
	}
	deliver(t, l.Node, l.External, l.ExternalAddr, 1)
}

func counters(t *testing.T, l *Lab) (uint64, uint64) {
	t.Helper()
	a, err := l.GatewayForwarded(0)
	if err != nil {
		t.Fatal(err)
	}
	b, err := l.GatewayForwarded(1)
	if err != nil {
		t.Fatal(err)
	}
	return a, b
}

func TestCloseAndNames(t *testing.T) {
	a := newLab(t, Options{Purpose: "t4a", Gateways: 3})
	b := newLab(t, Options{Purpose: "t4b", Gateways: 1})
	if len(a.Gateways) != 3 || len(b.Gateways) != 1 || a.GatewayVPC[2] != netip.MustParseAddr("10.114.0.5") {
		t.Errorf("gateways: a %v %v, b %v", a.Gateways, a.GatewayVPC, b.Gateways)
	}
	seen := map[string]bool{}
	for _, ns := range append(a.all(), b.all()...) {
		if seen[ns] {
			t.Errorf("namespace %s used twice", ns)
		}
		seen[ns] = true
	}

	// The same purpose again while a is alive is refused, and must leave a
	// intact.
	if dup, err := New(Options{Purpose: "t4a"}); err == nil {
		dup.Close()
		t.Fatal("New with a live lab's Purpose succeeded, want an error")
	} else {
		t.Logf("duplicate Purpose: %v", err)
	}
	if missing := missingNamespaces(t, a.all()); len(missing) > 0 {
		t.Fatalf("the failed duplicate New removed %v", missing)
	}

	for _, l := range []*Lab{a, b} {
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
		if err := l.Close(); err != nil {
			t.Fatalf("second Close: %v", err)
		}
		if missing := missingNamespaces(t, l.all()); len(missing) != len(l.all()) {
			t.Errorf("after Close, still listed: %v", l.all())
		}
	}
}

// TestFailedNewTearsDown breaks the layout so building fails half way,
// after every namespace and some links exist, and checks none is left.
func TestFailedNewTearsDown(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("these tests build network namespaces and must run as root")
	}
	l, err := layout(Options{Purpose: "t6"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	names := l.all()
	l.GatewayVPC[1] = netip.Addr{} // ip rejects "invalid Prefix"
	if err := l.setUp(); err == nil {
		t.Fatal("setUp with an invalid gateway address succeeded")
	} else {
		t.Logf("setUp: %v", err)
	}
	if missing := missingNamespaces(t, names); len(missing) != len(names) {
		t.Errorf("after a failed setUp, some of %v are still listed", names)
	}
	if _, err := layout(Options{Gateways: MaxGateways + 1}); err == nil {
		t.Errorf("layout with %d gateways succeeded", MaxGateways+1)
	}
}

// missingNamespaces returns those of names `ip netns list` does not show.
func missingNamespaces(t *testing.T, names []string) []string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns list: %v: %s", err, out)
	}
	listed := map[string]bool{}
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 0 {
			listed[f[0]] = true
		}
	}
	var missing []string
	for _, n := range names {
		if !listed[n] {
			missing = append(missing, n)
		}
	}
	return missing
}

func TestIPv6(t *testing.T) {
	l := newLab(t, Options{Purpose: "t5", IPv6: true})
	t.Run("default route", func(t *testing.T) {
		deliver(t, l.Node, l.External, l.ExternalAddr6, 1)
	})
	t.Run("VPC", func(t *testing.T) {
		deliver(t, l.Node, l.Gateways[1], l.GatewayVPC6[1], 1)
	})
	t.Run("policy route through gateway", func(t *testing.T) {
		for _, args := range [][]string{
			{"-6", "route", "add", "2001:db8:100::/64", "via", l.GatewayVPC6[0].String(), "table", "100"},
			{"-6", "rule", "add", "to", "2001:db8:100::/64", "lookup", "100", "priority", "100"},
		} {
			if _, err := l.Exec(l.Node, append([]string{"ip"}, args...)...); err != nil {
				t.Fatal(err)
			}
		}
		before, err := l.GatewayForwarded(0)
		if err != nil {
			t.Fatal(err)
		}
		deliver(t, l.Node, l.External, l.ExternalAddr6, 5)
		after, err := l.GatewayForwarded(0)
		if err != nil {
			t.Fatal(err)
		}
		if after-before < 5 {
			t.Errorf("gateway 0 received %d packets, want at least 5", after-before)
		}

		// The kernel drops IPv6 addresses on link down unless
		// keep_addr_on_down is set; New sets it so a gateway comes back
		// whole.
		for _, up := range []bool{false, true} {
			if err := l.SetGatewayLink(0, up); err != nil {
				t.Fatal(err)
			}
		}
		deliver(t, l.Node, l.External, l.ExternalAddr6, 1)
	})
}

func TestLayoutAddresses(t *testing.T) {
	l, err := layout(Options{Purpose: "t7", Nodes: 3, ControlPlane: true, IPv6: true})
	if err != nil {
		t.Fatal(err)
	}
	addrs := func(ss ...string) []netip.Addr {
		var as []netip.Addr
		for _, s := range ss {
			as = append(as, netip.MustParseAddr(s))
		}
		return as
	}
	for _, c := range []struct {
		name      string
		got, want []netip.Addr
	}{
		{"NodePublics", l.NodePublics, addrs("203.0.113.10", "203.0.113.11", "203.0.113.12")},
		{"NodeVPCs", l.NodeVPCs, addrs("10.114.0.10", "10.114.0.11", "10.114.0.12")},
		{"NodePublics6", l.NodePublics6, addrs("2001:db8:203::10", "2001:db8:203::11", "2001:db8:203::12")},
		{"NodeVPCs6", l.NodeVPCs6, addrs("fd00:114::10", "fd00:114::11", "fd00:114::12")},
		{"node 0", []netip.Addr{l.NodePublic, l.NodeVPC, l.NodePublic6, l.NodeVPC6}, addrs("203.0.113.10", "10.114.0.10", "2001:db8:203::10", "fd00:114::10")},
		{"control plane", []netip.Addr{l.ControlPlaneAddr, l.ControlPlaneAddr6}, addrs("203.0.113.100", "2001:db8:203::100")},
		{"external host", []netip.Addr{l.ExternalAddr, l.ExternalDNS, l.ExternalAddr6}, addrs("198.51.100.10", "198.51.100.53", "2001:db8:100::10")},
	} {
		if fmt.Sprint(c.got) != fmt.Sprint(c.want) {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}
	if len(l.Nodes) != 3 || l.Nodes[0] != l.Node || l.Node != netns.Name("t7-node") || l.ControlPlane == "" {
		t.Errorf("Nodes = %v, Node = %s, ControlPlane = %q", l.Nodes, l.Node, l.ControlPlane)
	}
	for j, ns := range l.Nodes {
		if got := l.NodeIndex(ns); got != j {
			t.Errorf("NodeIndex(%s) = %d, want %d", ns, got, j)
		}
	}
	if got := l.NodeIndex(l.Router); got != -1 {
		t.Errorf("NodeIndex(Router) = %d, want -1", got)
	}

	// The default is one node and no control plane.
	d, err := layout(Options{Purpose: "t7d"})
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Nodes) != 1 || d.Nodes[0] != d.Node || d.ControlPlane != "" || d.ControlPlaneAddr.IsValid() || len(d.all()) != 6 {
		t.Errorf("default layout: Nodes %v, ControlPlane %q %v, all %v", d.Nodes, d.ControlPlane, d.ControlPlaneAddr, d.all())
	}

	if d.NodeVPCIf != VPCIf || d.SingleNIC {
		t.Errorf("default layout: NodeVPCIf %q, SingleNIC %v", d.NodeVPCIf, d.SingleNIC)
	}
	if s, err := layout(Options{Purpose: "t7s", SingleNIC: true}); err != nil || s.NodeVPCIf != NodePublicIf || s.NodeVPC != d.NodeVPC {
		t.Errorf("single-NIC layout: %v, NodeVPCIf %q, NodeVPC %v", err, s.NodeVPCIf, s.NodeVPC)
	}

	for _, bad := range []Options{{Nodes: -1}, {Nodes: MaxNodes + 1}, {Gateways: 8}} {
		if _, err := layout(bad); err == nil {
			t.Errorf("layout(%+v) succeeded", bad)
		} else {
			t.Logf("layout(%+v): %v", bad, err)
		}
	}
}

// TestMultiNodeControlPlane: every node reaches the control plane directly
// on the public network, the others over the VPC, and the external host
// through the router; so does the external host reach the control plane.
func TestMultiNodeControlPlane(t *testing.T) {
	l := newLab(t, Options{Purpose: "t8", Nodes: 3, ControlPlane: true, IPv6: true})
	names := l.all()
	if len(names) != 9 {
		t.Fatalf("all() = %v, want 9 namespaces", names)
	}
	if missing := missingNamespaces(t, names); len(missing) > 0 {
		t.Fatalf("not listed: %v", missing)
	}

	for j, node := range l.Nodes {
		for _, c := range []struct{ dst, want string }{
			{l.ExternalAddr.String(), "via " + l.RouterPublic.String() + " dev " + NodePublicIf},
			{l.ExternalAddr6.String(), "via " + l.RouterPublic6.String() + " dev " + NodePublicIf},
			// Directly, not via the router.
			{l.ControlPlaneAddr.String(), l.ControlPlaneAddr.String() + " dev " + NodePublicIf + " src " + l.NodePublics[j].String()},
		} {
			out, err := l.Exec(node, "ip", "route", "get", c.dst)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(out, c.want) {
				t.Errorf("node %d: ip route get %s = %q, want it to contain %q", j, c.dst, out, c.want)
			}
		}
	}

	t.Run("control plane over TCP", func(t *testing.T) {
		for _, dst := range []netip.Addr{l.ControlPlaneAddr, l.ControlPlaneAddr6} {
			seen := tcpServer(t, l.ControlPlane, netip.AddrPortFrom(dst, 6443))
			for j, node := range l.Nodes {
				want := l.NodePublics[j]
				if dst.Is6() {
					want = l.NodePublics6[j]
				}
				if got := tcpDial(t, node, netip.AddrPortFrom(dst, 6443)); got != want {
					t.Errorf("node %d reached %v from %v, want from %v", j, dst, got, want)
				}
			}
			if got := tcpDial(t, l.External, netip.AddrPortFrom(dst, 6443)); got != l.ExternalAddr && got != l.ExternalAddr6 {
				t.Errorf("external host reached %v from %v", dst, got)
			}
			if n := seen(); n != len(l.Nodes)+1 {
				t.Errorf("control plane accepted %d connections on %v, want %d", n, dst, len(l.Nodes)+1)
			}
			t.Logf("%d nodes and the external host connected to %v in %s", len(l.Nodes), dst, l.ControlPlane)
		}
	})
	t.Run("nodes over the VPC", func(t *testing.T) {
		deliver(t, l.Nodes[1], l.Nodes[2], l.NodeVPCs[2], 1)
		deliver(t, l.Nodes[2], l.Nodes[0], l.NodeVPCs[0], 1)
		deliver(t, l.Nodes[1], l.Nodes[2], l.NodeVPCs6[2], 1)
		deliver(t, l.Nodes[1], l.Gateways[0], l.GatewayVPC[0], 1)
	})
	t.Run("nodes to the external host", func(t *testing.T) {
		deliver(t, l.Nodes[2], l.External, l.ExternalAddr, 1)
		deliver(t, l.Nodes[1], l.External, l.ExternalAddr6, 1)
	})

	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if missing := missingNamespaces(t, names); len(missing) != len(names) {
		t.Errorf("after Close, some of %v are still listed", names)
	}
}

// tcpServer listens on addr inside ns until the test ends, answering each
// connection with the address it came from. It returns a function counting
// the connections accepted so far.
func tcpServer(t *testing.T, ns string, addr netip.AddrPort) func() int {
	t.Helper()
	var ln net.Listener
	err := netns.Do(ns, func() error {
		var err error
		ln, err = net.Listen("tcp", addr.String())
		return err
	})
	if err != nil {
		t.Fatalf("listening on %v in %s: %v", addr, ns, err)
	}
	var n atomic.Int32
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n.Add(1)
			fmt.Fprintln(c, c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap())
			c.Close()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
	})
	return func() int { return int(n.Load()) }
}

// tcpDial connects from ns to addr and returns the address the server saw
// the connection come from.
func tcpDial(t *testing.T, ns string, addr netip.AddrPort) netip.Addr {
	t.Helper()
	var c net.Conn
	err := netns.Do(ns, func() error {
		var err error
		c, err = net.DialTimeout("tcp", addr.String(), 3*time.Second)
		return err
	})
	if err != nil {
		t.Fatalf("connecting from %s to %v: %v", ns, addr, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("reading from %v in %s: %v", addr, ns, err)
	}
	from, err := netip.ParseAddr(strings.TrimSpace(line))
	if err != nil {
		t.Fatalf("%v answered %q: %v", addr, line, err)
	}
	return from
}

// TestExternalDNSAddress: the external host's second address, where the
// lab's DNS server listens, is reached from a node through the router like
// its first, and the host still sends from its first.
func TestExternalDNSAddress(t *testing.T) {
	l := newLab(t, Options{Purpose: "t9"})
	for _, c := range []struct{ ns, dst, want string }{
		{l.Node, l.ExternalDNS.String(), "via " + l.RouterPublic.String() + " dev " + NodePublicIf},
		{l.Router, l.ExternalDNS.String(), l.ExternalDNS.String() + " dev ext src " + l.RouterExt.String()},
		{l.External, l.NodePublic.String(), "src " + l.ExternalAddr.String()},
	} {
		out, err := l.Exec(c.ns, "ip", "route", "get", c.dst)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(out, c.want) {
			t.Errorf("in %s: ip route get %s = %q, want it to contain %q", c.ns, c.dst, out, c.want)
		}
	}
	deliver(t, l.Node, l.External, l.ExternalDNS, 3)
}

// TestAPIVIP: the router balances TCP for a VIP onto the control plane's API
// port, masquerading so the API server sees the router as the client;
// removing a VIP stops its new and established connections and leaves
// another VIP's alone.
func TestAPIVIP(t *testing.T) {
	l := newLab(t, Options{Purpose: "t10", Nodes: 2, ControlPlane: true})
	vip1, vip2 := netip.MustParseAddr("198.51.100.100"), netip.MustParseAddr("198.51.100.101")
	api1, api2 := netip.AddrPortFrom(vip1, APIPort), netip.AddrPortFrom(vip2, APIPort)
	seen := echoServer(t, l.ControlPlane, netip.AddrPortFrom(l.ControlPlaneAddr, APIPort))

	// Before AddAPIVIP nothing answers on the VIP.
	noDial(t, l.Node, api1)
	if err := l.AddAPIVIP(vip1); err != nil {
		t.Fatal(err)
	}
	c1 := echoDial(t, l.Node, api1)
	echo(t, c1, "through vip1")
	if peers, _ := seen(); len(peers) != 1 || peers[0] != l.RouterPublic {
		t.Errorf("the API server saw connections from %v, want one from the router, %v", peers, l.RouterPublic)
	}
	// The router sends no ICMP redirect that would steer the node past it:
	// its route to the VIP is still the default one.
	if out, err := l.Exec(l.Node, "ip", "route", "get", vip1.String()); err != nil {
		t.Fatal(err)
	} else if want := "via " + l.RouterPublic.String() + " dev " + NodePublicIf; !strings.Contains(out, want) || strings.Contains(out, "redirected") {
		t.Errorf("after a connection to %v: ip route get = %q, want %q and no redirect", vip1, out, want)
	}

	if err := l.AddAPIVIP(vip2); err != nil {
		t.Fatal(err)
	}
	if err := l.AddAPIVIP(vip2); err != nil {
		t.Errorf("adding %v again: %v", vip2, err)
	}
	c2 := echoDial(t, l.Nodes[1], api2)
	echo(t, c2, "through vip2")
	echo(t, c1, "vip1 still")

	if err := l.RemoveAPIVIP(vip1); err != nil {
		t.Fatal(err)
	}
	_, before := seen()
	lostEcho(t, c1, "after removal")
	if _, after := seen(); after != before {
		t.Errorf("the API server received %d bytes on a connection through removed %v", after-before, vip1)
	}
	noDial(t, l.Node, api1)
	echo(t, c2, "vip2 unaffected")
	echo(t, echoDial(t, l.Node, api2), "new connection through vip2")

	// Back again, vip1 takes new connections.
	if err := l.AddAPIVIP(vip1); err != nil {
		t.Fatal(err)
	}
	echo(t, echoDial(t, l.Nodes[1], api1), "vip1 re-added")
	if peers, _ := seen(); len(peers) != 4 {
		t.Errorf("the API server accepted %d connections, want 4: %v", len(peers), peers)
	}

	for _, bad := range []netip.Addr{
		netip.MustParseAddr("203.0.113.50"),  // on the nodes' public network
		netip.MustParseAddr("10.114.0.99"),   // in the VPC
		l.ExternalDNS,                        // a host's address
		netip.MustParseAddr("2001:db8::100"), // IPv6
	} {
		if err := l.AddAPIVIP(bad); err == nil {
			t.Errorf("AddAPIVIP(%v) succeeded", bad)
		} else {
			t.Logf("AddAPIVIP(%v): %v", bad, err)
		}
	}
	if err := l.RemoveAPIVIP(netip.MustParseAddr("198.51.100.102")); err == nil {
		t.Error("RemoveAPIVIP of a VIP never added succeeded")
	}
	if noCP, err := layout(Options{Purpose: "t10b"}); err != nil {
		t.Fatal(err)
	} else if err := noCP.AddAPIVIP(vip1); err == nil {
		t.Error("AddAPIVIP without a control plane succeeded")
	}
}

// echoServer listens on addr inside ns until the test ends and echoes what
// each connection sends. It returns a function reporting the peer address
// of every connection accepted so far and the bytes received on all of
// them.
func echoServer(t *testing.T, ns string, addr netip.AddrPort) func() ([]netip.Addr, int64) {
	t.Helper()
	var ln net.Listener
	err := netns.Do(ns, func() error {
		var err error
		ln, err = net.Listen("tcp", addr.String())
		return err
	})
	if err != nil {
		t.Fatalf("listening on %v in %s: %v", addr, ns, err)
	}
	var (
		mu       sync.Mutex
		peers    []netip.Addr
		conns    []net.Conn
		received atomic.Int64
		wg       sync.WaitGroup
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			peers = append(peers, c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap())
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				buf := make([]byte, 1500)
				for {
					n, err := c.Read(buf)
					received.Add(int64(n))
					if err != nil {
						return
					}
					if _, err := c.Write(buf[:n]); err != nil {
						return
					}
				}
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return func() ([]netip.Addr, int64) {
		mu.Lock()
		defer mu.Unlock()
		return append([]netip.Addr(nil), peers...), received.Load()
	}
}

// echoDial connects from ns to addr, failing the test if it cannot; the
// connection is closed when the test ends.
func echoDial(t *testing.T, ns string, addr netip.AddrPort) net.Conn {
	t.Helper()
	var c net.Conn
	err := netns.Do(ns, func() error {
		var err error
		c, err = net.DialTimeout("tcp", addr.String(), 3*time.Second)
		return err
	})
	if err != nil {
		t.Fatalf("connecting from %s to %v: %v", ns, addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// echo sends msg on c and checks it comes back.
func echo(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatalf("writing %q to %v: %v", msg, c.RemoteAddr(), err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
		t.Fatalf("echo of %q from %v: %q, %v", msg, c.RemoteAddr(), buf, err)
	}
}

// lostEcho sends msg on c and checks that nothing comes back: the
// connection no longer passes data (the kernel still accepts the write into
// its buffer and retransmits it in vain).
func lostEcho(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatalf("writing %q to %v: %v", msg, c.RemoteAddr(), err)
	}
	n, err := c.Read(make([]byte, 1500))
	if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
		t.Fatalf("after sending %q to %v: read %d bytes, %v; want a timeout", msg, c.RemoteAddr(), n, err)
	}
}

// noDial checks that a connection from ns to addr cannot be made.
func noDial(t *testing.T, ns string, addr netip.AddrPort) {
	t.Helper()
	err := netns.Do(ns, func() error {
		c, err := net.DialTimeout("tcp", addr.String(), time.Second)
		if err == nil {
			c.Close()
			return errors.New("connected")
		}
		t.Logf("dialing %v from %s: %v", addr, ns, err)
		return nil
	})
	if err != nil {
		t.Fatalf("from %s to %v: %v, want no connection", ns, addr, err)
	}
}

// sourceOf sends a datagram from ns to dst and returns the source address
// it arrives from at a listener on dst inside recvNS.
func sourceOf(t *testing.T, ns, recvNS string, dst netip.Addr) netip.Addr {
	t.Helper()
	to := netip.AddrPortFrom(dst, port)
	conn, err := ListenUDP(recvNS, to)
	if err != nil {
		t.Fatalf("listening on %v in %s: %v", to, recvNS, err)
	}
	defer conn.Close()
	if err := SendUDP(ns, to, []byte("who sent this?")); err != nil {
		t.Fatalf("sending to %v from %s: %v", to, ns, err)
	}
	conn.SetReadDeadline(time.Now().Add(3 * time.Second))
	_, from, err := conn.ReadFromUDPAddrPort(make([]byte, 1500))
	if err != nil {
		t.Fatalf("datagram from %s to %v did not arrive in %s: %v", ns, to, recvNS, err)
	}
	return from.Addr().Unmap()
}

// routeGet checks that `ip route get dst` in ns contains every one of want.
func routeGet(t *testing.T, l *Lab, ns string, dst netip.Addr, want ...string) {
	t.Helper()
	out, err := l.Exec(ns, "ip", "route", "get", dst.String())
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range want {
		if !strings.Contains(out, w) {
			t.Errorf("in %s: ip route get %v = %q, want it to contain %q", ns, dst, strings.TrimSpace(out), w)
		}
	}
}

// serveEcho runs ServeEcho on addr inside ns until the test ends.
func serveEcho(t *testing.T, ns string, addr netip.AddrPort) {
	t.Helper()
	ln, err := ListenTCP(ns, addr)
	if err != nil {
		t.Fatalf("listening on %v in %s: %v", addr, ns, err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		ServeEcho(ln)
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
	})
}

// answers dials addr from ns n times and checks that every connection is
// answered with want as the source the server saw.
func answers(t *testing.T, ns string, addr netip.AddrPort, want netip.Addr, n int) {
	t.Helper()
	for i := range n {
		got, err := DialTCP(ns, addr, 3*time.Second)
		if err != nil {
			t.Fatalf("connection %d of %d from %s to %v: %v", i+1, n, ns, addr, err)
		}
		if got != want.String() {
			t.Fatalf("connection %d from %s to %v: the server saw %q, want %v", i+1, ns, addr, got, want)
		}
	}
}

// TestPodAndNodePorts: a pod behind node 1 reaches the external host
// through the node's default route (masqueraded to the node's public
// address), and NodePorts on the node bring the external host's
// connections to it, with the external host's address or, masquerading,
// the node's as their source, IPv4 and IPv6.
func TestPodAndNodePorts(t *testing.T) {
	l := newLab(t, Options{Purpose: "t11", Nodes: 2, IPv6: true})
	pod, err := l.AddPod(1)
	if err != nil {
		t.Fatal(err)
	}
	want := Pod{NS: netns.Name("t11-pod1"), Node: 1, NodeSide: PodNodeIf,
		Addr: netip.MustParseAddr("10.244.1.2"), Addr6: netip.MustParseAddr("fd00:244:1::2"),
		NodeAddr: netip.MustParseAddr("10.244.1.1"), NodeAddr6: netip.MustParseAddr("fd00:244:1::1")}
	if *pod != want {
		t.Errorf("AddPod(1) = %+v, want %+v", *pod, want)
	}
	for _, j := range []int{1, 2, -1} {
		if _, err := l.AddPod(j); err == nil {
			t.Errorf("AddPod(%d) succeeded", j)
		} else {
			t.Logf("AddPod(%d): %v", j, err)
		}
	}
	for _, f := range []string{"ipv4/ip_forward", "ipv6/conf/all/forwarding", "ipv6/conf/" + PodNodeIf + "/forwarding"} {
		if out, err := l.Exec(l.Nodes[1], "cat", "/proc/sys/net/"+f); err != nil || strings.TrimSpace(out) != "1" {
			t.Errorf("node 1's %s = %q, %v; want 1", f, out, err)
		}
	}

	t.Run("egress through the node's default route", func(t *testing.T) {
		routeGet(t, l, pod.NS, l.ExternalAddr, "via "+pod.NodeAddr.String()+" dev "+PodIf)
		routeGet(t, l, pod.NS, l.ExternalAddr6, "via "+pod.NodeAddr6.String()+" dev "+PodIf)
		if err := l.CountUplinkTraffic(1); err != nil {
			t.Fatal(err)
		}
		for _, c := range []struct{ dst, from netip.Addr }{{l.ExternalAddr, l.NodePublics[1]}, {l.ExternalAddr6, l.NodePublics6[1]}} {
			// Ping needs the way back too.
			if out, err := l.Exec(pod.NS, "ping", "-c", "1", "-W", "3", c.dst.String()); err != nil {
				t.Errorf("pod pinging %v: %v\n%s", c.dst, err, out)
			}
			if got := sourceOf(t, pod.NS, l.External, c.dst); got != c.from {
				t.Errorf("the external host got the pod's datagram from %v, want from node 1's public %v", got, c.from)
			}
		}
		// 2 pings and 2 datagrams.
		if n, err := l.UplinkPackets(1); err != nil || n < 4 {
			t.Errorf("node 1's uplink counted %d packets (%v), want at least 4", n, err)
		}
	})

	t.Run("NodePorts", func(t *testing.T) {
		serveEcho(t, pod.NS, netip.AddrPortFrom(netip.IPv6Unspecified(), 8080))
		if err := l.AddNodePort(1, 30080, pod, 8080, false); err != nil {
			t.Fatal(err)
		}
		if err := l.AddNodePort(1, 30081, pod, 8080, true); err != nil {
			t.Fatal(err)
		}
		at := func(a netip.Addr, p uint16) netip.AddrPort { return netip.AddrPortFrom(a, p) }
		for _, c := range []struct {
			ns   string
			to   netip.AddrPort
			want netip.Addr
		}{
			{l.External, at(l.NodePublics[1], 30080), l.ExternalAddr},
			{l.External, at(l.NodePublics[1], 30081), pod.NodeAddr},
			{l.External, at(l.NodePublics6[1], 30080), l.ExternalAddr6},
			{l.External, at(l.NodePublics6[1], 30081), pod.NodeAddr6},
			// Any of the node's addresses, here from the VPC.
			{l.Gateways[0], at(l.NodeVPCs[1], 30080), l.GatewayVPC[0]},
			{l.Nodes[0], at(l.NodeVPCs6[1], 30081), pod.NodeAddr6},
		} {
			answers(t, c.ns, c.to, c.want, 3)
			t.Logf("%s to %v: answered, the pod saw %v", c.ns, c.to, c.want)
		}

		// The masquerading port's connections carry kube-proxy's mark when
		// the node routes their first packet, the other's do not: a rule
		// on that bit alone stops the first and leaves the second.
		mark := fmt.Sprintf("0x%x/0x%x", KubeProxyMasqueradeMark, KubeProxyMasqueradeMark)
		if _, err := l.Exec(l.Nodes[1], "ip", "rule", "add", "priority", "50", "fwmark", mark, "prohibit"); err != nil {
			t.Fatal(err)
		}
		if got, err := DialTCP(l.External, at(l.NodePublics[1], 30081), time.Second); err == nil {
			t.Errorf("with marked packets prohibited, NodePort 30081 answered %q", got)
		} else {
			t.Logf("with marked packets prohibited, NodePort 30081: %v", err)
		}
		answers(t, l.External, at(l.NodePublics[1], 30080), l.ExternalAddr, 1)
		if _, err := l.Exec(l.Nodes[1], "ip", "rule", "del", "priority", "50"); err != nil {
			t.Fatal(err)
		}
		answers(t, l.External, at(l.NodePublics[1], 30081), pod.NodeAddr, 1)

		for _, bad := range []struct {
			j    int
			port uint16
			pod  *Pod
		}{{1, 30080, pod}, {0, 30090, pod}, {1, 30090, nil}, {1, 0, pod}, {1, 30090, &Pod{Node: 1}}} {
			if err := l.AddNodePort(bad.j, bad.port, bad.pod, 8080, false); err == nil {
				t.Errorf("AddNodePort(%d, %d, %v) succeeded", bad.j, bad.port, bad.pod)
			} else {
				t.Logf("AddNodePort(%d, %d, ...): %v", bad.j, bad.port, err)
			}
		}
	})

	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if missing := missingNamespaces(t, []string{pod.NS}); len(missing) != 1 {
		t.Errorf("after Close, %s is still listed", pod.NS)
	}
}

// TestSingleNIC: with one interface per node, pub0 reaches the router and
// the gateways' VPC addresses directly; the default route, a Route through
// a NAT gateway, the gateway helpers, the uplink counter, the API VIP and
// NodePorts all keep working.
func TestSingleNIC(t *testing.T) {
	l := newLab(t, Options{Purpose: "t12", Nodes: 2, SingleNIC: true, IPv6: true, NAT: true, ControlPlane: true})
	if l.NodeVPCIf != NodePublicIf || !l.SingleNIC {
		t.Errorf("NodeVPCIf = %q, SingleNIC = %v", l.NodeVPCIf, l.SingleNIC)
	}
	for _, hub := range []string{l.Router, l.VPC} {
		if out, err := l.Exec(hub, "cat", "/proc/sys/net/bridge/bridge-nf-call-iptables"); err == nil && strings.TrimSpace(out) != "0" {
			t.Errorf("bridge-nf-call-iptables in %s = %q, want 0", hub, out)
		}
	}
	for j, node := range l.Nodes {
		if out, err := l.Exec(node, "ip", "link", "show", VPCIf); err == nil {
			t.Errorf("node %d has %s: %s", j, VPCIf, out)
		}
		dev := " dev " + NodePublicIf + " "
		routeGet(t, l, node, l.GatewayVPC[0], l.GatewayVPC[0].String()+dev+"src "+l.NodeVPCs[j].String())
		routeGet(t, l, node, l.RouterPublic, l.RouterPublic.String()+dev+"src "+l.NodePublics[j].String())
		routeGet(t, l, node, l.ExternalAddr, "via "+l.RouterPublic.String()+dev+"src "+l.NodePublics[j].String())
		routeGet(t, l, node, l.GatewayVPC6[1], dev, "src "+l.NodeVPCs6[j].String())
		routeGet(t, l, node, l.ExternalAddr6, "via "+l.RouterPublic6.String()+dev, "src "+l.NodePublics6[j].String())
	}

	t.Run("reachability", func(t *testing.T) {
		deliver(t, l.Node, l.Gateways[0], l.GatewayVPC[0], 1)
		deliver(t, l.Nodes[1], l.Gateways[1], l.GatewayVPC6[1], 1)
		deliver(t, l.Nodes[1], l.Nodes[0], l.NodeVPCs[0], 1)
		deliver(t, l.Nodes[0], l.Nodes[1], l.NodeVPCs6[1], 1)
		deliver(t, l.Node, l.ControlPlane, l.ControlPlaneAddr, 1)
		for _, dst := range []netip.Addr{l.RouterPublic, l.RouterPublic6} {
			if out, err := l.Exec(l.Node, "ping", "-c", "1", "-W", "3", dst.String()); err != nil {
				t.Errorf("pinging %v: %v\n%s", dst, err, out)
			}
		}
		if got := sourceOf(t, l.Node, l.External, l.ExternalAddr); got != l.NodePublic {
			t.Errorf("the external host got the node's datagram from %v, want %v", got, l.NodePublic)
		}
		if got := sourceOf(t, l.Node, l.External, l.ExternalAddr6); got != l.NodePublic6 {
			t.Errorf("the external host got the node's datagram from %v, want %v", got, l.NodePublic6)
		}
	})

	t.Run("Route through a NAT gateway", func(t *testing.T) {
		if err := l.CountUplinkTraffic(0); err != nil {
			t.Fatal(err)
		}
		if err := l.CountExternalTraffic(0); err != nil {
			t.Fatal(err)
		}
		count := func() (uplink, gw uint64) {
			t.Helper()
			uplink, err := l.UplinkPackets(0)
			if err != nil {
				t.Fatal(err)
			}
			if gw, err = l.ExternalPackets(0); err != nil {
				t.Fatal(err)
			}
			return uplink, gw
		}
		const n = 5
		u0, g0 := count()
		deliver(t, l.Node, l.External, l.ExternalAddr, n)
		u1, g1 := count()
		if u1-u0 != n || g1 != g0 {
			t.Errorf("through the default route: uplink counted %d, gateway 0 %d; want %d and 0", u1-u0, g1-g0, n)
		}

		for _, args := range [][]string{
			{"route", "add", "198.51.100.0/24", "via", l.GatewayVPC[0].String(), "dev", NodePublicIf, "table", "100"},
			{"rule", "add", "to", "198.51.100.0/24", "lookup", "100", "priority", "100"},
		} {
			if _, err := l.Exec(l.Node, append([]string{"ip"}, args...)...); err != nil {
				t.Fatal(err)
			}
		}
		routeGet(t, l, l.Node, l.ExternalAddr, "via "+l.GatewayVPC[0].String()+" dev "+NodePublicIf)
		deliver(t, l.Node, l.External, l.ExternalAddr, n)
		u2, g2 := count()
		// The frames to the gateway cross the router's port of node 0 but
		// are not counted as the uplink's.
		if u2 != u1 || g2-g1 < n {
			t.Errorf("through gateway 0: uplink counted %d, gateway 0 %d; want 0 and at least %d", u2-u1, g2-g1, n)
		}
		if got := sourceOf(t, l.Node, l.External, l.ExternalAddr); got != l.GatewayUplink[0] {
			t.Errorf("through gateway 0, the external host got the node's datagram from %v, want the gateway's %v", got, l.GatewayUplink[0])
		}

		// The API VIP behind the router, reached through the gateway: the
		// router's bridge leaves the frames to the gateway alone.
		serveEcho(t, l.ControlPlane, netip.AddrPortFrom(l.ControlPlaneAddr, APIPort))
		vip := netip.MustParseAddr("198.51.100.100")
		if err := l.AddAPIVIP(vip); err != nil {
			t.Fatal(err)
		}
		_, g3 := count()
		answers(t, l.Node, netip.AddrPortFrom(vip, APIPort), l.RouterPublic, 2)
		if _, g4 := count(); g4-g3 < 6 {
			t.Errorf("gateway 0 received %d packets of 2 connections to the API VIP, want at least 6", g4-g3)
		}

		for _, silence := range []func(bool) error{
			func(on bool) error { return l.SilenceGateway(0, on) },
			func(up bool) error { return l.SetGatewayLink(0, !up) },
		} {
			if err := silence(true); err != nil {
				t.Fatal(err)
			}
			lost(t, l.Node, l.External, l.ExternalAddr)
			if err := silence(false); err != nil {
				t.Fatal(err)
			}
			deliver(t, l.Node, l.External, l.ExternalAddr, 1)
		}
	})

	t.Run("NodePort", func(t *testing.T) {
		pod, err := l.AddPod(1)
		if err != nil {
			t.Fatal(err)
		}
		serveEcho(t, pod.NS, netip.AddrPortFrom(netip.IPv6Unspecified(), 8080))
		if err := l.AddNodePort(1, 30080, pod, 8080, false); err != nil {
			t.Fatal(err)
		}
		answers(t, l.External, netip.AddrPortFrom(l.NodePublics[1], 30080), l.ExternalAddr, 3)
		answers(t, l.External, netip.AddrPortFrom(l.NodePublics6[1], 30080), l.ExternalAddr6, 3)
		answers(t, l.Gateways[1], netip.AddrPortFrom(l.NodeVPCs[1], 30080), l.GatewayVPC[1], 3)
		if got := sourceOf(t, pod.NS, l.External, l.ExternalAddr); got != l.NodePublics[1] {
			t.Errorf("the external host got the pod's datagram from %v, want node 1's %v", got, l.NodePublics[1])
		}
	})
}
