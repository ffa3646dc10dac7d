// Package pktrate measures how many packets per second a node namespace
// forwards: a sender namespace blasts 64-byte UDP frames at the node, which
// routes them on to a sink namespace that counts and drops them. The
// benchmarks of the datapath (pkg/applier: rules per Route) and of the
// connection-marking table (pkg/connmark) share it, so their figures are
// comparable. Everything lives in namespaces the caller's test owns.
package pktrate

import (
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/ipv4"

	"github.com/routing-agent/routing-agent/pkg/lab/netns"
)

// Addresses of the three namespaces: sender 10.201.0.2 — 10.201.0.1 node
// 10.202.0.1 — 10.202.0.2 sink. The node's default route is the sink,
// which drops whatever it is sent (a blackhole default, forwarding on, so
// no ICMP comes back) after its interface counted it.
var (
	NodeIn  = netip.MustParseAddr("10.201.0.1")
	SinkIP  = netip.MustParseAddr("10.202.0.2")
	SinkDev = "k0"
	// NodeOut is the node's interface towards the sink.
	NodeOut = "f1"
)

// Lab is the three namespaces.
type Lab struct {
	Sender, Node, Sink string
}

// New builds the lab in namespaces ra-<purpose>-{send,node,sink}-<pid>,
// removed when the test ends (also when it fails). It needs root.
func New(tb testing.TB, purpose string) *Lab {
	tb.Helper()
	l := &Lab{Sender: newNS(tb, purpose+"send"), Node: newNS(tb, purpose+"node"), Sink: newNS(tb, purpose+"sink")}
	veth(tb, l.Sender, "s0", l.Node, "f0")
	veth(tb, l.Node, NodeOut, l.Sink, SinkDev)
	Script(tb, l.Sender, `
		ip addr add 10.201.0.2/24 dev s0
		ip route add default via 10.201.0.1`)
	Script(tb, l.Node, `
		sysctl -qw net.ipv4.ip_forward=1
		ip addr add 10.201.0.1/24 dev f0
		ip addr add 10.202.0.1/24 dev f1
		ip route add default via 10.202.0.2`)
	Script(tb, l.Sink, `
		sysctl -qw net.ipv4.ip_forward=1
		ip addr add 10.202.0.2/24 dev k0
		ip route add blackhole default`)
	return l
}

// Rounds is how a benchmark repeats its measurements: 5 rounds of 1 s by
// default, or with -benchtime Nx N rounds of 1 s (-benchtime 1x: one quick
// round, as make test runs it).
func Rounds(b *testing.B) (int, time.Duration) {
	if bt := flag.Lookup("test.benchtime"); bt != nil && strings.HasSuffix(bt.Value.String(), "x") {
		return b.N, time.Second
	}
	return 5, time.Second
}

// Measure sends 64-byte frames from the sender to dst:9000 from two sockets
// (two flows, one per goroutine, as the machine has few CPUs) with sendmmsg,
// and returns what the sink's interface received per second over dur, after
// a short warm-up. Every call uses new sockets, hence new conntrack flows.
func (l *Lab) Measure(tb testing.TB, dst netip.Addr, dur time.Duration) float64 {
	tb.Helper()
	const senders, batch = 2, 64
	payload := make([]byte, 18) // 14 Ethernet + 20 IPv4 + 8 UDP + 18 + 4 FCS = 64
	var conns []*net.UDPConn
	if err := netns.Do(l.Sender, func() error {
		for range senders {
			c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(dst, 9000)))
			if err != nil {
				return err
			}
			conns = append(conns, c)
		}
		return nil
	}); err != nil {
		tb.Fatal(err)
	}
	var stop atomic.Bool
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			pc := ipv4.NewPacketConn(c)
			msgs := make([]ipv4.Message, batch)
			for i := range msgs {
				msgs[i].Buffers = [][]byte{payload}
			}
			for !stop.Load() {
				// sendmmsg; errors (ENOBUFS when a queue is full) only
				// mean fewer packets, which the sink's count shows.
				pc.WriteBatch(msgs, 0)
			}
		}()
	}
	defer func() { stop.Store(true); wg.Wait() }()
	time.Sleep(300 * time.Millisecond)
	n0, t0 := l.rxPackets(tb), time.Now()
	time.Sleep(dur)
	n1, t1 := l.rxPackets(tb), time.Now()
	return float64(n1-n0) / t1.Sub(t0).Seconds()
}

func (l *Lab) rxPackets(tb testing.TB) uint64 {
	tb.Helper()
	h, closeH, err := netns.NetlinkHandle(l.Sink)
	if err != nil {
		tb.Fatal(err)
	}
	defer closeH()
	link, err := h.LinkByName(SinkDev)
	if err != nil {
		tb.Fatalf("in %s: %s: %v", l.Sink, SinkDev, err)
	}
	return link.Attrs().Statistics.RxPackets
}

// Median of v.
func Median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// Script runs each non-empty line of lines as a command inside ns.
func Script(tb testing.TB, ns, lines string) {
	tb.Helper()
	for _, line := range strings.Split(lines, "\n") {
		if line = strings.TrimSpace(line); line != "" {
			if out, err := exec.Command("ip", append([]string{"netns", "exec", ns}, strings.Fields(line)...)...).CombinedOutput(); err != nil {
				tb.Fatalf("in %s: %s: %v: %s", ns, line, err, strings.TrimSpace(string(out)))
			}
		}
	}
}

func newNS(tb testing.TB, purpose string) string {
	tb.Helper()
	name := netns.Name(purpose)
	if err := netns.Add(name); err != nil {
		tb.Fatalf("creating a network namespace (this needs root): %v", err)
	}
	tb.Cleanup(func() {
		if err := netns.Delete(name); err != nil {
			tb.Errorf("removing namespace: %v", err)
		}
	})
	return name
}

// veth connects interface a in namespace nsA to b in nsB, both up; the pair
// is created inside nsA, so the machine's own namespace never holds it.
func veth(tb testing.TB, nsA, a, nsB, b string) {
	tb.Helper()
	Script(tb, nsA, fmt.Sprintf("ip link add %s type veth peer name %s netns %s\nip link set %s up", a, b, nsB, a))
	Script(tb, nsB, "ip link set "+b+" up")
}
