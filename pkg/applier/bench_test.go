package applier_test

import (
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
	"github.com/routing-agent/routing-agent/pkg/applier"
	"github.com/routing-agent/routing-agent/pkg/kernelwatch"
	"github.com/routing-agent/routing-agent/pkg/lab/netns"
	"github.com/routing-agent/routing-agent/pkg/lab/vpcnode"
	"github.com/routing-agent/routing-agent/pkg/nodefacts"
	"github.com/routing-agent/routing-agent/pkg/planner"
)

// benchNS is a bare node namespace: one VPC interface, 10.114.0.10/20, on
// which gateways 10.114.0.3 and .4 are directly connected.
type benchNS struct {
	name string
	h    *netlink.Handle
	node planner.Node
}

func newBenchNS(b *testing.B, purpose string) *benchNS {
	b.Helper()
	name, h := vpcnode.New(b, purpose)
	node, err := nodefacts.Read(h)
	if err != nil {
		b.Fatal(err)
	}
	return &benchNS{name: name, h: h, node: node}
}

// benchRoutes are the benchmarks' Routes (vpcnode.Routes).
func benchRoutes(n, per int) []*v1alpha1.Route { return vpcnode.Routes(n, per) }

func (n *benchNS) plan(b *testing.B, routes []*v1alpha1.Route) planner.Plan {
	plan := planner.Compute(planner.Input{Config: planner.DefaultConfig(), Node: n.node, Routes: routes})
	for _, r := range plan.Results {
		if r.Phase != planner.Applied {
			b.Fatalf("%s: %s %s", r.Name, r.Reason, r.Message)
		}
	}
	return plan
}

var shapes = []struct {
	name        string
	routes, per int
	// bare drops the backstops from the plan: the layout before them,
	// measured in the same run for what they cost.
	bare bool
	// perRoute writes every route with its gateways, as on a kernel
	// without nexthop objects (the fallback), against an ip -batch of the
	// same.
	perRoute bool
}{{"1x4096", 1, 4096, false, false}, {"500x8", 500, 8, false, false}, {"1x4096-without-backstops", 1, 4096, true, false}, {"1x4096-per-route", 1, 4096, false, true}}

// withoutBackstops is plan less its backstop routes.
func withoutBackstops(plan planner.Plan) planner.Plan {
	plan.Routes = slices.DeleteFunc(slices.Clone(plan.Routes), func(r planner.Route) bool { return r.Backstop })
	return plan
}

// BenchmarkColdApply installs a whole plan into an empty namespace with
// netlink; BenchmarkIPBatchCold installs the same nexthop objects, rules
// and routes with one `ip -batch`, the fastest way iproute2 offers (the
// lines of planner's CommandsWithNexthops, or Commands for the per-route
// shape). Compare them in one run:
//
//	go test -run '^$' -bench 'Cold' -benchtime 20x ./pkg/applier
func BenchmarkColdApply(b *testing.B) {
	for _, s := range shapes {
		b.Run(s.name, func(b *testing.B) {
			n := newBenchNS(b, "bench-nl")
			plan := n.plan(b, benchRoutes(s.routes, s.per))
			if s.bare {
				plan = withoutBackstops(plan)
			}
			ap := newApplierIn(b, n.name, n.h, planner.DefaultConfig())
			if s.perRoute {
				ap.DisableNexthopObjects()
			}
			b.ResetTimer()
			for range b.N {
				b.StopTimer()
				if _, err := ap.Cleanup(); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				if _, err := ap.Apply(plan); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(len(plan.Routes)+len(plan.Rules)), "objects/op")
		})
	}
}

func BenchmarkIPBatchCold(b *testing.B) {
	for _, s := range shapes {
		b.Run(s.name, func(b *testing.B) {
			n := newBenchNS(b, "bench-ip")
			plan := n.plan(b, benchRoutes(s.routes, s.per))
			if s.bare {
				plan = withoutBackstops(plan)
			}
			commands := plan.CommandsWithNexthops(planner.DefaultProtocol)
			if s.perRoute {
				commands = plan.Commands(planner.DefaultProtocol)
			}
			// IPv4 only: ip's rules default to it (and ip -4 would refuse
			// the groups, which have no family).
			var lines []string
			for _, c := range commands {
				lines = append(lines, strings.TrimPrefix(strings.TrimPrefix(c, "ip "), "-4 "))
			}
			batch := filepath.Join(b.TempDir(), "batch")
			if err := os.WriteFile(batch, []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
				b.Fatal(err)
			}
			ap := newApplierIn(b, n.name, n.h, planner.DefaultConfig())
			if s.perRoute {
				ap.DisableNexthopObjects()
			}
			b.ResetTimer()
			for range b.N {
				b.StopTimer()
				if _, err := ap.Cleanup(); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				if out, err := exec.Command("ip", "-n", n.name, "-batch", batch).CombinedOutput(); err != nil {
					b.Fatalf("ip -batch: %v: %s", err, out)
				}
			}
			b.StopTimer()
			// The same state as the applier's: a following Apply has nothing to do.
			if rep, err := ap.Apply(plan); err != nil || rep.Changes != 0 {
				b.Fatalf("ip -batch left a different state: %d changes, %v", rep.Changes, err)
			}
		})
	}
}

// BenchmarkFailover4096 takes one of the two gateways of a Route with
// 4,096 destinations out of use (planner.Input.Down, as the prober reports
// a dead gateway) and back, with nexthop objects and with routes that name
// their gateways (the fallback on kernels without them), in one run. Each
// op is one Apply of the changed plan; writes/op is what it wrote,
// kernel-ms/op (and its median, kernel-ms-p50) how long after Apply was
// called the kernel was done (with nexthop objects Report.NexthopsIn, when
// the group holds the new gateways; per route the whole Apply, whose last
// write is the last route), ms/op the whole Apply (it also reads the
// kernel back). With a kernel view (nexthop-objects-view, its notifications
// left unread: its own writes mark what it reads) the Apply reads the
// group's table again after the replace, not everything.
func BenchmarkFailover4096(b *testing.B) {
	for _, mode := range []struct {
		name           string
		perRoute, view bool
	}{{"nexthop-objects", false, false}, {"nexthop-objects-view", false, true}, {"per-route", true, false}} {
		for _, dir := range []string{"down", "up"} {
			b.Run(mode.name+"/"+dir, func(b *testing.B) {
				n := newBenchNS(b, "bench-fo")
				routes := benchRoutes(1, 4096)
				ap := newApplierIn(b, n.name, n.h, planner.DefaultConfig())
				if mode.perRoute {
					ap.DisableNexthopObjects()
				}
				var view *applier.View
				if mode.view {
					dumps, closeDumps, err := netns.NetlinkHandle(n.name)
					if err != nil {
						b.Fatal(err)
					}
					b.Cleanup(closeDumps)
					if view, err = ap.UseView(dumps); err != nil {
						b.Fatal(err)
					}
					if err := view.Watching(kernelwatch.Routes | kernelwatch.Rules | kernelwatch.Links | kernelwatch.Addrs); err != nil {
						b.Fatal(err)
					}
				}
				plan := func(down bool) planner.Plan {
					in := planner.Input{Config: planner.DefaultConfig(), Node: n.node, Routes: routes}
					if down {
						in.Down = map[netip.Addr]bool{netip.MustParseAddr("10.114.0.4"): true}
					}
					return planner.Compute(in)
				}
				up, down := plan(false), plan(true)
				before, after := up, down
				if dir == "up" {
					before, after = down, up
				}
				if _, err := ap.Apply(before); err != nil {
					b.Fatal(err)
				}
				var writes int64
				var kernel, total time.Duration
				var kernels []time.Duration
				b.ResetTimer()
				for range b.N {
					b.StopTimer()
					if _, err := ap.Apply(before); err != nil {
						b.Fatal(err)
					}
					w := ap.Writes.Total()
					b.StartTimer()
					begin := time.Now()
					rep, err := ap.Apply(after)
					took := time.Since(begin)
					b.StopTimer()
					if err != nil || len(rep.Rejected) > 0 {
						b.Fatalf("apply: %v, %v", err, rep.Rejected)
					}
					writes += ap.Writes.Total() - w
					total += took
					k := rep.NexthopsIn
					if mode.perRoute {
						k = took
					}
					kernel += k
					kernels = append(kernels, k)
					b.StartTimer()
				}
				b.StopTimer()
				if got := n.routeVia(b, "172.16.0.1"); (dir == "down") != !strings.Contains(got, "10.114.0.4") {
					b.Errorf("after going %s: ip route get 172.16.0.1 = %q", dir, got)
				}
				b.ReportMetric(float64(writes)/float64(b.N), "writes/op")
				b.ReportMetric(float64(kernel.Microseconds())/1e3/float64(b.N), "kernel-ms/op")
				// The median too: on a busy machine a few slow ops drag the mean.
				slices.Sort(kernels)
				b.ReportMetric(float64(kernels[len(kernels)/2].Microseconds())/1e3, "kernel-ms-p50")
				b.ReportMetric(float64(total.Microseconds())/1e3/float64(b.N), "ms/op")
				if view != nil {
					if rep, err := ap.Apply(after); err != nil || rep.Changes != 0 {
						b.Errorf("the same plan again through the view: %d writes, %v", rep.Changes, err)
					}
					if s := view.Stats(); s.Full != 1 {
						b.Errorf("view: %+v, want one full read (the first apply)", s)
					}
				}
			})
		}
	}
}

// routeVia is how the namespace routes traffic to dst, every path.
func (n *benchNS) routeVia(b *testing.B, dst string) string {
	out, err := exec.Command("ip", "-n", n.name, "route", "show", "table", "all", "match", dst, "proto", "245").CombinedOutput()
	if err != nil {
		b.Fatalf("ip route show: %v: %s", err, out)
	}
	return string(out)
}

// BenchmarkIncrementalOneOf500 changes one Route's gateways among 500 Routes
// of 8 destinations and applies: the writes are that Route's 8 routes.
func BenchmarkIncrementalOneOf500(b *testing.B) {
	n := newBenchNS(b, "bench-inc")
	routes := benchRoutes(500, 8)
	ap := newApplierIn(b, n.name, n.h, planner.DefaultConfig())
	if _, err := ap.Apply(n.plan(b, routes)); err != nil {
		b.Fatal(err)
	}
	gateways := [][]string{{"10.114.0.3"}, {"10.114.0.3", "10.114.0.4"}}
	before := ap.Writes.Total()
	b.ResetTimer()
	for i := range b.N {
		routes[250].Spec.Gateways = gateways[i%2]
		if _, err := ap.Apply(n.plan(b, routes)); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(ap.Writes.Total()-before)/float64(b.N), "writes/op")
}

// BenchmarkCompute is the planner alone for 500 Routes x 8 destinations.
func BenchmarkCompute(b *testing.B) {
	node := planner.Node{
		Links:     []planner.Link{{Index: 2, Name: "vpc0"}},
		Addresses: []planner.Address{{LinkIndex: 2, Prefix: netip.MustParsePrefix("10.114.0.10/20")}},
	}
	routes := benchRoutes(500, 8)
	for range b.N {
		planner.Compute(planner.Input{Config: planner.DefaultConfig(), Node: node, Routes: routes})
	}
}
