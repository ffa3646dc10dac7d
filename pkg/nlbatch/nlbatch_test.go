package nlbatch_test

import (
	"net/netip"
	"os"
	"os/exec"
	"reflect"
	"strings"
	"testing"

	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/routing-agent/routing-agent/pkg/lab/netns"
	"github.com/routing-agent/routing-agent/pkg/nlbatch"
)

var (
	gw1 = netip.MustParseAddr("10.114.0.3")
	gw2 = netip.MustParseAddr("10.114.0.4")
)

func payload(t *testing.T, m nlbatch.Msg) []byte {
	t.Helper()
	b := m.Marshal(7)
	if got := int(b[0]) | int(b[1])<<8; got != len(b) {
		t.Fatalf("length %d of %d bytes", got, len(b))
	}
	return b[unix.SizeofNlMsghdr:]
}

func TestRouteRoundTrip(t *testing.T) {
	for _, r := range []nlbatch.Route{
		{Family: unix.AF_INET, Table: 10000, Dst: netip.MustParsePrefix("172.16.0.0/24"), Protocol: 245, Type: unix.RTN_UNICAST, NHID: 4110548992},
		{Family: unix.AF_INET, Table: 100, Dst: netip.MustParsePrefix("0.0.0.0/0"), Protocol: 245, Type: unix.RTN_UNICAST, Nexthops: []nlbatch.Nexthop{{Gateway: gw1, LinkIndex: 2}}},
		{Family: unix.AF_INET, Table: 10001, Dst: netip.MustParsePrefix("192.0.2.0/25"), Protocol: 245, Type: unix.RTN_UNICAST, Nexthops: []nlbatch.Nexthop{{Gateway: gw1, LinkIndex: 2}, {Gateway: gw2, LinkIndex: 3}}},
		{Family: unix.AF_INET6, Table: 10002, Dst: netip.MustParsePrefix("2001:db8::/32"), Protocol: 245, Type: unix.RTN_UNREACHABLE, Priority: 1<<32 - 1},
		{Family: unix.AF_INET, Table: 10002, Dst: netip.MustParsePrefix("198.51.100.7/32"), Protocol: 245, Type: unix.RTN_THROW},
	} {
		got, err := nlbatch.ParseRoute(payload(t, nlbatch.ReplaceRoute(r)))
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, r) {
			t.Errorf("round trip:\n got %+v\nwant %+v", got, r)
		}
		del, err := nlbatch.ParseRoute(payload(t, nlbatch.DeleteRoute(r)))
		if err != nil {
			t.Fatal(err)
		}
		if del.NHID != 0 || del.Nexthops != nil || del.Dst != r.Dst || del.Table != r.Table || del.Priority != r.Priority {
			t.Errorf("delete of %+v names %+v", r, del)
		}
	}
}

func TestRuleRoundTrip(t *testing.T) {
	for _, r := range []nlbatch.Rule{
		{Family: unix.AF_INET, Priority: 30000, Table: 254, Protocol: 245, Dst: netip.MustParsePrefix("10.114.0.3/32"), SuppressPrefixlen: -1},
		{Family: unix.AF_INET, Priority: 30100, Table: 254, Protocol: 245, Mark: 0x2000, Mask: 0x2000, SuppressPrefixlen: -1},
		{Family: unix.AF_INET, Priority: 30100, Table: 254, Protocol: 245, Src: netip.MustParsePrefix("203.0.113.10/32"), SuppressPrefixlen: -1},
		{Family: unix.AF_INET, Priority: 30200, Table: 254, Protocol: 245, SuppressPrefixlen: 0},
		{Family: unix.AF_INET6, Priority: 30300, Table: 49999, Protocol: 245, SuppressPrefixlen: -1},
		{Family: unix.AF_INET, Priority: 30300, Protocol: 245, Dst: netip.MustParsePrefix("172.16.0.0/12"), Invert: true, Goto: 30400, SuppressPrefixlen: -1},
		{Family: unix.AF_INET, Priority: 30999, Protocol: 245, Nop: true, SuppressPrefixlen: -1},
	} {
		got, err := nlbatch.ParseRule(payload(t, nlbatch.AddRule(r)))
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, r) {
			t.Errorf("round trip:\n got %+v\nwant %+v", got, r)
		}
	}
}

func TestNexthopRoundTrip(t *testing.T) {
	for _, n := range []nlbatch.NexthopObject{
		{ID: 1, Protocol: 245, Family: unix.AF_INET, Gateway: gw1, LinkIndex: 2},
		{ID: 2, Protocol: 245, Family: unix.AF_INET6, Gateway: netip.MustParseAddr("fd00:114::3"), LinkIndex: 2},
		{ID: 3, Protocol: 245, Group: []uint32{1, 7}},
	} {
		got, err := nlbatch.ParseNexthop(payload(t, nlbatch.ReplaceNexthop(n)))
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, n) {
			t.Errorf("round trip:\n got %+v\nwant %+v", got, n)
		}
	}
}

// TestInNamespace writes through a batch into a namespace of its own and
// reads back what ip shows: per-request errors, nexthop objects, routes
// using them, every field of a rule.
func TestInNamespace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test builds a network namespace and must run as root")
	}
	if err := netns.RemoveStale(); err != nil {
		t.Fatal(err)
	}
	name := netns.Name("nlbatch")
	if err := netns.Add(name); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { netns.Delete(name) })
	ip := func(args ...string) string {
		t.Helper()
		out, err := exec.Command("ip", append([]string{"-n", name}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("ip %v: %v: %s", args, err, out)
		}
		return string(out)
	}
	ip("link", "add", "vpc0", "type", "veth", "peer", "name", "vpc1")
	ip("addr", "add", "10.114.0.10/20", "dev", "vpc0")
	ip("link", "set", "vpc0", "up")
	ip("link", "set", "vpc1", "up")
	ns, err := vnetns.GetFromName(name)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	c, err := nlbatch.Open(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	link := 0
	for _, l := range strings.Split(ip("-o", "link", "show", "vpc0"), ":")[:1] {
		for _, ch := range l {
			link = link*10 + int(ch-'0')
		}
	}

	msgs := []nlbatch.Msg{
		nlbatch.ReplaceNexthop(nlbatch.NexthopObject{ID: 11, Protocol: 245, Family: unix.AF_INET, Gateway: gw1, LinkIndex: link}),
		nlbatch.ReplaceNexthop(nlbatch.NexthopObject{ID: 12, Protocol: 245, Family: unix.AF_INET, Gateway: gw2, LinkIndex: link}),
		nlbatch.ReplaceNexthop(nlbatch.NexthopObject{ID: 20, Protocol: 245, Group: []uint32{11, 12}}),
		// Not on a connected network: refused, alone.
		nlbatch.ReplaceRoute(nlbatch.Route{Family: unix.AF_INET, Table: 10000, Dst: netip.MustParsePrefix("192.0.2.0/24"), Protocol: 245, Type: unix.RTN_UNICAST, Nexthops: []nlbatch.Nexthop{{Gateway: netip.MustParseAddr("198.51.100.1"), LinkIndex: link}}}),
		nlbatch.AddRule(nlbatch.Rule{Family: unix.AF_INET, Priority: 30300, Protocol: 245, Dst: netip.MustParsePrefix("172.16.0.0/12"), Invert: true, Goto: 30400, SuppressPrefixlen: -1}),
		nlbatch.AddRule(nlbatch.Rule{Family: unix.AF_INET, Priority: 30999, Protocol: 245, Nop: true, SuppressPrefixlen: -1}),
		nlbatch.AddRule(nlbatch.Rule{Family: unix.AF_INET, Priority: 30100, Table: 254, Protocol: 245, Mark: 0x2000, Mask: 0x2000, SuppressPrefixlen: -1}),
		nlbatch.AddRule(nlbatch.Rule{Family: unix.AF_INET, Priority: 30200, Table: 254, Protocol: 245, SuppressPrefixlen: 0}),
		nlbatch.AddRule(nlbatch.Rule{Family: unix.AF_INET, Priority: 30400, Table: 10000, Protocol: 245, Src: netip.MustParsePrefix("10.114.0.0/20"), SuppressPrefixlen: -1}),
	}
	for i := range 3000 { // several chunks
		dst := netip.PrefixFrom(netip.AddrFrom4([4]byte{172, byte(16 + i/256), byte(i), 0}), 24)
		msgs = append(msgs,
			nlbatch.ReplaceRoute(nlbatch.Route{Family: unix.AF_INET, Table: 10000, Dst: dst, Protocol: 245, Type: unix.RTN_UNICAST, NHID: 20}),
			nlbatch.ReplaceRoute(nlbatch.Route{Family: unix.AF_INET, Table: 10000, Dst: dst, Protocol: 245, Type: unix.RTN_UNREACHABLE, Priority: 1<<32 - 1}))
	}
	// A second rule add is a duplicate: refused (EEXIST), last in a chunk.
	msgs = append(msgs, nlbatch.AddRule(nlbatch.Rule{Family: unix.AF_INET, Priority: 30200, Table: 254, Protocol: 245, SuppressPrefixlen: 0}))
	errs := c.Send(msgs)
	for i, err := range errs {
		switch i {
		case 3:
			if err == nil || !strings.Contains(err.Error(), "network is unreachable") {
				t.Errorf("route through an unreachable gateway: %v", err)
			}
		case len(msgs) - 1:
			if err == nil || !strings.Contains(err.Error(), "file exists") {
				t.Errorf("duplicate rule: %v", err)
			}
		default:
			if err != nil {
				t.Errorf("request %d: %v", i, err)
			}
		}
	}
	rules := ip("rule")
	for _, r := range []string{
		"30100:\tfrom all fwmark 0x2000/0x2000 lookup main proto 245",
		"30200:\tfrom all lookup main suppress_prefixlength 0 proto 245",
		"30300:\tnot from all to 172.16.0.0/12 goto 30400 proto 245",
		"30400:\tfrom 10.114.0.0/20 lookup 10000 proto 245",
	} {
		if !strings.Contains(rules, r+"\n") {
			t.Errorf("ip rule lacks %q:\n%s", r, rules)
		}
	}
	if got := ip("nexthop", "show", "id", "20"); !strings.Contains(got, "id 20 group 11/12 proto 245") {
		t.Errorf("ip nexthop show id 20: %q", got)
	}
	shown := ip("route", "show", "table", "10000")
	if !strings.Contains(shown, "172.16.0.0/24 nhid 20 proto 245") || strings.Count(shown, "nhid 20") != 3000 || strings.Count(shown, "unreachable") != 3000 {
		t.Errorf("table 10000 holds %d routes with nhid 20 and %d unreachable", strings.Count(shown, "nhid 20"), strings.Count(shown, "unreachable"))
	}

	routes, err := c.Routes(unix.AF_INET, 245)
	if err != nil {
		t.Fatal(err)
	}
	nhid := 0
	for _, r := range routes {
		if r.NHID == 20 {
			nhid++
		}
	}
	if len(routes) != 6000 || nhid != 3000 {
		t.Errorf("dump: %d routes, %d with nhid 20; want 6000 and 3000", len(routes), nhid)
	}
	// One table's dump is filtered by the kernel (strict checking): the
	// table alone, a table id past 255 too; a table the family does not
	// have has no routes, not an error.
	ip("route", "add", "198.51.100.0/24", "via", "10.114.0.3", "table", "10001", "proto", "245")
	ip("route", "add", "198.51.100.0/25", "via", "10.114.0.3", "table", "10001", "proto", "boot")
	one, err := c.RoutesIn(unix.AF_INET, 245, 10001)
	if err != nil || len(one) != 1 || one[0].Table != 10001 || one[0].Dst != netip.MustParsePrefix("198.51.100.0/24") {
		t.Errorf("dump of table 10001: %+v, %v; want its one route of protocol 245", one, err)
	}
	if none, err := c.RoutesIn(unix.AF_INET6, 245, 10001); err != nil || len(none) != 0 {
		t.Errorf("IPv6 dump of a table IPv6 does not have: %+v, %v; want nothing", none, err)
	}
	if none, err := c.RoutesIn(unix.AF_INET, 245, 10002); err != nil || len(none) != 0 {
		t.Errorf("dump of a table that does not exist: %+v, %v; want nothing", none, err)
	}
	// A dump the kernel refuses fails (its error comes in NLMSG_DONE).
	if err := c.Dump(nlbatch.Msg{Type: unix.RTM_GETROUTE, Body: []byte{unix.AF_INET, 24, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}}, func(uint16, []byte) error { return nil }); err == nil {
		t.Error("a strict dump with a destination length was not refused")
	}
	objs, err := c.Nexthops()
	if err != nil {
		t.Fatal(err)
	}
	if len(objs) != 3 || !reflect.DeepEqual(objs[2].Group, []uint32{11, 12}) || objs[0].Gateway != gw1 || objs[0].LinkIndex != link {
		t.Errorf("nexthop dump: %+v", objs)
	}

	// Deleting the group takes its routes with it; the backstops stay.
	if errs := c.Send([]nlbatch.Msg{nlbatch.DeleteNexthop(20), nlbatch.DeleteNexthop(99)}); errs[0] != nil || errs[1] == nil {
		t.Errorf("deleting nexthops: %v", errs)
	}
	if shown := ip("route", "show", "table", "10000"); strings.Contains(shown, "nhid") || strings.Count(shown, "unreachable") != 3000 {
		t.Errorf("after deleting the group:\n%.300s", shown)
	}
}
