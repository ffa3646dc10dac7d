package applier

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/routing-agent/routing-agent/pkg/nlutil"
	"github.com/routing-agent/routing-agent/pkg/planner"
)

// State is what the agent owns in the kernel, plus the foreign rules that
// sit in its band.
type State struct {
	// Rules are the agent's rules, keyed by ruleKey; more than one rule
	// under a key are duplicates.
	Rules map[string][]planner.Rule
	// Routes are the agent's routes, by table, destination and kind.
	Routes map[routeKey]planner.Route
	// metrics are the installed routes' metrics, which deleting one names
	// so that it removes that route and not its backstop (or the reverse).
	metrics map[routeKey]int
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

// Read lists the kernel's rules and routes and keeps what the agent owns:
// its protocol number, inside its rule band or table range.
func (a *Applier) Read() (*State, error) {
	st := &State{Rules: map[string][]planner.Rule{}, Routes: map[routeKey]planner.Route{}, metrics: map[routeKey]int{}}
	if err := a.readRules(st); err != nil {
		return nil, err
	}
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		filter := &netlink.Route{Table: unix.RT_TABLE_UNSPEC, Protocol: netlink.RouteProtocol(a.cfg.Protocol)}
		if err := a.readRoutes(a.h, st, family, filter); err != nil {
			return nil, err
		}
	}
	return st, nil
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
			key := a.ruleKey(pr)
			st.Rules[key] = append(st.Rules[key], pr)
		}
	}
	slices.Sort(st.Foreign)
	slices.Sort(st.MarkUsers)
	return nil
}

// readRoutes adds to st the agent's routes of family that a dump through h
// with filter lists (its table and protocol).
func (a *Applier) readRoutes(h *netlink.Handle, st *State, family int, filter *netlink.Route) error {
	routes, err := nlutil.RetryDump(func() ([]netlink.Route, error) {
		return h.RouteListFiltered(family, filter, netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PROTOCOL)
	})
	if family == netlink.FAMILY_V6 && nlutil.NoIPv6(err) {
		return nil // booted with ipv6.disable=1
	}
	if err != nil {
		return fmt.Errorf("listing routes: %w", err)
	}
	for _, r := range routes {
		if uint32(r.Table) < a.cfg.TableMin || uint32(r.Table) > a.cfg.TableMax {
			continue
		}
		pr := a.fromNetlinkRoute(r, family)
		st.Routes[keyOf(pr)] = pr
		st.metrics[keyOf(pr)] = r.Priority
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

// ruleKey identifies a rule by everything the kernel compares: its family
// and its ip rule rendering.
func (a *Applier) ruleKey(r planner.Rule) string {
	family := "-4 "
	if r.IPv6 {
		family = "-6 "
	}
	return family + r.Batch(a.cfg.Protocol)
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
	// A skip is `not to <region> goto <priority>`, nothing else.
	skipShape := !skip || r.Invert && r.Dst != nil && r.Src == nil && !marked && r.SuppressPrefixlen < 0
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

// Route returns the agent's installed live (or throw) route for dst in
// table, if any.
func (s *State) Route(table uint32, dst netip.Prefix) (planner.Route, bool) {
	r, ok := s.Routes[routeKey{table, dst, false}]
	return r, ok
}

// NewState returns a State holding routes, for tests of code that reads
// one.
func NewState(routes ...planner.Route) *State {
	st := &State{Rules: map[string][]planner.Rule{}, Routes: map[routeKey]planner.Route{}, metrics: map[routeKey]int{}}
	for _, r := range routes {
		st.Routes[keyOf(r)] = r
	}
	return st
}
