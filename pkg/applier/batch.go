package applier

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/routing-agent/routing-agent/pkg/nlbatch"
	"github.com/routing-agent/routing-agent/pkg/nlutil"
	"github.com/routing-agent/routing-agent/pkg/planner"
)

// SetNamespace makes the Applier write through a netlink socket of its own
// in ns, which must be the namespace of its handle (netns.None() for the
// current one, that of the zero Handle): its requests then go out many per
// sendmsg, with the kernel's answers collected after each of Apply's steps
// (see writer), routes are read with their nexthop object ids, and, where
// the kernel has them, live routes use nexthop objects (planner.Nexthops).
// Without it every write is a request of its own through the handle and
// routes name their gateways.
func (a *Applier) SetNamespace(ns netns.NsHandle) error {
	c, err := nlbatch.Open(ns)
	if err != nil {
		return err
	}
	if a.conn != nil {
		a.conn.Close()
	}
	a.conn = c
	return nil
}

// Close closes the socket SetNamespace opened.
func (a *Applier) Close() error {
	if a.conn == nil {
		return nil
	}
	return a.conn.Close()
}

// write is one netlink request of Apply, in both forms: the message for a
// batch, the call through the handle without one.
type write struct {
	// what renders the request for the log line and errors (ip's terms);
	// it is only called when one is written.
	what    func() string
	counter *atomic.Int64
	msg     nlbatch.Msg
	direct  func() error
	// failed takes the error; without it the error is Apply's.
	failed func(error)
	// settled runs once the kernel answered, with its error (nil: the
	// request was applied).
	settled func(error)
}

// writer queues an Apply step's requests and sends them together at the
// end of the step (flush): steps never reorder, and inside a step the
// kernel applies the requests in the order they were queued. Without a
// socket of its own it writes each at once through the handle.
type writer struct {
	a     *Applier
	rep   *Report
	errs  *[]error
	queue []write
}

func (w *writer) add(x write) {
	if w.a.conn == nil {
		w.done(x, x.direct())
		return
	}
	w.queue = append(w.queue, x)
}

func (w *writer) flush() {
	if len(w.queue) == 0 {
		return
	}
	msgs := make([]nlbatch.Msg, len(w.queue))
	for i, x := range w.queue {
		msgs[i] = x.msg
	}
	errs := w.a.conn.Send(msgs)
	for i, x := range w.queue {
		w.done(x, errs[i])
	}
	w.queue = w.queue[:0]
}

func (w *writer) done(x write, err error) {
	if x.settled != nil {
		x.settled(err)
	}
	if err != nil {
		err = fmt.Errorf("%s: %w", x.what(), err)
		if x.failed != nil {
			x.failed(err)
		} else {
			*w.errs = append(*w.errs, err)
		}
		return
	}
	x.counter.Add(1)
	w.rep.Changes++
	if w.a.log.Enabled() {
		w.a.log.Info("kernel change", "op", x.what())
	}
}

// routeWrite replaces r, through the nexthop object nhid if not 0.
func (a *Applier) routeWrite(r planner.Route, nhid uint32) write {
	x := write{what: func() string { return r.Batch(a.cfg.Protocol) }, counter: &a.Writes.RouteReplace}
	if nhid != 0 {
		x.what = func() string { return r.BatchNHID(a.cfg.Protocol, nhid) }
	}
	if a.conn == nil {
		nl := a.toNetlinkRoute(r)
		x.direct = func() error { return a.h.RouteReplace(nl) }
		return x
	}
	x.msg = nlbatch.ReplaceRoute(a.toBatchRoute(r, nhid, 0))
	return x
}

// routeRemoval deletes the installed route key (metric metric).
func (a *Applier) routeRemoval(r planner.Route, metric int) write {
	x := write{what: func() string { return fmt.Sprintf("route del %s table %d", r.Dst, r.Table) }, counter: &a.Writes.RouteDelete}
	if r.Backstop {
		x.what = func() string {
			return fmt.Sprintf("route del unreachable %s table %d metric %d", r.Dst, r.Table, uint32(planner.BackstopMetric))
		}
	}
	if a.conn == nil {
		nl := a.toNetlinkRoute(r)
		// Without its gateways: naming them would miss a route that uses
		// a nexthop object.
		nl.Priority, nl.Gw, nl.LinkIndex, nl.MultiPath = metric, nil, 0, nil
		x.direct = func() error { return a.h.RouteDel(nl) }
		return x
	}
	x.msg = nlbatch.DeleteRoute(a.toBatchRoute(r, 0, uint32(metric)))
	return x
}

func (a *Applier) ruleWrite(r planner.Rule, add bool) write {
	x := write{what: func() string { return keyOfRule(r).text(a.cfg.Protocol) }, counter: &a.Writes.RuleAdd}
	if !add {
		x.what = func() string { return strings.Replace(keyOfRule(r).text(a.cfg.Protocol), "rule add", "rule del", 1) }
		x.counter = &a.Writes.RuleDelete
	}
	if a.conn == nil {
		nl := a.toNetlinkRule(r)
		x.direct = func() error { return a.h.RuleAdd(nl) }
		if !add {
			x.direct = func() error { return a.h.RuleDel(nl) }
		}
		return x
	}
	x.msg = nlbatch.AddRule(a.toBatchRule(r))
	if !add {
		x.msg = nlbatch.DeleteRule(a.toBatchRule(r))
	}
	if v := a.view; v != nil {
		// Announced now, before it is sent: the echo may be read before
		// the answer.
		e := v.expectRule(r, add)
		x.settled = func(err error) { v.ruleWritten(e, r, err) }
	}
	return x
}

// fromBatchRule is toBatchRule's inverse, for a rule of the agent's (a
// parsed jump or nop has no table: nlbatch.ParseRule).
func fromBatchRule(r nlbatch.Rule) planner.Rule {
	return planner.Rule{Priority: int(r.Priority), IPv6: r.Family == unix.AF_INET6, Table: r.Table, Src: r.Src, Dst: r.Dst,
		Mark: r.Mark, Mask: r.Mask, SuppressPrefixlen: r.SuppressPrefixlen, Invert: r.Invert, Goto: int(r.Goto), Nop: r.Nop}
}

func (a *Applier) toBatchRoute(r planner.Route, nhid, metric uint32) nlbatch.Route {
	out := nlbatch.Route{Family: unix.AF_INET, Table: r.Table, Dst: r.Dst, Protocol: a.cfg.Protocol, Type: unix.RTN_UNICAST, Priority: metric}
	if r.Dst.Addr().Is6() {
		out.Family = unix.AF_INET6
	}
	switch {
	case r.Throw:
		out.Type = unix.RTN_THROW
	case r.Backstop:
		out.Type, out.Priority = unix.RTN_UNREACHABLE, planner.BackstopMetric
	case nhid != 0:
		out.NHID = nhid
	default:
		for _, nh := range r.Nexthops {
			out.Nexthops = append(out.Nexthops, nlbatch.Nexthop{Gateway: nh.Gateway, LinkIndex: nh.LinkIndex})
		}
	}
	return out
}

func (a *Applier) toBatchRule(r planner.Rule) nlbatch.Rule {
	out := nlbatch.Rule{Family: unix.AF_INET, Priority: uint32(r.Priority), Table: r.Table, Protocol: a.cfg.Protocol,
		Src: r.Src, Dst: r.Dst, Mark: r.Mark, Mask: r.Mask, SuppressPrefixlen: r.SuppressPrefixlen, Invert: r.Invert}
	if r.IPv6 {
		out.Family = unix.AF_INET6
	}
	switch {
	case r.IsSkip():
		out.Table, out.Goto = 0, uint32(r.Goto)
	case r.Nop:
		out.Table, out.Nop = 0, true
	}
	return out
}

// ownRoute is one of the agent's routes as read, with its metric and the
// nexthop object it uses (0: it names its gateways).
type ownRoute struct {
	route  planner.Route
	metric int
	nhid   uint32
}

// listRoutes reads the agent's routes of family in table (0: every table;
// the caller keeps its range), resolving nexthop objects through nhs.
// Without a socket of its own it dumps through h.
func (a *Applier) listRoutes(h *netlink.Handle, family int, table uint32, nhs map[uint32]nlbatch.NexthopObject) ([]ownRoute, error) {
	var out []ownRoute
	if a.conn == nil {
		filter := &netlink.Route{Table: int(table), Protocol: netlink.RouteProtocol(a.cfg.Protocol)}
		routes, err := nlutil.RetryDump(func() ([]netlink.Route, error) {
			return h.RouteListFiltered(family, filter, netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PROTOCOL)
		})
		if err != nil {
			return nil, err
		}
		for _, r := range routes {
			out = append(out, ownRoute{route: a.fromNetlinkRoute(r, family), metric: r.Priority})
		}
		return out, nil
	}
	routes, err := a.conn.RoutesIn(uint8(family), a.cfg.Protocol, table)
	if err != nil {
		return nil, err
	}
	for _, r := range routes {
		pr := planner.Route{Table: r.Table, Dst: r.Dst, Throw: r.Type == unix.RTN_THROW,
			Backstop: r.Type == unix.RTN_UNREACHABLE && r.Priority == planner.BackstopMetric}
		nexthops := r.Nexthops
		if obj, ok := nhs[r.NHID]; ok && r.NHID != 0 {
			nexthops = resolve(obj, nhs)
		}
		for _, nh := range nexthops {
			pr.Nexthops = append(pr.Nexthops, planner.Nexthop{Gateway: nh.Gateway, LinkIndex: nh.LinkIndex})
		}
		slices.SortFunc(pr.Nexthops, func(a, b planner.Nexthop) int { return a.Gateway.Compare(b.Gateway) })
		pr.Nexthops = a.gateways.intern(pr.Nexthops)
		out = append(out, ownRoute{route: pr, metric: int(r.Priority), nhid: r.NHID})
	}
	return out, nil
}

// gatewaySets hands out one slice for every route read with the same
// few gateways (the routes of a thousand Routes through the same two NAT
// gateways), which the State then holds once instead of per route. They
// are read-only, like a plan's. The sets a node has are few: it is
// emptied when it grows past a bound all the same.
type gatewaySets struct {
	mu   sync.Mutex
	sets map[gatewaySetKey][]planner.Nexthop
}

type gatewaySetKey struct {
	n  int
	nh [4]planner.Nexthop
}

func (g *gatewaySets) intern(nhs []planner.Nexthop) []planner.Nexthop {
	if len(nhs) == 0 || len(nhs) > len(gatewaySetKey{}.nh) {
		return nhs
	}
	k := gatewaySetKey{n: len(nhs)}
	copy(k.nh[:], nhs)
	g.mu.Lock()
	defer g.mu.Unlock()
	if have, ok := g.sets[k]; ok {
		return have
	}
	if g.sets == nil || len(g.sets) >= 1024 {
		g.sets = map[gatewaySetKey][]planner.Nexthop{}
	}
	g.sets[k] = nhs
	return nhs
}

// resolve is the gateways a nexthop object stands for.
func resolve(obj nlbatch.NexthopObject, nhs map[uint32]nlbatch.NexthopObject) []nlbatch.Nexthop {
	if len(obj.Group) == 0 {
		if !obj.Gateway.IsValid() {
			return nil
		}
		return []nlbatch.Nexthop{{Gateway: obj.Gateway, LinkIndex: obj.LinkIndex}}
	}
	var out []nlbatch.Nexthop
	for _, id := range obj.Group {
		if m, ok := nhs[id]; ok && len(m.Group) == 0 && m.Gateway.IsValid() {
			out = append(out, nlbatch.Nexthop{Gateway: m.Gateway, LinkIndex: m.LinkIndex})
		}
	}
	return out
}

// readNexthops lists every nexthop object (to resolve the routes that use
// them, the agent's and others'), or nil where there are none to read.
func (a *Applier) readNexthops() (map[uint32]nlbatch.NexthopObject, error) {
	if a.conn == nil || a.nexthopsOff.Load() {
		return nil, nil
	}
	objs, err := a.conn.Nexthops()
	if err != nil {
		if nlbatch.Unsupported(err) {
			return nil, nil
		}
		return nil, fmt.Errorf("listing nexthop objects: %w", err)
	}
	out := make(map[uint32]nlbatch.NexthopObject, len(objs))
	for _, o := range objs {
		out[o.ID] = o
	}
	return out, nil
}

// nexthopObjects lists the kernel's nexthop objects by id, or takes them
// from the view when it has them current; the caller may change the map.
func (a *Applier) nexthopObjects() (map[uint32]nlbatch.NexthopObject, error) {
	if a.view != nil {
		if objs, ok := a.view.keptNexthops(); ok {
			return objs, nil
		}
	}
	list, err := a.conn.Nexthops()
	if err != nil {
		return nil, err
	}
	objs := make(map[uint32]nlbatch.NexthopObject, len(list))
	for _, o := range list {
		objs[o.ID] = o
	}
	return objs, nil
}

// expect tells the view, if any, of a nexthop write about to be sent.
func (a *Applier) expect(obj nlbatch.NexthopObject, gone bool) {
	if a.view != nil {
		a.view.expectNexthop(obj, gone)
	}
}

// nexthopState is what the first phase of Apply found and made of the
// agent's nexthop objects.
type nexthopState struct {
	// protocol is the agent's: its objects (owned) are those of all with
	// it, in its id range.
	protocol uint8
	// groups are the groups in place, with the plan's live gateways, that
	// the table's routes are to use.
	groups map[planner.TableFamily]uint32
	// keep are the objects the plan uses.
	keep map[uint32]bool
	// all are every nexthop object, as listed and then written: what
	// routes read after the first phase resolve through.
	all map[uint32]nlbatch.NexthopObject
	// changed are the ids of the objects written (replaced or deleted),
	// in order.
	changed []uint32
}

// syncNexthops is Apply's first phase where the kernel has nexthop
// objects: gateway objects the plan needs are created, and each table's
// group is given the plan's live gateways of its family. It comes before
// anything else (and before Read), so a gateway going down or up is in the
// kernel after one small dump and one write per group. A table whose group
// cannot be made (a gateway object the kernel refuses, e.g. on a link that
// is down) gets routes that name their gateways; that is no error of
// Apply's: those routes are written, or refused, as ever. nil means the
// kernel has no nexthop objects (found once, then never asked again) or
// they could not be read this time.
func (a *Applier) syncNexthops(plan planner.Plan, w *writer) *nexthopState {
	if a.conn == nil || a.nexthopsOff.Load() {
		return nil
	}
	objs, err := a.nexthopObjects()
	if err != nil {
		if nlbatch.Unsupported(err) {
			a.nexthopsOff.Store(true)
			a.log.Info("the kernel has no nexthop objects; routes name their gateways", "reason", err.Error())
		} else {
			a.log.Error(err, "listing nexthop objects; routes name their gateways this time")
		}
		return nil
	}
	st := &nexthopState{protocol: a.cfg.Protocol, all: objs}
	type gwKey struct {
		gw   netip.Addr
		link int
	}
	existing := map[gwKey]uint32{}
	// used: ids taken, in the kernel or by this apply's new objects.
	taken := map[uint32]bool{}
	used := func(id uint32) bool { _, ok := objs[id]; return ok || taken[id] }
	for _, o := range objs {
		if o.Protocol != a.cfg.Protocol || !planner.OwnsNexthopID(a.cfg.Protocol, o.ID) {
			continue
		}
		if len(o.Group) == 0 && o.Gateway.IsValid() && !planner.IsGroupID(a.cfg.Protocol, o.ID) {
			existing[gwKey{o.Gateway, o.LinkIndex}] = o.ID
		}
	}
	layout := plan.Nexthops(a.cfg.Protocol)
	st.groups = make(map[planner.TableFamily]uint32, len(layout.Objects))
	st.keep = make(map[uint32]bool, len(layout.Objects))
	next, end := planner.GatewayIDs(a.cfg.Protocol)
	ids := map[uint32]uint32{} // the layout's gateway id -> the kernel's
	failed := map[uint32]bool{}
	for _, o := range layout.Objects {
		if len(o.Group) > 0 {
			continue
		}
		if id, ok := existing[gwKey{o.Gateway, o.LinkIndex}]; ok {
			ids[o.ID] = id
			st.keep[id] = true
			continue
		}
		for next < end && used(next) {
			next++
		}
		if next >= end {
			failed[o.ID] = true
			continue
		}
		id, layoutID := next, o.ID
		taken[id] = true
		ids[layoutID] = id
		st.keep[id] = true
		obj := nlbatch.NexthopObject{ID: id, Protocol: a.cfg.Protocol, Family: unix.AF_INET, Gateway: o.Gateway, LinkIndex: o.LinkIndex}
		if o.Gateway.Is6() {
			obj.Family = unix.AF_INET6
		}
		o.ID = id
		a.expect(obj, false)
		w.add(write{what: func() string { return o.Batch(a.cfg.Protocol) }, counter: &a.Writes.NexthopReplace, msg: nlbatch.ReplaceNexthop(obj),
			failed: func(err error) {
				failed[layoutID] = true
				a.log.Info("kernel refused a nexthop object; the routes through it name their gateways", "error", err.Error())
				if errors.Is(err, unix.EOPNOTSUPP) {
					// Listed but not made: a kernel without them after all.
					a.nexthopsOff.Store(true)
				}
			},
			settled: func(err error) {
				if err == nil {
					st.written(obj)
				}
			}})
	}
	w.flush()
	// The groups, in order: a group's id says its table and family.
	var members []uint32 // the kernel's ids of a group's members; copied when written
	for _, g := range layout.Objects {
		if len(g.Group) == 0 {
			continue
		}
		gid := g.ID
		table, ipv6, _ := planner.GroupTable(a.cfg.Protocol, gid)
		tf := planner.TableFamily{Table: table, IPv6: ipv6}
		members = members[:0]
		ok := true
		for _, m := range g.Group {
			ok = ok && !failed[m]
			members = append(members, ids[m])
		}
		if !ok {
			continue
		}
		st.keep[gid] = true
		have, exists := st.owned(gid)
		if exists && sameMembers(have.Group, members) {
			st.groups[tf] = gid
			continue
		}
		if used(gid) && !exists {
			continue // someone else's object holds the id: leave it alone
		}
		g.Group = slices.Clone(members)
		obj := nlbatch.NexthopObject{ID: gid, Protocol: a.cfg.Protocol, Group: g.Group}
		st.groups[tf] = gid
		a.expect(obj, false)
		w.add(write{what: func() string { return g.Batch(a.cfg.Protocol) }, counter: &a.Writes.NexthopReplace, msg: nlbatch.ReplaceNexthop(obj),
			failed: func(err error) {
				delete(st.groups, tf)
				a.log.Info("kernel refused a nexthop group; the table's routes name their gateways", "table", tf.Table, "error", err.Error())
			},
			settled: func(err error) {
				if err == nil {
					st.written(obj)
				}
			}})
	}
	w.flush()
	return st
}

// owns says whether o is one of the agent's objects.
func (st *nexthopState) owns(o nlbatch.NexthopObject) bool {
	return o.Protocol == st.protocol && planner.OwnsNexthopID(st.protocol, o.ID)
}

// owned is the agent's object id, if there is one.
func (st *nexthopState) owned(id uint32) (nlbatch.NexthopObject, bool) {
	o, ok := st.all[id]
	return o, ok && st.owns(o)
}

// written records obj as made (or replaced) in the kernel.
func (st *nexthopState) written(obj nlbatch.NexthopObject) {
	st.all[obj.ID] = obj
	st.changed = append(st.changed, obj.ID)
}

func sameMembers(a, b []uint32) bool {
	if slices.Equal(a, b) {
		return true
	}
	if len(a) != len(b) {
		return false
	}
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}

// collectNexthops removes the agent's nexthop objects the plan no longer
// uses, groups before gateways. It runs last, once no route of the agent's
// uses them: deleting an object deletes the routes through it. A group
// stays when its table is one spare says (a table outside this layout's
// range: another layout's, see RemoveLayout), and so do its members; with
// groupsOnly, every gateway object stays.
func (a *Applier) collectNexthops(st *nexthopState, w *writer, spare func(table uint32) bool, groupsOnly bool) {
	if st == nil {
		return
	}
	var groups, gateways []uint32
	members := map[uint32]bool{}
	for id, o := range st.all {
		if !st.owns(o) {
			continue
		}
		if len(o.Group) == 0 {
			continue
		}
		table, _, isGroup := planner.GroupTable(a.cfg.Protocol, id)
		if st.keep[id] || isGroup && spare(table) {
			for _, m := range o.Group {
				members[m] = true
			}
			continue
		}
		groups = append(groups, id)
	}
	for id, o := range st.all {
		if !st.owns(o) {
			continue
		}
		if len(o.Group) == 0 && !st.keep[id] && !members[id] && !groupsOnly {
			gateways = append(gateways, id)
		}
	}
	slices.Sort(groups)
	slices.Sort(gateways)
	for _, id := range append(groups, gateways...) {
		a.expect(nlbatch.NexthopObject{ID: id}, true)
		w.add(write{what: func() string { return fmt.Sprintf("nexthop del id %d", id) }, counter: &a.Writes.NexthopDelete, msg: nlbatch.DeleteNexthop(id),
			settled: func(err error) {
				if err == nil {
					delete(st.all, id)
					st.changed = append(st.changed, id)
				}
			}})
	}
	w.flush()
}

// outsideRange says whether table is outside cfg's table range.
func outsideRange(cfg planner.Config) func(uint32) bool {
	return func(t uint32) bool { return t < cfg.TableMin || t > cfg.TableMax }
}
