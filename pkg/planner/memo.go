package planner

import (
	"maps"
	"net/netip"
	"reflect"
	"slices"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
)

// Memo carries, from one Compute to the next, the dispatch of each family
// (dispatch.go), each Route's parsed spec and its check on the node, what
// the Routes claim (conflicts and throws), and the last plan's rules:
// laying out the trie, validating a thousand specs and walking their
// destinations are most of the work of planning many Routes, and most
// changes (a gateway edited, a gateway down, a node label) leave the
// Routes' destinations and tables, and all but one Route, as they were.
// Each part is reused only while what it was computed from is the same:
// the plan is the same with a Memo as without (TestMemoChangesNothing).
// It keeps only what spares work, nothing that spares allocations alone:
// the agent's memory at rest is a goal too. Not safe for concurrent use;
// the agent's single reconcile loop keeps one.
type Memo struct {
	dispatch [2]*dispatchMemo // IPv4, IPv6
	// layout is LayoutOf the last plan's rules: what the next Compute's
	// Input.Layout is when it starts from that plan. reused says which
	// families' dispatch the current Compute took from the Memo.
	layout Layout
	reused [2]bool
	// replaced are, by family, the tries of the kept dispatches the
	// current Compute laid out again (nil: there was none), and movable
	// whether keepLayout can move the layout from them to the new ones.
	replaced [2][]Rule
	movable  [2]bool
	// moved counts the slots moved in layout since it was read from rules.
	moved int
	// parsed are the specs of the last Compute's Routes, parsed and
	// validated, by object: an informer hands out the same object until
	// the Route changes.
	parsed map[*v1alpha1.Route]parsedEntry
	epoch  uint64
	// node is what checkOnNode reads of the last Compute's node, and
	// nodeEpoch counts its changes: a Route's check is kept with the
	// nodeEpoch it was made in.
	node      nodeFacts
	nodeEpoch uint64
	// lastRules are the last plan's rules (the plan's own slice).
	lastRules []Rule
	// claims are, in age order, what the last Compute's Routes claimed
	// and what conflict resolution and the throw walk made of it.
	claims []claim
}

// claim is what one Route claims, its destinations if applicable here,
// and what it came to: the prefixes it lost to older Routes and, if it
// got a table, the ones it hands on. Read-only once kept.
type claim struct {
	name string
	// applicable: it passed checkOnNode; applied: it got a table too.
	applicable, applied bool
	destinations        []netip.Prefix
	conflicts           map[netip.Prefix]string
	throws              []netip.Prefix
}

// sameClaims is the last Compute's claims when byAge (checked on this
// node) claims the same: the same Routes in the same order, each
// applicable or not as then, with the same destinations. Conflicts and
// throws depend on nothing else. nil otherwise.
func (m *Memo) sameClaims(byAge []*candidate) []claim {
	if m == nil || len(m.claims) != len(byAge) {
		return nil
	}
	for i, c := range byAge {
		k := &m.claims[i]
		if k.name != c.route.Name || k.applicable != c.applicable || !slices.Equal(k.destinations, c.destinations) {
			return nil
		}
	}
	return m.claims
}

// gotTables says whether the same Routes got a table in byAge as when
// claims were kept: the throws depend on that too.
func gotTables(claims []claim, byAge []*candidate) bool {
	for i, c := range byAge {
		if (c.result.Phase == Applied) != claims[i].applied {
			return false
		}
	}
	return true
}

// keepClaims keeps what byAge claimed and came to, once tableRoutes has
// walked their throws.
func (m *Memo) keepClaims(byAge []*candidate) {
	if m == nil {
		return
	}
	m.claims = make([]claim, len(byAge))
	for i, c := range byAge {
		m.claims[i] = claim{name: c.route.Name, applicable: c.applicable, applied: c.result.Phase == Applied,
			destinations: c.destinations, conflicts: c.conflicts, throws: c.throws}
	}
}

// ruleBuilder appends a plan's rules, and hands out the last plan's
// instead while they are the same: most plans have the last one's rules,
// and then none is copied, and nothing is kept beside the plan.
type ruleBuilder struct {
	last []Rule // the last plan's, read-only
	n    int    // how many of last the rules so far are
	out  []Rule // once they differ: the rules so far
}

func (b *ruleBuilder) add(rs ...Rule) {
	for _, r := range rs {
		if b.out == nil && b.n < len(b.last) && b.last[b.n] == r {
			b.n++
			continue
		}
		if b.out == nil {
			b.out = make([]Rule, b.n, max(len(b.last), b.n+len(rs)))
			copy(b.out, b.last[:b.n])
		}
		b.out = append(b.out, r)
	}
}

// count is how many rules were added.
func (b *ruleBuilder) count() int {
	if b.out != nil {
		return len(b.out)
	}
	return b.n
}

// rules are the rules added: the last plan's slice when they are all of
// it (nil when there are none, as without a Memo).
func (b *ruleBuilder) rules() []Rule {
	switch {
	case b.out != nil:
		return b.out
	case b.n == len(b.last):
		return b.last
	case b.n == 0:
		return nil
	}
	return slices.Clone(b.last[:b.n])
}

type parsedEntry struct {
	resourceVersion string
	generation      int64
	spec            parsedSpec
	epoch           uint64 // the Compute that last used it
	// check is checkOnNode's outcome for the spec, made on the node of
	// nodeEpoch with wasApplied as it says; valid while both hold.
	check *nodeCheck
}

// nodeCheck is what checkOnNode sets on a candidate beside its
// destinations (the spec's): read-only once kept.
type nodeCheck struct {
	nodeEpoch  uint64
	wasApplied bool
	nexthops   []Nexthop
	shadowedBy map[netip.Prefix]netip.Prefix
	stranded   []netip.Addr
	phase      Phase
	reason     string
	message    string
}

// nodeFacts are the parts of a Node checkOnNode reads.
type nodeFacts struct {
	links      []Link
	addresses  []Address
	mainRoutes []MainRoute
}

func (f nodeFacts) equal(n Node) bool {
	return slices.Equal(f.links, n.Links) && slices.Equal(f.addresses, n.Addresses) && slices.Equal(f.mainRoutes, n.MainRoutes)
}

// specCache parses the specs of one Compute, reusing a Memo's: its map is
// the Memo's, updated in place, and swept of the Routes this Compute did
// not have at its end.
type specCache struct {
	entries   map[*v1alpha1.Route]parsedEntry
	epoch     uint64
	nodeEpoch uint64
}

// specs starts a Compute on node.
func (m *Memo) specs(node Node) *specCache {
	if m == nil {
		return nil // every spec parsed, nothing kept
	}
	if m.parsed == nil {
		m.parsed = map[*v1alpha1.Route]parsedEntry{}
	}
	m.epoch++
	if m.nodeEpoch == 0 || !m.node.equal(node) {
		m.nodeEpoch++
		m.node = nodeFacts{slices.Clone(node.Links), slices.Clone(node.Addresses), slices.Clone(node.MainRoutes)}
	}
	return &specCache{entries: m.parsed, epoch: m.epoch, nodeEpoch: m.nodeEpoch}
}

// check runs checkOnNode on c, or takes its kept outcome for the same
// spec on the same node.
func (c *specCache) check(cand *candidate, node Node, links map[int]Link, wasApplied bool) {
	if c == nil {
		checkOnNode(cand, parseSpec(cand.route), node, links, wasApplied)
		return
	}
	e := c.entry(cand.route)
	if k := e.check; k != nil && k.nodeEpoch == c.nodeEpoch && k.wasApplied == wasApplied {
		// checkOnNode takes the spec's destinations (none for a spec
		// that is invalid, which has none).
		cand.destinations, cand.nexthops, cand.shadowedBy, cand.stranded = e.spec.destinations, k.nexthops, k.shadowedBy, k.stranded
		cand.result.Phase, cand.result.Reason, cand.result.Message = k.phase, k.reason, k.message
		return
	}
	checkOnNode(cand, e.spec, node, links, wasApplied)
	e.check = &nodeCheck{nodeEpoch: c.nodeEpoch, wasApplied: wasApplied, nexthops: cand.nexthops,
		shadowedBy: cand.shadowedBy, stranded: cand.stranded, phase: cand.result.Phase, reason: cand.result.Reason, message: cand.result.Message}
	c.entries[cand.route] = e
}

// entry is r's, marked used by this Compute: the kept one while the
// object is the same one at the same version, else with its spec parsed
// now.
func (c *specCache) entry(r *v1alpha1.Route) parsedEntry {
	e, ok := c.entries[r]
	if !ok || e.resourceVersion != r.ResourceVersion || e.generation != r.Generation {
		e = parsedEntry{resourceVersion: r.ResourceVersion, generation: r.Generation, spec: parseSpec(r)}
	}
	e.epoch = c.epoch
	c.entries[r] = e
	return e
}

// keepSpecs keeps the specs of this Compute's Routes, and only those.
func (m *Memo) keepSpecs(c *specCache) {
	if m == nil {
		return
	}
	maps.DeleteFunc(m.parsed, func(_ *v1alpha1.Route, e parsedEntry) bool { return e.epoch != c.epoch })
}

type dispatchMemo struct {
	base       int
	items      []dispatchItem // sorted
	gate, trie []Rule
}

// Layout is where the last plan computed with m put the dispatch's rules
// (LayoutOf its rules), for the next Input.Layout.
func (m *Memo) Layout() Layout {
	if m == nil {
		return nil
	}
	return m.layout
}

// dispatchFor is the kept dispatch of a family if it was computed from
// these sorted items and band, starting from the layout the plan that
// kept it left, which is where a layout computed from it stays.
func (m *Memo) dispatchFor(ipv6 bool, base int, items []dispatchItem, layout Layout) *dispatchMemo {
	if m == nil {
		return nil
	}
	d := m.dispatch[boolIndex(ipv6)]
	if d == nil || d.base != base || !slices.Equal(d.items, items) || !sameLayout(layout, m.layout) {
		return nil
	}
	m.reused[boolIndex(ipv6)] = true
	return d
}

// sameLayout says whether a and b hold the same slots: at once when they
// are one map, as when the agent passes the Memo's own.
func sameLayout(a, b Layout) bool {
	if reflect.ValueOf(a).UnsafePointer() == reflect.ValueOf(b).UnsafePointer() {
		return true
	}
	return maps.Equal(a, b)
}

func (m *Memo) keepDispatch(ipv6 bool, base int, items []dispatchItem, gate, trie []Rule) {
	if m == nil {
		return
	}
	f := boolIndex(ipv6)
	if old := m.dispatch[f]; old != nil {
		m.replaced[f], m.movable[f] = old.trie, old.base == base
	} else {
		m.movable[f] = true // the last plan had no slots of this family
	}
	// items are the Compute's own, read-only once sorted: kept, not copied.
	m.dispatch[f] = &dispatchMemo{base: base, items: items, gate: gate, trie: trie}
}

// startCompute forgets which dispatches the previous Compute reused
// (keepLayout forgot which it replaced).
func (m *Memo) startCompute() {
	if m != nil {
		m.reused = [2]bool{}
	}
}

// keepLayout records the layout of a plan's rules, computed from previous
// (its Input.Layout); a family the plan has no dispatch for forgets its
// kept one.
func (m *Memo) keepLayout(rules []Rule, base int, previous Layout) {
	if m == nil {
		return
	}
	var has [2]bool
	for _, r := range rules {
		has[boolIndex(r.IPv6)] = true
	}
	// The layout is the tries' alone: a family whose trie is the one the
	// kept layout was read from has the same slots still; one laid out
	// again from that layout moves it along (moveLayout), in place, as
	// nothing reads the last layout once Compute is done with it. Anything
	// else reads the layout from the rules.
	same := m.layout != nil && sameLayout(previous, m.layout)
	moves := same
	var was, is [2][]Rule
	for f := range m.dispatch {
		switch {
		case !has[f] && m.dispatch[f] != nil:
			same = false
			was[f] = m.dispatch[f].trie
			moves = moves && m.dispatch[f].base == base
			m.dispatch[f] = nil
		case has[f] && !m.reused[f]:
			same = false
			was[f], is[f] = m.replaced[f], m.dispatch[f].trie
			moves = moves && m.movable[f]
		}
	}
	switch {
	case same:
	case moves && m.moved <= len(m.layout):
		for f := range was {
			m.moved += moveLayout(m.layout, was[f], is[f], base)
		}
	default:
		// Also once as many slots were moved as it holds: a map keeps
		// the room of what was deleted from it.
		m.moved = 0
		m.layout = LayoutOf(rules, base)
	}
	// The replaced tries are parts of the last plan's rules: not kept
	// until the next Compute.
	m.replaced, m.movable = [2][]Rule{}, [2]bool{}
}
