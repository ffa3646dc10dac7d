package planner

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Kernel nexthop objects (Linux >= 5.3). On a kernel that has them the
// applier does not write a Route's gateways into each of its routes: it
// keeps one nexthop object per (gateway, link) and one multipath group per
// Route table and family, whose members are the table's live gateways, and
// points every live route of the table at the group (`nhid`). A gateway
// going down or coming back is then one group replace, however many
// destinations the Route has. Backstops and throws have no nexthop and stay
// as they are.
//
// Nexthop ids are global in a network namespace. The agent owns the ids
// [NexthopIDBase(protocol), NexthopIDBase(protocol)+NexthopIDSpan) of the
// objects that also carry its protocol number, and never touches others:
// with the default protocol 245 that is 4110417920-4127195135. Gateway
// objects take the first free ids of the range; a table's group has a
// fixed id (GroupID), so a restarted agent finds it again.
const (
	NexthopIDSpan = 1 << 24
	// nexthopGroupOffset: ids below it (after the base) are gateways.
	nexthopGroupOffset = 1 << 16
)

// NexthopIDBase is the first nexthop id of the agent's range for protocol.
func NexthopIDBase(protocol uint8) uint32 { return uint32(protocol) << 24 }

// OwnsNexthopID says whether id is in the agent's range for protocol.
func OwnsNexthopID(protocol uint8, id uint32) bool {
	base := NexthopIDBase(protocol)
	return id >= base && id-base < NexthopIDSpan
}

// IsGroupID says whether id, in the agent's range, is a table's group.
func IsGroupID(protocol uint8, id uint32) bool {
	return OwnsNexthopID(protocol, id) && id-NexthopIDBase(protocol) >= nexthopGroupOffset
}

// GatewayIDs is the range [first, end) of gateway object ids.
func GatewayIDs(protocol uint8) (first, end uint32) {
	base := NexthopIDBase(protocol)
	return base + 1, base + nexthopGroupOffset
}

// GroupID is the id of the group of table's routes of one family; ok is
// false for a table beyond what the range holds (above ~8.3 million),
// whose routes then name their gateways themselves.
func GroupID(protocol uint8, table uint32, ipv6 bool) (uint32, bool) {
	off := uint64(table) * 2
	if ipv6 {
		off++
	}
	if off >= NexthopIDSpan-nexthopGroupOffset {
		return 0, false
	}
	return NexthopIDBase(protocol) + nexthopGroupOffset + uint32(off), true
}

// GroupTable is the table and family whose group id is; ok is false for
// an id that is no table's group.
func GroupTable(protocol uint8, id uint32) (table uint32, ipv6, ok bool) {
	if !IsGroupID(protocol, id) {
		return 0, false, false
	}
	off := id - NexthopIDBase(protocol) - nexthopGroupOffset
	return off / 2, off%2 == 1, true
}

// NexthopObject is one of the agent's kernel nexthop objects: a gateway on
// a link, or a group of gateway objects.
type NexthopObject struct {
	ID        uint32
	Gateway   netip.Addr
	LinkIndex int
	LinkName  string
	Group     []uint32
}

// Batch renders the object as an `ip -batch` line.
func (n NexthopObject) Batch(protocol uint8) string {
	if len(n.Group) > 0 {
		ids := make([]string, len(n.Group))
		for i, id := range n.Group {
			ids[i] = fmt.Sprint(id)
		}
		return fmt.Sprintf("nexthop replace id %d group %s protocol %d", n.ID, strings.Join(ids, "/"), protocol)
	}
	return fmt.Sprintf("nexthop replace id %d via %s dev %s protocol %d", n.ID, n.Gateway, n.LinkName, protocol)
}

// BatchNHID renders the route as an `ip -batch` line that uses the nexthop
// object nhid instead of naming its gateways.
func (r Route) BatchNHID(protocol uint8, nhid uint32) string {
	return fmt.Sprintf("route replace %s table %d proto %d nhid %d", r.Dst, r.Table, protocol, nhid)
}

// TableFamily names a table's routes of one family.
type TableFamily struct {
	Table uint32
	IPv6  bool
}

// NexthopLayout is how the plan's routes use nexthop objects when the
// kernel has them and none of the agent's exist yet (a running agent keeps
// the gateway ids it finds).
type NexthopLayout struct {
	// Objects are the gateways (first) and groups to create, the groups
	// in the order of their table and family.
	Objects []NexthopObject
}

// Groups is the group of each table and family whose live routes all go
// through the same gateways: the layout's groups, by what their id says.
func (l NexthopLayout) Groups(protocol uint8) map[TableFamily]uint32 {
	out := map[TableFamily]uint32{}
	for _, o := range l.Objects {
		if table, ipv6, ok := GroupTable(protocol, o.ID); ok && len(o.Group) > 0 {
			out[TableFamily{table, ipv6}] = o.ID
		}
	}
	return out
}

// Nexthops lays the plan's live routes out on nexthop objects.
func (p Plan) Nexthops(protocol uint8) NexthopLayout {
	type gwKey struct {
		addr netip.Addr
		link int
	}
	gws := map[gwKey]Nexthop{}
	// The live routes of one table and family are adjacent in p.Routes
	// (sorted by table, then destination: IPv4 before IPv6), and the
	// tables come in order: one pass finds each table family's gateways,
	// in order, with no map.
	type family struct {
		tf      TableFamily
		members []Nexthop
		mixed   bool
	}
	var families []family
	for _, r := range p.Routes {
		if r.Throw || r.Backstop || len(r.Nexthops) == 0 {
			continue
		}
		tf := TableFamily{r.Table, r.Dst.Addr().Is6()}
		if n := len(families); n > 0 && families[n-1].tf == tf {
			if !SameNexthops(families[n-1].members, r.Nexthops) {
				families[n-1].mixed = true
			}
			continue
		}
		// Most tables have the gateways of the table before.
		if n := len(families); n == 0 || !SameNexthops(families[n-1].members, r.Nexthops) {
			for _, nh := range r.Nexthops {
				gws[gwKey{nh.Gateway, nh.LinkIndex}] = nh
			}
		}
		families = append(families, family{tf: tf, members: r.Nexthops})
	}
	if !slices.IsSortedFunc(families, func(a, b family) int { return compareTableFamily(a.tf, b.tf) }) {
		// Not a plan's routes (sorted by CompareRoutes): sort them, and
		// make each table family's runs one.
		slices.SortStableFunc(families, func(a, b family) int { return compareTableFamily(a.tf, b.tf) })
		merged := families[:1]
		for _, f := range families[1:] {
			last := &merged[len(merged)-1]
			if f.tf != last.tf {
				merged = append(merged, f)
				continue
			}
			last.mixed = last.mixed || f.mixed || !SameNexthops(last.members, f.members)
		}
		families = merged
	}
	// Every gateway of the applied Routes has its object, down or not: a
	// gateway coming back is then one write, its group's.
	for _, g := range p.Gateways {
		if _, ok := gws[gwKey{g.Address, g.LinkIndex}]; !ok {
			gws[gwKey{g.Address, g.LinkIndex}] = Nexthop{Gateway: g.Address, LinkIndex: g.LinkIndex, LinkName: g.LinkName}
		}
	}
	keys := make([]gwKey, 0, len(gws))
	for k := range gws {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b gwKey) int {
		if c := a.addr.Compare(b.addr); c != 0 {
			return c
		}
		return a.link - b.link
	})
	out := NexthopLayout{Objects: make([]NexthopObject, 0, len(keys)+len(families))}
	ids := make(map[gwKey]uint32, len(keys))
	next, _ := GatewayIDs(protocol)
	for _, k := range keys {
		ids[k] = next
		out.Objects = append(out.Objects, NexthopObject{ID: next, Gateway: k.addr, LinkIndex: k.link, LinkName: gws[k].LinkName})
		next++
	}
	// The groups' members, in one allocation.
	n := 0
	for _, f := range families {
		n += len(f.members)
	}
	members := make([]uint32, 0, n)
	for _, f := range families {
		gid, ok := GroupID(protocol, f.tf.Table, f.tf.IPv6)
		if !ok || f.mixed {
			continue
		}
		g := NexthopObject{ID: gid, Group: members[len(members) : len(members) : len(members)+len(f.members)]}
		members = members[:len(members)+len(f.members)]
		for _, nh := range f.members {
			g.Group = append(g.Group, ids[gwKey{nh.Gateway, nh.LinkIndex}])
		}
		out.Objects = append(out.Objects, g)
	}
	return out
}

func compareTableFamily(a, b TableFamily) int {
	if a.Table != b.Table {
		return cmp.Compare(a.Table, b.Table)
	}
	return compareBool(a.IPv6, b.IPv6)
}

// SameNexthops says whether a and b name the same gateways on the same
// links, in the same order.
func SameNexthops(a, b []Nexthop) bool {
	return slices.EqualFunc(a, b, func(x, y Nexthop) bool { return x.Gateway == y.Gateway && x.LinkIndex == y.LinkIndex })
}

// CommandsWithNexthops renders the plan as Commands does, for a kernel
// with nexthop objects (what the applier installs there): the nexthop
// objects first, then the rules, then the routes, live ones through their
// table's group.
func (p Plan) CommandsWithNexthops(protocol uint8) []string {
	layout := p.Nexthops(protocol)
	groups := layout.Groups(protocol)
	var out []string
	for _, n := range layout.Objects {
		out = append(out, "ip "+n.Batch(protocol))
	}
	for _, r := range p.Rules {
		out = append(out, "ip "+familyFlag(r.IPv6)+" "+r.Batch(protocol))
	}
	for _, r := range p.Routes {
		line := r.Batch(protocol)
		if gid, ok := groups[TableFamily{r.Table, r.Dst.Addr().Is6()}]; ok && !r.Throw && !r.Backstop {
			line = r.BatchNHID(protocol, gid)
		}
		out = append(out, "ip "+familyFlag(r.Dst.Addr().Is6())+" "+line)
	}
	return out
}
