package applier

import (
	"net"
	"net/netip"
	"testing"

	"github.com/go-logr/logr"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/routing-agent/routing-agent/pkg/kernelwatch"
	"github.com/routing-agent/routing-agent/pkg/nlbatch"
	"github.com/routing-agent/routing-agent/pkg/nlutil"
	"github.com/routing-agent/routing-agent/pkg/planner"
)

// Notifications of what is not the agent's cost a comparison and mark
// nothing; the echo of a planned route marks its table but calls for no
// apply; anything else in the range does.
func TestViewSortsNotifications(t *testing.T) {
	cfg := planner.DefaultConfig()
	a := New(nil, cfg, logr.Discard())
	v := &View{a: a, tables: map[uint32]bool{}}
	gw := planner.Nexthop{Gateway: netip.MustParseAddr("10.114.0.3"), LinkIndex: 2}
	dst := netip.MustParsePrefix("198.51.100.0/24")
	planned := planner.Route{Table: cfg.TableMin, Dst: dst, Nexthops: []planner.Nexthop{gw}}
	backstop := planner.Route{Table: cfg.TableMin, Dst: dst, Backstop: true}
	for i, order := range [][]planner.Route{{planned, backstop}, {backstop, planned}} { // searched, looked up
		v.planned(planner.Plan{Routes: order})
		if v.sorted != (i == 0) {
			t.Fatalf("plan %d: sorted %v", i, v.sorted)
		}
		sortsRoutes(t, v, cfg, dst)
	}
	sortsRules(t, v, cfg)
}

func sortsRoutes(t *testing.T, v *View, cfg planner.Config, dst netip.Prefix) {
	t.Helper()

	update := func(typ uint16, table int, proto netlink.RouteProtocol, via string) netlink.RouteUpdate {
		r := netlink.Route{Table: table, Dst: nlutil.IPNet(dst), Protocol: proto, Family: netlink.FAMILY_V4, LinkIndex: 2}
		if via != "" {
			r.Gw = net.ParseIP(via)
		}
		return netlink.RouteUpdate{Type: typ, Route: r}
	}
	ours := netlink.RouteProtocol(cfg.Protocol)
	for _, tc := range []struct {
		name   string
		u      netlink.RouteUpdate
		differ bool
		dirty  bool
	}{
		{"main table", update(unix.RTM_NEWROUTE, unix.RT_TABLE_MAIN, ours, "10.114.0.3"), false, false},
		{"a table outside the range", update(unix.RTM_DELROUTE, int(cfg.TableMax)+1, ours, "10.114.0.3"), false, false},
		{"the echo of the planned route", update(unix.RTM_NEWROUTE, int(cfg.TableMin), ours, "10.114.0.3"), false, true},
		{"the planned route through another gateway", update(unix.RTM_NEWROUTE, int(cfg.TableMin), ours, "10.114.0.4"), true, true},
		{"the planned route deleted", update(unix.RTM_DELROUTE, int(cfg.TableMin), ours, "10.114.0.3"), true, true},
		{"someone else's route in the table", update(unix.RTM_NEWROUTE, int(cfg.TableMin), unix.RTPROT_STATIC, "10.114.0.3"), true, true},
		{"an unplanned route of ours deleted: the echo of a delete", update(unix.RTM_DELROUTE, int(cfg.TableMin)+1, ours, "10.114.0.3"), false, true},
	} {
		clear(v.tables)
		if got := v.RouteChanged(tc.u); got != tc.differ {
			t.Errorf("%s: calls for an apply %v, want %v", tc.name, got, tc.differ)
		}
		if got := len(v.tables) > 0; got != tc.dirty {
			t.Errorf("%s: a table dirty %v, want %v", tc.name, got, tc.dirty)
		}
	}
}

func sortsRules(t *testing.T, v *View, cfg planner.Config) {
	t.Helper()
	rule := func(typ uint16, r nlbatch.Rule) kernelwatch.RuleUpdate {
		if r.Family == 0 {
			r.Family = unix.AF_INET
		}
		return kernelwatch.RuleUpdate{Type: typ, Rule: r}
	}
	ours := planner.Rule{Priority: cfg.PriorityBase + planner.OffsetBypass, Dst: netip.MustParsePrefix("10.96.0.1/32"), Table: planner.MainTable, SuppressPrefixlen: -1}
	oursAsNotified := v.a.toBatchRule(ours)
	other := oursAsNotified
	other.Other = true
	for _, tc := range []struct {
		name   string
		expect []bool // rule writes announced first: adds (true) or deletes
		u      kernelwatch.RuleUpdate
		want   bool
	}{
		{"outside the band", nil, rule(unix.RTM_NEWRULE, nlbatch.Rule{Priority: uint32(cfg.PriorityBase - 1), Table: 100}), false},
		{"in the band", nil, rule(unix.RTM_NEWRULE, nlbatch.Rule{Priority: uint32(cfg.PriorityBase + planner.OffsetBypass), Table: 254}), true},
		{"outside the band, another fwmark", nil, rule(unix.RTM_NEWRULE, nlbatch.Rule{Priority: 100, Mark: 0x1, Mask: 0x1}), false},
		{"outside the band, the connection mark's bit", nil, rule(unix.RTM_NEWRULE, nlbatch.Rule{Priority: 100, Mark: cfg.ConnMark, Mask: cfg.ConnMark}), true},
		{"the echo of an add", []bool{true}, rule(unix.RTM_NEWRULE, oursAsNotified), false},
		{"the echo of a delete", []bool{false}, rule(unix.RTM_DELRULE, oursAsNotified), false},
		{"a delete where an add was written", []bool{true}, rule(unix.RTM_DELRULE, oursAsNotified), true},
		{"an add no write announced", nil, rule(unix.RTM_NEWRULE, oursAsNotified), true},
		{"the written rule with more than the agent writes", []bool{true}, rule(unix.RTM_NEWRULE, other), true},
	} {
		v.rules, v.ruleEchoes = false, nil
		for _, add := range tc.expect {
			v.expectRule(ours, add)
		}
		if got := v.RuleChanged(tc.u); got != tc.want || v.rules != tc.want {
			t.Errorf("%s: %v (rules dirty %v), want %v", tc.name, got, v.rules, tc.want)
		}
	}
	// One echo each: the second of two identical adds, one written, is
	// someone else's.
	v.rules, v.ruleEchoes = false, nil
	v.expectRule(ours, true)
	if v.RuleChanged(rule(unix.RTM_NEWRULE, oursAsNotified)) || !v.RuleChanged(rule(unix.RTM_NEWRULE, oursAsNotified)) {
		t.Error("one write excused two notifications")
	}
	// A write that failed brings no echo: its count goes, and the rules
	// are dumped again.
	v.rules, v.ruleEchoes = false, nil
	v.ruleWritten(v.expectRule(ours, true), ours, unix.EEXIST)
	if !v.rules || len(v.ruleEchoes) != 0 {
		t.Errorf("after a failed write: rules dirty %v, echoes %v", v.rules, v.ruleEchoes)
	}
	// Lost notifications may have held the echoes: none is waited for.
	v.expectRule(ours, true)
	v.Lost(kernelwatch.Rules)
	v.rules = false
	if !v.RuleChanged(rule(unix.RTM_NEWRULE, oursAsNotified)) {
		t.Error("an echo was still expected after notifications were lost")
	}

	v.links = map[int]bool{2: true}
	if v.LinkChanged(7) || v.routes {
		t.Error("a link no route uses made the routes dirty")
	}
	if !v.LinkChanged(2) || !v.routes {
		t.Error("the link of a route did not make the routes dirty")
	}
}
