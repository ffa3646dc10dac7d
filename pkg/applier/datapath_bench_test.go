package applier_test

import (
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
	"github.com/routing-agent/routing-agent/pkg/applier"
	"github.com/routing-agent/routing-agent/pkg/lab/netns"
	"github.com/routing-agent/routing-agent/pkg/lab/pktrate"
	"github.com/routing-agent/routing-agent/pkg/nodefacts"
	"github.com/routing-agent/routing-agent/pkg/planner"
)

// BenchmarkDatapath measures what the agent's rules cost a forwarded
// packet: 64-byte UDP through a node namespace (pkg/lab/pktrate) holding
// 0, 100 or 1,000 Routes of one /24 each, laid out by the applier as the
// agent lays them out, for traffic no Route matches (to 198.51.100.9,
// main's default route) and traffic to one Route's destination (through
// its table, whose gateway is the sink). For comparison, "1000-flat" is the
// layout before the dispatch: one plain `lookup <table>` rule per Route.
// All configurations are measured interleaved in one run; each ratio is
// the median over rounds of the configuration against no Routes, for the
// same traffic in the same round.
//
//	go test -run '^$' -bench Datapath ./pkg/applier
func BenchmarkDatapath(b *testing.B) {
	rounds, dur := pktrate.Rounds(b)
	lab := pktrate.New(b, "dp")
	h, closeHandle, err := netns.NetlinkHandle(lab.Node)
	if err != nil {
		b.Fatal(err)
	}
	defer closeHandle()
	node, err := nodefacts.Read(h)
	if err != nil {
		b.Fatal(err)
	}
	cfg := planner.DefaultConfig()
	ap := applier.New(h, cfg, logr.Discard())
	unmatched := netip.MustParseAddr("198.51.100.9")

	type config struct {
		name    string
		routes  int
		flat    bool
		matched netip.Addr // inside one Route's destination
	}
	configs := []config{
		{"none", 0, false, datapathDst(500)},
		{"100", 100, false, datapathDst(50)},
		{"1000", 1000, false, datapathDst(500)},
		{"1000-flat", 1000, true, datapathDst(500)},
	}
	apply := func(c config) {
		plan := planner.Compute(planner.Input{Config: cfg, Node: node, Routes: datapathRoutes(c.routes)})
		if c.flat {
			plan = flatLayout(plan, cfg)
		}
		if _, err := ap.Cleanup(); err != nil {
			b.Fatal(err)
		}
		if _, err := ap.Apply(plan); err != nil {
			b.Fatal(err)
		}
		// The matched traffic really takes its Route's table (or main
		// with none), the unmatched traffic main.
		// (ip route get names a table unless it is main.)
		got := routeGet(b, lab.Node, c.matched)
		if c.routes == 0 && strings.Contains(got, "table ") || c.routes > 0 && !strings.Contains(got, fmt.Sprintf("table %d ", tableFor(plan, c.matched))) {
			b.Fatalf("%s: ip route get %s = %q, want its Route's table", c.name, c.matched, got)
		}
		if got := routeGet(b, lab.Node, unmatched); strings.Contains(got, "table ") {
			b.Fatalf("%s: ip route get %s = %q, want main", c.name, unmatched, got)
		}
	}

	pps := map[string][]float64{}
	for r := range rounds {
		// Every other round in reverse, so that a drift of the machine's
		// speed during a round falls on both sides of each ratio.
		order := slices.Clone(configs)
		if r%2 == 1 {
			slices.Reverse(order)
		}
		for _, c := range order {
			apply(c)
			for _, t := range []struct {
				kind string
				dst  netip.Addr
			}{{"unmatched", unmatched}, {"matched", c.matched}} {
				p := lab.Measure(b, t.dst, dur)
				pps[c.name+"-"+t.kind] = append(pps[c.name+"-"+t.kind], p)
				b.Logf("round %d %-10s %-9s %9.0f pps", r+1, c.name, t.kind, p)
			}
		}
	}
	// A ratio per round, against no Routes in the same round, then their
	// median: the machine's speed moves by ±10 % between rounds.
	for _, kind := range []string{"unmatched", "matched"} {
		none := pps["none-"+kind]
		b.ReportMetric(pktrate.Median(none), "pps-none-"+kind)
		for _, c := range configs[1:] {
			p := pps[c.name+"-"+kind]
			ratios := make([]float64, len(p))
			for r := range p {
				ratios[r] = p[r] / none[r]
			}
			b.ReportMetric(pktrate.Median(p), "pps-"+c.name+"-"+kind)
			b.ReportMetric(pktrate.Median(ratios), c.name+"-"+kind+"/none")
		}
	}
}

// tableFor is the table of plan's Route whose destination holds a.
func tableFor(plan planner.Plan, a netip.Addr) uint32 {
	for _, r := range plan.Routes {
		if !r.Throw && r.Dst.Contains(a) {
			return r.Table
		}
	}
	return 0
}

// datapathRoutes are n Routes of one /24 each, consecutive in
// 172.16.0.0/12, through the pktrate sink as their gateway.
func datapathRoutes(n int) []*v1alpha1.Route {
	routes := make([]*v1alpha1.Route, n)
	for i := range routes {
		routes[i] = &v1alpha1.Route{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("r%04d", i), Generation: 1, CreationTimestamp: metav1.NewTime(time.Unix(int64(i), 0))},
			Spec: v1alpha1.RouteSpec{
				Destinations: []string{fmt.Sprintf("172.%d.%d.0/24", 16+i/256, i%256)},
				Gateways:     []string{pktrate.SinkIP.String()},
			},
		}
	}
	return routes
}

// datapathDst is an address inside Route i's destination.
func datapathDst(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{172, byte(16 + i/256), byte(i % 256), 9})
}

// flatLayout replaces plan's dispatch with one plain lookup rule per table
// at the start of the Routes' range, as the agent laid them out before.
func flatLayout(plan planner.Plan, cfg planner.Config) planner.Plan {
	rules := slices.DeleteFunc(slices.Clone(plan.Rules), func(r planner.Rule) bool {
		return r.Priority > cfg.PriorityBase+planner.OffsetRoutes
	})
	for _, res := range plan.Results {
		rules = append(rules, planner.Rule{Priority: cfg.PriorityBase + planner.OffsetRoutes, Table: res.Table, SuppressPrefixlen: -1})
	}
	plan.Rules = rules
	return plan
}

func routeGet(b *testing.B, ns string, dst netip.Addr) string {
	b.Helper()
	out, err := exec.Command("ip", "-n", ns, "route", "get", dst.String(), "from", "10.201.0.2", "iif", "f0").CombinedOutput()
	if err != nil {
		b.Fatalf("ip route get %s: %v: %s", dst, err, out)
	}
	return string(out)
}
