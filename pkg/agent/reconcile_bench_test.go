package agent

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	kubefake "k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
	"github.com/routing-agent/routing-agent/generated/clientset/versioned/fake"
	"github.com/routing-agent/routing-agent/pkg/applier"
	"github.com/routing-agent/routing-agent/pkg/lab/netns"
	"github.com/routing-agent/routing-agent/pkg/lab/vpcnode"
	"github.com/routing-agent/routing-agent/pkg/nodefacts"
	"github.com/routing-agent/routing-agent/pkg/planner"
)

// benchAgent is an Agent on fake clientsets whose kernel is a bare network
// namespace: one VPC interface, 10.114.0.10/20, on which gateways
// 10.114.0.3 and .4 are directly connected.
type benchAgent struct {
	*Agent
	ns     string
	h      *netlink.Handle
	client *fake.Clientset
	objs   []*v1alpha1.Route
}

// newBenchAgent holds n Routes of per destinations each (consecutive /24s
// of 172.16.0.0/12, through two ECMP gateways), their informers synced,
// and the first reconcile done.
// With view, the agent keeps a kernel view (Options.DumpHandle) fed by its
// own watch of the namespace.
func newBenchAgent(b testing.TB, purpose string, n, per int, view bool) *benchAgent {
	b.Helper()
	name, h := vpcnode.New(b, purpose)

	routes := vpcnode.Routes(n, per)
	var objs []runtime.Object
	for _, r := range routes {
		objs = append(objs, r)
	}
	client := fake.NewSimpleClientset(objs...)
	kube := kubefake.NewSimpleClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "bench"}})
	resolv := filepath.Join(b.TempDir(), "resolv.conf")
	if err := os.WriteFile(resolv, []byte("nameserver 198.51.100.53\n"), 0o644); err != nil {
		b.Fatal(err)
	}
	opts := Options{NodeName: "bench", Planner: planner.DefaultConfig(), ResyncPeriod: time.Hour, ResolvConf: resolv}
	ns, err := vnetns.GetFromName(name)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ns.Close() })
	if view {
		dumps, closeDumps, err := netns.NetlinkHandle(name)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(closeDumps)
		opts.DumpHandle, opts.KernelNamespace = dumps, &ns
	}
	a := New(opts, client, kube, h, logr.Discard())
	// As Run sets it: a reconcile compares each Route's result with the
	// last one's for its Events (none here: nothing fails).
	a.recorder = record.NewFakeRecorder(1 << 16)
	if view && a.view == nil {
		b.Fatal("no kernel view")
	}
	// As the agent runs: batched writes and nexthop objects (its routes
	// are read with their nexthop ids).
	if err := a.SetNamespace(ns); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { a.applier.Close() })
	ctx, cancel := context.WithCancel(context.Background())
	b.Cleanup(cancel)
	if view {
		watching := make(chan struct{})
		go func() {
			a.watchKernel(ctx)
			close(watching)
		}()
		b.Cleanup(func() { cancel(); <-watching })
		// watchKernel calls Watching once subscribed; reconciles before
		// that read everything.
		for deadline := time.Now().Add(5 * time.Second); !a.view.Watched(); time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				b.Fatal("the kernel watch never started")
			}
		}
	}
	a.routeFactory.Start(ctx.Done())
	a.nodeFactory.Start(ctx.Done())
	a.epFactory.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), a.synced...) {
		b.Fatal("caches did not sync")
	}
	if err := a.reconcile(); err != nil {
		b.Fatal(err)
	}
	for _, r := range a.last.Results {
		if r.Phase != planner.Applied {
			b.Fatalf("%s: %s %s", r.Name, r.Reason, r.Message)
		}
	}
	if view {
		// The notifications of the cold apply mark every table dirty as
		// they are read: once they are, one reconcile dumps them again.
		time.Sleep(time.Second)
		if err := a.reconcile(); err != nil {
			b.Fatal(err)
		}
	}
	return &benchAgent{Agent: a, ns: name, h: h, client: client, objs: routes}
}

// change flips the gateways of Route i between one and two (or, with
// destination, its last destination between its own and a /24 no Route
// has, among theirs) and waits until the informer's cache has the new version: what a
// reconcile then finds.
func (ba *benchAgent) change(b *testing.B, i, round int, destination bool) {
	b.Helper()
	gateways := [][]string{{"10.114.0.3"}, {"10.114.0.3", "10.114.0.4"}}[round%2]
	r := ba.objs[i].DeepCopy()
	if destination {
		gateways = r.Spec.Gateways
		last := len(r.Spec.Destinations) - 1
		r.Spec.Destinations[last] = []string{vpcnode.Routes(i+1, len(r.Spec.Destinations))[i].Spec.Destinations[last], "172.23.250.0/24"}[round%2]
	}
	r.Spec.Gateways = gateways
	r.Generation++
	updated, err := ba.client.NetworkingV1alpha1().Routes().Update(context.Background(), r, metav1.UpdateOptions{})
	if err != nil {
		b.Fatal(err)
	}
	ba.objs[i] = updated
	for deadline := time.Now().Add(5 * time.Second); ; {
		got, err := ba.Agent.routes.Get(r.Name)
		if err == nil && got.Generation == r.Generation {
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("the informer never saw %s change", r.Name)
		}
		time.Sleep(time.Millisecond)
	}
}

// BenchmarkReconcileOneOf1000 is the agent's reconcile after one Route
// among 1,000 (2 destinations each: 4,000 routes with their backstops, the
// dispatch's rules, a nexthop group per table) changed its gateways: its
// table's group is replaced (its 2 routes stay on the group). It runs
// the agent with its kernel view and, as the baseline, without (every
// reconcile reads every owned route and rule), and reports the ratios;
// both report what the parts of a reconcile cost on their own. The
// "view-destination" run changes a destination instead (a route and its
// backstop replaced, one removed, the dispatch laid out again).
//
//	go test -run '^$' -bench ReconcileOneOf1000 -benchtime 100x ./pkg/agent
func BenchmarkReconcileOneOf1000(b *testing.B) {
	var full, fullCPU float64
	for _, mode := range []struct {
		name              string
		view, destination bool
	}{{"full-read", false, false}, {"view", true, false}, {"view-destination", true, true}} {
		b.Run(mode.name, func(b *testing.B) {
			ba := newBenchAgent(b, "bench-rec", 1000, 2, mode.view)
			ms, cpu := ba.benchChanges(b, mode.destination)
			if mode.destination {
				return
			}
			ba.reportParts(b)
			if !mode.view {
				full, fullCPU = ms, cpu
			} else if full > 0 && fullCPU > 0 {
				b.ReportMetric(ms/full, "x-full-read")
				b.ReportMetric(cpu/fullCPU, "x-full-read-cpu")
			}
		})
	}
}

// benchChanges changes one Route b.N times, reconciling after each, and
// returns the mean reconcile time and CPU time in milliseconds.
func (ba *benchAgent) benchChanges(b *testing.B, destination bool) (ms, cpuMS float64) {
	before := ba.applier.Writes.Total()
	var stats applier.ViewStats
	if ba.view != nil {
		stats = ba.view.Stats()
	}
	var total, cpu time.Duration
	each := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := range b.N {
		b.StopTimer()
		ba.change(b, 500, i, destination)
		b.StartTimer()
		began, cpuBegan := time.Now(), processCPU(b)
		if err := ba.reconcile(); err != nil {
			b.Fatal(err)
		}
		took := time.Since(began)
		total += took
		each = append(each, took)
		cpu += processCPU(b) - cpuBegan
	}
	b.StopTimer()
	ms = total.Seconds() * 1e3 / float64(b.N)
	cpuMS = cpu.Seconds() * 1e3 / float64(b.N)
	b.ReportMetric(float64(ba.applier.Writes.Total()-before)/float64(b.N), "writes/op")
	b.ReportMetric(ms, "ms/change")
	// The mean carries the reconciles that also collected the heap and
	// returned it to the kernel (releaseMemory, every 5 s at most) or
	// waited for the other core; the median is the typical change.
	slices.Sort(each)
	b.ReportMetric(each[len(each)/2].Seconds()*1e3, "p50-ms/change")
	// The process's CPU time (every goroutine's, the garbage collector's
	// too) while it reconciled: what a loaded machine does not inflate.
	b.ReportMetric(cpuMS, "cpu-ms/change")
	if ba.view != nil {
		after := ba.view.Stats()
		b.ReportMetric(float64(after.Full-stats.Full)/float64(b.N), "full-reads/op")
		b.ReportMetric(float64(after.Tables-stats.Tables)/float64(b.N), "table-dumps/op")
		b.ReportMetric(float64(after.KeptNexthops-stats.KeptNexthops)/float64(b.N), "kept-nexthops/op")
	}
	return ms, cpuMS
}

// processCPU is the CPU time the process has used, user and system.
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// reportParts times, a few rounds each, the parts of one reconcile at
// rest: reading the node, planning (from nothing, and with the agent's
// Memo), reading the kernel (without a view),
// an Apply with nothing to write (its read, through the view if any, and
// the diff), building the status.
func (ba *benchAgent) reportParts(b *testing.B) {
	const rounds = 5
	timeIt := func(unit string, f func()) {
		began := time.Now()
		for range rounds {
			f()
		}
		b.ReportMetric(time.Since(began).Seconds()*1e3/rounds, unit)
	}
	var facts planner.Node
	dumps := ba.h
	if ba.view != nil {
		dumps = ba.opts.DumpHandle // the main table alone
	}
	timeIt("ms-nodefacts", func() {
		var err error
		if facts, err = nodefacts.ReadThrough(ba.h, dumps); err != nil {
			b.Fatal(err)
		}
	})
	facts.DNSServers = ba.dnsServers()
	facts.ControlPlane = ba.controlPlane(time.Now())
	input := planner.Input{Config: ba.opts.Planner, Node: facts, Routes: ba.objs, Tables: ba.tables, Layout: ba.layout(nil)}
	var plan planner.Plan
	// From nothing, and as the agent plans: with its Memo, which holds
	// the dispatch of these destinations.
	timeIt("ms-plan-cold", func() { plan = planner.Compute(input) })
	input.Memo = &ba.memo
	timeIt("ms-plan", func() { plan = planner.Compute(input) })
	if ba.view == nil {
		timeIt("ms-kernel-read", func() {
			if _, err := ba.applier.Read(); err != nil {
				b.Fatal(err)
			}
		})
	}
	timeIt("ms-apply-at-rest", func() {
		if rep, err := ba.applier.Apply(plan); err != nil || rep.Changes != 0 {
			b.Fatalf("apply at rest: %d changes, %v", rep.Changes, err)
		}
	})
	timeIt("ms-status", func() { ba.buildStatus(plan, ba.prober.States(), applier.Report{}, nil, nil) })
}

// TestReconcileKeepsTheDispatchInPlace: a Route added among 300 rewrites a
// few of the dispatch's rules, not the ~300 after it (the agent plans with
// the layout its last plan left), and an unchanged plan writes nothing.
// The /25 inside a /24 of the trie's blocks splits that block: one half
// moves (at most 8 rules), with the new rule and skips.
func TestReconcileKeepsTheDispatchInPlace(t *testing.T) {
	ba := newBenchAgent(t, "layout", 300, 1, false)
	writes := func() int64 {
		w := &ba.applier.Writes
		return w.RuleAdd.Load() + w.RuleDelete.Load()
	}
	for _, step := range []struct {
		what string
		dst  string
		max  int64
	}{{"a Route added in the middle", "172.16.150.128/25", 16}, {"nothing changed", "", 0}} {
		if step.dst != "" {
			r := &v1alpha1.Route{
				ObjectMeta: metav1.ObjectMeta{Name: "added", Generation: 1, CreationTimestamp: metav1.NewTime(time.Unix(5000, 0))},
				Spec:       v1alpha1.RouteSpec{Destinations: []string{step.dst}, Gateways: []string{"10.114.0.3"}},
			}
			if _, err := ba.client.NetworkingV1alpha1().Routes().Create(context.Background(), r, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
				if _, err := ba.Agent.routes.Get("added"); err == nil {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("the informer never saw the new Route")
				}
			}
		}
		before := writes()
		if err := ba.reconcile(); err != nil {
			t.Fatal(err)
		}
		if n := writes() - before; n > step.max {
			t.Errorf("%s: %d rule writes, want at most %d", step.what, n, step.max)
		}
	}
}
