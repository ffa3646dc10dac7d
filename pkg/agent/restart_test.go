package agent

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/routing-agent/routing-agent/pkg/applier"
	"github.com/routing-agent/routing-agent/pkg/planner"
)

func TestGatewaysOutOfUse(t *testing.T) {
	gw := func(s ...string) []planner.Nexthop {
		var out []planner.Nexthop
		for _, a := range s {
			out = append(out, planner.Nexthop{Gateway: netip.MustParseAddr(a), LinkIndex: 3})
		}
		return out
	}
	route := func(table uint32, dst string, nexthops []planner.Nexthop) planner.Route {
		return planner.Route{Table: table, Dst: netip.MustParsePrefix(dst), Nexthops: nexthops}
	}
	throw := func(table uint32, dst string) planner.Route {
		return planner.Route{Table: table, Dst: netip.MustParsePrefix(dst), Throw: true}
	}
	ecmp := gw("10.114.0.3", "10.114.0.4")
	known := func(s ...string) map[netip.Addr]bool {
		m := map[netip.Addr]bool{}
		for _, a := range s {
			m[netip.MustParseAddr(a)] = true
		}
		return m
	}
	for _, tc := range []struct {
		name   string
		plan   []planner.Route
		kernel []planner.Route
		known  map[netip.Addr]bool
		want   []string
	}{
		{"fresh node: nothing installed", []planner.Route{route(10, "0.0.0.0/0", ecmp)}, nil, nil, nil},
		{"all in use", []planner.Route{route(10, "0.0.0.0/0", ecmp)}, []planner.Route{route(10, "0.0.0.0/0", ecmp)}, nil, nil},
		{"one taken out", []planner.Route{route(10, "0.0.0.0/0", ecmp)}, []planner.Route{route(10, "0.0.0.0/0", gw("10.114.0.3"))}, nil, []string{"10.114.0.4"}},
		{"out of one Route but in use in another: it was never down", []planner.Route{route(10, "0.0.0.0/0", ecmp), route(11, "192.0.2.0/24", ecmp)},
			[]planner.Route{route(10, "0.0.0.0/0", ecmp), route(11, "192.0.2.0/24", gw("10.114.0.3"))}, nil, nil},
		{"out of every Route", []planner.Route{route(10, "0.0.0.0/0", ecmp), route(11, "192.0.2.0/24", ecmp)},
			[]planner.Route{route(10, "0.0.0.0/0", gw("10.114.0.3")), route(11, "192.0.2.0/24", gw("10.114.0.3"))}, nil, []string{"10.114.0.4"}},
		{"a single-gateway Route kept its dead gateway (fail closed) while another Route dropped it", []planner.Route{route(10, "0.0.0.0/5", gw("10.114.0.3")), route(11, "0.0.0.0/0", ecmp)},
			[]planner.Route{route(10, "0.0.0.0/5", gw("10.114.0.3")), route(11, "0.0.0.0/0", gw("10.114.0.4"))}, nil, []string{"10.114.0.3"}},
		{"every gateway of a Route dead: kept, nothing to tell", []planner.Route{route(10, "0.0.0.0/0", ecmp)}, []planner.Route{route(10, "0.0.0.0/0", ecmp)}, nil, nil},
		{"all-dead Route next to a Route that shows one of them down", []planner.Route{route(10, "0.0.0.0/0", ecmp), route(11, "192.0.2.0/24", gw("10.114.0.4", "10.114.0.5"))},
			[]planner.Route{route(10, "0.0.0.0/0", ecmp), route(11, "192.0.2.0/24", gw("10.114.0.5"))}, nil, []string{"10.114.0.3", "10.114.0.4"}},
		{"out, and the previous agent knew it", []planner.Route{route(10, "0.0.0.0/0", ecmp)}, []planner.Route{route(10, "0.0.0.0/0", gw("10.114.0.3"))},
			known("10.114.0.3", "10.114.0.4"), []string{"10.114.0.4"}},
		{"out, but the previous agent never knew it: new", []planner.Route{route(10, "0.0.0.0/0", ecmp)}, []planner.Route{route(10, "0.0.0.0/0", gw("10.114.0.3"))},
			known("10.114.0.3"), nil},
		{"Route changed gateways entirely", []planner.Route{route(10, "0.0.0.0/0", ecmp)}, []planner.Route{route(10, "0.0.0.0/0", gw("10.114.0.5"))}, nil, nil},
		{"a single gateway cannot be out: all down keeps it", []planner.Route{route(10, "0.0.0.0/0", gw("10.114.0.3"))}, []planner.Route{route(10, "0.0.0.0/0", gw("10.114.0.4"))}, nil, nil},
		{"throw routes are not routes through gateways", []planner.Route{throw(10, "192.0.2.0/24")}, []planner.Route{throw(10, "192.0.2.0/24")}, nil, nil},
		{"installed throw, planned route", []planner.Route{route(10, "192.0.2.0/24", ecmp)}, []planner.Route{throw(10, "192.0.2.0/24")}, nil, nil},
		{"a third gateway added while down, no NodeRouting to tell", []planner.Route{route(10, "0.0.0.0/0", gw("10.114.0.3", "10.114.0.4", "10.114.0.5"))},
			[]planner.Route{route(10, "0.0.0.0/0", ecmp)}, nil, []string{"10.114.0.5"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := gatewaysOutOfUse(planner.Plan{Routes: tc.plan}, applier.NewState(tc.kernel...), tc.known)
			var want []netip.Addr
			for _, a := range tc.want {
				want = append(want, netip.MustParseAddr(a))
			}
			if !slices.Equal(got, want) {
				t.Errorf("got %v, want %v", got, want)
			}
		})
	}
}
