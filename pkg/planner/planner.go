package planner

import (
	"cmp"
	"fmt"
	"hash/fnv"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"maps"
	"net/netip"
	"slices"
	"strings"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
	"github.com/routing-agent/routing-agent/pkg/routespec"
)

// Input is everything a plan depends on.
type Input struct {
	Config Config
	Node   Node
	// Routes are the Routes selected for this node.
	Routes []*v1alpha1.Route
	// Down holds the gateways the prober found dead.
	Down map[netip.Addr]bool
	// Tables are the table ids Routes had so far, by Route name; a Route
	// keeps its id whenever it is still free and in range.
	Tables map[string]uint32
	// Layout is where the dispatch's rules sit now (LayoutOf the kernel's
	// rules or the previous plan's): they stay there when the order allows,
	// so a change rewrites only the rules around it.
	Layout Layout
	// Memo, when set, lets Compute reuse what the previous Compute with the
	// same Memo worked out from the same inputs; the plan is the same.
	Memo *Memo
}

// candidate is a Route on its way through the planner.
type candidate struct {
	route        *v1alpha1.Route
	index        int // position in Input.Routes
	destinations []netip.Prefix
	nexthops     []Nexthop // all gateways, with their links
	// shadowedBy maps a destination to the main-table route that wins over
	// it; conflicts maps one to the older Route that owns it.
	shadowedBy map[netip.Prefix]netip.Prefix
	conflicts  map[netip.Prefix]string
	// stranded are gateways no longer connected to a Route that was
	// applied here (see checkOnNode).
	stranded []netip.Addr
	result   Result
	// inst caches installed(), once conflicts are resolved; throws are the
	// more specific prefixes of other Routes its table hands on.
	inst   []netip.Prefix
	throws []netip.Prefix
	// applicable: the Route passed checkOnNode, so claims its destinations.
	applicable bool
}

// installed are the destinations that go into the Route's table: all but
// those an older Route owns. Shadowed ones stay: they do nothing while the
// main-table route is there, and fail closed the moment it goes.
func (c *candidate) installed() []netip.Prefix {
	if len(c.conflicts) == 0 {
		return c.destinations // read-only, like every part of a plan
	}
	out := make([]netip.Prefix, 0, len(c.destinations))
	for _, d := range c.destinations {
		if _, lost := c.conflicts[d]; !lost {
			out = append(out, d)
		}
	}
	return out
}

// Compute returns the plan for in. It is deterministic: the same input gives
// the same plan, whatever the order of in.Routes.
func Compute(in Input) Plan {
	// One allocation for them all: a thousand Routes are a thousand
	// candidates at every reconcile.
	slab := make([]candidate, len(in.Routes))
	cands := make([]*candidate, len(in.Routes))
	for i, r := range in.Routes {
		slab[i] = candidate{route: r, index: i, result: Result{Name: r.Name, Generation: r.Generation}}
		cands[i] = &slab[i]
	}
	// Oldest first: the older Route wins an equal prefix, and gets first
	// pick of a colliding table id.
	byAge := slices.Clone(cands)
	sortByAge(byAge)

	links := make(map[int]Link, len(in.Node.Links))
	for _, l := range in.Node.Links {
		links[l.Index] = l
	}
	in.Memo.startCompute()
	specs := in.Memo.specs(in.Node)
	for _, c := range byAge {
		_, applied := in.Tables[c.route.Name]
		specs.check(c, in.Node, links, applied)
		c.applicable = c.result.Phase == Applied
	}
	in.Memo.keepSpecs(specs)
	// What the Routes claim (their destinations, in age order) settles
	// which prefixes each loses to an older Route and which it hands on
	// (throws): the Memo keeps that while the claims are the same.
	kept := in.Memo.sameClaims(byAge)
	if kept == nil {
		resolveConflicts(byAge)
	}
	for i, c := range byAge {
		if kept != nil {
			c.conflicts = kept[i].conflicts
		}
		c.judgeDestinations()
		c.inst = c.installed()
	}
	assignTables(byAge, in.Config, in.Tables)

	var plan Plan
	applied := make([]*candidate, 0, len(byAge))
	for _, c := range byAge {
		if c.result.Phase == Applied {
			applied = append(applied, c)
		}
	}
	walk := kept == nil || !gotTables(kept, byAge)
	if !walk {
		for i, c := range byAge {
			c.throws = kept[i].throws
		}
	}
	plan.Routes = tableRoutes(applied, in.Down, walk)
	if walk {
		in.Memo.keepClaims(byAge)
	}
	plan.Gateways = gateways(applied, in.Down)
	plan.Bypass = bypass(in, plan.Gateways)
	plan.Rules = rules(in, applied, plan.Bypass, plan.Gateways)
	plan.ConnMark = connMark(in, plan.Rules, plan.Gateways)
	in.Memo.keepLayout(plan.Rules, in.Config.PriorityBase, in.Layout)
	plan.Results = make([]Result, 0, len(cands))
	for _, c := range cands {
		plan.Results = append(plan.Results, c.result)
	}
	return plan
}

// owners is an empty map sized for the destinations of cands, to map a
// prefix to the index of its candidate.
func owners(cands []*candidate) map[netip.Prefix]int {
	n := 0
	for _, c := range cands {
		n += len(c.destinations)
	}
	return make(map[netip.Prefix]int, n)
}

// sortByAge orders cands oldest first, names breaking ties.
func sortByAge(cands []*candidate) {
	slices.SortFunc(cands, func(a, b *candidate) int {
		if c := a.route.CreationTimestamp.Time.Compare(b.route.CreationTimestamp.Time); c != 0 {
			return c
		}
		return strings.Compare(a.route.Name, b.route.Name)
	})
}

// checkOnNode parses the Route and judges what only this node can judge:
// whether its gateways are on directly connected networks here, and whether
// a main-table route would shadow a destination. wasApplied says the Route
// already holds a table on this node: a gateway that has lost its network
// since (the interface re-created without its addresses yet, a lost lease)
// then strands the Route instead of withdrawing it, so its destinations
// fail closed behind their backstops rather than leave through main.
func checkOnNode(c *candidate, spec parsedSpec, node Node, links map[int]Link, wasApplied bool) {
	invalid := func(reason, format string, args ...any) {
		c.result.Phase, c.result.Reason, c.result.Message = Invalid, reason, fmt.Sprintf(format, args...)
	}
	if len(spec.errs) > 0 {
		invalid(ReasonInvalidSpec, "%v", spec.errs.ToAggregate())
		return
	}
	c.destinations = spec.destinations

	for _, gw := range spec.gateways {
		link, network, local, ok := connectedLink(node, links, gw)
		switch {
		case local:
			invalid(ReasonGatewayIsLocal, "gateway %s is an address of this node", gw)
			return
		case !ok && wasApplied:
			c.stranded = append(c.stranded, gw)
			continue
		case !ok:
			invalid(ReasonGatewayNotConnected, "gateway %s is not on a directly connected network of this node", gw)
			return
		case isNetworkOrBroadcast(gw, network):
			invalid(ReasonGatewayNotUsable, "gateway %s is the network or broadcast address of the connected network %s on %s, not a host that could forward", gw, network, link.Name)
			return
		}
		c.nexthops = append(c.nexthops, Nexthop{Gateway: gw, LinkIndex: link.Index, LinkName: link.Name})
	}
	slices.SortFunc(c.nexthops, func(a, b Nexthop) int { return a.Gateway.Compare(b.Gateway) })

	// A main-table route that holds a destination wins over it (lookup main
	// suppress_prefixlength 0 comes first). That destination is reported,
	// not a reason to withdraw the rest of the Route.
	for _, d := range c.destinations {
		for _, m := range node.MainRoutes {
			if m.Dst.Bits() > 0 && m.Dst.Bits() <= d.Bits() && m.Dst.Contains(d.Addr()) {
				if c.shadowedBy == nil {
					c.shadowedBy = map[netip.Prefix]netip.Prefix{}
				}
				c.shadowedBy[d] = m.Dst
				break
			}
		}
	}
	c.result.Phase, c.result.Reason = Applied, ReasonApplied
	if len(c.stranded) > 0 {
		c.result.Reason = ReasonGatewayNotConnected
		c.result.Message = fmt.Sprintf("gateway %s is no longer on a directly connected network of this node; the Route stays, and destinations with no other gateway fail closed (unreachable) until it is back", c.stranded[0])
	}
}

// parsedSpec is what checkOnNode takes from a Route's spec, which depends
// on the object alone: its validation errors, else its destinations
// (sorted, once each: 1.2.3.4/5 and 0.0.0.0/5 are one) and gateways.
type parsedSpec struct {
	errs         field.ErrorList
	destinations []netip.Prefix
	gateways     []netip.Addr
}

func parseSpec(r *v1alpha1.Route) parsedSpec {
	if errs := routespec.Validate(r); len(errs) > 0 {
		return parsedSpec{errs: errs}
	}
	var s parsedSpec
	s.destinations = make([]netip.Prefix, 0, len(r.Spec.Destinations))
	for _, d := range r.Spec.Destinations {
		p, _ := routespec.ParseDestination(d) // validated above
		s.destinations = append(s.destinations, p)
	}
	slices.SortFunc(s.destinations, comparePrefix)
	s.destinations = slices.Compact(s.destinations)
	for _, g := range r.Spec.Gateways {
		gw, _ := routespec.ParseGateway(g)
		s.gateways = append(s.gateways, gw)
	}
	return s
}

// isNetworkOrBroadcast: an IPv4 network's own address and its broadcast
// address are no host's (the kernel refuses the broadcast one as a next
// hop outright); /31 and /32 networks have neither. IPv6 has no broadcast,
// and its subnet-router anycast address does reach a router.
func isNetworkOrBroadcast(gw netip.Addr, network netip.Prefix) bool {
	if !gw.Is4() || network.Bits() >= 31 {
		return false
	}
	b := network.Masked().Addr().As4()
	first := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	last := first | (uint32(1)<<(32-network.Bits()) - 1)
	g := gw.As4()
	v := uint32(g[0])<<24 | uint32(g[1])<<16 | uint32(g[2])<<8 | uint32(g[3])
	return v == first || v == last
}

// judgeDestinations settles, once conflicts are known, whether the Route
// stands and which of its destinations are not in effect.
func (c *candidate) judgeDestinations() {
	if c.result.Phase != Applied {
		return
	}
	var issues []DestinationIssue
	shadowedInstalled := 0
	for _, d := range c.destinations {
		if winner, lost := c.conflicts[d]; lost {
			issues = append(issues, DestinationIssue{Destination: d, Reason: ReasonEqualPrefix,
				Message: fmt.Sprintf("destination %s is also in Route %q, which is older and wins", d, winner)})
		} else if m, ok := c.shadowedBy[d]; ok {
			shadowedInstalled++
			issues = append(issues, DestinationIssue{Destination: d, Reason: ReasonDestinationShadowed,
				Message: fmt.Sprintf("destination %s lies inside main-table route %s, which takes precedence over every Route (lookup main suppress_prefixlength 0)", d, m)})
		}
	}
	c.result.NotApplied = issues
	installed := len(c.destinations) - len(c.conflicts)
	switch {
	case installed == 0:
		c.result.Phase, c.result.Reason, c.result.Message = Conflict, ReasonEqualPrefix, issues[0].Message
	case shadowedInstalled == installed:
		i := slices.IndexFunc(issues, func(d DestinationIssue) bool { return d.Reason == ReasonDestinationShadowed })
		c.result.Reason = ReasonDestinationShadowed
		c.result.Message = issues[i].Message + "; kept in the Route's table, where it takes over if that route goes"
	case len(issues) > 0:
		c.result.Reason = ReasonDestinationsNotApplied
		c.result.Message = fmt.Sprintf("%d of %d destinations are not in effect here (notAppliedDestinations); the others are", len(issues), len(c.destinations))
	}
}

// connectedLink finds the link (of links, node's by index) whose network
// holds gw, preferring the longest prefix, as the kernel would, and that
// network.
func connectedLink(node Node, links map[int]Link, gw netip.Addr) (link Link, network netip.Prefix, local, ok bool) {
	best := -1
	for _, a := range node.Addresses {
		if a.Prefix.Addr() == gw {
			return Link{}, netip.Prefix{}, true, false
		}
		// A link that is down still counts: its gateways are the prober's
		// to take out of use, and a Route whose gateways are all down must
		// stay installed (fail closed), not vanish and let its traffic leak
		// out of the node's default route.
		l, known := links[a.LinkIndex]
		if !known || !a.Prefix.Masked().Contains(gw) || a.Prefix.Bits() <= best {
			continue
		}
		best, link, network, ok = a.Prefix.Bits(), l, a.Prefix.Masked(), true
	}
	return link, network, false, ok
}

// resolveConflicts gives each prefix claimed by several applicable Routes
// to the oldest; the others lose that destination alone.
func resolveConflicts(byAge []*candidate) {
	owner := owners(byAge)
	for i, c := range byAge {
		if c.result.Phase != Applied {
			continue
		}
		for _, d := range c.destinations {
			if winner, taken := owner[d]; taken {
				if c.conflicts == nil {
					c.conflicts = map[netip.Prefix]string{}
				}
				c.conflicts[d] = byAge[winner].route.Name
				continue
			}
			owner[d] = i
		}
	}
}

// assignTables gives each applied Route a table id: the one it had if that
// is still free and in range, else the first free id from a hash of its
// name, so ids survive restarts and do not move when other Routes change.
func assignTables(byAge []*candidate, cfg Config, previous map[string]uint32) {
	used := map[uint32]bool{}
	for _, c := range byAge {
		if t, ok := previous[c.route.Name]; ok && c.result.Phase == Applied && t >= cfg.TableMin && t <= cfg.TableMax && !used[t] {
			c.result.Table, used[t] = t, true
		}
	}
	size := uint64(cfg.TableMax-cfg.TableMin) + 1
	for _, c := range byAge {
		if c.result.Phase != Applied || c.result.Table != 0 {
			continue
		}
		h := fnv.New32a()
		h.Write([]byte(c.route.Name))
		start := uint64(h.Sum32()) % size
		for i := uint64(0); i < size; i++ {
			if t := cfg.TableMin + uint32((start+i)%size); !used[t] {
				c.result.Table, used[t] = t, true
				break
			}
		}
		if c.result.Table == 0 {
			c.result.Phase, c.result.Reason = Invalid, ReasonNoTableFree
			c.result.Message = fmt.Sprintf("every table id in %d-%d is taken", cfg.TableMin, cfg.TableMax)
		}
	}
}

// tableRoutes lays out each applied Route's table: its destinations through
// its live gateways of the destination's family, and a throw route for every
// more specific prefix of another Route inside one of its destinations
// (walkThrows; without walk, the candidates have theirs already).
func tableRoutes(applied []*candidate, down map[netip.Addr]bool, walk bool) []Route {
	if walk {
		walkThrows(applied)
	}

	// Built in table order, each table's routes sorted on their own: the
	// tables are distinct (assignTables), so the whole is sorted
	// (CompareRoutes orders by table first).
	byTable := slices.Clone(applied)
	slices.SortFunc(byTable, func(a, b *candidate) int { return cmp.Compare(a.result.Table, b.result.Table) })
	n := 0
	for _, c := range applied {
		n += 2*len(c.inst) + len(c.throws)
	}
	var routes []Route
	if n > 0 {
		routes = make([]Route, 0, n)
	}
	for _, c := range byTable {
		first := len(routes)
		// The nexthops of a family, shared by the Route's destinations of
		// that family (read-only, like every Route of a plan).
		var live [2][]Nexthop
		var known [2]bool
		for _, d := range c.inst {
			f := boolIndex(d.Addr().Is6())
			if !known[f] {
				live[f], known[f] = liveNexthops(c, f == 1, down), true
			}
			// A family whose gateways are all stranded has no live route:
			// the backstop alone holds the destination.
			if nhs := live[f]; len(nhs) > 0 {
				routes = append(routes, Route{Table: c.result.Table, Dst: d, Nexthops: nhs})
			}
			routes = append(routes, Route{Table: c.result.Table, Dst: d, Backstop: true})
		}
		for _, e := range c.throws {
			routes = append(routes, Route{Table: c.result.Table, Dst: e, Throw: true})
		}
		// Destinations come sorted (parseSpec); throws are what may not be.
		if len(c.throws) > 0 {
			slices.SortFunc(routes[first:], CompareRoutes)
		}
		if len(c.nexthops) > 0 && c.allDown(down) {
			c.result.Reason = ReasonAllGatewaysDown
			c.result.Message = "every gateway is down; routes stay pointed at them so traffic fails closed instead of leaking through the node's default route"
		}
	}
	return routes
}

// walkThrows gives each applied candidate its throws. After conflict
// resolution every prefix has one owner. A prefix needs a throw route in
// the table of each other Route that owns one of its supernets; walking up
// its at most 128 supernets keeps this linear in the number of
// destinations. Only the lengths some destination has can hold a
// supernet: most nodes' destinations have a few lengths, and most walks
// are short.
func walkThrows(applied []*candidate) {
	owner := owners(applied)
	var lengths [2][129]bool // by family (IPv6 second), prefix length
	for i, c := range applied {
		for _, d := range c.inst {
			owner[d] = i
			lengths[boolIndex(d.Addr().Is6())][d.Bits()] = true
		}
	}
	for i, c := range applied {
		for _, e := range c.inst {
			have := &lengths[boolIndex(e.Addr().Is6())]
			for bits := e.Bits() - 1; bits >= 0; bits-- {
				if !have[bits] {
					continue
				}
				super, _ := e.Addr().Prefix(bits)
				// Two supernets of e may be one Route's: e is then that
				// Route's last throw already (the walk adds e alone).
				if o, ok := owner[super]; ok && o != i {
					if t := applied[o].throws; len(t) == 0 || t[len(t)-1] != e {
						applied[o].throws = append(t, e)
					}
				}
			}
		}
	}
}

// liveNexthops are the Route's gateways of one family that are not down; if
// all of them are down, all of them (fail closed). Most Routes have one
// family, and none or all of their gateways down: the candidate's own
// slice then, read-only like every part of a plan.
func liveNexthops(c *candidate, ipv6 bool, down map[netip.Addr]bool) []Nexthop {
	family := c.nexthops
	if slices.ContainsFunc(family, func(nh Nexthop) bool { return nh.Gateway.Is6() != ipv6 }) {
		family = slices.DeleteFunc(slices.Clone(family), func(nh Nexthop) bool { return nh.Gateway.Is6() != ipv6 })
	}
	dead := 0
	for _, nh := range family {
		if down[nh.Gateway] {
			dead++
		}
	}
	if dead == 0 || dead == len(family) {
		return family
	}
	return slices.DeleteFunc(slices.Clone(family), func(nh Nexthop) bool { return down[nh.Gateway] })
}

func (c *candidate) allDown(down map[netip.Addr]bool) bool {
	for _, nh := range c.nexthops {
		if !down[nh.Gateway] {
			return false
		}
	}
	return true
}

func gateways(applied []*candidate, down map[netip.Addr]bool) []Gateway {
	byAddr := map[netip.Addr]*Gateway{}
	for _, c := range applied {
		for _, nh := range c.nexthops {
			g, ok := byAddr[nh.Gateway]
			if !ok {
				g = &Gateway{Address: nh.Gateway, LinkIndex: nh.LinkIndex, LinkName: nh.LinkName, Down: down[nh.Gateway]}
				byAddr[nh.Gateway] = g
			}
			g.Routes = append(g.Routes, c.route.Name)
		}
	}
	var out []Gateway
	for _, g := range byAddr {
		slices.Sort(g.Routes)
		out = append(out, *g)
	}
	slices.SortFunc(out, func(a, b Gateway) int { return a.Address.Compare(b.Address) })
	return out
}

// bypass lists what must keep using the main table: control plane,
// metadata service, DNS servers, gateways and operator extras, each with
// the sources that asked for it.
func bypass(in Input, gws []Gateway) []Bypass {
	set := map[netip.Prefix]map[string]bool{}
	add := func(p netip.Prefix, source string) {
		if set[p] == nil {
			set[p] = map[string]bool{}
		}
		set[p][source] = true
	}
	addAddr := func(a netip.Addr, source string) {
		if p, ok := BypassPrefix(a); ok {
			add(p, source)
		}
	}
	for _, list := range [][]Endpoint{in.Node.ControlPlane, in.Node.DNSServers} {
		for _, e := range list {
			addAddr(e.Addr, e.Source)
		}
	}
	for _, a := range in.Config.Metadata {
		addAddr(a, SourceMetadata)
	}
	for _, g := range gws {
		addAddr(g.Address, SourceGateway)
	}
	for _, p := range in.Config.ExtraBypass {
		add(p.Masked(), SourceExtra)
	}
	out := make([]Bypass, 0, len(set))
	for p, sources := range set {
		b := Bypass{Prefix: p}
		for s := range sources {
			b.Sources = append(b.Sources, s)
		}
		slices.Sort(b.Sources)
		out = append(out, b)
	}
	slices.SortFunc(out, func(a, b Bypass) int { return comparePrefix(a.Prefix, b.Prefix) })
	return out
}

// BypassPrefix is the prefix of a's bypass rule, or false for an address
// that needs none (loopback, unspecified: never routed).
func BypassPrefix(a netip.Addr) (netip.Prefix, bool) {
	a = a.Unmap().WithZone("")
	if !a.IsValid() || a.IsLoopback() || a.IsUnspecified() {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(a, a.BitLen()), true
}

// rules builds the band, per address family in use by an applied Route:
// the dispatch's gate, bypass, symmetric replies, main's specific routes,
// then the dispatch to the Routes' tables (dispatch.go).
func rules(in Input, applied []*candidate, bypass []Bypass, gws []Gateway) []Rule {
	base := in.Config.PriorityBase
	// Against the last plan's rules, handed out again when they are the
	// same.
	var out ruleBuilder
	if in.Memo != nil {
		out.last = in.Memo.lastRules
	}
	// Where each family's gate and trie are among the rules, [start, end).
	var spans [2]struct{ gate, trie [2]int }
	for _, ipv6 := range []bool{false, true} {
		n := 0
		for _, c := range applied {
			n += len(c.inst)
		}
		items := make([]dispatchItem, 0, n)
		for _, c := range applied {
			for _, d := range c.inst {
				if d.Addr().Is6() == ipv6 {
					items = append(items, dispatchItem{dst: d, table: c.result.Table})
				}
			}
		}
		if len(items) == 0 {
			continue // nothing of this family to protect
		}
		slices.SortFunc(items, compareItems)
		var gate, dispatch []Rule
		if m := in.Memo.dispatchFor(ipv6, base, items, in.Layout); m != nil {
			gate, dispatch = m.gate, m.trie
		} else {
			gate, dispatch = dispatchRules(items, ipv6, base, in.Layout)
			in.Memo.keepDispatch(ipv6, base, items, gate, dispatch)
		}
		f := boolIndex(ipv6)
		spans[f].gate[0] = out.count()
		out.add(gate...)
		spans[f].gate[1] = out.count()
		for _, b := range bypass {
			if b.Prefix.Addr().Is6() == ipv6 {
				out.add(Rule{Priority: base + OffsetBypass, IPv6: ipv6, Dst: b.Prefix, Table: MainTable, SuppressPrefixlen: -1})
			}
		}
		// Replies to connections that came in from outside leave the way
		// they came: marked by the agent's nftables table (ConnMark), they
		// go back to main by fwmark, DNATed ones to pods included.
		out.add(sourceRules(in, ipv6, gws)...)
		if in.Config.ConnMark != 0 {
			out.add(Rule{Priority: base + OffsetSymmetric, IPv6: ipv6, Mark: in.Config.ConnMark, Mask: in.Config.ConnMark, Table: MainTable, SuppressPrefixlen: -1})
		}
		out.add(Rule{Priority: base + OffsetSuppress, IPv6: ipv6, Table: MainTable, SuppressPrefixlen: 0})
		spans[f].trie[0] = out.count()
		out.add(dispatch...)
		spans[f].trie[1] = out.count()
	}
	rules := out.rules()
	if in.Memo != nil {
		in.Memo.lastRules = rules
		// The Memo keeps each dispatch as a part of the plan's rules,
		// which it keeps anyway, not as a second copy.
		for f, sp := range spans {
			if d := in.Memo.dispatch[f]; d != nil && sp.trie[1] > 0 {
				d.gate, d.trie = rules[sp.gate[0]:sp.gate[1]:sp.gate[1]], rules[sp.trie[0]:sp.trie[1]:sp.trie[1]]
			}
		}
	}
	return rules
}

// sourceRules complement the marks (a fallback for traffic conntrack does
// not track, and the only symmetric rule with marking off) with `from
// <address> lookup main` for the global addresses of the default route's
// interface. Never for an IPv4 address whose subnet holds a Route's
// gateway: the kernel picks that address as the source of new connections
// to the gateway's side, and the rule would undo the Route (a single NIC
// with a public and a VPC address). IPv6 chooses its source without regard
// to the gateway's subnet (a link-local or ULA gateway), so there a gateway
// anywhere behind the interface rules them all out. And over IPv6 none while
// the marks are on: when a Route's table holds only its backstops, the
// kernel retries an unbound socket's lookup with a source address it picked
// (ip6_dst_lookup_tail), and this rule would send that traffic out of the
// node's own uplink.
func sourceRules(in Input, ipv6 bool, gws []Gateway) []Rule {
	if ipv6 && in.Config.ConnMark != 0 {
		return nil
	}
	link, ok := defaultLink(in.Node, ipv6)
	if !ok {
		return nil
	}
	var out []Rule
	for _, a := range in.Node.Addresses {
		addr := a.Prefix.Addr()
		if a.LinkIndex != link || addr.Is6() != ipv6 || !addr.IsGlobalUnicast() {
			continue
		}
		holdsGateway := false
		for _, g := range gws {
			holdsGateway = holdsGateway || a.Prefix.Masked().Contains(g.Address) || ipv6 && g.Address.Is6() && g.LinkIndex == link
		}
		if !holdsGateway {
			out = append(out, Rule{Priority: in.Config.PriorityBase + OffsetSymmetric, IPv6: ipv6, Src: netip.PrefixFrom(addr, addr.BitLen()), Table: MainTable, SuppressPrefixlen: -1})
		}
	}
	return out
}

// connMark is the nftables part of the plan: with marking on and a band in
// use, new connections arriving on any interface but loopback and those
// only Routes send through (a gateway's link that is not also the default
// route's) are marked. Pods' own interfaces are marked too: that only sends
// the replies of pod-originated connections back to the pod through main,
// where the pod's route is anyway, and keeps the table the same size however
// many pods come and go.
func connMark(in Input, rules []Rule, gws []Gateway) *ConnMark {
	if in.Config.ConnMark == 0 || len(rules) == 0 {
		return nil
	}
	defaults := map[int]bool{}
	for _, ipv6 := range []bool{false, true} {
		if link, ok := defaultLink(in.Node, ipv6); ok {
			defaults[link] = true
		}
	}
	exclude := map[string]bool{"lo": true}
	for _, g := range gws {
		if !defaults[g.LinkIndex] && g.LinkName != "" {
			exclude[g.LinkName] = true
		}
	}
	return &ConnMark{Mark: in.Config.ConnMark, Exclude: slices.Sorted(maps.Keys(exclude))}
}

// defaultLink is the link of the main table's preferred default route.
func defaultLink(node Node, ipv6 bool) (int, bool) {
	best := -1
	link := 0
	for _, m := range node.MainRoutes {
		if m.Dst.Bits() == 0 && m.Dst.Addr().Is6() == ipv6 && (best < 0 || m.Metric < best) {
			best, link = m.Metric, m.LinkIndex
		}
	}
	return link, best >= 0
}

// CompareRoutes orders routes by table, then destination (a supernet
// before the prefixes inside it), then a live or throw route before its
// backstop: the order plans list them in, and the applier removes them in.
func CompareRoutes(a, b Route) int {
	return cmp.Or(cmp.Compare(a.Table, b.Table), comparePrefix(a.Dst, b.Dst), compareBool(a.Backstop, b.Backstop))
}

func boolIndex(b bool) int {
	if b {
		return 1
	}
	return 0
}

func compareBool(a, b bool) int {
	switch {
	case a == b:
		return 0
	case b:
		return -1
	}
	return 1
}

func comparePrefix(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}
