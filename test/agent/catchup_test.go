package agent_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
)

// TestCatchUp stops the API server, starts it again and checks that a Route
// created once it is ready reaches the kernel within the product's 10 s,
// and its NodeRouting says so. The outage is shorter than
// BenchmarkCatchUp's 45 s, which gives the figure, and still long enough
// for client-go's own backoff to miss the mark: without the agent's
// /readyz gate this took 60.6 s.
func TestCatchUp(t *testing.T) {
	e := newEnv(t, "catchup", 1)
	c := e.catchUp(20*time.Second, "198.51.100.128/26")
	t.Logf("20 s outage: a Route created once the API server was ready reached the kernel %s later; the agent made %.0f API requests during the outage",
		c.after.Round(time.Millisecond), c.requests)
	for _, l := range strings.Split(e.logs(0), "\n") {
		if strings.Contains(l, "informers") {
			t.Log(l) // the agent's word on the outage
		}
	}
	if c.after > 10*time.Second {
		t.Fatalf("caught up %s after the API server was ready, more than 10 s\nlog:\n%s", c.after.Round(time.Millisecond), tail(e.logs(0), 30))
	}
	e.eventually(10*time.Second, "the NodeRouting says the new Route is applied", func() (bool, string) {
		s := routeState(e.nodeRouting(0), "after-outage")
		return s != nil && s.Phase == v1alpha1.RouteApplied, fmt.Sprintf("%+v", s)
	})
}

// caughtUp is what catchUp measured.
type caughtUp struct {
	// after is from the API server being ready again to the new Route's
	// route in node 0's kernel.
	after time.Duration
	// requests are those node 0's agent made while the API server was
	// down (failed ones included).
	requests float64
}

// catchUp stops the API server for outage, starts it again (StartAPIServer
// returns once its /readyz says ok), creates a Route to dst through
// 10.114.0.3 and measures how long it takes to reach node 0's kernel. It
// waits up to 3 minutes, so that the figure is there even when it is bad.
func (e *env) catchUp(outage time.Duration, dst string) caughtUp {
	e.t.Helper()
	requests := func() float64 { return e.metric(0, "routing_agent_api_requests_total") }
	before := requests()
	e.cp.StopAPIServer()
	time.Sleep(outage)
	during := requests() - before
	if err := e.cp.StartAPIServer(context.Background()); err != nil {
		e.t.Fatal(err)
	}
	ready := time.Now()
	e.applyRoute(newRoute("after-outage", []string{dst}, []string{"10.114.0.3"}))
	for !strings.Contains(e.routesOn(0), dst+" ") {
		if time.Since(ready) > 3*time.Minute {
			e.t.Fatalf("a Route created after the outage not in the kernel 3 minutes after the API server was ready\nlog:\n%s", tail(e.logs(0), 30))
		}
		time.Sleep(20 * time.Millisecond)
	}
	return caughtUp{after: time.Since(ready), requests: during}
}
