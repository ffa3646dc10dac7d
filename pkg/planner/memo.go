package planner

import (
	"maps"
	"slices"
)

// Memo carries, from one Compute to the next, the dispatch of each family
// (dispatch.go): laying out the trie is most of the work of planning many
// Routes, and most changes (a gateway edited, a gateway down, a node
// label) leave the Routes' destinations and tables as they were. A
// dispatch is reused only when its destinations, its band and the layout
// it starts from are the ones it was computed from: the plan is the same
// with a Memo as without (TestMemoChangesNothing). Not safe for concurrent
// use; the agent's single reconcile loop keeps one.
type Memo struct {
	dispatch [2]*dispatchMemo // IPv4, IPv6
	// layout is LayoutOf the last plan's rules: what the next Compute's
	// Input.Layout is when it starts from that plan.
	layout Layout
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
	if d == nil || d.base != base || !slices.Equal(d.items, items) || !maps.Equal(layout, m.layout) {
		return nil
	}
	return d
}

func (m *Memo) keepDispatch(ipv6 bool, base int, items []dispatchItem, gate, trie []Rule) {
	if m == nil {
		return
	}
	m.dispatch[boolIndex(ipv6)] = &dispatchMemo{base: base, items: slices.Clone(items), gate: gate, trie: trie}
}

// keepLayout records the layout of a plan's rules; a family the plan has
// no dispatch for forgets its kept one.
func (m *Memo) keepLayout(rules []Rule, base int) {
	if m == nil {
		return
	}
	m.layout = LayoutOf(rules, base)
	var has [2]bool
	for _, r := range rules {
		has[boolIndex(r.IPv6)] = true
	}
	for f := range m.dispatch {
		if !has[f] {
			m.dispatch[f] = nil
		}
	}
}
