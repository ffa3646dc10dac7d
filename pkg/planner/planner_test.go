package planner

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
)

// testNode is a two-NIC cloud node: public interface pub0 carries the
// default routes, vpc0 the VPC where the gateways live, and a pod network
// routed through vpc0.
func testNode() Node {
	return Node{
		Links: []Link{{Index: 2, Name: "pub0"}, {Index: 3, Name: "vpc0"}, {Index: 4, Name: "down0"}}, // down0 is down: no connected route
		Addresses: []Address{
			{LinkIndex: 2, Prefix: netip.MustParsePrefix("203.0.113.10/24")},
			{LinkIndex: 2, Prefix: netip.MustParsePrefix("2001:db8:203::10/64")},
			{LinkIndex: 3, Prefix: netip.MustParsePrefix("10.114.0.10/20")},
			{LinkIndex: 3, Prefix: netip.MustParsePrefix("fd00:114::10/64")},
			{LinkIndex: 4, Prefix: netip.MustParsePrefix("10.200.0.10/24")},
		},
		MainRoutes: []MainRoute{
			{Dst: netip.MustParsePrefix("0.0.0.0/0"), Gateway: netip.MustParseAddr("203.0.113.1"), LinkIndex: 2},
			{Dst: netip.MustParsePrefix("203.0.113.0/24"), LinkIndex: 2},
			{Dst: netip.MustParsePrefix("10.114.0.0/20"), LinkIndex: 3},
			{Dst: netip.MustParsePrefix("10.244.0.0/16"), Gateway: netip.MustParseAddr("10.114.0.1"), LinkIndex: 3},
			{Dst: netip.MustParsePrefix("::/0"), Gateway: netip.MustParseAddr("2001:db8:203::1"), LinkIndex: 2, Metric: 1024},
			{Dst: netip.MustParsePrefix("fd00:114::/64"), LinkIndex: 3},
		},
		ControlPlane: []Endpoint{{Addr: netip.MustParseAddr("203.0.113.100"), Source: "endpointslice default/kubernetes"}},
		DNSServers:   []Endpoint{{Addr: netip.MustParseAddr("198.51.100.53"), Source: "resolv.conf"}, {Addr: netip.MustParseAddr("127.0.0.53"), Source: "resolv.conf"}},
	}
}

var epoch = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func route(name string, age int, destinations, gateways []string) *v1alpha1.Route {
	return &v1alpha1.Route{
		ObjectMeta: metav1.ObjectMeta{Name: name, Generation: 1, CreationTimestamp: metav1.NewTime(epoch.Add(time.Duration(age) * time.Minute))},
		Spec:       v1alpha1.RouteSpec{Destinations: destinations, Gateways: gateways},
	}
}

func list(s ...string) []string { return s }

// bypass4 are testNode's IPv4 bypass rules other than gateways: metadata,
// DNS (the loopback stub is left out) and control plane. Rules sort by
// address, so the 10.114.0.x gateways come before them.
const bypass4 = `ip -4 rule add priority 30010 to 169.254.169.254/32 lookup main protocol 245
ip -4 rule add priority 30010 to 198.51.100.53/32 lookup main protocol 245
ip -4 rule add priority 30010 to 203.0.113.100/32 lookup main protocol 245`

func TestCompute(t *testing.T) {
	tests := []struct {
		name   string
		routes []*v1alpha1.Route
		down   []string
		tables map[string]uint32
		want   string // Commands, one per line
	}{{
		name:   "seed basic: one destination, one gateway",
		routes: []*v1alpha1.Route{route("basic", 0, list("1.2.3.4/5"), list("10.114.0.3"))},
		tables: map[string]uint32{"basic": 10001},
		want: `ip -4 rule add priority 30001 not to 0.0.0.0/5 goto 30999 protocol 245
ip -4 rule add priority 30010 to 10.114.0.3/32 lookup main protocol 245
` + bypass4 + `
ip -4 rule add priority 30100 from 203.0.113.10/32 lookup main protocol 245
ip -4 rule add priority 30100 fwmark 0x2000/0x2000 lookup main protocol 245
ip -4 rule add priority 30200 lookup main suppress_prefixlength 0 protocol 245
ip -4 rule add priority 30301 to 0.0.0.0/5 lookup 10001 protocol 245
ip -4 rule add priority 30999 nop protocol 245
ip -4 route replace 0.0.0.0/5 table 10001 proto 245 via 10.114.0.3 dev vpc0
ip -4 route replace unreachable 0.0.0.0/5 table 10001 proto 245 metric 4294967295`,
	}, {
		name:   "seed ECMP default override: multipath, main untouched, bypass first",
		routes: []*v1alpha1.Route{route("basic", 0, list("0.0.0.0/0"), list("10.114.0.4", "10.114.0.3"))},
		tables: map[string]uint32{"basic": 10001},
		want: `ip -4 rule add priority 30010 to 10.114.0.3/32 lookup main protocol 245
ip -4 rule add priority 30010 to 10.114.0.4/32 lookup main protocol 245
` + bypass4 + `
ip -4 rule add priority 30100 from 203.0.113.10/32 lookup main protocol 245
ip -4 rule add priority 30100 fwmark 0x2000/0x2000 lookup main protocol 245
ip -4 rule add priority 30200 lookup main suppress_prefixlength 0 protocol 245
ip -4 rule add priority 30301 to 0.0.0.0/1 lookup 10001 protocol 245
ip -4 rule add priority 30301 to 128.0.0.0/1 lookup 10001 protocol 245
ip -4 route replace 0.0.0.0/0 table 10001 proto 245 nexthop via 10.114.0.3 dev vpc0 weight 1 nexthop via 10.114.0.4 dev vpc0 weight 1
ip -4 route replace unreachable 0.0.0.0/0 table 10001 proto 245 metric 4294967295`,
	}, {
		name:   "a dead gateway leaves the nexthops",
		routes: []*v1alpha1.Route{route("basic", 0, list("0.0.0.0/0"), list("10.114.0.3", "10.114.0.4"))},
		down:   list("10.114.0.4"),
		tables: map[string]uint32{"basic": 10001},
		want: `ip -4 rule add priority 30010 to 10.114.0.3/32 lookup main protocol 245
ip -4 rule add priority 30010 to 10.114.0.4/32 lookup main protocol 245
` + bypass4 + `
ip -4 rule add priority 30100 from 203.0.113.10/32 lookup main protocol 245
ip -4 rule add priority 30100 fwmark 0x2000/0x2000 lookup main protocol 245
ip -4 rule add priority 30200 lookup main suppress_prefixlength 0 protocol 245
ip -4 rule add priority 30301 to 0.0.0.0/1 lookup 10001 protocol 245
ip -4 rule add priority 30301 to 128.0.0.0/1 lookup 10001 protocol 245
ip -4 route replace 0.0.0.0/0 table 10001 proto 245 via 10.114.0.3 dev vpc0
ip -4 route replace unreachable 0.0.0.0/0 table 10001 proto 245 metric 4294967295`,
	}, {
		name:   "all gateways dead: all stay (fail closed)",
		routes: []*v1alpha1.Route{route("basic", 0, list("0.0.0.0/0"), list("10.114.0.3", "10.114.0.4"))},
		down:   list("10.114.0.3", "10.114.0.4"),
		tables: map[string]uint32{"basic": 10001},
		want: `ip -4 rule add priority 30010 to 10.114.0.3/32 lookup main protocol 245
ip -4 rule add priority 30010 to 10.114.0.4/32 lookup main protocol 245
` + bypass4 + `
ip -4 rule add priority 30100 from 203.0.113.10/32 lookup main protocol 245
ip -4 rule add priority 30100 fwmark 0x2000/0x2000 lookup main protocol 245
ip -4 rule add priority 30200 lookup main suppress_prefixlength 0 protocol 245
ip -4 rule add priority 30301 to 0.0.0.0/1 lookup 10001 protocol 245
ip -4 rule add priority 30301 to 128.0.0.0/1 lookup 10001 protocol 245
ip -4 route replace 0.0.0.0/0 table 10001 proto 245 nexthop via 10.114.0.3 dev vpc0 weight 1 nexthop via 10.114.0.4 dev vpc0 weight 1
ip -4 route replace unreachable 0.0.0.0/0 table 10001 proto 245 metric 4294967295`,
	}, {
		name:   "gateway behind the default route's interface: no symmetric rule (single-NIC case)",
		routes: []*v1alpha1.Route{route("basic", 0, list("0.0.0.0/0"), list("203.0.113.5"))},
		tables: map[string]uint32{"basic": 10001},
		want: `ip -4 rule add priority 30010 to 169.254.169.254/32 lookup main protocol 245
ip -4 rule add priority 30010 to 198.51.100.53/32 lookup main protocol 245
ip -4 rule add priority 30010 to 203.0.113.5/32 lookup main protocol 245
ip -4 rule add priority 30010 to 203.0.113.100/32 lookup main protocol 245
ip -4 rule add priority 30100 fwmark 0x2000/0x2000 lookup main protocol 245
ip -4 rule add priority 30200 lookup main suppress_prefixlength 0 protocol 245
ip -4 rule add priority 30301 to 0.0.0.0/1 lookup 10001 protocol 245
ip -4 rule add priority 30301 to 128.0.0.0/1 lookup 10001 protocol 245
ip -4 route replace 0.0.0.0/0 table 10001 proto 245 via 203.0.113.5 dev pub0
ip -4 route replace unreachable 0.0.0.0/0 table 10001 proto 245 metric 4294967295`,
	}, {
		name: "longest prefix across Routes: throw routes, in both orders of age",
		routes: []*v1alpha1.Route{
			route("wide", 1, list("10.0.0.0/8", "198.51.100.0/24"), list("10.114.0.3")),
			route("narrow", 0, list("10.1.0.0/16", "10.1.2.0/24"), list("10.114.0.4")),
		},
		tables: map[string]uint32{"wide": 10001, "narrow": 10002},
		want: `ip -4 rule add priority 30000 to 10.0.0.0/8 goto 30009 protocol 245
ip -4 rule add priority 30001 not to 198.51.100.0/24 goto 30999 protocol 245
ip -4 rule add priority 30009 nop protocol 245
ip -4 rule add priority 30010 to 10.114.0.3/32 lookup main protocol 245
ip -4 rule add priority 30010 to 10.114.0.4/32 lookup main protocol 245
` + bypass4 + `
ip -4 rule add priority 30100 from 203.0.113.10/32 lookup main protocol 245
ip -4 rule add priority 30100 fwmark 0x2000/0x2000 lookup main protocol 245
ip -4 rule add priority 30200 lookup main suppress_prefixlength 0 protocol 245
ip -4 rule add priority 30301 to 10.1.2.0/24 lookup 10002 protocol 245
ip -4 rule add priority 30301 to 198.51.100.0/24 lookup 10001 protocol 245
ip -4 rule add priority 30301 to 10.1.0.0/16 lookup 10002 protocol 245
ip -4 rule add priority 30301 to 10.0.0.0/8 lookup 10001 protocol 245
ip -4 rule add priority 30999 nop protocol 245
ip -4 route replace 10.0.0.0/8 table 10001 proto 245 via 10.114.0.3 dev vpc0
ip -4 route replace unreachable 10.0.0.0/8 table 10001 proto 245 metric 4294967295
ip -4 route replace throw 10.1.0.0/16 table 10001 proto 245
ip -4 route replace throw 10.1.2.0/24 table 10001 proto 245
ip -4 route replace 198.51.100.0/24 table 10001 proto 245 via 10.114.0.3 dev vpc0
ip -4 route replace unreachable 198.51.100.0/24 table 10001 proto 245 metric 4294967295
ip -4 route replace 10.1.0.0/16 table 10002 proto 245 via 10.114.0.4 dev vpc0
ip -4 route replace unreachable 10.1.0.0/16 table 10002 proto 245 metric 4294967295
ip -4 route replace 10.1.2.0/24 table 10002 proto 245 via 10.114.0.4 dev vpc0
ip -4 route replace unreachable 10.1.2.0/24 table 10002 proto 245 metric 4294967295`,
	}, {
		name:   "IPv6 default override with IPv6 gateway, plus normalized duplicates merged",
		routes: []*v1alpha1.Route{route("v6", 0, list("::/0", "2001:db8:100::1/48", "2001:db8:100::/48"), list("fd00:114::3"))},
		tables: map[string]uint32{"v6": 10001},
		want: `ip -6 rule add priority 30010 to fd00:114::3/128 lookup main protocol 245
ip -6 rule add priority 30010 to fd00:ec2::254/128 lookup main protocol 245
ip -6 rule add priority 30010 to fd20:ce::254/128 lookup main protocol 245
ip -6 rule add priority 30100 fwmark 0x2000/0x2000 lookup main protocol 245
ip -6 rule add priority 30200 lookup main suppress_prefixlength 0 protocol 245
ip -6 rule add priority 30301 to ::/1 lookup 10001 protocol 245
ip -6 rule add priority 30301 to 8000::/1 lookup 10001 protocol 245
ip -6 route replace ::/0 table 10001 proto 245 via fd00:114::3 dev vpc0
ip -6 route replace unreachable ::/0 table 10001 proto 245 metric 4294967295
ip -6 route replace 2001:db8:100::/48 table 10001 proto 245 via fd00:114::3 dev vpc0
ip -6 route replace unreachable 2001:db8:100::/48 table 10001 proto 245 metric 4294967295`,
	}, {
		name: "invalid Routes install nothing; a conflicting destination is left out alone, a shadowed one stays inert",
		routes: []*v1alpha1.Route{
			route("off-link", 0, list("192.0.2.0/24"), list("10.99.0.1")),
			route("broadcast-gw", 0, list("198.51.100.80/32"), list("10.114.15.255")),
			route("network-gw", 0, list("198.51.100.81/32"), list("10.114.0.0")),
			route("shadowed", 0, list("10.244.1.0/24"), list("10.114.0.3")),
			route("older", 1, list("1.2.3.4/5"), list("10.114.0.3")),
			route("younger", 2, list("0.0.0.0/5", "203.0.113.0/25", "198.18.0.0/15"), list("10.114.0.4")),
		},
		tables: map[string]uint32{"older": 10001, "shadowed": 10002, "younger": 10003},
		want: `ip -4 rule add priority 30000 to 0.0.0.0/5 goto 30009 protocol 245
ip -4 rule add priority 30000 to 10.244.1.0/24 goto 30009 protocol 245
ip -4 rule add priority 30000 to 198.18.0.0/15 goto 30009 protocol 245
ip -4 rule add priority 30001 not to 203.0.113.0/25 goto 30999 protocol 245
ip -4 rule add priority 30009 nop protocol 245
ip -4 rule add priority 30010 to 10.114.0.3/32 lookup main protocol 245
ip -4 rule add priority 30010 to 10.114.0.4/32 lookup main protocol 245
` + bypass4 + `
ip -4 rule add priority 30100 from 203.0.113.10/32 lookup main protocol 245
ip -4 rule add priority 30100 fwmark 0x2000/0x2000 lookup main protocol 245
ip -4 rule add priority 30200 lookup main suppress_prefixlength 0 protocol 245
ip -4 rule add priority 30301 to 203.0.113.0/25 lookup 10003 protocol 245
ip -4 rule add priority 30301 to 10.244.1.0/24 lookup 10002 protocol 245
ip -4 rule add priority 30301 to 198.18.0.0/15 lookup 10003 protocol 245
ip -4 rule add priority 30301 to 0.0.0.0/5 lookup 10001 protocol 245
ip -4 rule add priority 30999 nop protocol 245
ip -4 route replace 0.0.0.0/5 table 10001 proto 245 via 10.114.0.3 dev vpc0
ip -4 route replace unreachable 0.0.0.0/5 table 10001 proto 245 metric 4294967295
ip -4 route replace 10.244.1.0/24 table 10002 proto 245 via 10.114.0.3 dev vpc0
ip -4 route replace unreachable 10.244.1.0/24 table 10002 proto 245 metric 4294967295
ip -4 route replace 198.18.0.0/15 table 10003 proto 245 via 10.114.0.4 dev vpc0
ip -4 route replace unreachable 198.18.0.0/15 table 10003 proto 245 metric 4294967295
ip -4 route replace 203.0.113.0/25 table 10003 proto 245 via 10.114.0.4 dev vpc0
ip -4 route replace unreachable 203.0.113.0/25 table 10003 proto 245 metric 4294967295`,
	}, {
		name: "a destination an older Route owns is handed to it by a throw; the rest of the Route applies",
		routes: []*v1alpha1.Route{
			route("vpn", 0, list("192.0.2.0/24"), list("10.114.0.3")),
			route("nat", 1, list("0.0.0.0/0", "192.0.2.0/24"), list("10.114.0.4")),
		},
		tables: map[string]uint32{"vpn": 10001, "nat": 10002},
		want: `ip -4 rule add priority 30010 to 10.114.0.3/32 lookup main protocol 245
ip -4 rule add priority 30010 to 10.114.0.4/32 lookup main protocol 245
` + bypass4 + `
ip -4 rule add priority 30100 from 203.0.113.10/32 lookup main protocol 245
ip -4 rule add priority 30100 fwmark 0x2000/0x2000 lookup main protocol 245
ip -4 rule add priority 30200 lookup main suppress_prefixlength 0 protocol 245
ip -4 rule add priority 30301 to 192.0.2.0/24 lookup 10001 protocol 245
ip -4 rule add priority 30301 to 0.0.0.0/1 lookup 10002 protocol 245
ip -4 rule add priority 30301 to 128.0.0.0/1 lookup 10002 protocol 245
ip -4 route replace 192.0.2.0/24 table 10001 proto 245 via 10.114.0.3 dev vpc0
ip -4 route replace unreachable 192.0.2.0/24 table 10001 proto 245 metric 4294967295
ip -4 route replace 0.0.0.0/0 table 10002 proto 245 via 10.114.0.4 dev vpc0
ip -4 route replace unreachable 0.0.0.0/0 table 10002 proto 245 metric 4294967295
ip -4 route replace throw 192.0.2.0/24 table 10002 proto 245`,
	}, {
		name: "a gateway that lost its network strands a Route applied here: backstops only, no rule withdrawn",
		routes: []*v1alpha1.Route{
			route("was-here", 0, list("0.0.0.0/0"), list("10.99.0.1")),
			route("new-here", 1, list("192.0.2.0/24"), list("10.99.0.1")),
			route("half", 2, list("198.51.100.0/24"), list("10.99.0.2", "10.114.0.3")),
		},
		tables: map[string]uint32{"was-here": 10001, "half": 10003},
		want: `ip -4 rule add priority 30010 to 10.114.0.3/32 lookup main protocol 245
` + bypass4 + `
ip -4 rule add priority 30100 from 203.0.113.10/32 lookup main protocol 245
ip -4 rule add priority 30100 fwmark 0x2000/0x2000 lookup main protocol 245
ip -4 rule add priority 30200 lookup main suppress_prefixlength 0 protocol 245
ip -4 rule add priority 30301 to 198.51.100.0/24 lookup 10003 protocol 245
ip -4 rule add priority 30301 to 0.0.0.0/1 lookup 10001 protocol 245
ip -4 rule add priority 30301 to 128.0.0.0/1 lookup 10001 protocol 245
ip -4 route replace unreachable 0.0.0.0/0 table 10001 proto 245 metric 4294967295
ip -4 route replace throw 198.51.100.0/24 table 10001 proto 245
ip -4 route replace 198.51.100.0/24 table 10003 proto 245 via 10.114.0.3 dev vpc0
ip -4 route replace unreachable 198.51.100.0/24 table 10003 proto 245 metric 4294967295`,
	}, {
		name:   "no Routes: nothing at all",
		routes: nil,
		want:   ``,
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := Input{Config: DefaultConfig(), Node: testNode(), Routes: tt.routes, Tables: tt.tables, Down: map[netip.Addr]bool{}}
			for _, d := range tt.down {
				in.Down[netip.MustParseAddr(d)] = true
			}
			plan := Compute(in)
			got := strings.Join(plan.Commands(DefaultProtocol), "\n")
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("commands (-want +got):\n%s", diff)
			}
		})
	}
}

func TestResults(t *testing.T) {
	routes := []*v1alpha1.Route{
		route("younger", 2, list("0.0.0.0/5"), list("10.114.0.4")),
		route("older", 1, list("1.2.3.4/5"), list("10.114.0.3")),
		route("off-link", 0, list("192.0.2.0/24"), list("10.99.0.1")),
		route("local-gw", 0, list("192.0.2.0/24"), list("10.114.0.10")),
		route("on-down-link", 0, list("192.0.2.0/25"), list("10.200.0.1")),
		route("shadowed", 0, list("10.244.1.0/24"), list("10.114.0.3")),
		route("equal-to-main", 0, list("10.114.0.0/20"), list("10.114.0.3")),
		route("bad-spec", 0, list("not-a-cidr"), list("10.114.0.3")),
		route("dead", 3, list("198.51.100.0/24"), list("10.114.0.5", "10.114.0.6")),
		route("broadcast-gw", 0, list("198.51.100.80/32"), list("10.114.15.255")),
		route("part-conflict", 4, list("0.0.0.0/0", "0.0.0.0/5", "10.244.9.0/24"), list("10.114.0.3")),
		route("v6-anycast-gw", 0, list("2001:db8:1::/48"), list("fd00:114::")),
		route("network-gw", 0, list("198.51.100.81/32"), list("10.114.0.0")),
	}
	plan := Compute(Input{Config: DefaultConfig(), Node: testNode(), Routes: routes, Tables: map[string]uint32{"older": 10001, "dead": 10002},
		Down: map[netip.Addr]bool{netip.MustParseAddr("10.114.0.5"): true, netip.MustParseAddr("10.114.0.6"): true}})
	want := []struct {
		phase   Phase
		reason  string
		message string
	}{
		{Conflict, ReasonEqualPrefix, `destination 0.0.0.0/5 is also in Route "older", which is older and wins`},
		{Applied, ReasonApplied, ""},
		{Invalid, ReasonGatewayNotConnected, "gateway 10.99.0.1 is not on a directly connected network of this node"},
		{Invalid, ReasonGatewayIsLocal, "gateway 10.114.0.10 is an address of this node"},
		{Applied, ReasonApplied, ""}, // on a down link: kept (fail closed); the prober takes the gateway out of use
		{Applied, ReasonDestinationShadowed, "destination 10.244.1.0/24 lies inside main-table route 10.244.0.0/16"},
		{Applied, ReasonDestinationShadowed, "destination 10.114.0.0/20 lies inside main-table route 10.114.0.0/20"},
		{Invalid, ReasonInvalidSpec, `spec.destinations[0]: Invalid value: "not-a-cidr"`},
		{Applied, ReasonAllGatewaysDown, "every gateway is down"},
		{Invalid, ReasonGatewayNotUsable, "gateway 10.114.15.255 is the network or broadcast address of the connected network 10.114.0.0/20 on vpc0"},
		{Applied, ReasonDestinationsNotApplied, "2 of 3 destinations are not in effect here"},
		{Applied, ReasonApplied, ""}, // IPv6 subnet-router anycast reaches a router
		{Invalid, ReasonGatewayNotUsable, "gateway 10.114.0.0 is the network or broadcast address"},
	}
	if len(plan.Results) != len(routes) {
		t.Fatalf("%d results for %d routes", len(plan.Results), len(routes))
	}
	for i, w := range want {
		r := plan.Results[i]
		if r.Name != routes[i].Name || r.Phase != w.phase || r.Reason != w.reason || !strings.Contains(r.Message, w.message) {
			t.Errorf("result %d = %+v, want %s %s %q", i, r, w.phase, w.reason, w.message)
		}
		if (r.Phase == Applied) != (r.Table != 0) {
			t.Errorf("result %d: phase %s with table %d", i, r.Phase, r.Table)
		}
	}
	wantIssues := []DestinationIssue{
		{netip.MustParsePrefix("0.0.0.0/5"), ReasonEqualPrefix, `destination 0.0.0.0/5 is also in Route "older", which is older and wins`},
		{netip.MustParsePrefix("10.244.9.0/24"), ReasonDestinationShadowed, "destination 10.244.9.0/24 lies inside main-table route 10.244.0.0/16, which takes precedence over every Route (lookup main suppress_prefixlength 0)"},
	}
	if diff := cmp.Diff(wantIssues, plan.Results[10].NotApplied, cmpopts.EquateComparable(netip.Prefix{})); diff != "" {
		t.Errorf("part-conflict's destinations not applied (-want +got):\n%s", diff)
	}
	if len(plan.Gateways) != 5 || !plan.Gateways[1].Down || plan.Gateways[0].Down || plan.Gateways[3].Down {
		t.Errorf("gateways = %+v, want 10.114.0.3, 10.200.0.1 and fd00:114:: up, 10.114.0.5 and .6 down", plan.Gateways)
	}
}

// TestDeterministic: the order Routes arrive in changes nothing.
func TestDeterministic(t *testing.T) {
	a := route("a", 0, list("10.0.0.0/8"), list("10.114.0.3"))
	b := route("b", 1, list("10.1.0.0/16", "::/0"), list("10.114.0.4", "fd00:114::3"))
	c := route("c", 2, list("192.0.2.0/24"), list("10.114.0.3", "10.114.0.4"))
	first := Compute(Input{Config: DefaultConfig(), Node: testNode(), Routes: []*v1alpha1.Route{a, b, c}})
	second := Compute(Input{Config: DefaultConfig(), Node: testNode(), Routes: []*v1alpha1.Route{c, a, b}})
	if diff := cmp.Diff(first.Commands(245), second.Commands(245)); diff != "" {
		t.Errorf("order of input changed the plan:\n%s", diff)
	}
}

// TestTableIDsStable: a Route's table id depends on its name, not on which
// other Routes exist; hints keep ids through collisions; the range holds.
func TestTableIDsStable(t *testing.T) {
	cfg := DefaultConfig()
	tableOf := func(plan Plan, name string) uint32 {
		for _, r := range plan.Results {
			if r.Name == name {
				return r.Table
			}
		}
		t.Fatalf("no result for %s", name)
		return 0
	}
	alone := Compute(Input{Config: cfg, Node: testNode(), Routes: []*v1alpha1.Route{route("vpn", 5, list("192.0.2.0/24"), list("10.114.0.3"))}})
	id := tableOf(alone, "vpn")
	if id < cfg.TableMin || id > cfg.TableMax {
		t.Fatalf("table %d outside %d-%d", id, cfg.TableMin, cfg.TableMax)
	}
	var many []*v1alpha1.Route
	for i := range 300 {
		many = append(many, route("r"+string(rune('a'+i%26))+strings.Repeat("x", i/26), i, list("198.51.100.0/24"), list("10.114.0.3")))
	}
	withOthers := Compute(Input{Config: cfg, Node: testNode(), Routes: append(many, route("vpn", 5, list("192.0.2.0/24"), list("10.114.0.3")))})
	if got := tableOf(withOthers, "vpn"); got != id {
		t.Errorf("table of vpn moved from %d to %d when unrelated Routes appeared", id, got)
	}

	// A tiny range forces collisions: the hint keeps the younger Route's id.
	small := cfg
	small.TableMin, small.TableMax = 100, 101
	x, y := route("x", 0, list("192.0.2.0/24"), list("10.114.0.3")), route("y", 1, list("198.51.100.0/24"), list("10.114.0.3"))
	plan := Compute(Input{Config: small, Node: testNode(), Routes: []*v1alpha1.Route{x, y}, Tables: map[string]uint32{"y": tableOf(Compute(Input{Config: small, Node: testNode(), Routes: []*v1alpha1.Route{x, y}}), "y")}})
	if tableOf(plan, "x") == tableOf(plan, "y") {
		t.Errorf("two Routes share table %d", tableOf(plan, "x"))
	}
	third := route("z", 2, list("198.18.0.0/15"), list("10.114.0.3"))
	full := Compute(Input{Config: small, Node: testNode(), Routes: []*v1alpha1.Route{x, y, third}})
	if r := full.Results[2]; r.Phase != Invalid || r.Reason != ReasonNoTableFree {
		t.Errorf("third Route in a two-table range: %+v, want Invalid/NoTableFree", r)
	}
}

// A Route applied here whose gateway lost its network stays Applied and
// says why; one never applied here is Invalid, leaving its traffic to main.
func TestStrandedResults(t *testing.T) {
	plan := Compute(Input{Config: DefaultConfig(), Node: testNode(), Tables: map[string]uint32{"was-here": 10001},
		Routes: []*v1alpha1.Route{route("was-here", 0, list("0.0.0.0/0"), list("10.99.0.1")), route("new-here", 1, list("192.0.2.0/24"), list("10.99.0.1"))}})
	if r := plan.Results[0]; r.Phase != Applied || r.Reason != ReasonGatewayNotConnected || r.Table != 10001 || !strings.Contains(r.Message, "fail closed") {
		t.Errorf("was-here: %+v", r)
	}
	if r := plan.Results[1]; r.Phase != Invalid || r.Reason != ReasonGatewayNotConnected {
		t.Errorf("new-here: %+v", r)
	}
	if len(plan.Gateways) != 0 {
		t.Errorf("a stranded gateway is still probed: %+v", plan.Gateways)
	}
}

// TestBypassSources: each bypass address once, with every source that asked
// for it, loopback and unspecified addresses dropped, mapped IPv4 unmapped.
func TestBypassSources(t *testing.T) {
	node := testNode()
	node.ControlPlane = []Endpoint{
		{Addr: netip.MustParseAddr("203.0.113.100"), Source: "endpointslice default/kubernetes"},
		{Addr: netip.MustParseAddr("203.0.113.100"), Source: "dns api.example.com"},
		{Addr: netip.MustParseAddr("::ffff:198.51.100.100"), Source: "kubelet-kubeconfig"},
		{Addr: netip.MustParseAddr("0.0.0.0"), Source: "kubeconfig"},
	}
	node.DNSServers = []Endpoint{
		{Addr: netip.MustParseAddr("127.0.0.53"), Source: "resolv.conf"},
		{Addr: netip.MustParseAddr("10.114.0.3"), Source: "resolv.conf"},
	}
	cfg := DefaultConfig()
	cfg.Metadata = []netip.Addr{netip.MustParseAddr("169.254.169.254"), netip.MustParseAddr("fd00:ec2::254")}
	cfg.ExtraBypass = []netip.Prefix{netip.MustParsePrefix("192.0.2.7/24")}
	plan := Compute(Input{Config: cfg, Node: node, Routes: []*v1alpha1.Route{route("override", 0, list("0.0.0.0/0"), list("10.114.0.3"))}})
	var got []string
	for _, b := range plan.Bypass {
		got = append(got, b.Prefix.String()+" "+strings.Join(b.Sources, ","))
	}
	want := []string{
		"10.114.0.3/32 gateway,resolv.conf",
		"169.254.169.254/32 metadata",
		"192.0.2.0/24 --bypass",
		"198.51.100.100/32 kubelet-kubeconfig",
		"203.0.113.100/32 dns api.example.com,endpointslice default/kubernetes",
		"fd00:ec2::254/128 metadata",
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("bypass (-want +got):\n%s", diff)
	}
	// Only the families in use get rules: no IPv6 Route, no IPv6 bypass rule.
	for _, r := range plan.Rules {
		if r.IPv6 {
			t.Errorf("IPv6 rule without an IPv6 Route: %+v", r)
		}
	}
}

// TestSymmetricReplies: the fwmark rule and the nftables part per layout;
// source rules only for addresses whose subnet holds no gateway, and none
// over IPv6 while the marks are on.
func TestSymmetricReplies(t *testing.T) {
	singleNIC := Node{
		Links: []Link{{Index: 1, Name: "lo"}, {Index: 2, Name: "eth0"}},
		Addresses: []Address{
			{LinkIndex: 2, Prefix: netip.MustParsePrefix("203.0.113.10/24")},
			{LinkIndex: 2, Prefix: netip.MustParsePrefix("10.114.0.10/16")},
		},
		MainRoutes: []MainRoute{
			{Dst: netip.MustParsePrefix("0.0.0.0/0"), Gateway: netip.MustParseAddr("203.0.113.1"), LinkIndex: 2},
			{Dst: netip.MustParsePrefix("203.0.113.0/24"), LinkIndex: 2},
			{Dst: netip.MustParsePrefix("10.114.0.0/16"), LinkIndex: 2},
		},
	}
	override := []*v1alpha1.Route{route("basic", 0, list("0.0.0.0/0"), list("10.114.0.3"))}
	dual := []*v1alpha1.Route{route("basic", 0, list("0.0.0.0/0", "::/0"), list("10.114.0.3", "fd00:114::3"))}
	for _, tc := range []struct {
		name      string
		node      Node
		routes    []*v1alpha1.Route
		connMark  uint32
		symmetric string // the 30100 rules
		exclude   string // ConnMark.Exclude, or "none" for no table
	}{{
		name: "two NICs", node: testNode(), routes: dual, connMark: DefaultConnMark,
		symmetric: "ip -4 rule add priority 30100 from 203.0.113.10/32 lookup main protocol 245\n" +
			"ip -4 rule add priority 30100 fwmark 0x2000/0x2000 lookup main protocol 245\n" +
			"ip -6 rule add priority 30100 fwmark 0x2000/0x2000 lookup main protocol 245",
		exclude: "lo,vpc0",
	}, {
		name: "two NICs, marking off: source rules for both families", node: testNode(), routes: dual,
		symmetric: "ip -4 rule add priority 30100 from 203.0.113.10/32 lookup main protocol 245\n" +
			"ip -6 rule add priority 30100 from 2001:db8:203::10/128 lookup main protocol 245",
		exclude: "none",
	}, {
		name: "one NIC with a public and a VPC address: the VPC address gets no source rule, the NIC is marked", node: singleNIC, routes: override, connMark: DefaultConnMark,
		symmetric: "ip -4 rule add priority 30100 from 203.0.113.10/32 lookup main protocol 245\n" +
			"ip -4 rule add priority 30100 fwmark 0x2000/0x2000 lookup main protocol 245",
		exclude: "lo",
	}} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := DefaultConfig()
			cfg.ConnMark = tc.connMark
			plan := Compute(Input{Config: cfg, Node: tc.node, Routes: tc.routes})
			var symmetric []string
			for _, line := range plan.Commands(cfg.Protocol) {
				if strings.Contains(line, "priority 30100 ") {
					symmetric = append(symmetric, line)
				}
			}
			if got := strings.Join(symmetric, "\n"); got != tc.symmetric {
				t.Errorf("symmetric rules:\n%s\nwant:\n%s", got, tc.symmetric)
			}
			exclude := "none"
			if plan.ConnMark != nil {
				exclude = strings.Join(plan.ConnMark.Exclude, ",")
				if plan.ConnMark.Mark != tc.connMark {
					t.Errorf("mark %#x, want %#x", plan.ConnMark.Mark, tc.connMark)
				}
			}
			if exclude != tc.exclude {
				t.Errorf("excluded interfaces %s, want %s", exclude, tc.exclude)
			}
		})
	}
	if plan := Compute(Input{Config: DefaultConfig(), Node: testNode()}); plan.ConnMark != nil {
		t.Errorf("no Route, yet a connmark table: %+v", plan.ConnMark)
	}
}
