package agent_test

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
)

// BenchmarkFailover measures, at default and aggressive probe settings,
// how long a dead gateway keeps its place in a Route's nexthops (from the
// kill to the kernel's route without it) and how long a recovered one takes
// to come back, over 20 trials alternating link-down and silent-drop kills;
// then a 4,096-destination Route's failover burst and the probe cost of 16
// gateways. With -short (make test) 2 trials and a 5 s probe window.
//
//	LAB_BIN_DIR=$(hack/build-lab-tools.sh) go test -run '^$' -bench Failover -benchtime 1x -timeout 30m ./test/agent
func BenchmarkFailover(b *testing.B) {
	for _, setting := range []struct {
		name string
		args []string
	}{
		{"default", nil},
		{"aggressive", []string{"--probe-interval", "200ms", "--probe-timeout", "200ms", "--probe-fall", "2", "--probe-rise", "2"}},
	} {
		b.Run(setting.name, func(b *testing.B) {
			e := newEnvWith(b, "fo-"+setting.name[:3], 1, "30s", setting.args...)
			e.applyRoute(newRoute("vpn", []string{failoverDst}, []string{"10.114.0.3", "10.114.0.4"}))
			e.waitNexthops(failoverDst, "10.114.0.3,10.114.0.4", 10*time.Second)
			trials := 20
			if testing.Short() { // make test: one pass of each kind of kill
				trials = 2
			}
			var downs, ups []time.Duration
			for i := range trials {
				kill, revive := func() { e.lab.SetGatewayLink(1, false) }, func() { e.lab.SetGatewayLink(1, true) }
				if i%2 == 1 {
					kill, revive = func() { e.silence(1, true) }, func() { e.silence(1, false) }
				}
				start := time.Now()
				kill()
				downs = append(downs, e.waitNexthops(failoverDst, "10.114.0.3", 15*time.Second))
				time.Sleep(500 * time.Millisecond)
				revive()
				ups = append(ups, e.waitNexthops(failoverDst, "10.114.0.3,10.114.0.4", 30*time.Second))
				// Past the flap window, so each trial sees undamped recovery
				// (after the last, nothing follows).
				if i < trials-1 {
					time.Sleep(time.Until(start.Add(10*time.Second + 200*time.Millisecond)))
				}
			}
			report(b, "down", downs)
			report(b, "up", ups)
		})
	}

	b.Run("burst-4096", func(b *testing.B) {
		e := newEnvWith(b, "fo-bur", 1, "30s")
		var dsts []string
		for i := range 4096 {
			dsts = append(dsts, fmt.Sprintf("172.%d.%d.0/24", 16+i/256, i%256))
		}
		e.applyRoute(newRoute("wide", dsts, []string{"10.114.0.3", "10.114.0.4"}))
		e.waitNexthops("172.31.255.0/24", "10.114.0.3,10.114.0.4", 30*time.Second)
		ns, err := vnetns.GetFromName(e.ns(0))
		if err != nil {
			b.Fatal(err)
		}
		defer ns.Close()
		updates := make(chan netlink.RouteUpdate, 8192)
		done := make(chan struct{})
		defer close(done)
		if err := netlink.RouteSubscribeWithOptions(updates, done, netlink.RouteSubscribeOptions{Namespace: &ns, ReceiveBufferSize: 8 << 20, ReceiveBufferForceSize: true}); err != nil {
			b.Fatal(err)
		}
		kill := time.Now()
		e.silence(1, true)
		var first, last time.Time
		n := 0
		timeout := time.After(30 * time.Second)
		for n < 4096 {
			select {
			case u := <-updates:
				if u.Type == 24 && u.Protocol == 245 && u.Gw != nil && u.Gw.String() == "10.114.0.3" {
					if n == 0 {
						first = time.Now()
					}
					last = time.Now()
					n++
				}
			case <-timeout:
				b.Fatalf("only %d of 4096 routes moved off the dead gateway", n)
			}
		}
		b.Logf("4,096-destination Route: detection %s, then all 4,096 routes replaced in %s (first to last kernel notification); kill to last %s",
			first.Sub(kill).Round(time.Millisecond), last.Sub(first).Round(time.Millisecond), last.Sub(kill).Round(time.Millisecond))
		b.ReportMetric(float64(last.Sub(first).Milliseconds()), "burst-ms")
	})

	b.Run("probe-cost-16-gateways", func(b *testing.B) {
		e := newEnvWith(b, "fo-pc", 1, "30s")
		// Sixteen answering gateway addresses: eight on each gateway host.
		var gws []string
		for i := range 16 {
			addr := fmt.Sprintf("10.114.2.%d", i+1)
			if out, err := e.lab.Exec(e.lab.Gateways[i%2], "ip", "addr", "add", addr+"/20", "dev", "vpc0"); err != nil {
				b.Fatalf("%v: %s", err, out)
			}
			gws = append(gws, addr)
		}
		e.applyRoute(newRoute("wide-ecmp", []string{failoverDst}, gws))
		e.eventually(15*time.Second, "16 gateways up", func() (bool, string) {
			nr := e.nodeRouting(0)
			return nr != nil && nr.Status.Summary.GatewaysUp == 16, fmt.Sprintf("%+v", nr)
		})
		pid := e.c.Nodes[0].Agent.PID()
		rx0 := gatewayRx(b, e)
		cpu0 := cpuTicks(b, pid)
		window := 30 * time.Second
		if testing.Short() {
			window = 5 * time.Second
		}
		time.Sleep(window)
		pps := float64(gatewayRx(b, e)-rx0) / window.Seconds()
		cpu := float64(cpuTicks(b, pid)-cpu0) / 100 / window.Seconds() * 100
		b.Logf("16 gateways at default settings: %.1f packets/s received by the gateways (probes, plus ARP), agent CPU %.2f%% of a core", pps, cpu)
		b.ReportMetric(pps, "probe-pkt/s")
		b.ReportMetric(cpu, "cpu-%")
	})
}

func gatewayRx(b *testing.B, e *env) uint64 {
	var total uint64
	for i := range e.lab.Gateways {
		n, err := e.lab.GatewayForwarded(i)
		if err != nil {
			b.Fatal(err)
		}
		total += n
	}
	return total
}

func report(b *testing.B, what string, d []time.Duration) {
	slices.Sort(d)
	q := func(p float64) time.Duration { return d[int(p*float64(len(d)-1))] }
	b.Logf("gateway %s over %d trials: min %s, p50 %s, p90 %s, max %s", what, len(d), d[0].Round(time.Millisecond), q(0.5).Round(time.Millisecond), q(0.9).Round(time.Millisecond), d[len(d)-1].Round(time.Millisecond))
	b.ReportMetric(float64(q(0.5).Milliseconds()), what+"-p50-ms")
	b.ReportMetric(float64(d[len(d)-1].Milliseconds()), what+"-max-ms")
}
