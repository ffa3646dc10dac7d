package connmark

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/routing-agent/routing-agent/pkg/lab/pktrate"
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
// Rounds as pktrate.Rounds says: 5 of 1 s per configuration by default.
func BenchmarkForwarding(b *testing.B) {
	rounds, dur := pktrate.Rounds(b)
	lab := pktrate.New(b, "cmb")
	node, dst := lab.Node, netip.MustParseAddr("198.51.100.9") // out through the node's default route
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
			p := lab.Measure(b, dst, dur)
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
	bare, without, with := pktrate.Median(pps["bare"]), pktrate.Median(pps["without"]), pktrate.Median(pps["with"])
	b.ReportMetric(bare, "pps-bare")
	b.ReportMetric(without, "pps-without")
	b.ReportMetric(with, "pps-with")
	b.ReportMetric(with/without, "with/without")
	b.ReportMetric(with/bare, "with/bare")
}
