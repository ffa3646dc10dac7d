package connmark

import (
	"flag"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/ipv4"

	"github.com/routing-agent/routing-agent/pkg/lab/netns"
)

// BenchmarkForwarding measures the per-packet cost of the table: packets per
// second a node namespace forwards from a sender namespace to a sink, for
// 64-byte frames (18-byte UDP payload), in three configurations measured
// interleaved in the same run:
//
//   - bare:    no nftables at all in the node (no conntrack either);
//   - without: a kube-proxy-like nat table with a DNAT rule only, so conntrack
//     runs, as on every Kubernetes node: the baseline the table is judged
//     against;
//   - with:    the same plus Apply(Spec{Exclude: ["lo"]}): every packet from the sender is marked.
//
// Traffic is one direction only (the sink does not answer), so each UDP flow
// stays in conntrack state NEW and every packet takes the table's costliest
// path: the iifname match and the ct mark write.
//
// By default it runs 3 rounds of 2 s per configuration; -benchtime Nx runs
// N rounds of 1 s (so -benchtime 1x is one quick round).
func BenchmarkForwarding(b *testing.B) {
	rounds, dur := 3, 2*time.Second
	if bt := flag.Lookup("test.benchtime"); bt != nil && strings.HasSuffix(bt.Value.String(), "x") {
		rounds, dur = b.N, time.Second
	}
	sender, node, sink := newNS(b, "cmbsend"), newNS(b, "cmbnode"), newNS(b, "cmbsink")
	veth(b, sender, "s0", node, "f0")
	veth(b, node, "f1", sink, "k0")
	script(b, sender, `
		ip addr add 10.201.0.2/24 dev s0
		ip route add default via 10.201.0.1`)
	script(b, node, `
		sysctl -qw net.ipv4.ip_forward=1
		ip addr add 10.201.0.1/24 dev f0
		ip addr add 10.202.0.1/24 dev f1`)
	script(b, sink, `
		ip addr add 10.202.0.2/24 dev k0
		ip route add default via 10.202.0.1`)
	// A bound socket that is never read: packets to it are dropped when its
	// buffer is full, without the ICMP errors a closed port would send back.
	var sinkConn net.PacketConn
	if err := netns.Do(sink, func() (err error) {
		sinkConn, err = net.ListenPacket("udp4", "10.202.0.2:9000")
		return err
	}); err != nil {
		b.Fatal(err)
	}
	defer sinkConn.Close()

	tbl, err := New(nsFd(b, node))
	if err != nil {
		b.Fatal(err)
	}
	// A NodePort-like DNAT the traffic never matches: a nat statement is
	// what makes nftables run conntrack in the namespace (an empty nat chain
	// does not).
	const kube = `
table ip kube {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr 10.201.0.1 tcp dport 30080 dnat to 10.202.0.2:80
	}
}`
	configs := []struct {
		name  string
		setup func()
	}{
		{"bare", func() {
			if _, err := tbl.Remove(""); err != nil {
				b.Fatal(err)
			}
			run(b, node, "nft", "flush", "ruleset")
		}},
		{"without", func() {
			if _, err := tbl.Remove(""); err != nil {
				b.Fatal(err)
			}
			nft(b, node, "flush ruleset\n"+kube)
		}},
		{"with", func() {
			if _, err := tbl.Apply(Spec{Mark: 0x1000, Exclude: []string{"lo"}}); err != nil {
				b.Fatal(err)
			}
		}},
	}

	pps := map[string][]float64{}
	for r := 0; r < rounds; r++ {
		for _, c := range configs {
			c.setup()
			p := measure(b, sender, sink, "k0", dur)
			pps[c.name] = append(pps[c.name], p)
			if r == 0 && c.name == "without" {
				// The baseline must track connections, as every
				// Kubernetes node does.
				if n := strings.TrimSpace(run(b, node, "cat", "/proc/sys/net/netfilter/nf_conntrack_count")); n == "0" {
					b.Fatal("no conntrack entries in the node without the table: the baseline does not track connections")
				}
			}
			b.Logf("round %d %-7s %10.0f pps", r+1, c.name, p)
		}
	}
	bare, without, with := median(pps["bare"]), median(pps["without"]), median(pps["with"])
	b.ReportMetric(bare, "pps-bare")
	b.ReportMetric(without, "pps-without")
	b.ReportMetric(with, "pps-with")
	b.ReportMetric(with/without, "with/without")
	b.ReportMetric(with/bare, "with/bare")
}

// measure sends 64-byte frames from sender to the sink's UDP port from two
// sockets (two flows, one per goroutine, as the machine has few CPUs), with
// sendmmsg, and returns what the sink's interface
// received per second over dur (after a short warm-up). Every call uses new
// sockets, hence new conntrack flows.
func measure(b *testing.B, sender, sink, sinkIf string, dur time.Duration) float64 {
	const senders, batch = 2, 64
	payload := make([]byte, 18) // 14 Ethernet + 20 IPv4 + 8 UDP + 18 + 4 FCS = 64
	var conns []*net.UDPConn
	if err := netns.Do(sender, func() error {
		for range senders {
			c, err := net.DialUDP("udp4", nil, &net.UDPAddr{IP: net.IPv4(10, 202, 0, 2), Port: 9000})
			if err != nil {
				return err
			}
			conns = append(conns, c)
		}
		return nil
	}); err != nil {
		b.Fatal(err)
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
	n0, t0 := rxPackets(b, sink, sinkIf), time.Now()
	time.Sleep(dur)
	n1, t1 := rxPackets(b, sink, sinkIf), time.Now()
	return float64(n1-n0) / t1.Sub(t0).Seconds()
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
