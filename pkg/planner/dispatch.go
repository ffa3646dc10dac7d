package planner

import (
	"encoding/binary"
	"math"
	"math/bits"
	"net/netip"
	"slices"

	"github.com/routing-agent/routing-agent/pkg/runs"
)

// The dispatch: how a packet finds its Route's table among many without
// walking one rule per Route.
//
// The kernel evaluates ip rules one after another, so N plain `lookup
// <table>` rules cost every packet that no Route matches N table lookups
// (1,000 Routes forward at 13 % of the rate with none). The agent instead
// lays its per-Route rules out as a binary trie over their destinations:
//
//   - every rule that leads to a table carries `to <prefix>`, the
//     destination (or, for a part of the trie whose destinations all belong
//     to one Route, their common prefix), so a packet that is not for it
//     passes on after a compare instead of a table lookup;
//   - every block of the trie that holds more than one rule starts with a
//     skip, `not to <block's prefix> goto <first priority after the
//     block>`, so a packet outside the block jumps over it whole.
//
// A packet therefore meets about two skips per level of the trie and at
// most dispatchLeaf rules at its end, whatever the number of Routes.
//
// First in the band sits a gate over the few regions that hold every
// Route's destinations: `to <region> goto <OffsetGateLanding>` for all but
// the last, then `not to <last region> goto <DispatchEnd>`. A
// packet outside every Route's destinations — pod egress to the internet,
// mostly — costs a handful of compares and no table lookup at all, and
// meets the rules after the band exactly as it would without the agent.
// The gate comes before the bypass and symmetric rules too: they send
// traffic to main ahead of the Routes' rules, and for traffic no Route can
// capture main is where it goes anyway. There is no gate when a Route
// holds a /0.
//
// Correctness never depends on the skips. Longest-prefix match across
// Routes is kept by the throw routes in the tables (a table hands a more
// specific prefix owned by another Route on to the rules after it), so the
// lookup rules are right in any order; a skip only ever jumps over rules
// whose `to` cannot match the packet. The applier adds skips after every
// other rule and removes stale ones before anything else, so while it
// rewrites the layout a packet at worst walks more rules, never past its
// Route's. A goto whose target is missing is a no-op in the kernel.
//
// Priorities: the layout's slots are spread over the band's route range
// with room between them, and a slot keeps the priority it has in the
// kernel (Input.Layout) whenever the order allows, so adding or removing a
// Route rewrites the few rules around it, not every rule after it.

// dispatchLeaf is the most lookup rules a block of the trie holds before
// it is split; doubled as long as the layout would not fit the band.
const dispatchLeaf = 8

// DispatchEnd is the offset of the band's last rule, `nop`: the target of
// skips that jump past every Route's rule (a goto needs a rule to land on).
const DispatchEnd = BandWidth - 1

// dispatchItem is one destination of one Route's table.
type dispatchItem struct {
	dst   netip.Prefix
	table uint32
}

// dispatchNode is a block of the trie: the rules of its children, then its
// own lookups.
type dispatchNode struct {
	prefix   netip.Prefix
	own      []dispatchItem
	children []*dispatchNode
	rules    int // lookup rules in the whole block
}

// buildDispatch builds the trie of items, which must be sorted and all
// inside one family. Its nodes share items' array.
func buildDispatch(items []dispatchItem, leaf int) *dispatchNode {
	if sameTable(items) {
		// One Route: a single rule covers the lot. A packet inside the
		// common prefix that is for none of its destinations misses in the
		// table and goes on.
		cp := commonPrefix(items)
		return &dispatchNode{prefix: cp, own: []dispatchItem{{cp, items[0].table}}, rules: 1}
	}
	if len(items) <= leaf {
		own := byTable(items)
		return &dispatchNode{prefix: commonPrefix(items), own: own, rules: len(own)}
	}
	cp, own, lo, hi := split(items)
	n := &dispatchNode{prefix: cp, own: own, rules: len(own)}
	for _, h := range [][]dispatchItem{lo, hi} {
		if len(h) > 0 {
			c := buildDispatch(h, leaf)
			n.children = append(n.children, c)
			n.rules += c.rules
		}
	}
	return n
}

// collapseAt is how many destinations of one table in a block get one rule
// (byTable); fewer keep a rule each, which reads better in `ip rule`.
const collapseAt = 4

// byTable gives a table's destinations among items one rule, with their
// common prefix, where they are many and that prefix holds no other
// table's destination: a
// block then holds one rule per Route whatever its number of destinations
// (a packet inside the prefix but for none of them misses in the table and
// goes on). Elsewhere each destination keeps its own rule, so no rule
// sends another Route's traffic through a table first.
func byTable(items []dispatchItem) []dispatchItem {
	// A block is small (a leaf of the trie): a table's items are found by
	// a scan, not a map. In most, no table has collapseAt of them: each
	// keeps its rule, in items' order (prefixes are distinct), and the
	// block's lookups are items itself.
	many := func(it dispatchItem) bool {
		n := 0
		for _, o := range items {
			if o.table == it.table {
				n++
			}
		}
		return n >= collapseAt
	}
	if !slices.ContainsFunc(items, many) {
		return items
	}
	out := make([]dispatchItem, 0, len(items))
	mine := make([]dispatchItem, 0, len(items))
	collapsed := false
	for i, it := range items {
		if slices.ContainsFunc(items[:i], func(o dispatchItem) bool { return o.table == it.table }) {
			continue // its table is done
		}
		mine = mine[:0]
		for _, o := range items[i:] {
			if o.table == it.table {
				mine = append(mine, o)
			}
		}
		cp := commonPrefix(mine)
		alone := len(mine) >= collapseAt
		for _, o := range items {
			alone = alone && (o.table == it.table || !cp.Overlaps(o.dst))
		}
		if alone {
			out, collapsed = append(out, dispatchItem{cp, it.table}), true
		} else {
			out = append(out, mine...)
		}
	}
	if collapsed || !slices.IsSortedFunc(out, compareItems) {
		slices.SortFunc(out, compareItems)
	}
	return out
}

func compareItems(a, b dispatchItem) int { return comparePrefix(a.dst, b.dst) }

// split divides sorted items at their common prefix cp: own are the items
// that are cp itself (an older Route owns a prefix alone, so at most one),
// lo and hi the others, by cp's next bit. Sorted by address, they come in
// that order.
func split(items []dispatchItem) (cp netip.Prefix, own, lo, hi []dispatchItem) {
	cp = commonPrefix(items)
	i := 0
	for i < len(items) && items[i].dst.Bits() == cp.Bits() {
		i++
	}
	rest := items[i:]
	j, _ := slices.BinarySearchFunc(rest, 1, func(it dispatchItem, bit int) int { return bitAt(it.dst.Addr(), cp.Bits()) - bit })
	return cp, items[:i], rest[:j], rest[j:]
}

// dispatchSlot is one priority of the layout: a skip, or lookup rules.
// Its keys identify it across plans (LayoutOf): a skip's prefix, or each
// of its lookups; the slot stays where any of them was.
type dispatchSlot struct {
	skip netip.Prefix // a skip's: its block's
	// lookups are the items of a slot of lookups, most specific first: a
	// rule for each of their selectors.
	lookups []dispatchItem
	end     int // for a skip: the index of the first slot after its block
}

func (s *dispatchSlot) isSkip() bool { return s.skip.IsValid() }

// rules is how many rules the slot has.
func (s *dispatchSlot) rules() int {
	if s.isSkip() {
		return 1
	}
	n := 0
	for _, it := range s.lookups {
		_, k := selectors(it.dst)
		n += k
	}
	return n
}

// slots flattens the trie into priorities: a skip for a block of more than
// one rule, the children's blocks, then the block's own lookups (after the
// children: a packet for a child then needs no extra table lookup). own
// takes the lookups' items, out the slots.
func (n *dispatchNode) slots(out []dispatchSlot, own *[]dispatchItem) []dispatchSlot {
	skip := -1
	if n.rules > 1 && n.prefix.Bits() > 0 { // everything is inside a /0
		skip = len(out)
		out = append(out, dispatchSlot{skip: n.prefix})
	}
	for _, c := range n.children {
		out = c.slots(out, own)
	}
	if len(n.own) > 0 {
		// Most specific first: a packet for one of them then meets no
		// supernet's table (whose throw would only send it on). Copied:
		// n.own is a part of the items' array.
		start := len(*own)
		*own = append(*own, n.own...)
		lookups := (*own)[start:len(*own):len(*own)]
		slices.SortStableFunc(lookups, func(a, b dispatchItem) int { return b.dst.Bits() - a.dst.Bits() })
		out = append(out, dispatchSlot{lookups: lookups})
	}
	if skip >= 0 {
		out[skip].end = len(out)
	}
	return out
}

// dispatchGate is the most regions the gate lets in: each costs a packet
// that enters the band one compare.
const dispatchGate = 4

// dispatchRules lays out the per-Route rules of one family of the band at
// base: the gate, and the trie from OffsetDispatch to the nop at
// DispatchEnd; previous gives the priorities the trie's slots have now.
func dispatchRules(items []dispatchItem, ipv6 bool, base int, previous Layout) (gate, trie []Rule) {
	first, end := base+OffsetDispatch, base+DispatchEnd
	slices.SortFunc(items, compareItems)
	var slots []dispatchSlot
	// Every item is a lookup of one slot at most.
	own := make([]dispatchItem, 0, len(items))
	for leaf := dispatchLeaf; ; leaf *= 2 {
		slots = buildDispatch(items, leaf).slots(make([]dispatchSlot, 0, len(items)), &own)
		if len(slots) <= end-first || leaf > len(items) {
			break
		}
		own = own[:0]
	}
	prio := slotPriorities(slots, first, end, previous)
	n := 1
	for i := range slots {
		n += slots[i].rules()
	}
	out := make([]Rule, 0, n)
	skips := false
	for i, s := range slots {
		if s.isSkip() {
			skips = true
			r := Rule{Priority: prio[i], IPv6: ipv6, Dst: s.skip, Invert: true, Goto: end, SuppressPrefixlen: -1}
			if s.end < len(slots) {
				r.Goto = prio[s.end]
			}
			out = append(out, r)
			continue
		}
		for _, it := range s.lookups {
			sel, k := selectors(it.dst)
			for _, dst := range sel[:k] {
				out = append(out, Rule{Priority: prio[i], IPv6: ipv6, Dst: dst, Table: it.table, SuppressPrefixlen: -1})
			}
		}
	}
	// The gate's regions come from splitting items as far as it goes (a
	// block of a few rules may span much more address space than they do).
	// Entries for all regions but the last, whose exit is `not to <it>`:
	// a packet outside every region takes one compare per region.
	regions := gateRegions(items)
	if len(regions) > 0 {
		last := len(regions) - 1
		for _, p := range regions[:last] {
			gate = append(gate, Rule{Priority: base + OffsetGate, IPv6: ipv6, Dst: p, Goto: base + OffsetGateLanding, SuppressPrefixlen: -1})
		}
		gate = append(gate, Rule{Priority: base + OffsetGate + 1, IPv6: ipv6, Dst: regions[last], Invert: true, Goto: end, SuppressPrefixlen: -1})
		if last > 0 {
			gate = append(gate, Rule{Priority: base + OffsetGateLanding, IPv6: ipv6, Nop: true, SuppressPrefixlen: -1})
		}
	}
	if skips || len(regions) > 0 {
		out = append(out, Rule{Priority: end, IPv6: ipv6, Nop: true, SuppressPrefixlen: -1})
	}
	return gate, out
}

// gateRegions are at most dispatchGate prefixes that hold every item, as
// little address space as they can: the fewest regions that cover at most
// an eighth more than the best dispatchGate regions can. A region more
// costs every packet outside every Route a compare, so a split that
// removes little or no address space (172.16.0.0/14 of consecutive /24s
// into four /16s) is not made. None when an item is a /0.
func gateRegions(items []dispatchItem) []netip.Prefix {
	var best [dispatchGate + 1]gateCover
	for k := 1; k <= dispatchGate; k++ {
		best[k] = coverWith(items, k)
	}
	k := 1
	for best[k].space > best[dispatchGate].space*9/8 {
		k++
	}
	out := best[k].regions
	for _, p := range out {
		if p.Bits() == 0 {
			return nil
		}
	}
	slices.SortFunc(out, comparePrefix)
	return out
}

// gateCover is a set of regions and the address space they cover.
type gateCover struct {
	space   float64
	regions []netip.Prefix
}

// coverWith is the cover of items by at most k prefixes with the least
// address space: the items' common prefix, or the best split of k between
// its two halves. A prefix that is itself an item cannot be split. Each
// split leaves its halves at most k-1, so the recursion is shallow.
func coverWith(items []dispatchItem, k int) gateCover {
	p, own, lo, hi := split(items)
	best := gateCover{space: math.Ldexp(1, p.Addr().BitLen()-p.Bits()), regions: []netip.Prefix{p}}
	if k < 2 || len(own) > 0 || len(lo) == 0 || len(hi) == 0 {
		return best
	}
	for k1 := 1; k1 < k; k1++ {
		a, b := coverWith(lo, k1), coverWith(hi, k-k1)
		if a.space+b.space < best.space {
			best = gateCover{a.space + b.space, append(slices.Clone(a.regions), b.regions...)}
		}
	}
	return best
}

// slotPriorities gives slot i a priority in [first, end), increasing with
// i. A slot keeps its previous priority when that still fits between its
// neighbours' (with room for the new slots between them); new slots are
// spread evenly over the gap they fall in, which leaves room for later
// ones.
func slotPriorities(slots []dispatchSlot, first, end int, previous Layout) []int {
	n := len(slots)
	prio := make([]int, n)
	kept := make([]bool, n)
	last, lastIdx := first-1, -1
	for i := range slots {
		// Where the first of its rules that was there before sat: a block
		// that gains or loses a rule stays in place.
		p, ok := slots[i].previous(previous)
		// Room for the slots since the last kept one, and for every slot
		// after this one before end.
		if ok && p > last+(i-lastIdx-1) && p < end-(n-1-i) {
			prio[i], kept[i], last, lastIdx = p, true, p, i
		}
	}
	// Fill each run of new slots between kept ones (or the range's ends).
	lo, loIdx := first-1, -1
	for i := 0; i <= n; i++ {
		if i < n && !kept[i] {
			continue
		}
		hi := end
		if i < n {
			hi = prio[i]
		}
		run := i - loIdx - 1
		for j := 1; j <= run; j++ {
			if loIdx < 0 {
				// The first slots start at first: a layout built from
				// nothing reads from the top of the range.
				prio[j-1] = first + (hi-first)*(j-1)/run
			} else {
				prio[loIdx+j] = lo + (hi-lo)*j/(run+1)
			}
		}
		if i < n {
			lo, loIdx = prio[i], i
		}
	}
	return prio
}

// previous is the priority the first of the slot's keys that previous
// holds has there.
func (s *dispatchSlot) previous(previous Layout) (int, bool) {
	if s.isSkip() {
		p, ok := previous[SlotKey{Skip: true, Dst: s.skip}]
		return p, ok
	}
	for _, it := range s.lookups {
		sel, k := selectors(it.dst)
		for _, dst := range sel[:k] {
			if p, ok := previous[SlotKey{Dst: dst, Table: it.table}]; ok {
				return p, true
			}
		}
	}
	return 0, false
}

// selectors are the `to` prefixes of a rule for dst, the first n of sel:
// dst itself, or for a /0 its two halves (OpenVPN's def1). The kernel
// takes a rule given no destination for any rule of the same priority and
// table: it refuses to add one next to `to <prefix>` (EEXIST), and
// deleting one could take the other with it.
func selectors(dst netip.Prefix) (sel [2]netip.Prefix, n int) {
	if dst.Bits() > 0 {
		return [2]netip.Prefix{dst}, 1
	}
	lo, _ := dst.Addr().Prefix(1)
	hi := dst.Addr().AsSlice()
	hi[0] = 0x80
	h, _ := netip.AddrFromSlice(hi)
	return [2]netip.Prefix{lo, netip.PrefixFrom(h, 1)}, 2
}

// SlotKey identifies a slot of the dispatch across plans: a skip by its
// prefix, a lookup by its destination and table (the family is the
// prefix's).
type SlotKey struct {
	Skip  bool
	Dst   netip.Prefix
	Table uint32
}

// Layout is where the dispatch's slots sit: the priority of each.
type Layout map[SlotKey]int

// LayoutOf reads the dispatch's slot identities back from rules (the
// kernel's, or a previous plan's) of the band at base: what Input.Layout
// takes. Only the trie's range counts; the gate's rules sit at fixed
// priorities (its exit looks like a skip).
func LayoutOf(rules []Rule, base int) Layout {
	out := Layout{}
	for _, r := range rules {
		key, ok := slotKeyOf(r, base)
		if !ok {
			continue
		}
		if p, ok := out[key]; !ok || r.Priority < p {
			out[key] = r.Priority
		}
	}
	return out
}

// slotKeyOf is the key of the slot r is a rule of, if r is one of the
// trie's (LayoutOf).
func slotKeyOf(r Rule, base int) (SlotKey, bool) {
	if r.Priority < base+OffsetDispatch || r.Priority >= base+DispatchEnd {
		return SlotKey{}, false
	}
	switch {
	case r.IsSkip():
		return SlotKey{Skip: true, Dst: r.Dst}, true
	case r.Dst.IsValid() && r.Table != MainTable && r.Table != 0:
		return SlotKey{Dst: r.Dst, Table: r.Table}, true
	}
	return SlotKey{}, false
}

// moveLayout makes l, the layout of one family's trie was (LayoutOf, with
// the other family's slots beside), the layout of is: the slots that
// went, or moved, are deleted, then the new and moved ones set. Both are
// tries of dispatchRules, in priority order and each key once; most of a
// new trie's slots keep their priorities, and only the others are looked
// at. It returns how many slots it deleted or set.
func moveLayout(l Layout, was, is []Rule, base int) (moved int) {
	var gone, came []Rule
	byPriority := func(a, b Rule) int { return a.Priority - b.Priority }
	runs.Pair(was, is, byPriority, func(was, is []Rule) {
		for _, r := range was {
			if !slices.Contains(is, r) {
				gone = append(gone, r)
			}
		}
		for _, r := range is {
			if !slices.Contains(was, r) {
				came = append(came, r)
			}
		}
	})
	for _, r := range gone {
		if key, ok := slotKeyOf(r, base); ok && l[key] == r.Priority {
			delete(l, key)
		}
	}
	for _, r := range came {
		if key, ok := slotKeyOf(r, base); ok {
			l[key] = r.Priority
		}
	}
	return len(gone) + len(came)
}

func sameTable(items []dispatchItem) bool {
	for _, it := range items[1:] {
		if it.table != items[0].table {
			return false
		}
	}
	return true
}

// commonPrefix is the longest prefix that holds every item. Items are
// sorted by address, so the first and the last part soonest.
func commonPrefix(items []dispatchItem) netip.Prefix {
	first := items[0].dst.Addr()
	bits := commonBits(first, items[len(items)-1].dst.Addr())
	for _, it := range items {
		bits = min(bits, it.dst.Bits())
	}
	p, _ := first.Prefix(bits)
	return p
}

// commonBits is how many leading bits a and b share.
func commonBits(a, b netip.Addr) int {
	x, y := a.As16(), b.As16()
	hi := binary.BigEndian.Uint64(x[:8]) ^ binary.BigEndian.Uint64(y[:8])
	lo := binary.BigEndian.Uint64(x[8:]) ^ binary.BigEndian.Uint64(y[8:])
	n := bits.LeadingZeros64(hi)
	if hi == 0 {
		n = 64 + bits.LeadingZeros64(lo)
	}
	if a.Is4() {
		return max(n-96, 0)
	}
	return n
}

// bitAt is bit i (0 the most significant) of a.
func bitAt(a netip.Addr, i int) int {
	b := a.AsSlice()
	return int(b[i/8]>>(7-i%8)) & 1
}
