package planner

import (
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
)

func TestNexthopIDs(t *testing.T) {
	base := NexthopIDBase(245)
	if base != 4110417920 {
		t.Errorf("base %d", base)
	}
	first, end := GatewayIDs(245)
	for _, tc := range []struct {
		table uint32
		ipv6  bool
	}{{10000, false}, {10000, true}, {49999, true}, {1, false}} {
		id, ok := GroupID(245, tc.table, tc.ipv6)
		if !ok || id < end || !OwnsNexthopID(245, id) || !IsGroupID(245, id) {
			t.Errorf("GroupID(%d, %v) = %d, %v", tc.table, tc.ipv6, id, ok)
		}
		if table, ipv6, ok := GroupTable(245, id); !ok || table != tc.table || ipv6 != tc.ipv6 {
			t.Errorf("GroupTable(%d) = %d, %v, %v", id, table, ipv6, ok)
		}
	}
	if _, ok := GroupID(245, 1<<30, false); ok {
		t.Error("a table beyond the range has a group id")
	}
	if first <= base || IsGroupID(245, first) || OwnsNexthopID(245, base+NexthopIDSpan) || OwnsNexthopID(246, first) {
		t.Error("gateway ids")
	}
	// Protocols have ranges of their own.
	if a, _ := GroupID(245, 10000, false); OwnsNexthopID(246, a) {
		t.Error("protocol 246 owns protocol 245's group")
	}
}

func TestNexthopLayout(t *testing.T) {
	gw3, gw4 := Nexthop{Gateway: netip.MustParseAddr("10.114.0.3"), LinkIndex: 3, LinkName: "vpc0"}, Nexthop{Gateway: netip.MustParseAddr("10.114.0.4"), LinkIndex: 3, LinkName: "vpc0"}
	gw6 := Nexthop{Gateway: netip.MustParseAddr("fd00:114::3"), LinkIndex: 3, LinkName: "vpc0"}
	p := netip.MustParsePrefix
	plan := Plan{
		Routes: []Route{
			{Table: 100, Dst: p("198.51.100.0/24"), Nexthops: []Nexthop{gw3}}, // gw4 down
			{Table: 100, Dst: p("198.51.100.0/24"), Backstop: true},
			{Table: 100, Dst: p("198.51.100.7/32"), Throw: true},
			{Table: 100, Dst: p("2001:db8::/32"), Nexthops: []Nexthop{gw6}},
			{Table: 101, Dst: p("192.0.2.0/24"), Nexthops: []Nexthop{gw3, gw4}},
			{Table: 102, Dst: p("192.0.2.0/25"), Nexthops: []Nexthop{gw3}},
			{Table: 102, Dst: p("192.0.2.128/25"), Nexthops: []Nexthop{gw4}}, // not one set: no group
		},
		Gateways: []Gateway{{Address: gw3.Gateway, LinkIndex: 3, LinkName: "vpc0"}, {Address: gw4.Gateway, LinkIndex: 3, LinkName: "vpc0", Down: true}, {Address: gw6.Gateway, LinkIndex: 3, LinkName: "vpc0"}},
	}
	l := plan.Nexthops(245)
	first, _ := GatewayIDs(245)
	g100, _ := GroupID(245, 100, false)
	g100v6, _ := GroupID(245, 100, true)
	g101, _ := GroupID(245, 101, false)
	want := []NexthopObject{
		{ID: first, Gateway: gw3.Gateway, LinkIndex: 3, LinkName: "vpc0"},
		{ID: first + 1, Gateway: gw4.Gateway, LinkIndex: 3, LinkName: "vpc0"},
		{ID: first + 2, Gateway: gw6.Gateway, LinkIndex: 3, LinkName: "vpc0"},
		{ID: g100, Group: []uint32{first}},
		{ID: g100v6, Group: []uint32{first + 2}},
		{ID: g101, Group: []uint32{first, first + 1}},
	}
	if !slices.EqualFunc(l.Objects, want, func(a, b NexthopObject) bool {
		return a.ID == b.ID && a.Gateway == b.Gateway && a.LinkIndex == b.LinkIndex && slices.Equal(a.Group, b.Group)
	}) {
		t.Errorf("objects\n%+v\nwant\n%+v", l.Objects, want)
	}
	if groups := l.Groups(245); len(groups) != 3 || groups[TableFamily{102, false}] != 0 {
		t.Errorf("groups %v", groups)
	}
	cmds := strings.Join(plan.CommandsWithNexthops(245), "\n") + "\n"
	for _, line := range []string{
		"ip nexthop replace id 4110417921 via 10.114.0.3 dev vpc0 protocol 245",
		"ip nexthop replace id 4110483658 group 4110417921/4110417922 protocol 245",
		"ip -4 route replace 198.51.100.0/24 table 100 proto 245 nhid 4110483656",
		"ip -4 route replace unreachable 198.51.100.0/24 table 100 proto 245 metric 4294967295",
		"ip -4 route replace throw 198.51.100.7/32 table 100 proto 245",
		"ip -6 route replace 2001:db8::/32 table 100 proto 245 nhid 4110483657",
		"ip -4 route replace 192.0.2.128/25 table 102 proto 245 via 10.114.0.4 dev vpc0",
	} {
		if !strings.Contains(cmds, line+"\n") {
			t.Errorf("commands lack %q:\n%s", line, cmds)
		}
	}
}

// TestNexthopLayoutAnyOrder: the layout of a plan's routes does not depend
// on their order (Nexthops takes one pass over a plan's sorted routes, and
// sorts what is not), mixed gateways in one table family included.
func TestNexthopLayoutAnyOrder(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	plan := computeT(randomRoutes(rng, 200, "r"), nil)
	// One table family with two gateway sets: no group for it.
	for i, r := range plan.Routes {
		if !r.Throw && !r.Backstop && len(r.Nexthops) == 2 {
			plan.Routes[i].Nexthops = r.Nexthops[:1]
			break
		}
	}
	want := plan.Nexthops(245)
	for range 5 {
		shuffled := plan
		shuffled.Routes = slices.Clone(plan.Routes)
		rng.Shuffle(len(shuffled.Routes), func(i, j int) { shuffled.Routes[i], shuffled.Routes[j] = shuffled.Routes[j], shuffled.Routes[i] })
		if got := shuffled.Nexthops(245); !reflect.DeepEqual(got, want) {
			t.Fatalf("the layout of shuffled routes differs: %d objects and %d groups, want %d and %d", len(got.Objects), len(got.Groups(245)), len(want.Objects), len(want.Groups(245)))
		}
	}
	if len(want.Groups(245)) == 0 {
		t.Fatal("no groups: the test proves nothing")
	}
}
