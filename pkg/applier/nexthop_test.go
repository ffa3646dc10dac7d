package applier_test

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
	vnetns "github.com/vishvananda/netns"

	"github.com/routing-agent/routing-agent/pkg/applier"
	"github.com/routing-agent/routing-agent/pkg/lab/topology"
	"github.com/routing-agent/routing-agent/pkg/planner"
)

func manyDestinations(n int) []string {
	var out []string
	for i := range n {
		out = append(out, fmt.Sprintf("172.16.%d.0/24", i))
	}
	return out
}

// TestFailoverIsOneGroupReplace: a gateway going down or coming back is one
// write (the table's group) however many destinations the Route has; on a
// kernel without nexthop objects (forced) it is a replace per route. Either
// way the traffic moves, and an unchanged plan writes nothing.
func TestFailoverIsOneGroupReplace(t *testing.T) {
	e := newEnv(t, "nhfail")
	r := route("many", 0, append(manyDestinations(64), "198.51.100.0/24"), "10.114.0.3", "10.114.0.4")
	for _, tc := range []struct {
		name     string
		perRoute bool
		writes   int
	}{{"nexthop objects", false, 1}, {"per route", true, 65}} {
		t.Run(tc.name, func(t *testing.T) {
			e.t = t
			ap := e.newApplier(e.cfg)
			if tc.perRoute {
				ap.DisableNexthopObjects()
			}
			plan := e.plan(r)
			if _, err := ap.Apply(plan); err != nil {
				t.Fatal(err)
			}
			table := tableOf(t, plan, "many")
			if rep, err := ap.Apply(plan); err != nil || rep.Changes != 0 {
				t.Errorf("second apply: %d writes, %v", rep.Changes, err)
			}
			shown := e.ip("route", "show", "table", fmt.Sprint(table))
			if tc.perRoute == strings.Contains(shown, "nhid") {
				t.Errorf("table %d (per route %v):\n%s", table, tc.perRoute, shown)
			}
			for _, step := range []struct {
				down []string
				want string
			}{{[]string{"10.114.0.4"}, "via 10.114.0.3 dev vpc0"}, {nil, "nexthop via 10.114.0.4"}} {
				rep, err := ap.Apply(e.planDown(step.down, r))
				if err != nil {
					t.Fatal(err)
				}
				if rep.Changes != tc.writes {
					t.Errorf("down %v: %d writes, want %d", step.down, rep.Changes, tc.writes)
				}
				if !tc.perRoute && rep.NexthopsIn <= 0 {
					t.Errorf("down %v: Report.NexthopsIn = %v", step.down, rep.NexthopsIn)
				}
				for _, dst := range []string{"172.16.0.0/24", "172.16.63.0/24", "198.51.100.0/24"} {
					got := e.ip("route", "show", "table", fmt.Sprint(table), dst)
					if !strings.Contains(got, step.want) || len(step.down) > 0 && strings.Contains(got, "10.114.0.4") {
						t.Errorf("down %v: %s = %q, want %q", step.down, dst, got, step.want)
					}
				}
				if got := e.sendFlows(netip.AddrPortFrom(e.lab.ExternalAddr, 9000), e.lab.External, 4); got != 4 {
					t.Errorf("down %v: %d of 4 flows arrived", step.down, got)
				}
			}
			// Both gateways down: fail closed, the group keeps them both.
			if _, err := ap.Apply(e.planDown([]string{"10.114.0.3", "10.114.0.4"}, r)); err != nil {
				t.Fatal(err)
			}
			if got := e.ip("route", "show", "table", fmt.Sprint(table), "172.16.5.0/24"); !strings.Contains(got, "10.114.0.3") || !strings.Contains(got, "10.114.0.4") {
				t.Errorf("all gateways down: %q, want both kept", got)
			}
			if _, err := ap.Cleanup(); err != nil {
				t.Fatal(err)
			}
			if got := e.ip("nexthop", "show", "protocol", "245"); got != "" && !tc.perRoute {
				t.Errorf("cleanup left nexthop objects:\n%s", got)
			}
		})
	}
}

// TestNexthopDriftAndModes: a deleted group (which takes its routes with
// it) or gateway object is made again; routes that name their gateways are
// moved onto the group and back when the kernel is said to lack nexthop
// objects; objects of others, and ids outside the agent's range, are left
// alone; without a socket of its own the Applier still works request by
// request.
func TestNexthopDriftAndModes(t *testing.T) {
	e := newEnv(t, "nhdrift")
	r := route("drift", 0, []string{"198.51.100.0/24", "192.0.2.0/25", "2001:db8:100::/48"}, "10.114.0.3", "10.114.0.4", "fd00:114::3")
	plan, _ := e.apply(r)
	table := tableOf(t, plan, "drift")
	group4, _ := planner.GroupID(e.cfg.Protocol, table, false)
	group6, _ := planner.GroupID(e.cfg.Protocol, table, true)
	want := e.owned()
	// Someone else's objects, one of them inside the range but not the
	// agent's protocol, one outside it with the agent's protocol.
	e.ip("nexthop", "add", "id", "7", "via", "10.114.0.3", "dev", topology.VPCIf)
	e.ip("nexthop", "add", "id", fmt.Sprint(planner.NexthopIDBase(e.cfg.Protocol)+900), "via", "10.114.0.4", "dev", topology.VPCIf)
	e.ip("nexthop", "add", "id", "8", "via", "10.114.0.4", "dev", topology.VPCIf, "protocol", "245")
	if _, rep := e.apply(r); rep.Changes != 0 {
		t.Errorf("strangers' nexthop objects made %d writes", rep.Changes)
	}

	e.ip("nexthop", "del", "id", fmt.Sprint(group4))
	if got := e.ip("route", "show", "table", fmt.Sprint(table)); strings.Contains(got, "nhid") || strings.Count(got, "unreachable") != 2 {
		t.Errorf("after deleting the group, table %d:\n%s", table, got)
	}
	_, rep := e.apply(r)
	if rep.Changes != 3 {
		t.Errorf("repairing a deleted group: %d writes, want 3 (the group, two routes)", rep.Changes)
	}
	if got := e.owned(); got != want {
		t.Errorf("after repair:\n%s\nwant\n%s", got, want)
	}
	// A gateway object deleted: the group loses it; the next apply makes
	// it again and puts it back.
	objs := e.ip("nexthop", "show", "protocol", "245")
	first, _ := planner.GatewayIDs(e.cfg.Protocol)
	if !strings.Contains(objs, fmt.Sprintf("id %d via 10.114.0.3", first)) {
		t.Fatalf("nexthop objects:\n%s", objs)
	}
	e.ip("nexthop", "del", "id", fmt.Sprint(first))
	if _, rep = e.apply(r); rep.Changes < 2 {
		t.Errorf("repairing a deleted gateway object: %d writes", rep.Changes)
	}
	if got := e.owned(); got != want {
		t.Errorf("after repair:\n%s\nwant\n%s", got, want)
	}

	// The fallback: routes name their gateways, in place.
	fallback := e.newApplier(e.cfg)
	fallback.DisableNexthopObjects()
	if rep, err := fallback.Apply(e.plan(r)); err != nil || rep.Changes != 3 {
		t.Errorf("moving to routes that name their gateways: %d writes (want 3), %v", rep.Changes, err)
	}
	if got := e.ip("route", "show", "table", fmt.Sprint(table)) + e.ip("-6", "route", "show", "table", fmt.Sprint(table)); strings.Contains(got, "nhid") || !strings.Contains(got, "nexthop via 10.114.0.4") {
		t.Errorf("fallback table:\n%s", got)
	}
	if rep, _ := fallback.Apply(e.plan(r)); rep.Changes != 0 {
		t.Errorf("fallback, second apply: %d writes", rep.Changes)
	}
	if rep, _ := e.ap.Apply(e.plan(r)); rep.Changes != 3 {
		t.Errorf("back onto the groups: %d writes, want 3", rep.Changes)
	}
	if got := e.ip("-6", "route", "show", "table", fmt.Sprint(table)); !strings.Contains(got, fmt.Sprintf("nhid %d", group6)) {
		t.Errorf("IPv6 table:\n%s", got)
	}

	// Request by request through the handle (no SetNamespace).
	direct := applier.New(e.h, e.cfg, logr.Discard())
	if rep, err := direct.Apply(e.plan(r)); err != nil {
		t.Errorf("direct apply: %v (%d writes)", err, rep.Changes)
	}
	if _, err := direct.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if got := e.ip("route", "show", "table", "all", "proto", "245"); got != "" {
		t.Errorf("direct cleanup left: %s", got)
	}
	if _, err := e.ap.Cleanup(); err != nil {
		t.Fatal(err)
	}
	left := e.ip("nexthop", "show")
	for _, id := range []string{"id 7 ", fmt.Sprintf("id %d ", planner.NexthopIDBase(e.cfg.Protocol)+900), "id 8 "} {
		if !strings.Contains(left, id) {
			t.Errorf("cleanup removed a stranger's nexthop object %q:\n%s", id, left)
		}
	}
	if strings.Count(left, "\n") != 3 {
		t.Errorf("cleanup left more than the strangers' objects:\n%s", left)
	}
}

// TestFailClosedWhenTheLinkGoesWithNexthops is TestFailClosedWhenTheLinkGoes
// for both ways of writing routes: with nexthop objects the kernel deletes
// the objects on the link that went down (and the routes through them),
// the backstops hold every destination, an apply while the link is down
// reports the routes it cannot write as the Route's and fails nothing
// else, and once the link is back the objects, groups and routes are made
// again. Per route (the fallback) the same holds.
func TestFailClosedWhenTheLinkGoesWithNexthops(t *testing.T) {
	e := newEnv(t, "nhlink")
	if err := e.lab.CountUplinkTraffic(0); err != nil {
		t.Fatal(err)
	}
	r := route("default", 0, []string{"0.0.0.0/0", "::/0"}, "10.114.0.3", "10.114.0.4", "fd00:114::3", "fd00:114::4")
	external := netip.AddrPortFrom(e.lab.ExternalAddr, 9000)
	for _, perRoute := range []bool{false, true} {
		t.Run(fmt.Sprintf("per route %v", perRoute), func(t *testing.T) {
			e.t = t
			ap := e.newApplier(e.cfg)
			if perRoute {
				ap.DisableNexthopObjects()
			}
			plan := e.plan(r)
			if _, err := ap.Apply(plan); err != nil {
				t.Fatal(err)
			}
			table := fmt.Sprint(tableOf(t, plan, "default"))
			if got := e.sendFlows(external, e.lab.External, 4); got != 4 {
				t.Fatalf("%d of 4 flows arrived before the link went down", got)
			}
			e.ip("link", "set", topology.VPCIf, "down")
			if got := e.ip("nexthop", "show", "protocol", "245"); got != "" {
				t.Errorf("with vpc0 down the kernel kept nexthop objects:\n%s", got)
			}
			for _, family := range []string{"-4", "-6"} {
				if got := e.ip(family, "route", "show", "table", table); !strings.HasPrefix(got, "unreachable default") || strings.Count(got, "\n") != 1 {
					t.Errorf("with vpc0 down, table %s (%s) =\n%s", table, family, got)
				}
			}
			for range 3 {
				rep, err := ap.Apply(e.plan(r))
				if err != nil {
					t.Errorf("apply with the link down failed as a whole: %v", err)
				}
				if n := len(rep.Rejected[tableOf(t, plan, "default")]); n != 2 {
					t.Errorf("kernel refusals: %d (%v), want 2", n, rep.Rejected)
				}
				for i := range 4 {
					_ = topology.SendUDP(e.lab.Node, external, []byte(fmt.Sprintf("leak? %d", i)))
					_ = topology.SendUDP(e.lab.Node, netip.AddrPortFrom(e.lab.ExternalAddr6, 9000), []byte(fmt.Sprintf("leak? %d", i)))
				}
			}
			if n, err := e.lab.UplinkPackets(0); err != nil || n != 0 {
				t.Errorf("%d packets left through the node's own uplink (%v)", n, err)
			}
			e.ip("link", "set", topology.VPCIf, "up")
			if err := waitFor(5*time.Second, func() bool {
				rep, err := ap.Apply(e.plan(r))
				return err == nil && len(rep.Rejected) == 0
			}); err != nil {
				t.Fatalf("routes not restored after the link came back: %v", err)
			}
			if rep, err := ap.Apply(e.plan(r)); err != nil || rep.Changes != 0 {
				t.Errorf("after the restore: %d writes, %v", rep.Changes, err)
			}
			shown := e.ip("route", "show", "table", table)
			if perRoute == strings.Contains(shown, "nhid") || !strings.Contains(shown, "nexthop via 10.114.0.4") {
				t.Errorf("restored table %s:\n%s", table, shown)
			}
			if got := e.sendFlows(external, e.lab.External, 4); got != 4 {
				t.Errorf("%d of 4 flows arrived after the link came back", got)
			}
			if n, err := e.lab.UplinkPackets(0); err != nil || n != 0 {
				t.Errorf("%d packets left through the node's own uplink (%v)", n, err)
			}
			if _, err := ap.Cleanup(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestRemoveLayoutKeepsSharedNexthops: with the same protocol the nexthop
// ids are the new layout's too; moving the table range removes the old
// table's group (after its routes) and keeps the gateway objects the new
// tables use.
func TestRemoveLayoutKeepsSharedNexthops(t *testing.T) {
	e := newEnv(t, "nhlayout")
	r := route("nat", 0, []string{"0.0.0.0/0"}, "10.114.0.3", "10.114.0.4")
	old := e.cfg
	oldTable := tableOf(t, e.plan(r), "nat")
	if _, err := e.ap.Apply(e.plan(r)); err != nil {
		t.Fatal(err)
	}
	e.cfg.TableMin, e.cfg.TableMax = 50000, 59999
	moved := e.newApplier(e.cfg)
	plan := e.plan(r)
	if _, err := moved.Apply(plan); err != nil {
		t.Fatal(err)
	}
	oldGroup, _ := planner.GroupID(old.Protocol, oldTable, false)
	if got := e.ip("nexthop", "show", "id", fmt.Sprint(oldGroup)); !strings.Contains(got, "group") {
		t.Errorf("the new layout's apply removed the old table's group before its routes: %q", got)
	}
	if _, err := moved.RemoveLayout(old); err != nil {
		t.Fatal(err)
	}
	if n := moved.Writes.NexthopDelete.Load(); n != 1 {
		t.Errorf("%d nexthop deletes, want 1 (the old table's group)", n)
	}
	newGroup, _ := planner.GroupID(e.cfg.Protocol, tableOf(t, plan, "nat"), false)
	objs := e.ip("nexthop", "show", "protocol", "245")
	if strings.Count(objs, "\n") != 3 || !strings.Contains(objs, fmt.Sprintf("id %d group", newGroup)) {
		t.Errorf("nexthop objects after the move:\n%s", objs)
	}
	if got := e.sendFlows(netip.AddrPortFrom(e.lab.ExternalAddr, 9000), e.lab.External, 4); got != 4 {
		t.Errorf("%d of 4 flows arrived through the moved layout", got)
	}
	if rep, err := moved.Apply(plan); err != nil || rep.Changes != 0 {
		t.Errorf("apply after the move: %d writes, %v", rep.Changes, err)
	}
}

// TestOneLogLinePerChange: batched, every write the kernel made is one
// "kernel change" line and one count; a refused one is neither, and is the
// Route's.
func TestOneLogLinePerChange(t *testing.T) {
	e := newEnv(t, "nhlog")
	var lines []string
	log := funcr.New(func(prefix, args string) { lines = append(lines, args) }, funcr.Options{})
	ns, err := vnetns.GetFromName(e.lab.Node)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	ap := applier.New(e.h, e.cfg, log)
	if err := ap.SetNamespace(ns); err != nil {
		t.Fatal(err)
	}
	defer ap.Close()
	r := route("logged", 0, append(manyDestinations(40), "::/0"), "10.114.0.3", "10.114.0.4", "fd00:114::3")
	plan := e.plan(r)
	rep, err := ap.Apply(plan)
	if err != nil {
		t.Fatal(err)
	}
	count := func() int {
		n := 0
		for _, l := range lines {
			if strings.Contains(l, `"kernel change"`) {
				n++
			}
		}
		return n
	}
	if n := count(); n != rep.Changes || int64(n) != ap.Writes.Total() || n == 0 {
		t.Errorf("%d kernel change lines, %d changes reported, %d counted", n, rep.Changes, ap.Writes.Total())
	}
	// The IPv6 gateway's link loses its address and someone flushes the
	// IPv6 nexthop objects (their group and route go with them): the
	// kernel refuses the object again and then the route (no connected
	// network).
	lines = nil
	before := ap.Writes.Total()
	e.ip("-6", "addr", "flush", "dev", topology.VPCIf)
	table := tableOf(t, plan, "logged")
	e.ip("-6", "nexthop", "flush", "protocol", "245")
	// The plan made while the gateway was connected, as for a Route
	// already applied (see planner: it is not withdrawn).
	rep, err = ap.Apply(plan)
	if err != nil {
		t.Fatalf("apply: %v", err)
	}
	if got := len(rep.Rejected[table]); got != 1 {
		t.Errorf("refused: %v, want the IPv6 default route", rep.Rejected)
	}
	if n := count(); n != rep.Changes || int64(n) != ap.Writes.Total()-before {
		t.Errorf("%d kernel change lines, %d changes reported, %d counted", n, rep.Changes, ap.Writes.Total()-before)
	}
	for _, l := range lines {
		if strings.Contains(l, `"kernel change"`) && strings.Contains(l, "::/0") {
			t.Errorf("a refused write was logged as a change: %s", l)
		}
	}
	t.Logf("rejected: %v; %d changes", rep.Rejected, rep.Changes)
}
