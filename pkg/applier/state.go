package applier

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/routing-agent/routing-agent/pkg/nlbatch"
	"github.com/routing-agent/routing-agent/pkg/nlutil"
	"github.com/routing-agent/routing-agent/pkg/planner"
)

// State is what the agent owns in the kernel, plus the foreign rules that
// sit in its band.
type State struct {
	// Rules are the agent's rules, by what the kernel compares; more than
	// one rule under a key are duplicates.
	Rules map[ruleKey][]planner.Rule
	// Routes are the agent's routes, by table, destination and kind.
	Routes map[routeKey]planner.Route
	// attrs are what else the kernel says of each route: its metric, which
	// deleting one names so that it removes that route and not its
	// backstop (or the reverse), and the nexthop object it uses (0: it
	// names its gateways). One map for both: it is per route.
	attrs map[routeKey]routeAttrs
	// Foreign rules in the band, as `ip rule` would show them.
	Foreign []string
	// MarkUsers are rules of others, anywhere, that match a fwmark bit of
	// the agent's connection mark: another component using the bit.
	MarkUsers []string
}

// routeKey identifies one of the agent's routes: a destination of a table
// has a live (or throw) route and, behind it, a backstop.
type routeKey struct {
	Table    uint32
	Dst      netip.Prefix
	Backstop bool
}

func keyOf(r planner.Route) routeKey { return routeKey{r.Table, r.Dst, r.Backstop} }

type routeAttrs struct {
	metric int
	nhid   uint32
}

// Read lists the kernel's rules and routes and keeps what the agent owns:
// its protocol number, inside its rule band or table range.
func (a *Applier) Read() (*State, error) {
	nhs, err := a.readNexthops()
	if err != nil {
		return nil, err
	}
	return a.read(nhs)
}

// read is Read with the routes' nexthop objects resolved through nhs (see
// readNexthops).
func (a *Applier) read(nhs map[uint32]nlbatch.NexthopObject) (*State, error) {
	st := newState()
	if err := a.readRules(st); err != nil {
		return nil, err
	}
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		if err := a.readRoutes(a.h, st, family, 0, nhs); err != nil {
			return nil, err
		}
	}
	return st, nil
}

func newState() *State {
	return &State{Rules: map[ruleKey][]planner.Rule{}, Routes: map[routeKey]planner.Route{}, attrs: map[routeKey]routeAttrs{}}
}

// readRules fills st's rules, foreign rules and mark users from a dump of
// every rule of both families.
func (a *Applier) readRules(st *State) error {
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rules, err := nlutil.RetryDump(func() ([]netlink.Rule, error) { return a.h.RuleList(family) })
		if family == netlink.FAMILY_V6 && nlutil.NoIPv6(err) {
			break // booted with ipv6.disable=1: nothing of IPv6 to own
		}
		if err != nil {
			return fmt.Errorf("listing ip rules: %w", err)
		}
		for _, r := range rules {
			pr, plain := fromNetlinkRule(r, family == netlink.FAMILY_V6)
			inBand := r.Priority >= a.cfg.PriorityBase && r.Priority < a.cfg.PriorityBase+planner.BandWidth
			// The agent's own protocol is never a collision, in its band
			// or in one it is moving away from.
			if mask := ruleMarkMask(r); a.cfg.ConnMark != 0 && mask&a.cfg.ConnMark != 0 && r.Protocol != a.cfg.Protocol {
				text := describeForeign(pr, r.Protocol, plain)
				if !plain { // a plain rule's rendering already shows its fwmark
					text += fmt.Sprintf(" fwmark %#x/%#x", r.Mark, mask)
				}
				st.MarkUsers = append(st.MarkUsers, text)
			}
			if !inBand {
				continue
			}
			if r.Protocol != a.cfg.Protocol || !plain {
				st.Foreign = append(st.Foreign, describeForeign(pr, r.Protocol, plain))
				continue
			}
			key := keyOfRule(pr)
			st.Rules[key] = append(st.Rules[key], pr)
		}
	}
	slices.Sort(st.Foreign)
	slices.Sort(st.MarkUsers)
	return nil
}

// readRoutes adds to st the agent's routes of family in table (0: every
// table of its range), each with its metric and the nexthop object it
// uses, resolved through nhs. Without a socket of its own (SetNamespace)
// the Applier dumps through h, which for one table must have strict
// checking on, or the kernel sends every table.
func (a *Applier) readRoutes(h *netlink.Handle, st *State, family int, table uint32, nhs map[uint32]nlbatch.NexthopObject) error {
	routes, err := a.listRoutes(h, family, table, nhs)
	if family == netlink.FAMILY_V6 && nlutil.NoIPv6(err) {
		return nil // booted with ipv6.disable=1
	}
	if err != nil {
		return fmt.Errorf("listing routes: %w", err)
	}
	if len(st.Routes) == 0 && len(routes) > 0 {
		// Sized at once: a map grown route by route ends up to twice as
		// large as it needs, and the view keeps this one.
		st.Routes, st.attrs = make(map[routeKey]planner.Route, len(routes)), make(map[routeKey]routeAttrs, len(routes))
	}
	for _, r := range routes {
		if r.route.Table < a.cfg.TableMin || r.route.Table > a.cfg.TableMax || table != 0 && r.route.Table != table {
			continue
		}
		key := keyOf(r.route)
		st.Routes[key] = r.route
		st.attrs[key] = routeAttrs{metric: r.metric, nhid: r.nhid}
	}
	return nil
}

// ruleMarkMask is the fwmark bits a rule matches: its mask (the kernel
// reports 0xffffffff for a mark given without one; nil is for safety).
func ruleMarkMask(r netlink.Rule) uint32 {
	if r.Mask != nil {
		return *r.Mask
	}
	if r.Mark != 0 {
		return 0xffffffff
	}
	return 0
}

// ruleKey identifies a rule by everything the kernel compares, what its
// `ip rule` rendering shows: a rule with the fields that rendering leaves
// out zeroed.
type ruleKey planner.Rule

func keyOfRule(r planner.Rule) ruleKey {
	if r.Mask == 0 {
		r.Mark = 0
	}
	if r.IsSkip() || r.Nop {
		r.Table, r.SuppressPrefixlen = 0, -1
		r.Nop = !r.IsSkip()
	}
	if r.SuppressPrefixlen < 0 {
		r.SuppressPrefixlen = -1
	}
	return ruleKey(r)
}

// text is the rule as `ip -batch` takes it, with the family.
func (k ruleKey) text(protocol uint8) string {
	family := "-4 "
	if k.IPv6 {
		family = "-6 "
	}
	return family + planner.Rule(k).Batch(protocol)
}

// fromNetlinkRule converts a rule of the band into the planner's terms; ok
// is false for a rule the planner could never produce (it has selectors or
// actions the agent does not use), which is then foreign whatever its
// protocol says.
func fromNetlinkRule(r netlink.Rule, ipv6 bool) (planner.Rule, bool) {
	pr := planner.Rule{Priority: r.Priority, IPv6: ipv6, Table: uint32(r.Table), SuppressPrefixlen: r.SuppressPrefixlen, Invert: r.Invert}
	// The library fills Goto only from FRA_GOTO, which only a jump has.
	skip := r.Goto > 0
	if skip {
		pr.Goto, pr.Table = r.Goto, 0
	}
	// The library does not report a rule's action; the agent's rules with
	// no table and no goto are its nop (the kernel refuses a lookup of
	// table 0).
	if !skip && r.Table == 0 {
		pr.Nop = true
	}
	if r.Src != nil {
		pr.Src = nlutil.Prefix(r.Src, ipv6)
	}
	if r.Dst != nil {
		pr.Dst = nlutil.Prefix(r.Dst, ipv6)
	}
	// fwmark with a mask is the agent's symmetric-replies rule (the kernel
	// reports the mask of every fwmark rule, 0xffffffff when none was given).
	marked := r.Mask != nil && *r.Mask != 0
	if marked {
		pr.Mark, pr.Mask = r.Mark, *r.Mask
	}
	// A jump is a skip, `not to <region> goto <priority>`, or one of the
	// gate's: `to <region> goto <priority>`, `goto <priority>`; nothing else.
	skipShape := !skip || r.Src == nil && !marked && r.SuppressPrefixlen < 0 && (r.Dst != nil || !r.Invert)
	plain := (r.Mark == 0 && r.Mask == nil || marked) && r.Tos == 0 && (r.Goto <= 0 || skip) && r.IifName == "" && r.OifName == "" &&
		(r.Invert == false || skip) && skipShape && r.Dport == nil && r.Sport == nil && r.IPProto == 0 && r.UIDRange == nil &&
		(r.Type == 0 || r.Type == unix.RTN_UNICAST) && r.SuppressIfgroup <= 0 && r.Flow <= 0
	return pr, plain
}

func (a *Applier) fromNetlinkRoute(r netlink.Route, family int) planner.Route {
	pr := planner.Route{Table: uint32(r.Table), Dst: nlutil.Prefix(r.Dst, family == netlink.FAMILY_V6), Throw: r.Type == unix.RTN_THROW,
		Backstop: r.Type == unix.RTN_UNREACHABLE && uint32(r.Priority) == planner.BackstopMetric}
	add := func(gw net.IP, link int) {
		pr.Nexthops = append(pr.Nexthops, planner.Nexthop{Gateway: nlutil.Addr(gw), LinkIndex: link})
	}
	if r.Gw != nil {
		add(r.Gw, r.LinkIndex)
	}
	for _, nh := range r.MultiPath {
		add(nh.Gw, nh.LinkIndex)
	}
	slices.SortFunc(pr.Nexthops, func(a, b planner.Nexthop) int { return a.Gateway.Compare(b.Gateway) })
	return pr
}

// describeForeign renders a rule the agent does not own the way ip rule
// takes it, for status and logs.
func describeForeign(r planner.Rule, protocol uint8, plain bool) string {
	family := "-4"
	if r.IPv6 {
		family = "-6"
	}
	text := fmt.Sprintf("ip %s %s", family, strings.TrimPrefix(r.Batch(protocol), "rule add "))
	if !plain {
		text += " (and selectors or actions the agent never uses)"
	}
	return text
}

// Layout is where the dispatch's rules of the band at base sit in the
// kernel, for planner.Input.Layout.
func (s *State) Layout(base int) planner.Layout {
	var rules []planner.Rule
	for _, rs := range s.Rules {
		rules = append(rules, rs...)
	}
	return planner.LayoutOf(rules, base)
}

// Route returns the agent's installed live (or throw) route for dst in
// table, if any.
func (s *State) Route(table uint32, dst netip.Prefix) (planner.Route, bool) {
	r, ok := s.Routes[routeKey{table, dst, false}]
	return r, ok
}

// NewState returns a State holding routes, for tests of code that reads
// one.
func NewState(routes ...planner.Route) *State {
	st := newState()
	for _, r := range routes {
		st.Routes[keyOf(r)] = r
	}
	return st
}
