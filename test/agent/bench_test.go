package agent_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// BenchmarkAgent measures one agent at its default resync period:
// Route-change-to-kernel latency over 100 changes, RSS, CPU and API
// requests per minute at idle, then the same with 1,000 and with 10,000
// Routes created as `kubectl apply` creates them. With -short (make test)
// 10 changes, 5 s windows and 1,000 Routes only.
//
//	LAB_BIN_DIR=$(hack/build-lab-tools.sh) go test -run '^$' -bench Agent -benchtime 1x ./test/agent
func BenchmarkAgent(b *testing.B) {
	e := newEnvWith(b, "bench", 1, "30s")
	ctx := context.Background()

	// The kernel tells when a route lands: subscribe inside the node.
	ns, err := vnetns.GetFromName(e.ns(0))
	if err != nil {
		b.Fatal(err)
	}
	defer ns.Close()
	updates := make(chan netlink.RouteUpdate, 1024)
	done := make(chan struct{})
	defer close(done)
	if err := netlink.RouteSubscribeAt(ns, updates, done); err != nil {
		b.Fatal(err)
	}

	changes, window, levels := 100, time.Minute, []int{1000, 10000}
	if testing.Short() { // make test: one quick pass
		changes, window, levels = 10, 5*time.Second, []int{1000}
	}
	var latencies []time.Duration
	route := e.applyRoute(newRoute("latency", []string{"198.51.100.0/32"}, []string{"10.114.0.3"}))
	waitRoute(b, updates, "198.51.100.0/32")
	for i := 1; i <= changes; i++ {
		dst := fmt.Sprintf("198.51.100.%d/32", i)
		route.Spec.Destinations = []string{dst}
		begin := time.Now()
		if route, err = e.client.NetworkingV1alpha1().Routes().Update(ctx, route, metav1.UpdateOptions{}); err != nil {
			b.Fatal(err)
		}
		waitRoute(b, updates, dst)
		latencies = append(latencies, time.Since(begin))
	}
	b.Logf("the agent's own view (informer event to kernel): %.2f ms mean over %.0f changes",
		1000*e.metric(0, "routing_agent_route_apply_latency_seconds_sum")/e.metric(0, "routing_agent_route_apply_latency_seconds_count"),
		e.metric(0, "routing_agent_route_apply_latency_seconds_count"))
	slices.Sort(latencies)
	p50, p99 := latencies[len(latencies)/2], latencies[len(latencies)*99/100]
	b.Logf("Route update sent to route in the kernel, %d changes: p50 %s, p99 %s, max %s", changes, p50, p99, latencies[len(latencies)-1])
	b.ReportMetric(float64(p50.Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(p99.Microseconds())/1000, "p99-ms")

	idle := func(label string) {
		pid := e.c.Nodes[0].Agent.PID() // ip netns exec execs the agent in place
		cpu0, req0 := cpuTicks(b, pid), e.metric(0, "routing_agent_api_requests_total")
		rec0 := e.metric(0, "routing_agent_reconcile_duration_seconds_count")
		// RSS at the end of the window is the figure; its range over the
		// window (a resync every 30 s makes garbage) is logged.
		low, high := int64(math.MaxInt64), int64(0)
		for end := time.Now().Add(window); time.Now().Before(end); time.Sleep(time.Second) {
			rss := rssKiB(b, pid)
			low, high = min(low, rss), max(high, rss)
		}
		cpu1, req1 := cpuTicks(b, pid), e.metric(0, "routing_agent_api_requests_total")
		rec1 := e.metric(0, "routing_agent_reconcile_duration_seconds_count")
		cpu := float64(cpu1-cpu0) / 100 / window.Seconds() * 100 // USER_HZ is 100
		rss := rssKiB(b, pid)
		heap := e.metric(0, "go_memstats_heap_inuse_bytes") / (1 << 20)
		b.Logf("%s: RSS %.1f MiB (%.1f-%.1f over the minute; Go heap in use %.1f MiB), CPU %.2f%% of a core, %.0f API requests and %.0f reconciles in %s",
			label, float64(rss)/1024, float64(low)/1024, float64(high)/1024, heap, cpu, req1-req0, rec1-rec0, window)
		b.ReportMetric(float64(rss)/1024, label+"-rss-MiB")
		b.ReportMetric(cpu, label+"-cpu-%")
		b.ReportMetric(req1-req0, label+"-api-req/min")
	}
	idle("idle")

	// Routes as users make them, with `kubectl apply`: its annotation holds
	// a copy of the whole object, and its managedFields entry is kubectl's.
	// 1,000, then 9,000 more; each level idles as above.
	created := 0
	for _, many := range levels {
		createBulk(b, e, created, many)
		created = many
		// The agent's own count: at 10,000 Routes the NodeRouting is
		// larger than etcd takes (logged below).
		e.eventually(time.Duration(many/1000+1)*time.Minute, fmt.Sprintf("%d Routes applied", many), func() (bool, string) {
			n := e.metric(0, `routing_agent_routes{phase="Applied"}`)
			return int(n) == many+1, fmt.Sprintf("%.0f applied", n)
		})
		idle(fmt.Sprintf("%d-routes", many))
		if nr := e.nodeRouting(0); nr == nil || int(nr.Status.Summary.Applied) != many+1 {
			b.Logf("%d Routes: the NodeRouting does not show them (%v)", many, nr != nil)
		}
	}
}

// createBulk creates Routes bulk-<from> to bulk-<to-1>, one 172.x /24
// each through both gateways, as `kubectl apply` would (its
// last-applied-configuration annotation and field manager), from 8
// goroutines.
func createBulk(b *testing.B, e *env, from, to int) {
	const workers = 8
	begin := time.Now()
	create := func(w int) error {
		for i := from + w; i < to; i += workers {
			r := newRoute(fmt.Sprintf("bulk-%05d", i), []string{fmt.Sprintf("172.%d.%d.0/24", 16+i/256, i%256)}, []string{"10.114.0.3", "10.114.0.4"})
			applied, err := json.Marshal(map[string]any{
				"apiVersion": "networking.doks.digitalocean.com/v1alpha1", "kind": "Route",
				"metadata": map[string]any{"annotations": map[string]any{}, "name": r.Name},
				"spec":     r.Spec,
			})
			if err != nil {
				return err
			}
			r.Annotations = map[string]string{"kubectl.kubernetes.io/last-applied-configuration": string(applied) + "\n"}
			if _, err := e.client.NetworkingV1alpha1().Routes().Create(context.Background(), r, metav1.CreateOptions{FieldManager: "kubectl-client-side-apply"}); err != nil {
				return fmt.Errorf("creating %s: %w", r.Name, err)
			}
		}
		return nil
	}
	var wg sync.WaitGroup
	errs := make([]error, workers)
	for w := range workers {
		wg.Go(func() { errs[w] = create(w) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		b.Fatal(err)
	}
	b.Logf("created %d Routes in %s", to-from, time.Since(begin).Round(time.Millisecond))
}

func waitRoute(b *testing.B, updates chan netlink.RouteUpdate, dst string) {
	_, want, _ := net.ParseCIDR(dst)
	timeout := time.After(10 * time.Second)
	for {
		select {
		case u := <-updates:
			if u.Type == 24 /* RTM_NEWROUTE */ && u.Dst != nil && u.Dst.String() == want.String() {
				return
			}
		case <-timeout:
			b.Fatalf("%s did not reach the kernel within 10s", dst)
		}
	}
}

// cpuTicks is the process's user+system time in clock ticks.
func cpuTicks(b *testing.B, pid int) int64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	fields := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
	utime, _ := strconv.ParseInt(fields[11], 10, 64)
	stime, _ := strconv.ParseInt(fields[12], 10, 64)
	return utime + stime
}

func rssKiB(b *testing.B, pid int) int64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			v, _ := strconv.ParseInt(strings.Fields(rest)[0], 10, 64)
			return v
		}
	}
	b.Fatal("no VmRSS")
	return 0
}
