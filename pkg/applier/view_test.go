package applier_test

import (
	"context"
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"
	vnetns "github.com/vishvananda/netns"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
	"github.com/routing-agent/routing-agent/pkg/applier"
	"github.com/routing-agent/routing-agent/pkg/kernelwatch"
	"github.com/routing-agent/routing-agent/pkg/lab/netns"
	"github.com/routing-agent/routing-agent/pkg/lab/topology"
	"github.com/routing-agent/routing-agent/pkg/planner"
)

const viewKinds = kernelwatch.Routes | kernelwatch.Rules | kernelwatch.Links | kernelwatch.Addrs | kernelwatch.Nexthops

// memberOf is one member of the nexthop group id, for a group of one.
func (e *env) memberOf(id uint32) string {
	e.t.Helper()
	out := e.ip("nexthop", "show", "id", fmt.Sprint(id))
	f := strings.Fields(out)
	for i := 0; i+1 < len(f); i++ {
		if f[i] == "group" {
			return strings.SplitN(f[i+1], "/", 2)[0]
		}
	}
	e.t.Fatalf("nexthop %d: %q", id, out)
	return ""
}

// useView gives e's Applier a View with a socket of its own.
func (e *env) useView() *applier.View {
	e.t.Helper()
	dumps, closeDumps, err := netns.NetlinkHandle(e.lab.Node)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(closeDumps)
	v, err := e.ap.UseView(dumps)
	if err != nil {
		e.t.Fatal(err)
	}
	return v
}

// feed watches the node's namespace and hands every notification to v, as
// the agent does; each one that calls for an apply is sent on the channel
// returned.
func (e *env) feed(v *applier.View) <-chan string {
	e.t.Helper()
	return e.feedWith(v, kernelwatch.Options{})
}

// feedWith is feed with opts for the watch (its kinds, namespace and
// callbacks are feed's).
func (e *env) feedWith(v *applier.View, opts kernelwatch.Options) <-chan string {
	e.t.Helper()
	ns, err := vnetns.GetFromName(e.lab.Node)
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	opts.Kinds, opts.Namespace, opts.OnLost, opts.OnResubscribe = viewKinds, &ns, v.Lost, v.Resubscribed
	ev := kernelwatch.Watch(ctx, testr.New(e.t), opts)
	if err := v.Watching(viewKinds); err != nil {
		e.t.Fatal(err)
	}
	changed := make(chan string, 1024)
	done := make(chan struct{})
	e.t.Cleanup(func() {
		cancel()
		<-done
		ns.Close()
	})
	go func() {
		defer close(done)
		for {
			select {
			case <-ctx.Done():
				return
			case u := <-ev.Routes:
				if v.RouteChanged(u) {
					changed <- fmt.Sprintf("route %v table %d", u.Dst, u.Table)
				}
			case u := <-ev.Rules:
				if v.RuleChanged(u) {
					changed <- fmt.Sprintf("rule %d", u.Priority)
				}
			case u := <-ev.Links:
				v.LinkChanged(int(u.Index))
			case u := <-ev.Addrs:
				v.LinkChanged(u.LinkIndex)
			case u := <-ev.Nexthops:
				if v.NexthopChanged(u) {
					changed <- fmt.Sprintf("nexthop %d", u.ID)
				}
			}
		}
	}()
	return changed
}

// drain empties changed once the notifications of what was just done have
// had time to arrive.
func drain(changed <-chan string) {
	time.Sleep(300 * time.Millisecond)
	for {
		select {
		case <-changed:
		default:
			return
		}
	}
}

// await waits for n notifications that call for an apply.
func await(t *testing.T, changed <-chan string, n int) {
	t.Helper()
	timeout := time.After(2 * time.Second)
	for range n {
		select {
		case <-changed:
		case <-timeout:
			t.Fatalf("fewer than %d notifications calling for an apply within 2s", n)
		}
	}
}

// TestViewRepairsDrift is TestIdempotenceAndDrift through a kernel view fed
// by notifications: after the first apply nothing is read in full, the
// agent's own writes call for no apply, and every kind of drift is still
// noticed and repaired.
func TestViewRepairsDrift(t *testing.T) {
	e := newEnv(t, "vdrift")
	v := e.useView()
	changed := e.feed(v)
	keep := route("keep", 0, []string{"198.51.100.0/24", "2001:db8:100::/48"}, "10.114.0.3", "10.114.0.4", "fd00:114::3")
	gone := route("gone", 1, []string{"192.0.2.128/25"}, "10.114.0.4")
	plan, rep := e.apply(keep, gone)
	if rep.Changes == 0 {
		t.Fatal("first apply changed nothing")
	}
	want := e.owned()
	if s := v.Stats(); s.Full != 1 {
		t.Errorf("first apply: %+v, want one full read", s)
	}
	drain(changed)

	if _, rep = e.apply(keep, gone); rep.Changes != 0 {
		t.Errorf("second apply of the same plan made %d netlink writes, want 0", rep.Changes)
	}
	// The echo of a route the agent wrote, as planned (through its
	// table's nexthop group), calls for nothing.
	keepTable := tableOf(t, plan, "keep")
	table := fmt.Sprint(keepTable)
	group, _ := planner.GroupID(e.cfg.Protocol, keepTable, false)
	e.ip("route", "replace", "198.51.100.0/24", "proto", "245", "table", table, "nhid", fmt.Sprint(group))
	time.Sleep(300 * time.Millisecond)
	select {
	case what := <-changed:
		t.Errorf("a route rewritten as planned called for an apply: %s", what)
	default:
	}

	e.drift(table)
	await(t, changed, 6)
	_, rep = e.apply(keep, gone)
	e.checkRepaired(rep, want)
	// Someone else's route replacing the agent's is drift too.
	e.ip("route", "replace", "198.51.100.0/24", "via", "10.114.0.4", "dev", "vpc0", "table", table, "proto", "static")
	await(t, changed, 1)
	if _, rep = e.apply(keep, gone); rep.Changes != 1 {
		t.Errorf("repairing a route replaced by another protocol made %d writes, want 1", rep.Changes)
	}
	if got := e.owned(); got != want {
		t.Errorf("after the second repair:\n%s\nwant\n%s", got, want)
	}
	drain(changed)
	if _, rep = e.apply(keep, gone); rep.Changes != 0 {
		t.Errorf("apply after the repairs made %d writes, want 0", rep.Changes)
	}
	// The route named its gateways, as the plan has them, but not through
	// the group: a notification cannot tell (the library does not parse
	// RTA_NH_ID), so it calls for no apply; its table is dirty all the same,
	// and the next apply puts the route back on the group.
	e.ip("route", "replace", "198.51.100.0/24", "proto", "245", "table", table, "nexthop", "via", "10.114.0.3", "dev", "vpc0", "nexthop", "via", "10.114.0.4", "dev", "vpc0")
	drain(changed)
	if _, rep = e.apply(keep, gone); rep.Changes != 1 {
		t.Errorf("a route taken off its group: %d writes, want 1", rep.Changes)
	}
	// Someone else's replace of the group (compat mode notifies each route
	// through it, with gateways the plan does not have) calls for an apply,
	// which puts the group back.
	e.ip("nexthop", "replace", "id", fmt.Sprint(group), "group", e.memberOf(group), "protocol", "245")
	await(t, changed, 1)
	if _, rep = e.apply(keep, gone); rep.Changes != 1 {
		t.Errorf("repairing a group replaced by someone else made %d writes, want 1", rep.Changes)
	}
	if got := e.owned(); got != want {
		t.Errorf("after the group's repair:\n%s\nwant\n%s", got, want)
	}
	drain(changed)
	if _, rep = e.apply(keep, gone); rep.Changes != 0 {
		t.Errorf("apply after the repairs made %d writes, want 0", rep.Changes)
	}
	if s := v.Stats(); s.Full != 1 || s.Tables == 0 || s.Rules == 0 {
		t.Errorf("%+v: want still one full read, and dumps of tables and rules", s)
	}

	// A Route deleted: what a full read (a restart) sees afterwards is what
	// the view does.
	if _, rep = e.apply(keep); rep.Changes != 7 {
		t.Errorf("deleting a Route made %d writes, want 7 (its rule, its gate entry, the gate's landing and the skip; its route and backstop; its group: its gateway is keep's too)", rep.Changes)
	}
	fresh := e.newApplier(e.cfg)
	if rep, err := fresh.Apply(e.plan(keep)); err != nil || rep.Changes != 0 {
		t.Errorf("a full read after the view's apply: %d writes, %v; want none", rep.Changes, err)
	}
	// The echoes of its rule writes call for nothing, and the view holds
	// the rules as written: the next apply dumps none and writes nothing.
	time.Sleep(300 * time.Millisecond)
	select {
	case what := <-changed:
		t.Errorf("the echo of the agent's own writes called for an apply: %s", what)
	default:
	}
	rules := v.Stats().Rules
	if _, rep = e.apply(keep); rep.Changes != 0 {
		t.Errorf("apply after deleting a Route made %d writes, want 0", rep.Changes)
	}
	if got := v.Stats().Rules; got != rules {
		t.Errorf("the rules were dumped %d times after the agent's own rule writes, want 0", got-rules)
	}
	// Someone else deleting one of them is no echo.
	var lookup planner.Rule
	for _, r := range e.plan(keep).Rules {
		if r.Table == keepTable && !r.IPv6 {
			lookup = r
		}
	}
	e.ip("rule", "del", "priority", fmt.Sprint(lookup.Priority), "table", table)
	await(t, changed, 1)
	if _, rep = e.apply(keep); rep.Changes != 1 || v.Stats().Rules != rules+1 {
		t.Errorf("a rule deleted by hand: %d writes and %d rule dumps, want 1 and 1", rep.Changes, v.Stats().Rules-rules)
	}
}

// TestViewOwnWritesBeforeTheirNotifications applies plan after plan
// without ever reading a notification, as when an apply starts before the
// previous one's echoes arrive: each apply must still see the kernel its
// predecessor left.
func TestViewOwnWritesBeforeTheirNotifications(t *testing.T) {
	e := newEnv(t, "vrace")
	v := e.useView()
	if err := v.Watching(viewKinds); err != nil { // subscribed, as far as the view knows; nobody reads
		t.Fatal(err)
	}
	a := route("a", 0, []string{"198.51.100.0/24", "2001:db8:100::/48"}, "10.114.0.3", "10.114.0.4", "fd00:114::3")
	b := route("b", 1, []string{"192.0.2.128/25"}, "10.114.0.4")
	b1 := route("b", 1, []string{"192.0.2.128/25", "203.0.113.0/24"}, "10.114.0.3")
	c := route("c", 2, []string{"198.51.100.128/25"}, "10.114.0.3") // carved out of a: a throw in a's table
	for _, s := range []struct {
		name   string
		routes []*v1alpha1.Route
	}{
		{"a and b", []*v1alpha1.Route{a, b}},
		{"b's gateway and destinations changed", []*v1alpha1.Route{a, b1}},
		{"c carved out of a", []*v1alpha1.Route{a, b1, c}},
		{"b deleted", []*v1alpha1.Route{a, c}},
		{"back to a and b", []*v1alpha1.Route{a, b}},
	} {
		plan, rep := e.apply(s.routes...)
		if rep.Changes == 0 {
			t.Errorf("%s: no writes", s.name)
		}
		// At once, the same plan again: nothing to write, as a full read
		// of the kernel agrees.
		if rep, err := e.ap.Apply(plan); err != nil || rep.Changes != 0 {
			t.Errorf("%s: applying it again through the view: %d writes, %v; want none", s.name, rep.Changes, err)
		}
		fresh := e.newApplier(e.cfg)
		if rep, err := fresh.Apply(plan); err != nil || rep.Changes != 0 {
			t.Errorf("%s: a full read then finds %d writes to make, %v; want none", s.name, rep.Changes, err)
		}
	}
	if s := v.Stats(); s.Full != 1 {
		t.Errorf("%+v: want one full read", s)
	}
}

// TestViewReadsEverythingWhileAStreamIsDown: from a lost subscription until
// it is back, every apply reads everything; once it is back, one more does.
func TestViewReadsEverythingWhileAStreamIsDown(t *testing.T) {
	e := newEnv(t, "vlost")
	v := e.useView()
	if err := v.Watching(viewKinds); err != nil {
		t.Fatal(err)
	}
	r := route("r", 0, []string{"198.51.100.0/24"}, "10.114.0.3")
	full := func() int { return v.Stats().Full }
	e.apply(r)
	e.apply(r)
	if got := full(); got != 1 {
		t.Fatalf("%d full reads before the loss, want 1", got)
	}
	v.Lost(kernelwatch.Rules)
	e.ip("rule", "del", "to", "198.51.100.0/24", "lookup", fmt.Sprint(tableOf(t, e.plan(r), "r"))) // unnoticed: the stream is down
	if _, rep := e.apply(r); rep.Changes != 1 {
		t.Errorf("apply while the rules stream is down made %d writes, want 1 (the rule deleted meanwhile)", rep.Changes)
	}
	e.apply(r)
	if got := full(); got != 3 {
		t.Errorf("%d full reads after two applies with a stream down, want 3", got)
	}
	v.Resubscribed(kernelwatch.Rules)
	e.apply(r)
	e.apply(r)
	if got := full(); got != 4 {
		t.Errorf("%d full reads after the resubscription, want 4 (one more, then none)", got)
	}
	v.Invalidate() // the periodic resync
	e.apply(r)
	if got := full(); got != 5 {
		t.Errorf("%d full reads after Invalidate, want 5", got)
	}
}

// TestViewLinkBounce: the kernel removes the IPv4 routes through a link
// that goes down without a notification for each; the link's own
// notification makes the view read the routes again, and the next apply
// puts them back.
func TestViewLinkBounce(t *testing.T) {
	e := newEnv(t, "vlink")
	v := e.useView()
	changed := e.feed(v)
	r := route("r", 0, []string{"198.51.100.0/24", "2001:db8:100::/48"}, "10.114.0.3", "10.114.0.4", "fd00:114::3")
	e.apply(r)
	want := e.owned()
	drain(changed)

	e.ip("link", "set", topology.VPCIf, "down")
	e.ip("link", "set", topology.VPCIf, "up")
	if got := e.owned(); got == want {
		t.Fatal("the link bounce removed nothing: the test tests nothing")
	}
	drain(changed)
	// IPv6 addresses come back after duplicate address detection, which
	// the lab's links skip or finish within moments: retry until the
	// kernel takes the routes again.
	if err := waitFor(5*time.Second, func() bool {
		_, err := e.ap.Apply(e.plan(r))
		return err == nil && e.owned() == want
	}); err != nil {
		t.Errorf("after the link came back, through the view:\n%s\nwant\n%s", e.owned(), want)
	}
	if s := v.Stats(); s.Full != 1 || s.Routes == 0 {
		t.Errorf("%+v: want one full read, and the routes read again", s)
	}
}

// TestViewOverflow: a burst that overflows the notification socket (ENOBUFS)
// ends the subscription; from then until it is back every apply reads
// everything, and so does the first one after.
func TestViewOverflow(t *testing.T) {
	e := newEnv(t, "vflood")
	v := e.useView()
	// The smallest buffer, and a reader that takes one notification at a
	// time: a burst overflows it.
	e.feedWith(v, kernelwatch.Options{ReceiveBufferSize: 1, ChannelSize: 1})
	r := route("r", 0, []string{"198.51.100.0/24"}, "10.114.0.3")
	e.apply(r)
	want := e.owned()
	// The first apply's own notifications may overflow it already.
	if err := waitFor(15*time.Second, v.Watched); err != nil {
		t.Fatal("the view is not watching")
	}
	var burst []string
	for i := range 2000 {
		burst = append(burst, fmt.Sprintf("route add 10.%d.%d.0/24 dev %s table 100", 200+i/256, i%256, topology.VPCIf))
	}
	cmd := exec.Command("ip", "-n", e.lab.Node, "-batch", "-")
	cmd.Stdin = strings.NewReader(strings.Join(burst, "\n") + "\n")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("ip -batch: %v: %s", err, out)
	}
	if err := waitFor(5*time.Second, func() bool { return !v.Watched() }); err != nil {
		t.Fatal("the burst did not bring a stream down")
	}
	// Drift while notifications are lost is repaired all the same. The
	// apply reads everything: the stream is still down, or it is back
	// (within 100 ms) and notifications were lost.
	e.ip("route", "del", "198.51.100.0/24", "table", fmt.Sprint(tableOf(t, e.plan(r), "r")))
	before := v.Stats().Full
	if _, rep := e.apply(r); rep.Changes != 1 {
		t.Errorf("apply after the overflow made %d writes, want 1 (the route deleted meanwhile)", rep.Changes)
	}
	if got := v.Stats().Full; got != before+1 {
		t.Errorf("apply after the overflow: %d full reads, want %d", got, before+1)
	}
	if err := waitFor(15*time.Second, v.Watched); err != nil {
		t.Fatal("not resubscribed within 15s")
	}
	// Once back: one more full read if the resubscription came after that
	// apply, then none.
	e.apply(r)
	first := v.Stats().Full
	e.apply(r)
	if got := v.Stats().Full; got != first || first > before+2 {
		t.Errorf("after the resubscription: %d then %d full reads, want at most %d, then no more", first, got, before+2)
	}
	if got := e.owned(); got != want {
		t.Errorf("after the overflow:\n%s\nwant\n%s", got, want)
	}
}

// TestViewFailover: a gateway going down is one write, the replace of the
// table's nexthop group, with or without route notifications for the
// routes through it (net.ipv4.nexthop_compat_mode): the view reads the
// group's table again in that apply and holds the routes as the kernel
// now forwards them, and what notifications come are echoes.
func TestViewFailover(t *testing.T) {
	e := newEnv(t, "vfail")
	for _, compat := range []string{"1", "0"} {
		t.Run("compat "+compat, func(t *testing.T) {
			e.t = t
			e.ip("netns", "exec", e.lab.Node, "sysctl", "-qw", "net.ipv4.nexthop_compat_mode="+compat)
			e.ap = e.newApplier(e.cfg)
			v := e.useView()
			changed := e.feed(v)
			r := route("r", 0, append(manyDestinations(16), "198.51.100.0/24"), "10.114.0.3", "10.114.0.4")
			plan, _ := e.apply(r)
			table := tableOf(t, plan, "r")
			dst := netip.MustParsePrefix("198.51.100.0/24")
			drain(changed)
			for _, step := range []struct {
				down []string
				want []string
			}{{[]string{"10.114.0.4"}, []string{"10.114.0.3"}}, {nil, []string{"10.114.0.3", "10.114.0.4"}}} {
				tables := v.Stats().Tables
				rep, err := e.ap.Apply(e.planDown(step.down, r))
				if err != nil || rep.Changes != 1 {
					t.Fatalf("down %v: %d writes, %v; want 1 (the group)", step.down, rep.Changes, err)
				}
				if got := v.Stats().Tables; got != tables+1 {
					t.Errorf("down %v: %d table dumps, want 1", step.down, got-tables)
				}
				got, ok := v.ViewRoute(table, dst)
				var gws []string
				for _, nh := range got.Nexthops {
					gws = append(gws, nh.Gateway.String())
				}
				if !ok || !slices.Equal(gws, step.want) {
					t.Errorf("down %v: the view holds %v (%v), want gateways %v", step.down, gws, ok, step.want)
				}
				time.Sleep(300 * time.Millisecond)
				select {
				case what := <-changed:
					t.Errorf("down %v: the group's own replace called for an apply: %s", step.down, what)
				default:
				}
				if rep, err := e.ap.Apply(e.planDown(step.down, r)); err != nil || rep.Changes != 0 {
					t.Errorf("down %v: again, %d writes, %v; want none", step.down, rep.Changes, err)
				}
				if rep, err := e.newApplier(e.cfg).Apply(e.planDown(step.down, r)); err != nil || rep.Changes != 0 {
					t.Errorf("down %v: a full read finds %d writes to make, %v; want none", step.down, rep.Changes, err)
				}
			}
			if _, err := e.ap.Cleanup(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestViewKeepsNexthops: with the Nexthops stream watched, applies take the
// nexthop objects the view kept instead of listing them, the echoes of the
// agent's own writes (a failover's group replace) change nothing, and a
// group someone else deletes, which silently takes the IPv4 routes through
// it, calls for an apply that puts both back.
func TestViewKeepsNexthops(t *testing.T) {
	e := newEnv(t, "vnh")
	v := e.useView()
	changed := e.feed(v)
	r := route("nh", 0, []string{"198.51.100.0/24", "192.0.2.0/25"}, "10.114.0.3", "10.114.0.4")
	plan, _ := e.apply(r)
	want := e.owned()
	drain(changed)
	kept := func() int { return v.Stats().KeptNexthops }

	before := kept()
	if _, rep := e.apply(r); rep.Changes != 0 || kept() != before+1 {
		t.Errorf("an apply at rest: %d writes, nexthops kept %d times; want 0 writes and kept once", rep.Changes, kept()-before)
	}
	// A gateway down and back: one group replace each way, whose echoes
	// call for nothing, and the next apply still keeps the objects.
	for _, down := range [][]string{{"10.114.0.4"}, nil} {
		rep, err := e.ap.Apply(e.planDown(down, r))
		if err != nil {
			t.Fatal(err)
		}
		if rep.Changes != 1 {
			t.Errorf("gateways down %v: %d writes, want 1 (the group)", down, rep.Changes)
		}
		time.Sleep(300 * time.Millisecond)
		select {
		case what := <-changed:
			t.Errorf("the echo of the agent's own group replace called for an apply: %s", what)
		default:
		}
		before = kept()
		if rep, err := e.ap.Apply(e.planDown(down, r)); err != nil || rep.Changes != 0 || kept() != before+1 {
			t.Errorf("after the replace: %d writes (%v), nexthops kept %d times; want 0 and once", rep.Changes, err, kept()-before)
		}
	}

	group, _ := planner.GroupID(e.cfg.Protocol, tableOf(t, plan, "nh"), false)
	e.ip("nexthop", "del", "id", fmt.Sprint(group))
	await(t, changed, 1)
	before = kept()
	if _, rep := e.apply(r); rep.Changes != 3 || kept() != before {
		t.Errorf("repairing a deleted group: %d writes, nexthops kept %d times; want 3 (the group, two routes) and a listing", rep.Changes, kept()-before)
	}
	if got := e.owned(); got != want {
		t.Errorf("after the repair:\n%s\nwant\n%s", got, want)
	}
}
