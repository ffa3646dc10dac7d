package applier_test

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
	"github.com/routing-agent/routing-agent/pkg/applier"
	"github.com/routing-agent/routing-agent/pkg/lab/netns"
	"github.com/routing-agent/routing-agent/pkg/lab/topology"
	"github.com/routing-agent/routing-agent/pkg/nodefacts"
	"github.com/routing-agent/routing-agent/pkg/planner"
)

// env is a lab (node, two gateways, router, external host) and an Applier
// writing into the node's namespace.
type env struct {
	t   *testing.T
	lab *topology.Lab
	h   *netlink.Handle
	ap  *applier.Applier
	cfg planner.Config
}

var controlPlane = netip.MustParseAddr("203.0.113.100")
var dnsServer = netip.MustParseAddr("198.51.100.53")

func newEnv(t *testing.T, purpose string) *env {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test builds network namespaces and must run as root (make test runs it as root)")
	}
	if err := netns.RemoveStale(); err != nil {
		t.Fatal(err)
	}
	lab, err := topology.New(topology.Options{Purpose: purpose, IPv6: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := lab.Close(); err != nil {
			t.Error(err)
		}
	})
	h, closeHandle, err := netns.NetlinkHandle(lab.Node)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(closeHandle)
	if err := netns.Do(lab.Node, func() error {
		_, err := applier.EnsureSysctls("/proc/sys", applier.ECMPSysctls)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	cfg := planner.DefaultConfig()
	e := &env{t: t, lab: lab, h: h, cfg: cfg}
	e.ap = e.newApplier(cfg)
	return e
}

// newApplier is an Applier for the node's namespace with its own batch
// socket there, as the agent makes one.
func (e *env) newApplier(cfg planner.Config) *applier.Applier {
	e.t.Helper()
	return newApplierIn(e.t, e.lab.Node, e.h, cfg)
}

func newApplierIn(t testing.TB, name string, h *netlink.Handle, cfg planner.Config) *applier.Applier {
	t.Helper()
	ns, err := vnetns.GetFromName(name)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	ap := applier.New(h, cfg, logr.Discard())
	if err := ap.SetNamespace(ns); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ap.Close() })
	return ap
}

func (e *env) plan(routes ...*v1alpha1.Route) planner.Plan {
	e.t.Helper()
	return e.planDown(nil, routes...)
}

// planDown is plan with gateways marked down, as the prober reports them;
// the dispatch stays where the kernel has it, as the agent plans.
func (e *env) planDown(down []string, routes ...*v1alpha1.Route) planner.Plan {
	e.t.Helper()
	node, err := nodefacts.Read(e.h)
	if err != nil {
		e.t.Fatal(err)
	}
	node.ControlPlane = []planner.Endpoint{{Addr: controlPlane, Source: "test"}}
	node.DNSServers = []planner.Endpoint{{Addr: dnsServer, Source: "test"}}
	kernel, err := e.ap.Read()
	if err != nil {
		e.t.Fatal(err)
	}
	in := map[netip.Addr]bool{}
	for _, d := range down {
		in[netip.MustParseAddr(d)] = true
	}
	return planner.Compute(planner.Input{Config: e.cfg, Node: node, Routes: routes, Down: in, Layout: kernel.Layout(e.cfg.PriorityBase)})
}

func (e *env) apply(routes ...*v1alpha1.Route) (planner.Plan, applier.Report) {
	e.t.Helper()
	plan := e.plan(routes...)
	rep, err := e.ap.Apply(plan)
	if err != nil {
		e.t.Fatalf("apply: %v", err)
	}
	return plan, rep
}

// ip runs ip in the node's namespace.
func (e *env) ip(args ...string) string {
	e.t.Helper()
	out, err := e.lab.Exec(e.lab.Node, append([]string{"ip"}, args...)...)
	if err != nil {
		e.t.Fatalf("ip %v: %v\n%s", args, err, out)
	}
	return out
}

// routeGet returns `ip route get` for dst (optionally "from SRC").
func (e *env) routeGet(dst string, extra ...string) string {
	e.t.Helper()
	return strings.TrimSpace(e.ip(append([]string{"route", "get", dst}, extra...)...))
}

func (e *env) wantPath(dst, want string, extra ...string) {
	e.t.Helper()
	if got := e.routeGet(dst, extra...); !strings.Contains(got, want) {
		e.t.Errorf("ip route get %s %v = %q, want it to contain %q", dst, extra, got, want)
	}
}

func (e *env) mainTables() string {
	return e.ip("-4", "route", "show", "table", "main") + e.ip("-6", "route", "show", "table", "main")
}

// owned lists the agent's rules and routes, sorted: rules of one priority
// may sit in any order without changing what the kernel does.
func (e *env) owned() string {
	var lines []string
	for _, family := range []string{"-4", "-6"} {
		for _, l := range strings.Split(e.ip(family, "rule"), "\n") {
			if strings.Contains(l, "proto 245") {
				lines = append(lines, family+" "+l)
			}
		}
	}
	lines = append(lines, e.ip("route", "show", "table", "all", "proto", "245"), e.ip("-6", "route", "show", "table", "all", "proto", "245"))
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}

func tableOf(t *testing.T, plan planner.Plan, name string) uint32 {
	t.Helper()
	for _, r := range plan.Results {
		if r.Name == name {
			if r.Phase != planner.Applied {
				t.Fatalf("Route %s: %s %s: %s", name, r.Phase, r.Reason, r.Message)
			}
			return r.Table
		}
	}
	t.Fatalf("no result for %s", name)
	return 0
}

var epoch = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func route(name string, age int, destinations []string, gateways ...string) *v1alpha1.Route {
	return &v1alpha1.Route{
		ObjectMeta: metav1.ObjectMeta{Name: name, CreationTimestamp: metav1.NewTime(epoch.Add(time.Duration(age) * time.Minute))},
		Spec:       v1alpha1.RouteSpec{Destinations: destinations, Gateways: gateways},
	}
}

func seed(t *testing.T, file string) *v1alpha1.Route {
	data, err := os.ReadFile(filepath.Join("..", "..", "test", "testdata", "seed", file))
	if err != nil {
		t.Fatal(err)
	}
	var r v1alpha1.Route
	if err := yaml.UnmarshalStrict(data, &r); err != nil {
		t.Fatal(err)
	}
	return &r
}

// sendFlows sends one datagram per flow (a new source port each) from the
// node to dst and returns how many arrived there.
func (e *env) sendFlows(dst netip.AddrPort, listenNS string, flows int) int {
	e.t.Helper()
	conn, err := topology.ListenUDP(listenNS, dst)
	if err != nil {
		e.t.Fatal(err)
	}
	defer conn.Close()
	for i := range flows {
		if err := topology.SendUDP(e.lab.Node, dst, []byte(fmt.Sprintf("flow %d", i))); err != nil {
			e.t.Fatal(err)
		}
	}
	got := 0
	buf := make([]byte, 64)
	for got < flows {
		conn.SetReadDeadline(time.Now().Add(time.Second))
		if _, _, err := conn.ReadFromUDPAddrPort(buf); err != nil {
			break
		}
		got++
	}
	return got
}

func (e *env) forwarded() [2]uint64 {
	e.t.Helper()
	var c [2]uint64
	for i := range c {
		n, err := e.lab.GatewayForwarded(i)
		if err != nil {
			e.t.Fatal(err)
		}
		c[i] = n
	}
	return c
}

// TestSeedExamples applies each seed example on the node and checks the
// kernel's answer with ip, then removes it.
func TestSeedExamples(t *testing.T) {
	e := newEnv(t, "seed")
	mainBefore := e.mainTables()
	for _, tc := range []struct {
		file     string
		gateways []string
		default_ bool
	}{
		{"01-basic.yaml", []string{"10.114.0.3"}, false},
		{"02-ecmp.yaml", []string{"10.114.0.3", "10.114.0.4"}, false},
		{"03-default-override.yaml", []string{"10.114.0.3", "10.114.0.4"}, true},
		{"04-node-selector.yaml", []string{"10.114.0.3"}, false},
		{"05-match-fields.yaml", []string{"10.114.0.3"}, false},
		{"06-single-gateway-default.yaml", []string{"10.114.0.3"}, true},
	} {
		t.Run(tc.file, func(t *testing.T) {
			e.t = t
			r := seed(t, tc.file)
			plan, _ := e.apply(r)
			table := tableOf(t, plan, r.Name)

			rules := e.ip("-4", "rule")
			for _, want := range []string{
				"30010:\tfrom all to 10.114.0.3 lookup main proto 245",
				"30010:\tfrom all to 169.254.169.254 lookup main proto 245",
				"30010:\tfrom all to 198.51.100.53 lookup main proto 245",
				"30010:\tfrom all to 203.0.113.100 lookup main proto 245",
				"30100:\tfrom 203.0.113.10 lookup main proto 245",
				"30200:\tfrom all lookup main suppress_prefixlength 0 proto 245",
				fmt.Sprintf("30301:\tfrom all to %s lookup %d proto 245", map[bool]string{false: "0.0.0.0/5", true: "0.0.0.0/1"}[tc.default_], table),
			} {
				if !strings.Contains(rules, want+"\n") {
					t.Errorf("ip rule lacks %q:\n%s", want, rules)
				}
			}
			if strings.Contains(e.ip("-6", "rule"), "proto 245") {
				t.Errorf("an IPv4-only Route installed IPv6 rules:\n%s", e.ip("-6", "rule"))
			}
			dst := "0.0.0.0/5"
			if tc.default_ {
				dst = "default"
			}
			// The live route goes through the table's nexthop group
			// (ip shows its gateways too).
			group, _ := planner.GroupID(e.cfg.Protocol, table, false)
			var want string
			if len(tc.gateways) == 1 {
				want = fmt.Sprintf("%s nhid %d via %s dev vpc0 proto 245 \n", dst, group, tc.gateways[0])
			} else {
				want = fmt.Sprintf("%s nhid %d proto 245 \n\tnexthop via 10.114.0.3 dev vpc0 weight 1 \n\tnexthop via 10.114.0.4 dev vpc0 weight 1 \n", dst, group)
			}
			// Behind the live route, the backstop no link change flushes.
			want += fmt.Sprintf("unreachable %s proto 245 metric 4294967295 \n", dst)
			if got := e.ip("route", "show", "table", fmt.Sprint(table)); got != want {
				t.Errorf("ip route show table %d =\n%q\nwant\n%q", table, got, want)
			}

			e.wantPath("1.2.3.4", "dev vpc0 table "+fmt.Sprint(table))
			e.wantPath("6.0.0.1", "dev vpc0 table "+fmt.Sprint(table)) // still inside 0.0.0.0/5
			if tc.default_ {
				e.wantPath("198.51.100.10", "dev vpc0 table "+fmt.Sprint(table))
			} else {
				e.wantPath("198.51.100.10", "via 203.0.113.1 dev pub0")
			}
			e.wantPath(controlPlane.String(), "203.0.113.100 dev pub0") // on the public network
			e.wantPath(dnsServer.String(), "via 203.0.113.1 dev pub0")
			e.wantPath("169.254.169.254", "via 203.0.113.1 dev pub0")
			e.wantPath("10.114.0.3", "10.114.0.3 dev vpc0 src 10.114.0.10")
			e.wantPath("10.114.0.77", "10.114.0.77 dev vpc0 src 10.114.0.10")
			if got := e.mainTables(); got != mainBefore {
				t.Errorf("main table changed:\nbefore\n%s\nafter\n%s", mainBefore, got)
			}
		})
	}
	e.t = t
	if _, err := e.ap.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if rules := e.ip("rule"); strings.Contains(rules, "proto 245") {
		t.Errorf("cleanup left rules:\n%s", rules)
	}
	if got := e.ip("route", "show", "table", "all", "proto", "245"); got != "" {
		t.Errorf("cleanup left routes:\n%s", got)
	}
	if got := e.mainTables(); got != mainBefore {
		t.Errorf("main table changed after cleanup")
	}
}

// TestTrafficThroughGateways: real datagrams to a destination of a Route
// leave through its gateways, and many flows spread over both.
func TestTrafficThroughGateways(t *testing.T) {
	e := newEnv(t, "flows")
	ext := netip.AddrPortFrom(e.lab.ExternalAddr, 9000)

	before := e.forwarded()
	if got := e.sendFlows(ext, e.lab.External, 20); got != 20 {
		t.Fatalf("without a Route: %d of 20 datagrams arrived", got)
	}
	after := e.forwarded()
	if after[0]-before[0] > 5 || after[1]-before[1] > 5 {
		t.Errorf("without a Route traffic went through gateways: %v -> %v", before, after)
	}

	e.apply(route("ecmp", 0, []string{"198.51.100.0/24"}, "10.114.0.3", "10.114.0.4"))
	const flows = 200
	before = e.forwarded()
	if got := e.sendFlows(ext, e.lab.External, flows); got != flows {
		t.Fatalf("%d of %d datagrams arrived", got, flows)
	}
	after = e.forwarded()
	d0, d1 := after[0]-before[0], after[1]-before[1]
	t.Logf("%d flows: gateway 0 forwarded %d packets, gateway 1 %d", flows, d0, d1)
	if d0+d1 < flows {
		t.Errorf("only %d of %d flows went through the gateways", d0+d1, flows)
	}
	if d0 < flows/5 || d1 < flows/5 {
		t.Errorf("flows did not spread over both gateways: %d / %d", d0, d1)
	}

	// IPv6 too.
	e.apply(route("ecmp", 0, []string{"198.51.100.0/24", "2001:db8:100::/48"}, "10.114.0.3", "10.114.0.4", "fd00:114::3", "fd00:114::4"))
	ext6 := netip.AddrPortFrom(e.lab.ExternalAddr6, 9000)
	before = e.forwarded()
	if got := e.sendFlows(ext6, e.lab.External, flows); got != flows {
		t.Fatalf("IPv6: %d of %d datagrams arrived", got, flows)
	}
	after = e.forwarded()
	d0, d1 = after[0]-before[0], after[1]-before[1]
	t.Logf("IPv6, %d flows: gateway 0 forwarded %d packets, gateway 1 %d", flows, d0, d1)
	if d0 < flows/5 || d1 < flows/5 {
		t.Errorf("IPv6 flows did not spread over both gateways: %d / %d", d0, d1)
	}
}

// TestDefaultOverride: 0.0.0.0/0 and ::/0 through the gateways leave the
// main table byte for byte, keep control plane, metadata, DNS, gateways and
// the VPC on main, and replies to inbound connections on the public side.
func TestDefaultOverride(t *testing.T) {
	e := newEnv(t, "dflt")
	// The pod network, routed to another node over the VPC as a CNI would.
	e.ip("route", "add", "10.244.0.0/16", "via", "10.114.0.4", "dev", "vpc0")
	mainBefore := e.mainTables()
	plan, _ := e.apply(route("default", 0, []string{"0.0.0.0/0", "::/0"}, "10.114.0.3", "10.114.0.4", "fd00:114::3", "fd00:114::4"))
	table := fmt.Sprint(tableOf(t, plan, "default"))

	if got := e.mainTables(); got != mainBefore {
		t.Errorf("main table changed:\nbefore\n%s\nafter\n%s", mainBefore, got)
	}
	e.wantPath("198.51.100.10", "dev vpc0 table "+table)
	e.wantPath("2001:db8:100::10", "dev vpc0 table "+table)
	e.wantPath(controlPlane.String(), "203.0.113.100 dev pub0")
	for _, dst := range []string{dnsServer.String(), "169.254.169.254"} {
		e.wantPath(dst, "via 203.0.113.1 dev pub0")
	}
	e.wantPath("10.114.0.4", "10.114.0.4 dev vpc0 src 10.114.0.10")
	e.wantPath("10.114.0.99", "10.114.0.99 dev vpc0 src 10.114.0.10")
	e.wantPath("10.244.7.7", "10.244.7.7 via 10.114.0.4 dev vpc0 src 10.114.0.10 uid") // pods: main, no table
	e.wantPath("fd00:114::4", "dev vpc0")
	e.wantPath("203.0.113.77", "203.0.113.77 dev pub0 src 203.0.113.10") // connected
	e.wantPath("198.51.100.10", "via 203.0.113.1 dev pub0", "from", "203.0.113.10")
	// Over IPv6 the public address has no source rule while the marks are
	// on (see planner.sourceRules); a reply carries the connection's mark.
	e.wantPath("2001:db8:100::10", "dev vpc0 table "+table, "from", "2001:db8:203::10")
	e.wantPath("2001:db8:100::10", "via 2001:db8:203::1 dev pub0", "from", "2001:db8:203::10", "mark", "0x2000")
	e.wantPath("198.51.100.10", "via 203.0.113.1 dev pub0", "mark", "0x2000")

	// A real TCP exchange from the external host to the node's public
	// address: the replies must not go through the gateways.
	var ln net.Listener
	if err := netns.Do(e.lab.Node, func() (err error) {
		ln, err = net.Listen("tcp", net.JoinHostPort(e.lab.NodePublic.String(), "7000"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			buf := make([]byte, 16)
			for {
				n, err := c.Read(buf)
				if err != nil {
					c.Close()
					break
				}
				c.Write(buf[:n])
			}
		}
	}()
	before := e.forwarded()
	const exchanges = 50
	if err := netns.Do(e.lab.External, func() error {
		c, err := net.DialTimeout("tcp", net.JoinHostPort(e.lab.NodePublic.String(), "7000"), 3*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 4)
		for range exchanges {
			if _, err := c.Write([]byte("ping")); err != nil {
				return err
			}
			if _, err := c.Read(buf); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatalf("inbound TCP to the public address: %v", err)
	}
	after := e.forwarded()
	if d := after[0] - before[0] + after[1] - before[1]; d > 5 {
		t.Errorf("%d packets of an inbound connection's replies went through the gateways", d)
	}
}

// TestLongestPrefixAcrossRoutes: a more specific prefix of another Route
// wins whichever Route is older, and an equal prefix is a conflict.
func TestLongestPrefixAcrossRoutes(t *testing.T) {
	e := newEnv(t, "lpm")
	for _, order := range []struct{ wideAge, narrowAge int }{{0, 1}, {1, 0}} {
		wide := route("wide", order.wideAge, []string{"198.51.100.0/24", "0.0.0.0/0"}, "10.114.0.3")
		narrow := route("narrow", order.narrowAge, []string{"198.51.100.10/32", "1.2.3.4/5"}, "10.114.0.4")
		plan, _ := e.apply(wide, narrow)
		e.wantPath("198.51.100.10", "via 10.114.0.4 dev vpc0 table "+fmt.Sprint(tableOf(t, plan, "narrow")))
		e.wantPath("198.51.100.20", "via 10.114.0.3 dev vpc0 table "+fmt.Sprint(tableOf(t, plan, "wide")))
		e.wantPath("1.2.3.4", "via 10.114.0.4 dev vpc0")
		e.wantPath("192.0.2.99", "via 10.114.0.3 dev vpc0")

		before := e.forwarded()
		if got := e.sendFlows(netip.AddrPortFrom(e.lab.ExternalAddr, 9001), e.lab.External, 20); got != 20 {
			t.Fatalf("%d of 20 arrived", got)
		}
		after := e.forwarded()
		if after[1]-before[1] < 20 || after[0]-before[0] > 5 {
			t.Errorf("wide age %d: traffic to the /32 went %d via gateway 0, %d via gateway 1; want all via 1", order.wideAge, after[0]-before[0], after[1]-before[1])
		}
	}

	twin := route("twin", 5, []string{"198.51.100.0/24"}, "10.114.0.4")
	rulesBefore := e.ip("rule")
	plan, _ := e.apply(route("wide", 0, []string{"198.51.100.0/24", "0.0.0.0/0"}, "10.114.0.3"), route("narrow", 1, []string{"198.51.100.10/32", "1.2.3.4/5"}, "10.114.0.4"), twin)
	r := plan.Results[2]
	if r.Phase != planner.Conflict || !strings.Contains(r.Message, `"wide"`) {
		t.Errorf("equal prefix: %+v, want Conflict naming wide", r)
	}
	if got := e.ip("rule"); got != rulesBefore {
		t.Errorf("a conflicting Route changed the rules:\n%s", got)
	}
}

// TestIdempotenceAndDrift: a second apply writes nothing; hand-made damage
// is repaired; foreign rules and routes are left alone and reported; what a
// killed agent left for a since-deleted Route is collected, and nothing of
// the surviving Route is rewritten.
// drift does to the kernel what TestIdempotenceAndDrift repairs: keep's
// rule deleted, one of its routes replaced and another deleted (in table),
// a rule of the agent's form it does not want, a foreign rule in its band
// and a foreign route in its table.
func (e *env) drift(table string) {
	e.t.Helper()
	e.ip("rule", "del", "to", "198.51.100.0/24", "lookup", table)
	e.ip("route", "replace", "198.51.100.0/24", "via", "10.114.0.4", "dev", "vpc0", "table", table, "proto", "245")
	e.ip("route", "del", "2001:db8:100::/48", "table", table)
	e.ip("rule", "add", "priority", "30010", "to", "192.0.2.1", "lookup", "main", "protocol", "245") // ours in form, unwanted
	e.ip("rule", "add", "priority", "30500", "lookup", "777")                                        // foreign
	e.ip("route", "add", "203.0.113.128/25", "via", "10.114.0.3", "table", table)                    // foreign (proto boot)
}

// checkRepaired checks the apply after drift: four writes, the foreign rule
// reported, and what the agent owns as it was (want is e.owned() before).
func (e *env) checkRepaired(rep applier.Report, want string) {
	e.t.Helper()
	if rep.Changes != 4 {
		e.t.Errorf("repair made %d writes, want 4 (rule re-added, two routes replaced, stray rule removed)", rep.Changes)
	}
	if len(rep.Foreign) != 1 || !strings.Contains(rep.Foreign[0], "777") {
		e.t.Errorf("foreign rules reported: %q, want the lookup 777 rule", rep.Foreign)
	}
	if got := e.owned(); got != want {
		e.t.Errorf("after repair:\n%s\nwant\n%s", got, want)
	}
}

func TestIdempotenceAndDrift(t *testing.T) {
	e := newEnv(t, "drift")
	keep := route("keep", 0, []string{"198.51.100.0/24", "2001:db8:100::/48"}, "10.114.0.3", "10.114.0.4", "fd00:114::3")
	gone := route("gone", 1, []string{"192.0.2.128/25"}, "10.114.0.4")
	plan, rep := e.apply(keep, gone)
	if rep.Changes == 0 {
		t.Fatal("first apply changed nothing")
	}
	want := e.owned()

	if _, rep = e.apply(keep, gone); rep.Changes != 0 {
		t.Errorf("second apply of the same plan made %d netlink writes, want 0", rep.Changes)
	}

	keepTable := fmt.Sprint(tableOf(t, plan, "keep"))
	e.drift(keepTable)
	_, rep = e.apply(keep, gone)
	e.checkRepaired(rep, want)
	if !strings.Contains(e.ip("rule"), "30500:\tfrom all lookup 777") || !strings.Contains(e.ip("route", "show", "table", keepTable), "203.0.113.128/25") {
		t.Error("a foreign rule or route was removed")
	}

	// A new Applier is a restarted agent; "gone" was deleted while it was
	// down. Only gone's rule and routes are written (deleted).
	restarted := e.newApplier(e.cfg)
	rep, err := restarted.Apply(e.plan(keep))
	if err != nil {
		t.Fatal(err)
	}
	if n := restarted.Writes.RouteReplace.Load() + restarted.Writes.RuleAdd.Load(); n != 0 {
		t.Errorf("restart rewrote %d routes or rules of the surviving Route", n)
	}
	// gone's rule, its entry in the gate and the nop that entry landed on
	// (keep's region, the last, is the gate's exit), and the skip over the
	// two Routes' rules, which one rule does not need.
	if restarted.Writes.RuleDelete.Load() != 4 || restarted.Writes.RouteDelete.Load() != 2 {
		t.Errorf("collecting gone: %d rule and %d route deletes, want 4 and 2 (its rule, its gate entry, the gate's landing and the skip; its route and backstop)", restarted.Writes.RuleDelete.Load(), restarted.Writes.RouteDelete.Load())
	}
	if strings.Contains(e.ip("route", "show", "table", "all", "proto", "245"), "192.0.2.128/25") {
		t.Error("the deleted Route's route is still installed")
	}

	if _, err := restarted.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if got := e.ip("route", "show", "table", "all", "proto", "245"); got != "" {
		t.Errorf("cleanup left: %s", got)
	}
	if !strings.Contains(e.ip("rule"), "lookup 777") || !strings.Contains(e.ip("route", "show", "table", keepTable), "203.0.113.128/25") {
		t.Error("cleanup removed something the agent does not own")
	}
}

func TestEnsureSysctls(t *testing.T) {
	e := newEnv(t, "sysctl")
	// newEnv already set them: a second pass changes nothing.
	var changed []string
	if err := netns.Do(e.lab.Node, func() (err error) {
		changed, err = applier.EnsureSysctls("/proc/sys", applier.ECMPSysctls)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if len(changed) != 0 {
		t.Errorf("second pass changed %v", changed)
	}
	if got, _ := e.lab.Exec(e.lab.Node, "sysctl", "-n", "net.ipv4.fib_multipath_hash_policy", "net.ipv6.fib_multipath_hash_policy", "net.ipv4.fib_multipath_use_neigh"); got != "1\n1\n1\n" {
		t.Errorf("sysctls in the node namespace: %q", got)
	}
}

// A kernel booted with ipv6.disable=1 has no /proc/sys/net/ipv6: the IPv4
// settings are still made, the IPv6 one is skipped without an error.
func TestEnsureSysctlsWithoutIPv6(t *testing.T) {
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "net", "ipv4"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"fib_multipath_hash_policy", "fib_multipath_use_neigh"} {
		if err := os.WriteFile(filepath.Join(root, "net", "ipv4", name), []byte("0\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	changed, err := applier.EnsureSysctls(root, applier.ECMPSysctls)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"net/ipv4/fib_multipath_hash_policy", "net/ipv4/fib_multipath_use_neigh"}; !slices.Equal(changed, want) {
		t.Errorf("changed %v, want %v", changed, want)
	}
	// With net/ipv6 present but a file missing, that is still an error.
	if err := os.MkdirAll(filepath.Join(root, "net", "ipv6"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := applier.EnsureSysctls(root, applier.ECMPSysctls); err == nil {
		t.Error("a missing net.ipv6 sysctl on a kernel with IPv6 was not reported")
	}
}

// TestFailClosedWhenTheLinkGoes: the node's own interface towards the
// gateways goes down (a NIC reset, a netplan apply). The kernel flushes
// every route through it; what stays in the Route's table is the backstop,
// so the default override fails closed instead of leaking out of the
// node's uplink. An apply while the link is down has its routes refused by
// the kernel: reported as the Route's, not as a failed apply. When the link
// comes back the next apply restores the live routes.
func TestFailClosedWhenTheLinkGoes(t *testing.T) {
	e := newEnv(t, "linkdown")
	if err := e.lab.CountUplinkTraffic(0); err != nil {
		t.Fatal(err)
	}
	plan, _ := e.apply(route("default", 0, []string{"0.0.0.0/0", "::/0"}, "10.114.0.3", "10.114.0.4", "fd00:114::3", "fd00:114::4"))
	table := tableOf(t, plan, "default")
	external := netip.AddrPortFrom(e.lab.ExternalAddr, 9000)
	if got := e.sendFlows(external, e.lab.External, 8); got != 8 {
		t.Fatalf("%d of 8 flows arrived through the gateways before the link went down", got)
	}

	e.ip("link", "set", topology.VPCIf, "down")
	want := "unreachable default proto 245 metric 4294967295 \n"
	if got := e.ip("route", "show", "table", fmt.Sprint(table)); got != want {
		t.Errorf("with vpc0 down, table %d =\n%q\nwant only the backstop\n%q", table, got, want)
	}
	if got := e.ip("-6", "route", "show", "table", fmt.Sprint(table)); !strings.HasPrefix(got, "unreachable default") || strings.Contains(got, "via") {
		t.Errorf("with vpc0 down, IPv6 table %d =\n%s", table, got)
	}
	for _, dst := range []string{"198.51.100.10", "2001:db8:100::10"} {
		if out, err := e.lab.Exec(e.lab.Node, "ip", "route", "get", dst); err == nil || !strings.Contains(out, "No route to host") {
			t.Errorf("ip route get %s with vpc0 down: %q, %v; want No route to host (the backstop)", dst, out, err)
		}
	}
	// IPv6 too: an unbound IPv6 socket whose route lookup fails is looked
	// up again by the kernel with a source address it picks, here the
	// public one; a `from <public address> lookup main` rule would send it
	// out of the uplink. With connection marks on there is no IPv6 source
	// rule (planner.sourceRules), and that path is closed.
	external6 := netip.AddrPortFrom(e.lab.ExternalAddr6, 9000)
	sendOnly := func() {
		for i := range 8 {
			// Refused by the kernel (no route to host): that is the point.
			_ = topology.SendUDP(e.lab.Node, external, []byte(fmt.Sprintf("leak? %d", i)))
			_ = topology.SendUDP(e.lab.Node, external6, []byte(fmt.Sprintf("leak? %d", i)))
		}
	}
	sendOnly()

	// An apply now: the kernel refuses every gateway route (no connected
	// network on a down link); the refusals are the Route's.
	rep, err := e.ap.Apply(e.plan(route("default", 0, []string{"0.0.0.0/0", "::/0"}, "10.114.0.3", "10.114.0.4", "fd00:114::3", "fd00:114::4")))
	if err != nil {
		t.Errorf("apply with the link down failed as a whole: %v", err)
	}
	if n := len(rep.Rejected[table]); n != 2 {
		t.Errorf("kernel refusals for table %d: %d (%v), want 2 (the v4 and v6 default routes)", table, n, rep.Rejected)
	}
	sendOnly()
	if n, err := e.lab.UplinkPackets(0); err != nil || n != 0 {
		t.Errorf("%d packets for the external host left through the node's own uplink (%v)", n, err)
	}

	e.ip("link", "set", topology.VPCIf, "up")
	if err := waitFor(5*time.Second, func() bool {
		rep, err := e.ap.Apply(e.plan(route("default", 0, []string{"0.0.0.0/0", "::/0"}, "10.114.0.3", "10.114.0.4", "fd00:114::3", "fd00:114::4")))
		return err == nil && len(rep.Rejected) == 0
	}); err != nil {
		t.Fatalf("routes not restored after the link came back: %v", err)
	}
	if got := e.sendFlows(external, e.lab.External, 8); got != 8 {
		t.Errorf("%d of 8 flows arrived after the link came back", got)
	}
	if n, err := e.lab.UplinkPackets(0); err != nil || n != 0 {
		t.Errorf("%d packets for the external host left through the node's own uplink (%v)", n, err)
	}
}

// waitFor polls cond until it holds or timeout passes.
func waitFor(timeout time.Duration, cond func() bool) error {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("not within %s", timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return nil
}

// TestRemoveLayout: an agent restarted with another band, protocol or
// table range removes what its predecessor left, after its own rules are
// in, and never what it owns itself.
func TestRemoveLayout(t *testing.T) {
	e := newEnv(t, "layout")
	r := route("nat", 0, []string{"0.0.0.0/0"}, "10.114.0.3")
	external := netip.AddrPortFrom(e.lab.ExternalAddr, 9000)
	if _, err := e.ap.Apply(e.plan(r)); err != nil {
		t.Fatal(err)
	}
	old := e.cfg
	for _, tc := range []struct {
		name                        string
		change                      func(*planner.Config)
		wantRuleDels, wantRouteDels int64
		wantNexthopDels             int64
	}{
		// Same protocol and tables: the routes are the new agent's too;
		// only the old band's nine rules go (the /0 is two, 0.0.0.0/1 and
		// 128.0.0.0/1).
		{"band", func(c *planner.Config) { c.PriorityBase = 20000 }, 9, 0, 0},
		// Everything moves: the old rules and the route and its backstop,
		// then the old protocol's gateway object and group.
		{"protocol and tables", func(c *planner.Config) { c.Protocol, c.TableMin, c.TableMax = 246, 50000, 59999 }, 9, 2, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e.t = t
			cfg := old
			tc.change(&cfg)
			e.cfg = cfg
			moved := e.newApplier(cfg)
			if _, err := moved.Apply(e.plan(r)); err != nil {
				t.Fatal(err)
			}
			rep, err := moved.RemoveLayout(old)
			if err != nil {
				t.Fatal(err)
			}
			if moved.Writes.RuleDelete.Load() != tc.wantRuleDels || moved.Writes.RouteDelete.Load() != tc.wantRouteDels || moved.Writes.NexthopDelete.Load() != tc.wantNexthopDels ||
				rep.Changes != int(tc.wantRuleDels+tc.wantRouteDels+tc.wantNexthopDels) {
				t.Errorf("removing the old layout: %d rule, %d route and %d nexthop deletes (%d changes), want %d, %d and %d", moved.Writes.RuleDelete.Load(), moved.Writes.RouteDelete.Load(), moved.Writes.NexthopDelete.Load(), rep.Changes, tc.wantRuleDels, tc.wantRouteDels, tc.wantNexthopDels)
			}
			if st, err := e.newApplier(old).Read(); err != nil {
				t.Fatal(err)
			} else if len(st.Rules) != 0 {
				t.Errorf("the old band still holds rules: %v", st.Rules)
			}
			after, err := moved.Read()
			if err != nil {
				t.Fatal(err)
			}
			if want := e.plan(r); len(after.Rules) != len(want.Rules) || len(after.Routes) != len(want.Routes) {
				t.Errorf("the new layout lost something: %d rules and %d routes, want %d and %d", len(after.Rules), len(after.Routes), len(want.Rules), len(want.Routes))
			}
			if got := e.sendFlows(external, e.lab.External, 4); got != 4 {
				t.Errorf("%d of 4 flows arrived through the moved layout", got)
			}
			// The next move starts from the first layout again.
			if _, err := moved.Cleanup(); err != nil {
				t.Fatal(err)
			}
			e.cfg = old
			if _, err := e.ap.Apply(e.plan(r)); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestMarkCollisionsReported: a rule of someone else matching a bit of the
// connection mark is reported; one on other bits, or the agent's own, is not.
func TestMarkCollisionsReported(t *testing.T) {
	e := newEnv(t, "markuse")
	e.apply(route("default", 0, []string{"0.0.0.0/0"}, "10.114.0.3"))
	e.ip("rule", "add", "priority", "100", "fwmark", "0x2000/0xf000", "lookup", "100") // overlaps 0x2000
	e.ip("rule", "add", "priority", "101", "fwmark", "0xa00/0xf00", "lookup", "101")   // Cilium's bits: clear
	_, rep := e.apply(route("default", 0, []string{"0.0.0.0/0"}, "10.114.0.3"))
	if len(rep.MarkCollisions) != 1 || !strings.Contains(rep.MarkCollisions[0], "lookup 100") || !strings.Contains(rep.MarkCollisions[0], "0x2000/0xf000") {
		t.Errorf("mark collisions %q, want only the priority 100 rule", rep.MarkCollisions)
	}
}
