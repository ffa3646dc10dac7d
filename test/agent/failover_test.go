package agent_test

import (
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/routing-agent/routing-agent/pkg/lab/cluster"
	"github.com/routing-agent/routing-agent/pkg/lab/topology"
)

// startTraffic sends steady UDP from node ns to the external host
// (cluster.StartTraffic), or fails the test.
func startTraffic(t testing.TB, lab *topology.Lab, ns string, flows int, every time.Duration) *cluster.Traffic {
	t.Helper()
	tr, err := cluster.StartTraffic(lab, ns, 9100, flows, every)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Finish() }) // a test that failed half-way frees the port
	return tr
}

// flowGateway says which gateway the kernel hashes a flow to.
func (e *env) flowGateway(port int) string {
	gw, err := e.c.FlowGateway(0, port, 9100)
	if err != nil {
		e.t.Fatal(err)
	}
	return gw
}

// nexthops lists the gateways of the agent's route to dst on node 0.
func (e *env) nexthops(dst string) string {
	gws, err := e.c.Nexthops(0, dst)
	if err != nil {
		e.t.Fatal(err)
	}
	return gws
}

// waitNexthops polls until the route's gateways are want and says when.
func (e *env) waitNexthops(dst, want string, limit time.Duration) time.Duration {
	e.t.Helper()
	begin := time.Now()
	for time.Since(begin) < limit {
		if e.nexthops(dst) == want {
			return time.Since(begin)
		}
		time.Sleep(5 * time.Millisecond)
	}
	e.t.Fatalf("gateways of %s: %q, want %q after %s\n%s", dst, e.nexthops(dst), want, limit, tail(e.logs(0), 20))
	return 0
}

// silence makes gateway i drop everything it receives, link still up.
func (e *env) silence(i int, on bool) {
	e.t.Helper()
	if err := e.lab.SilenceGateway(i, on); err != nil {
		e.t.Fatal(err)
	}
}

const failoverDst = "198.51.100.0/24"

// TestFailover: a dead gateway leaves the route and traffic on the other
// gateway loses nothing; a recovered one comes back; with every gateway
// dead the route stays on them (fail closed) and status says so.
func TestFailover(t *testing.T) {
	e := newEnv(t, "failover", 1)
	e.applyRoute(newRoute("vpn", []string{failoverDst}, []string{"10.114.0.3", "10.114.0.4"}))
	e.eventually(10*time.Second, "both gateways probed Up", func() (bool, string) {
		nr := e.nodeRouting(0)
		return nr != nil && nr.Status.Summary.GatewaysUp == 2, fmt.Sprintf("%+v", nr)
	})
	e.waitNexthops(failoverDst, "10.114.0.3,10.114.0.4", 5*time.Second)

	for _, kill := range []struct {
		name       string
		down, up   func()
		downReason string
	}{
		{"link down", func() { e.lab.SetGatewayLink(1, false) }, func() { e.lab.SetGatewayLink(1, true) }, ""},
		{"silent drop", func() { e.silence(1, true) }, func() { e.silence(1, false) }, ""},
	} {
		t.Run(kill.name, func(t *testing.T) {
			e.t = t
			tr := startTraffic(t, e.lab, e.ns(0), 16, 10*time.Millisecond)
			survivors := map[int]bool{}
			for _, port := range tr.Ports {
				survivors[port] = e.flowGateway(port) == "10.114.0.3"
			}
			time.Sleep(300 * time.Millisecond)
			kill.down()
			took := e.waitNexthops(failoverDst, "10.114.0.3", 15*time.Second)
			t.Logf("%s: gateway 10.114.0.4 left the route after %s", kill.name, took.Round(time.Millisecond))
			time.Sleep(300 * time.Millisecond)
			kill.up()
			back := e.waitNexthops(failoverDst, "10.114.0.3,10.114.0.4", 15*time.Second)
			t.Logf("%s: gateway 10.114.0.4 back in the route after %s", kill.name, back.Round(time.Millisecond))
			_, loss := tr.Finish()
			n := 0
			for port, lost := range loss {
				if survivors[port] {
					n++
					if lost != 0 {
						t.Errorf("flow %d, hashed to the surviving gateway, lost %d datagrams", port, lost)
					}
				}
			}
			if n == 0 {
				t.Fatal("no flow hashed to the surviving gateway; the test proves nothing")
			}
			t.Logf("%s: loss per flow %v (%d flows on the survivor)", kill.name, loss, n)
			time.Sleep(11 * time.Second) // past the flap window, so the next kill is not damped
		})
	}

	t.Run("agent restart loses no packet", func(t *testing.T) {
		e.t = t
		tr := startTraffic(t, e.lab, e.ns(0), 16, 10*time.Millisecond)
		time.Sleep(300 * time.Millisecond)
		e.stopAgent(0, syscall.SIGTERM) // as in a rolling update
		time.Sleep(time.Second)
		e.startAgent(0)
		e.waitReady(0)
		time.Sleep(500 * time.Millisecond)
		_, loss := tr.Finish()
		for port, lost := range loss {
			if lost != 0 {
				t.Errorf("flow %d lost %d datagrams across the agent's restart", port, lost)
			}
		}
		if got := e.metric(0, "routing_agent_netlink_writes_total"); got != 0 {
			t.Errorf("the restarted agent made %v netlink writes; the kernel was already right", got)
		}
	})

	t.Run("all gateways dead: fail closed", func(t *testing.T) {
		e.t = t
		e.lab.SetGatewayLink(0, false)
		e.lab.SetGatewayLink(1, false)
		e.eventually(15*time.Second, "status says every gateway is down", func() (bool, string) {
			s := routeState(e.nodeRouting(0), "vpn")
			nr := e.nodeRouting(0)
			return s != nil && s.Reason == "AllGatewaysDown" && nr.Status.Summary.GatewaysDown == 2, fmt.Sprintf("%+v", nr)
		})
		if got := e.nexthops(failoverDst); got != "10.114.0.3,10.114.0.4" {
			t.Errorf("with every gateway dead the route holds %q; want both kept (fail closed)", got)
		}
		if out, _ := e.lab.Exec(e.ns(0), "ip", "route", "get", e.lab.ExternalAddr.String()); !strings.Contains(out, "dev vpc0") {
			t.Errorf("traffic leaks out of the node's own default route: %s", out)
		}
		e.eventually(10*time.Second, "GatewayDown and AllGatewaysDown Events", func() (bool, string) {
			out, _ := e.cp.Kubectl("get", "events", "-n", "default", "--field-selector", "involvedObject.name=vpn", "-o", "custom-columns=REASON:.reason,MESSAGE:.message").CombinedOutput()
			return strings.Contains(string(out), "GatewayDown") && strings.Contains(string(out), "AllGatewaysDown"), string(out)
		})
		e.lab.SetGatewayLink(0, true)
		e.lab.SetGatewayLink(1, true)
	})
}
