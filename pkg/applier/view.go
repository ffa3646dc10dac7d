package applier

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/routing-agent/routing-agent/pkg/kernelwatch"
	"github.com/routing-agent/routing-agent/pkg/nlbatch"
	"github.com/routing-agent/routing-agent/pkg/planner"
)

// View keeps the State an Applier diffs against current between applies,
// so that an apply reads only what may have changed since the last one
// instead of every owned route and rule.
//
// It never takes a notification's content for the truth: notifications
// only say what is dirty, and what is dirty is dumped again, from the
// kernel, at the next apply. The parts it tracks are the routes of each
// table of the range (dumped one table at a time, which the kernel filters
// itself on a socket with strict checking) and the rules (one dump of both
// families: the kernel cannot filter rules by priority).
//
// Its own route writes are dealt with the same way: after an apply, every
// table it wrote a route to is dirty (a write that failed changed
// nothing). Taking the content of the notifications instead would race:
// an apply that starts before the notifications of the previous apply's
// writes have been read would see the kernel as it was before them (and
// write again, or fail to add what exists); applying its own writes to the
// view when they succeed would race too, with a change by someone else
// made to the same object right after the write whose notification is read
// before the view is updated, and lost. A dump after the writes has
// neither problem, and costs what the change costs: one table.
//
// Rules cannot be dumped by part, and a dump of every rule costs several
// milliseconds with a thousand Routes, for a change that wrote a dozen. So
// the view counts the echoes its rule writes are to bring (expectRule,
// before each write) and applies each write that succeeded to its state
// (ruleWritten); an echo makes nothing dirty, any other notification does.
// The race above cannot lose a change: someone else's comes after the
// echo of the write it follows, is no echo, and has the rules dumped.
//
// Nexthop objects are kept by the view only while the Nexthops stream is
// watched as well (NexthopChanged): then Apply's nexthop phase lists them
// again only after a notification that is not the echo of the agent's own
// write, and otherwise takes the listing kept with its own writes since.
// Routes the view reads resolve their nexthop ids through the phase's
// objects; every dump of routes
// carries each route's nexthop id (RTA_NH_ID), without which an unchanged
// plan would rewrite every route through a group. The phase's own writes
// mark the tables of the groups written dirty before the view is read: a
// group replaced (a failover) changes what its routes forward to with no
// route written, and the kernel notifies those routes only in
// net.ipv4.nexthop_compat_mode (then as echoes, perhaps after the dump).
// The objects the apply collects at its end mark theirs for the next
// apply: deleting an object deletes the routes through it, IPv4 ones
// without a notification.
//
// What invalidates a view, whose next apply then reads everything, as
// Read does: its first apply, any apply while a stream it relies on is
// down or not yet subscribed (every apply then reads everything),
// Invalidate (the periodic resync), a stream subscribed again after
// notifications were lost, and a failed dump.
//
// A View's methods may be called from any goroutine; applies stay
// serialized, as they are without a view.
type View struct {
	a *Applier
	// dumps is a socket of its own with strict checking on, for dumps of
	// one table: the Applier's handle stays as it is (strict checking
	// rejects some of the library's other dump requests).
	dumps *netlink.Handle

	// st is the state as of the last apply plus what has not been marked
	// dirty since, and byTable the keys of its routes by table; only
	// applies touch them.
	st      *State
	byTable map[uint32][]routeKey

	mu sync.Mutex
	// watching: the streams were subscribed (Watching); down counts those
	// lost since and not subscribed again.
	watching bool
	down     kernelwatch.Kind
	// Dirty parts: all (the next apply reads everything), every route,
	// the rules, and tables by id.
	all, routes, rules bool
	tables             map[uint32]bool
	// links are the interfaces the routes in st go through, for
	// LinkChanged: rebuilt when every route is read, added to when a table
	// is (one that is no longer used costs a dump too many, never one too
	// few).
	links map[int]bool
	// plan is the last plan, to tell a notification that shows the kernel
	// as planned (the echo of the agent's own writes) from one that does
	// not: its routes are searched when sorted (as the planner makes them),
	// else looked up in desired, built when a notification first needs it.
	plan    *planner.Plan
	sorted  bool
	desired map[routeKey]planner.Route

	// Nexthop objects, once the Nexthops stream is watched too: the
	// kernel's as of the last listing with the agent's own writes since
	// (nexthops), whether they must be listed again (nexthopsStale), and
	// the current apply's writes, whose notifications are their echoes
	// (expected; nil for a delete).
	nexthopsWatched bool
	nexthops        map[uint32]nlbatch.NexthopObject
	nexthopsStale   bool
	expected        map[uint32]*nlbatch.NexthopObject

	// ruleEchoes count the notifications the agent's own rule writes are
	// still to bring (expectRule), so that they do not make the rules
	// dirty: the writes themselves are applied to st (ruleWritten).
	// Forgotten when notifications may have been lost: an echo that never
	// comes must not pass a later change by someone else off as one.
	ruleEchoes map[ruleEcho]int

	stats ViewStats
}

// maxTableDumps is how many dirty tables an apply dumps one by one; more
// are read in one dump of every route. Measured with 1,000 Routes of 2
// destinations (4,000 routes): some 0.05 ms a table, 15 ms for all.
const maxTableDumps = 256

// ViewStats count a view's dumps since it was made.
type ViewStats struct {
	// Full are reads of everything; Tables are dumps of one table (both
	// families); Rules are dumps of the rules alone; Routes are dumps of
	// every route without the rules; KeptNexthops are applies that took
	// the nexthop objects the view kept instead of listing them.
	Full, Tables, Rules, Routes, KeptNexthops int
}

// UseView makes a's applies read through a View, from now on. dumps is a
// netlink handle of its own in a's namespace (netlink.NewHandle or
// NewHandleAt: the zero Handle has no socket to switch), which the view
// switches to strict checking; it must stay open as long as a is used. Until
// Watching is called, every apply still reads everything.
func (a *Applier) UseView(dumps *netlink.Handle) (*View, error) {
	if err := dumps.SetStrictCheck(true); err != nil {
		return nil, fmt.Errorf("netlink strict checking (Linux 4.20 or later): %w", err)
	}
	v := &View{a: a, dumps: dumps, tables: map[uint32]bool{}, all: true}
	a.view = v
	return v, nil
}

// Watching says the notification streams of kinds (which must include
// Routes, Rules, Links and Addrs) are subscribed, less any reported Lost
// meanwhile: the next apply reads everything, and the ones after it read
// what the notifications mark dirty. Call it after kernelwatch.Watch
// returns: a change after that is notified.
func (v *View) Watching(kinds kernelwatch.Kind) error {
	const need = kernelwatch.Routes | kernelwatch.Rules | kernelwatch.Links | kernelwatch.Addrs
	if kinds&need != need {
		return fmt.Errorf("a kernel view needs the %s, %s, %s and %s streams", kernelwatch.Routes, kernelwatch.Rules, kernelwatch.Links, kernelwatch.Addrs)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	v.watching, v.all = true, true
	v.nexthopsWatched = kinds&kernelwatch.Nexthops != 0
	v.ruleEchoes = nil
	return nil
}

// Lost says the stream of kind is down (kernelwatch's OnLost): until it is
// Resubscribed, every apply reads everything.
func (v *View) Lost(kind kernelwatch.Kind) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.down |= kind
	v.all = true
	v.ruleEchoes = nil // their notifications may be among those lost
}

// Resubscribed says the stream of kind is up again (kernelwatch's
// OnResubscribe): notifications were lost, so the next apply reads
// everything.
func (v *View) Resubscribed(kind kernelwatch.Kind) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.down &^= kind
	v.all = true
	v.ruleEchoes = nil
}

// Invalidate makes the next apply read everything: the periodic resync,
// the backstop for whatever no notification told.
func (v *View) Invalidate() {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.all = true
}

// Watched reports whether Watching was called and no stream is down:
// whether applies read only what is dirty.
func (v *View) Watched() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.watching && v.down == 0
}

// Stats returns the view's dump counts.
func (v *View) Stats() ViewStats {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.stats
}

// RouteChanged takes a route notification. Only routes of the table range
// concern the view (whatever their protocol: someone else's route replaces
// the agent's); their table is dirty. It reports whether the notification
// shows the kernel other than the last plan wants, which calls for an
// apply; the echo of the agent's own write does not.
func (v *View) RouteChanged(u netlink.RouteUpdate) (differs bool) {
	cfg := &v.a.cfg
	t := uint32(u.Table)
	if t < cfg.TableMin || t > cfg.TableMax {
		return false
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	v.tables[t] = true
	if u.Protocol != netlink.RouteProtocol(cfg.Protocol) || v.plan == nil {
		return true
	}
	r := v.a.fromNetlinkRoute(u.Route, u.Family)
	var want planner.Route
	var ok bool
	if v.sorted {
		var i int
		i, ok = slices.BinarySearchFunc(v.plan.Routes, r, planner.CompareRoutes)
		if ok {
			want = v.plan.Routes[i]
		}
	} else {
		if v.desired == nil {
			v.desired = make(map[routeKey]planner.Route, len(v.plan.Routes))
			for _, p := range v.plan.Routes {
				v.desired[keyOf(p)] = p
			}
		}
		want, ok = v.desired[keyOf(r)]
	}
	switch u.Type {
	case unix.RTM_NEWROUTE:
		return !ok || !sameRoute(r, want)
	case unix.RTM_DELROUTE:
		return ok
	}
	return true
}

// RuleChanged takes a rule notification: a rule in the band, or one that
// matches a bit of the connection mark, makes the rules dirty, unless it
// is the echo of one of the agent's own writes (expectRule). It reports
// whether it did.
func (v *View) RuleChanged(u kernelwatch.RuleUpdate) bool {
	cfg := &v.a.cfg
	priority := int(u.Priority)
	inBand := priority >= cfg.PriorityBase && priority < cfg.PriorityBase+planner.BandWidth
	mask := u.Mask
	if mask == 0 && u.Mark != 0 {
		mask = 0xffffffff
	}
	if !inBand && (cfg.ConnMark == 0 || mask&cfg.ConnMark == 0) {
		return false
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if e, ok := v.echoOf(u); ok && v.ruleEchoes[e] > 0 {
		v.forgetEcho(e)
		return false
	}
	v.rules = true
	return true
}

// ruleEcho is a rule write of the agent's whose notification is to come.
type ruleEcho struct {
	key ruleKey
	add bool
}

// echoOf is the write u would be the echo of, if it could be one: a rule
// of the agent's protocol with nothing the agent never writes.
func (v *View) echoOf(u kernelwatch.RuleUpdate) (ruleEcho, bool) {
	if u.Other || u.Protocol != v.a.cfg.Protocol || u.Type != unix.RTM_NEWRULE && u.Type != unix.RTM_DELRULE {
		return ruleEcho{}, false
	}
	return ruleEcho{key: keyOfRule(fromBatchRule(u.Rule)), add: u.Type == unix.RTM_NEWRULE}, true
}

// expectRule says the apply is about to write rule r (add, or delete):
// its notification is an echo, and the write, once done (ruleWritten),
// is applied to the view's state instead of the rules being dumped again.
func (v *View) expectRule(r planner.Rule, add bool) ruleEcho {
	e := ruleEcho{key: keyOfRule(r), add: add}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.ruleEchoes == nil {
		v.ruleEchoes = map[ruleEcho]int{}
	}
	v.ruleEchoes[e]++
	return e
}

// forgetEcho counts one echo of e fewer. Call with v.mu held.
func (v *View) forgetEcho(e ruleEcho) {
	if n := v.ruleEchoes[e]; n > 1 {
		v.ruleEchoes[e] = n - 1
	} else {
		delete(v.ruleEchoes, e)
	}
}

// ruleWritten settles a write expectRule announced. Done, the view's state
// has it (the kernel compares rules by what their key holds: any one of a
// key's rules is the one deleted). Failed, it changed nothing and no echo
// comes; the rules are dumped again all the same, the write's error being
// the kind of surprise a dump is for.
func (v *View) ruleWritten(e ruleEcho, r planner.Rule, err error) {
	if err != nil {
		v.mu.Lock()
		defer v.mu.Unlock()
		v.forgetEcho(e)
		v.rules = true
		return
	}
	// st is the apply's alone (state); only the lock's fields are shared.
	have := v.st.Rules[e.key]
	switch {
	case e.add:
		v.st.Rules[e.key] = append(have, r)
	case len(have) > 1:
		v.st.Rules[e.key] = have[:len(have)-1]
	default:
		delete(v.st.Rules, e.key)
	}
}

// LinkChanged takes a link or address notification of interface index.
// The kernel removes IPv4 routes through an interface that goes down or
// loses its addresses without a notification for each: when a route of the
// view goes through it, every route is dirty. It reports whether they are.
// The nexthop objects are listed again whatever the interface.
func (v *View) LinkChanged(index int) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	// The kernel also removes the nexthop objects of an interface that
	// goes down, without notifying it.
	v.nexthopsStale = true
	if !v.links[index] {
		return false
	}
	v.routes = true
	return true
}

// NexthopChanged takes a nexthop object notification. The echo of a write
// of the current apply changes nothing; anything else makes the next apply
// list the objects again, and an object of the agent's deleted makes every
// route dirty too (the kernel deletes the IPv4 routes through it without a
// notification). It reports whether the notification calls for an apply:
// it is not an echo, and of an object of the agent's protocol or id range.
func (v *View) NexthopChanged(u kernelwatch.NexthopUpdate) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	if e, ok := v.expected[u.ID]; ok && (u.Type == unix.RTM_DELNEXTHOP && e == nil || u.Type == unix.RTM_NEWNEXTHOP && e != nil && sameObject(*e, u.NexthopObject)) {
		delete(v.expected, u.ID)
		return false
	}
	v.nexthopsStale = true
	ours := u.Protocol == v.a.cfg.Protocol || planner.OwnsNexthopID(v.a.cfg.Protocol, u.ID)
	if ours && u.Type == unix.RTM_DELNEXTHOP {
		v.routes = true
	}
	return ours
}

// sameObject says whether a notified object is what the agent wrote.
func sameObject(want, got nlbatch.NexthopObject) bool {
	return want.ID == got.ID && want.Protocol == got.Protocol && want.Gateway == got.Gateway && want.LinkIndex == got.LinkIndex &&
		want.Blackhole == got.Blackhole && sameMembers(want.Group, got.Group)
}

// keptNexthops are the objects as the view keeps them, when they are
// current: no notification since the last listing but the echoes of the
// agent's own writes. Otherwise the caller lists them (and gives the
// listing to listedNexthops): a notification from here on makes that
// listing stale in turn. Either way the echoes expected start anew.
//
// The objects are handed over, not copied: the apply changes them as it
// writes and gives them back at its end (wroteNexthops); an apply that
// ends before leaves the next one to list them.
func (v *View) keptNexthops() (map[uint32]nlbatch.NexthopObject, bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.expected = map[uint32]*nlbatch.NexthopObject{}
	kept := v.nexthops
	v.nexthops = nil
	if !v.nexthopsWatched || !v.watching || v.down != 0 || v.all || v.nexthopsStale || kept == nil {
		v.nexthopsStale = false
		return nil, false
	}
	v.stats.KeptNexthops++
	return kept, true
}

// expectNexthop says the apply is about to write obj (or, with gone, to
// delete its id): the notification that follows is its echo.
func (v *View) expectNexthop(obj nlbatch.NexthopObject, gone bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.expected == nil {
		v.expected = map[uint32]*nlbatch.NexthopObject{}
	}
	if gone {
		v.expected[obj.ID] = nil
	} else {
		v.expected[obj.ID] = &obj
	}
}

// wroteNexthops keeps the objects an apply ended with: its listing, or
// what the view handed it, and its own writes (nexthopState.all), which
// the view owns from now on.
func (v *View) wroteNexthops(all map[uint32]nlbatch.NexthopObject) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.nexthops = all
}

// state returns the State an apply diffs against: read in full, or the
// view's with its dirty parts dumped again. nhs is what the apply's
// nexthop phase found (nil without nexthop objects): routes resolve their
// nexthop objects through it.
func (v *View) state(nhs *nexthopState) (*State, reread, error) {
	v.mu.Lock()
	all := v.all || v.st == nil || !v.watching || v.down != 0
	routes, rules, tables := v.routes, v.rules, v.tables
	v.all, v.routes, v.rules, v.tables = false, false, false, map[uint32]bool{}
	v.mu.Unlock()
	// Many tables (a failover rewrites every table using the gateway) are
	// cheaper in one dump of every route.
	routes = routes || len(tables) > maxTableDumps
	read := reread{all: all || routes, tables: tables, rules: all || rules}
	// Whatever is marked from here on is dumped by the next apply: a
	// change the dumps below miss is notified after they began.
	var err error
	var stats ViewStats
	// The nexthop objects routes are resolved through: the phase's, else
	// (no objects, or they could not be listed then) listed now.
	var objs map[uint32]nlbatch.NexthopObject
	if nhs != nil {
		objs = nhs.all
	} else if all || routes || len(tables) > 0 {
		objs, err = v.a.readNexthops()
	}
	switch {
	case err != nil:
	case all:
		var st *State
		if st, err = v.a.read(objs); err == nil {
			v.st = st
			stats.Full++
		}
	default:
		if rules {
			err = v.dumpRules()
			stats.Rules++
		}
		if routes && err == nil {
			err = v.dumpRoutes(0, objs)
			stats.Routes++
		} else if err == nil {
			for t := range tables {
				if err = v.dumpRoutes(t, objs); err != nil {
					break
				}
				stats.Tables++
			}
		}
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	v.stats.Full += stats.Full
	v.stats.Rules += stats.Rules
	v.stats.Routes += stats.Routes
	v.stats.Tables += stats.Tables
	if err != nil {
		v.all = true
		return nil, read, err
	}
	if all || routes {
		v.byTable = map[uint32][]routeKey{}
		v.links = map[int]bool{}
		for k, r := range v.st.Routes {
			v.byTable[k.Table] = append(v.byTable[k.Table], k)
			for _, nh := range r.Nexthops {
				v.links[nh.LinkIndex] = true
			}
		}
	} else {
		for t := range tables {
			for _, k := range v.byTable[t] {
				for _, nh := range v.st.Routes[k].Nexthops {
					v.links[nh.LinkIndex] = true
				}
			}
		}
	}
	return v.st, read, nil
}

// dumpRules reads the rules of the view's state again.
func (v *View) dumpRules() error {
	st := &State{Rules: map[ruleKey][]planner.Rule{}}
	if err := v.a.readRules(st); err != nil {
		return err
	}
	v.st.Rules, v.st.Foreign, v.st.MarkUsers = st.Rules, st.Foreign, st.MarkUsers
	return nil
}

// dumpRoutes reads the routes of table again, or of every table for 0,
// with the nexthop object each uses (resolved through objs): a view that
// lost them would rewrite every route through a group at each apply.
// Through the Applier's own socket (SetNamespace), which checks strictly,
// the kernel sends the table alone; without it, one table is dumped
// through the view's strict handle.
func (v *View) dumpRoutes(table uint32, objs map[uint32]nlbatch.NexthopObject) error {
	st := newState()
	h := v.a.h
	if table != 0 {
		h = v.dumps
	}
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		err := v.a.readRoutes(h, st, family, table, objs)
		// A table the family never had: strict dumps say ENOENT.
		if table != 0 && errors.Is(err, unix.ENOENT) {
			err = nil
		}
		if err != nil {
			return err
		}
	}
	if table == 0 {
		v.st.Routes, v.st.attrs = st.Routes, st.attrs
		return nil
	}
	for _, k := range v.byTable[table] {
		delete(v.st.Routes, k)
		delete(v.st.attrs, k)
	}
	keys := make([]routeKey, 0, len(st.Routes))
	for k, r := range st.Routes {
		v.st.Routes[k], v.st.attrs[k] = r, st.attrs[k]
		keys = append(keys, k)
	}
	if len(keys) == 0 {
		delete(v.byTable, table)
	} else {
		v.byTable[table] = keys
	}
	return nil
}

// planned records plan as the one being applied, before its writes: their
// notifications are compared with it.
func (v *View) planned(plan planner.Plan) {
	// Sorted and without two routes of one key (CompareRoutes orders by
	// key), so that a search finds the one route of a key.
	sorted := true
	for i := 1; i < len(plan.Routes) && sorted; i++ {
		sorted = planner.CompareRoutes(plan.Routes[i-1], plan.Routes[i]) < 0
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	v.plan, v.sorted, v.desired = &plan, sorted, nil
}

// wrote marks dirty what an apply of plan onto actual (the view's state)
// wrote: when routes were written, the tables whose routes differ (the
// diff applyTo makes, with the nexthop groups of nhs, without its order).
// Its rule writes are in the view's state already (ruleWritten).
func (v *View) wrote(plan planner.Plan, actual *State, nhs *nexthopState, sc *scope, routes bool) {
	tables := map[uint32]bool{}
	if routes {
		// A table all of whose planned routes are installed as planned,
		// and which holds as many as planned, holds nothing else. Only
		// tables in the apply's scope were written.
		planned := map[uint32]int{}
		for _, r := range plan.Routes {
			if !sc.table(r.Table) {
				continue
			}
			planned[r.Table]++
			if !actual.installed(r, nhs.groupOf(r)) {
				tables[r.Table] = true
			}
		}
		for t, keys := range v.byTable {
			if sc.table(t) && len(keys) != planned[t] {
				tables[t] = true
			}
		}
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	maps.Copy(v.tables, tables)
	// The links of what was written count from now on: the kernel may drop
	// those routes before the next apply reads them.
	if len(tables) > 0 {
		if v.links == nil {
			v.links = map[int]bool{}
		}
		for _, r := range plan.Routes {
			if tables[r.Table] {
				for _, nh := range r.Nexthops {
					v.links[nh.LinkIndex] = true
				}
			}
		}
	}
}

// nexthopsWritten marks dirty the tables whose routes the nexthop objects
// nhs.changed[from:] written may have changed: the table of a group, and
// those of the view's routes through any of them. A group replaced (a
// failover) changes what its routes forward to without a route written,
// and an object deleted takes the routes through it along, IPv4 ones
// without a notification.
func (v *View) nexthopsWritten(nhs *nexthopState, from int) {
	if nhs == nil || len(nhs.changed) <= from {
		return
	}
	cfg := &v.a.cfg
	ids := map[uint32]bool{}
	tables := map[uint32]bool{}
	gatewaysToo := false
	for _, id := range nhs.changed[from:] {
		ids[id] = true
		if t, _, ok := planner.GroupTable(cfg.Protocol, id); ok {
			tables[t] = true
		} else {
			gatewaysToo = true
		}
	}
	// Only a table's own routes use its group: a route of the agent's in
	// another table through it is not as planned, and was rewritten by the
	// apply after the notification that showed it. A gateway object's
	// routes are found by looking.
	if v.st != nil && gatewaysToo {
		for k, at := range v.st.attrs {
			if at.nhid != 0 && ids[at.nhid] {
				tables[k.Table] = true
			}
		}
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	for t := range tables {
		if t >= cfg.TableMin && t <= cfg.TableMax {
			v.tables[t] = true
		}
	}
}

// rulesWritten marks the rules dirty after a write outside Apply.
func (v *View) rulesWritten() {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.rules = true
}
