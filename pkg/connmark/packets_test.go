package connmark

import (
	"errors"
	"net"
	"testing"
	"time"
)

// replyLab is a node under a default-route override, in namespaces:
//
//	client ── in0 [node] out0 ── gw (no forwarding: drops what it is sent)
//	                p0
//	                 └── pod
//
// The client is the node's upstream (main's default route) and connects from
// a public address behind it (203.0.113.10, 2001:db8:cc::10), like a host on
// the internet. The node's rules are the agent's band in small:
//
//	50:  fwmark 0x1000/0x1000 lookup main        (symmetric replies)
//	90:  lookup main suppress_prefixlength 0      (main's specific routes win)
//	100: lookup 100 = default via gw             (the override)
//
// so without connection marks a reply to the client leaves through gw and is
// lost there. In node, a kube-proxy-like table DNATs port 30080 to the pod,
// and 30081 too with kube-proxy's masquerade mark 0x4000; a probe table sets
// foreign bits around the agent's chain to show they survive it.
type replyLab struct{ client, node, gw, pod string }

const (
	clientV4, clientV6 = "203.0.113.10", "2001:db8:cc::10"
	labMark            = 0x1000
)

func newReplyLab(t *testing.T) replyLab {
	l := replyLab{
		client: newNS(t, "cmclient"),
		node:   newNS(t, "cmnode"),
		gw:     newNS(t, "cmgw"),
		pod:    newNS(t, "cmpod"),
	}
	veth(t, l.client, "c0", l.node, "in0")
	veth(t, l.node, "out0", l.gw, "g0")
	veth(t, l.node, "p0", l.pod, "e0")
	script(t, l.client, `
		ip addr add 198.51.100.10/24 dev c0
		ip addr add 2001:db8:1::10/64 dev c0 nodad
		ip addr add 203.0.113.10/32 dev lo
		ip addr add 2001:db8:cc::10/128 dev lo
		ip route add default via 198.51.100.1
		ip -6 route add default via 2001:db8:1::1`)
	// Loose rp_filter, as on most nodes: strict would drop the client's SYN,
	// whose reverse path is the override, before any mark could help. No
	// SYN-ACK retransmissions in node and pod: those of a connection that
	// failed without the table would still go to gw after Apply.
	script(t, l.node, `
		sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
		sysctl -qw net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.in0.rp_filter=2
		sysctl -qw net.ipv4.tcp_synack_retries=0
		ip addr add 198.51.100.1/24 dev in0
		ip addr add 2001:db8:1::1/64 dev in0 nodad
		ip addr add 10.114.0.10/24 dev out0
		ip addr add 2001:db8:2::10/64 dev out0 nodad
		ip addr add 10.244.0.1/24 dev p0
		ip addr add 2001:db8:244::1/64 dev p0 nodad
		ip route add default via 198.51.100.10
		ip -6 route add default via 2001:db8:1::10
		ip route add default via 10.114.0.3 table 100
		ip -6 route add default via 2001:db8:2::3 table 100
		ip rule add priority 50 fwmark 0x1000/0x1000 lookup main
		ip rule add priority 90 lookup main suppress_prefixlength 0
		ip rule add priority 100 lookup 100
		ip -6 rule add priority 50 fwmark 0x1000/0x1000 lookup main
		ip -6 rule add priority 90 lookup main suppress_prefixlength 0
		ip -6 rule add priority 100 lookup 100`)
	script(t, l.gw, `
		sysctl -qw net.ipv4.ip_forward=0 net.ipv6.conf.all.forwarding=0
		ip addr add 10.114.0.3/24 dev g0
		ip addr add 2001:db8:2::3/64 dev g0 nodad`)
	script(t, l.pod, `
		ip addr add 10.244.0.2/24 dev e0
		ip addr add 2001:db8:244::2/64 dev e0 nodad
		sysctl -qw net.ipv4.tcp_synack_retries=0
		ip route add default via 10.244.0.1
		ip -6 route add default via 2001:db8:244::1`)
	nft(t, l.node, `
table inet kube {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr 198.51.100.1 tcp dport 30080 dnat ip to 10.244.0.2:80
		ip daddr 198.51.100.1 tcp dport 30081 meta mark set meta mark | 0x4000 dnat ip to 10.244.0.2:80
		ip6 daddr 2001:db8:1::1 tcp dport 30080 dnat ip6 to [2001:db8:244::2]:80
		ip6 daddr 2001:db8:1::1 tcp dport 30081 meta mark set meta mark | 0x4000 dnat ip6 to [2001:db8:244::2]:80
	}
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		meta mark & 0x4000 == 0x4000 masquerade
	}
}
table inet probe {
	chain before {
		type filter hook prerouting priority -160; policy accept;
		ct state new ct mark set ct mark | 0x20000
		ct direction reply meta mark set meta mark | 0x8000
	}
	chain after {
		type filter hook prerouting priority -140; policy accept;
		ct direction reply ct mark 0x21000 meta mark 0x9000 counter
	}
}`)
	// What reaches gw is counted, so a failed connection can be shown to
	// have failed there, and dropped silently: without forwarding an IPv6
	// host answers with "no route" errors, which would make connects fail
	// fast or not depending on ICMP rate limits.
	nft(t, l.gw, `
table inet watch {
	chain in {
		type filter hook prerouting priority 0; policy accept;
		meta l4proto tcp counter drop
	}
}`)
	for _, ns := range []string{l.client, l.node, l.gw, l.pod} {
		settle(t, ns)
	}
	serveTCP(t, l.node, "198.51.100.1:8080", "node")
	serveTCP(t, l.node, "[2001:db8:1::1]:8080", "node")
	serveTCP(t, l.pod, "10.244.0.2:80", "pod")
	serveTCP(t, l.pod, "[2001:db8:244::2]:80", "pod")
	serveTCP(t, l.client, clientV4+":8081", "client")
	serveTCP(t, l.client, "["+clientV6+"]:8081", "client")
	return l
}

func (l replyLab) atGW(t *testing.T) uint64 { return counter(t, l.gw, "inet", "watch", "in") }

// TestRepliesLeaveTheWayTheyCame: connections from outside to the node
// itself and DNATed to a pod are answered under a default-route override
// with the table, and not without it; traffic the node and its pods start
// still follows the override.
func TestRepliesLeaveTheWayTheyCame(t *testing.T) {
	l := newReplyLab(t)
	tbl, err := New(nsFd(t, l.node))
	if err != nil {
		t.Fatal(err)
	}
	spec := Spec{Mark: labMark, Exclude: []string{"lo", "out0"}}

	for _, c := range []struct {
		name, src, dst, want string
		forwarded            bool // the reply is routed in prerouting
	}{
		{"host/v4", clientV4, "198.51.100.1:8080", "node", false},
		{"host/v6", clientV6, "[2001:db8:1::1]:8080", "node", false},
		{"nodeport/v4", clientV4, "198.51.100.1:30080", "pod", true},
		{"nodeport-masquerade/v4", clientV4, "198.51.100.1:30081", "pod", true},
		{"nodeport/v6", clientV6, "[2001:db8:1::1]:30080", "pod", true},
		{"nodeport-masquerade/v6", clientV6, "[2001:db8:1::1]:30081", "pod", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			if _, err := tbl.Remove(""); err != nil {
				t.Fatal(err)
			}
			gw := l.atGW(t)
			got, err := fetch(l.client, c.src, c.dst, time.Second)
			if !isTimeout(err) {
				t.Fatalf("without the table: got %q, %v; want a timeout (the reply lost at gw)", got, err)
			}
			if l.atGW(t) == gw {
				t.Fatalf("without the table the connection failed, but not because its reply went to gw")
			}

			if _, err := tbl.Apply(spec); err != nil {
				t.Fatal(err)
			}
			gw = l.atGW(t)
			probe := counter(t, l.node, "inet", "probe", "after")
			got, err = fetch(l.client, c.src, c.dst, 5*time.Second)
			if err != nil || got != c.want {
				t.Fatalf("with the table: got %q, %v; want %q", got, err, c.want)
			}
			if n := l.atGW(t) - gw; n != 0 {
				t.Errorf("with the table %d packets still went to gw", n)
			}
			// Foreign bits set before the agent's chain (ct mark 0x20000,
			// meta mark 0x8000) are still there after it, beside 0x1000.
			if c.forwarded && counter(t, l.node, "inet", "probe", "after") == probe {
				t.Errorf("no reply packet carried ct mark 0x21000 and meta mark 0x9000 after the agent's chain: it clobbered other bits")
			}
		})
	}

	// Replacing the table is atomic: while it is rewritten over and over
	// (between two specs that both mark in0), every connection is answered.
	t.Run("replace-under-traffic", func(t *testing.T) {
		other := Spec{Mark: labMark, Exclude: []string{"lo", "out0", "eth9"}}
		// The table is in place before the traffic starts: what is measured
		// is the replacement, not a connection's first marked packet.
		if _, err := tbl.Apply(spec); err != nil {
			t.Fatal(err)
		}
		stop, done := make(chan struct{}), make(chan int)
		go func() {
			n := 0
			for s := []Spec{spec, other}; ; n++ {
				select {
				case <-stop:
					done <- n
					return
				default:
				}
				if _, err := tbl.Apply(s[n%2]); err != nil {
					t.Error(err)
				}
			}
		}()
		conns, failed := 0, 0
		for end := time.Now().Add(2 * time.Second); time.Now().Before(end); conns++ {
			dst := []string{"198.51.100.1:8080", "198.51.100.1:30080"}[conns%2]
			if got, err := fetch(l.client, clientV4, dst, 2*time.Second); err != nil || got == "" {
				failed++
				t.Errorf("connection %d to %s during replacements: %q, %v", conns, dst, got, err)
			}
		}
		close(stop)
		t.Logf("%d connections, %d failed, during %d table replacements", conns, failed, <-done)
	})

	// Connections the node or a pod open go out through the override (gw,
	// which drops them) even with the table in place: they are not marked.
	if _, err := tbl.Apply(spec); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ name, ns, dst string }{
		{"node-originated/v4", l.node, clientV4 + ":8081"},
		{"node-originated/v6", l.node, "[" + clientV6 + "]:8081"},
		{"pod-originated/v4", l.pod, clientV4 + ":8081"},
		{"pod-originated/v6", l.pod, "[" + clientV6 + "]:8081"},
	} {
		t.Run(c.name, func(t *testing.T) {
			gw := l.atGW(t)
			got, err := fetch(c.ns, "", c.dst, time.Second)
			if !isTimeout(err) {
				t.Fatalf("got %q, %v; want a timeout (sent through gw)", got, err)
			}
			if l.atGW(t) == gw {
				t.Fatalf("the connection did not go through gw")
			}
		})
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
