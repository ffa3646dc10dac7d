// Package topology builds, in network namespaces, a small simulated cloud
// VPC for tests of the routing agent: a worker node with a public uplink and
// a VPC interface, gateway hosts on the same VPC bridge that forward to an
// "internet" router, and an external host behind that router.
//
//	External (198.51.100.10) ── Router ── pub0 Node vpc0 ── VPC bridge br0
//	                              │ 192.0.2.(4i+1)/30            │
//	                              └── up0 Gateway i vpc0 ────────┘ 10.114.0.(3+i)
//
// Nothing is created in the machine's own namespace: every veth pair is made
// inside a lab namespace with its peer placed straight into another one, so
// a failure or a kill can at worst leave namespaces behind, which Close or
// netns.RemoveStale removes.
package topology

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/routing-agent/routing-agent/pkg/lab/netns"
)

// Interface names inside the lab namespaces. In a hub namespace (VPC bridge,
// Router) the port towards a host is named after that host ("node", "gw0",
// "ext").
const (
	NodePublicIf = "pub0" // node's uplink to the router
	VPCIf        = "vpc0" // node's and gateways' interface on the VPC bridge
	UplinkIf     = "up0"  // gateway's uplink to the router
	ExternalIf   = "eth0" // external host's link to the router
	BridgeIf     = "br0"  // the VPC bridge, in the VPC namespace
)

// MaxGateways bounds Options.Gateways: gateway i's uplink is the /30 at
// 192.0.2.4i, so 63 is the last one that fits.
const MaxGateways = 63

// Options chooses the lab's layout; the zero value is the default one.
type Options struct {
	Purpose  string // used in namespace names, default "lab"
	Gateways int    // number of gateway hosts, default 2
	IPv6     bool   // also configure the IPv6 addresses
}

// Lab is a built topology. Namespace names are those of `ip netns`.
type Lab struct {
	Node     string   // netns of the worker node
	Gateways []string // netns of the gateway hosts, in order
	Router   string   // netns of the "internet" router
	External string   // netns of the external host
	VPC      string   // netns holding the VPC bridge

	IPv6 bool // whether the IPv6 addresses below are configured

	NodePublic    netip.Addr   // 203.0.113.10 on the node's pub0
	RouterPublic  netip.Addr   // 203.0.113.1, the node's default gateway
	NodeVPC       netip.Addr   // 10.114.0.10 on the node's vpc0
	GatewayVPC    []netip.Addr // 10.114.0.(3+i) on gateway i's vpc0
	GatewayUplink []netip.Addr // 192.0.2.(4i+2) on gateway i's up0
	RouterUplink  []netip.Addr // 192.0.2.(4i+1), the router's end of gateway i's uplink
	ExternalAddr  netip.Addr   // 198.51.100.10 on the external host
	RouterExt     netip.Addr   // 198.51.100.1, the external host's gateway
	VPCPrefix     netip.Prefix // 10.114.0.0/20

	// Set only with Options.IPv6.
	NodePublic6    netip.Addr   // 2001:db8:203::10
	RouterPublic6  netip.Addr   // 2001:db8:203::1
	NodeVPC6       netip.Addr   // fd00:114::10
	GatewayVPC6    []netip.Addr // fd00:114::(3+i)
	GatewayUplink6 []netip.Addr // 2001:db8:192:i::2
	RouterUplink6  []netip.Addr // 2001:db8:192:i::1
	ExternalAddr6  netip.Addr   // 2001:db8:100::10
	RouterExt6     netip.Addr   // 2001:db8:100::1
	VPCPrefix6     netip.Prefix // fd00:114::/64

	purpose string
	created []string // namespaces New made, in creation order, for Close
}

// New builds the lab. On error it tears down whatever it had built.
func New(opts Options) (*Lab, error) {
	l, err := layout(opts)
	if err != nil {
		return nil, err
	}
	if err := l.setUp(); err != nil {
		return nil, err
	}
	return l, nil
}

// layout fills in the names and addresses of the lab opts describe,
// creating nothing.
func layout(opts Options) (*Lab, error) {
	if opts.Purpose == "" {
		opts.Purpose = "lab"
	}
	if opts.Gateways == 0 {
		opts.Gateways = 2
	}
	if opts.Gateways < 0 || opts.Gateways > MaxGateways {
		return nil, fmt.Errorf("topology: Gateways = %d, want 1..%d", opts.Gateways, MaxGateways)
	}
	if strings.ContainsAny(opts.Purpose, "/ \t\n") {
		return nil, fmt.Errorf("topology: Purpose %q must not contain '/' or spaces", opts.Purpose)
	}

	name := func(role string) string { return netns.Name(opts.Purpose + "-" + role) }
	l := &Lab{
		Node:     name("node"),
		Router:   name("router"),
		External: name("ext"),
		VPC:      name("vpc"),
		IPv6:     opts.IPv6,
		purpose:  opts.Purpose,

		NodePublic:   netip.MustParseAddr("203.0.113.10"),
		RouterPublic: netip.MustParseAddr("203.0.113.1"),
		NodeVPC:      netip.MustParseAddr("10.114.0.10"),
		ExternalAddr: netip.MustParseAddr("198.51.100.10"),
		RouterExt:    netip.MustParseAddr("198.51.100.1"),
		VPCPrefix:    netip.MustParsePrefix("10.114.0.0/20"),
	}
	for i := range opts.Gateways {
		l.Gateways = append(l.Gateways, name("gw"+strconv.Itoa(i)))
		l.GatewayVPC = append(l.GatewayVPC, netip.AddrFrom4([4]byte{10, 114, 0, byte(3 + i)}))
		l.GatewayUplink = append(l.GatewayUplink, netip.AddrFrom4([4]byte{192, 0, 2, byte(4*i + 2)}))
		l.RouterUplink = append(l.RouterUplink, netip.AddrFrom4([4]byte{192, 0, 2, byte(4*i + 1)}))
	}
	if opts.IPv6 {
		l.NodePublic6 = netip.MustParseAddr("2001:db8:203::10")
		l.RouterPublic6 = netip.MustParseAddr("2001:db8:203::1")
		l.NodeVPC6 = netip.MustParseAddr("fd00:114::10")
		l.ExternalAddr6 = netip.MustParseAddr("2001:db8:100::10")
		l.RouterExt6 = netip.MustParseAddr("2001:db8:100::1")
		l.VPCPrefix6 = netip.MustParsePrefix("fd00:114::/64")
		for i := range opts.Gateways {
			l.GatewayVPC6 = append(l.GatewayVPC6, netip.MustParseAddr(fmt.Sprintf("fd00:114::%x", 3+i)))
			l.GatewayUplink6 = append(l.GatewayUplink6, netip.MustParseAddr(fmt.Sprintf("2001:db8:192:%x::2", i)))
			l.RouterUplink6 = append(l.RouterUplink6, netip.MustParseAddr(fmt.Sprintf("2001:db8:192:%x::1", i)))
		}
	}

	return l, nil
}

// setUp builds the lab l describes, or tears down what it built and fails.
func (l *Lab) setUp() error {
	err := l.build()
	if err == nil {
		err = l.waitOperUp(5 * time.Second)
	}
	if err != nil {
		if cerr := l.Close(); cerr != nil {
			err = fmt.Errorf("%w (and tearing down: %v)", err, cerr)
		}
	}
	return err
}

// waitOperUp waits until every link of the lab (but loopback) is
// operationally up: a veth reports LOWERLAYERDOWN or DOWN for a moment after
// both ends are set up, and a node agent rightly treats such a link's
// gateways as unreachable.
func (l *Lab) waitOperUp(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for _, ns := range l.all() {
		for {
			out, err := exec.Command("ip", "-n", ns, "-j", "link", "show").Output()
			if err != nil {
				return fmt.Errorf("topology: listing links in %s: %w", ns, err)
			}
			var links []struct {
				Name      string `json:"ifname"`
				OperState string `json:"operstate"`
			}
			if err := json.Unmarshal(out, &links); err != nil {
				return fmt.Errorf("topology: parsing links of %s: %w", ns, err)
			}
			var down []string
			for _, link := range links {
				if link.Name != "lo" && link.OperState != "UP" {
					down = append(down, link.Name+"="+link.OperState)
				}
			}
			if len(down) == 0 {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("topology: links of %s not up after %s: %v", ns, timeout, down)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	return nil
}

// all lists every namespace of the lab.
func (l *Lab) all() []string {
	return append([]string{l.Node, l.Router, l.External, l.VPC}, l.Gateways...)
}

func (l *Lab) build() error {
	// Refuse names that exist rather than adopt them: they belong to another
	// lab of this process (same Purpose) and Close would delete them.
	for _, ns := range l.all() {
		if _, err := os.Stat(filepath.Join("/run/netns", ns)); err == nil {
			return fmt.Errorf("topology: namespace %s already exists: another Lab in this process uses Purpose %q; give each live Lab its own", ns, l.purpose)
		}
	}
	for _, ns := range l.all() {
		if err := netns.Add(ns); err != nil {
			return fmt.Errorf("topology: %w", err)
		}
		l.created = append(l.created, ns)
	}

	// Sysctls go first: links take the "default" settings of their namespace
	// when created, and a veth's peer is created straight in the other
	// namespace, so every namespace must be set before any link exists.
	for _, ns := range l.all() {
		forward := ns == l.Router || l.isGateway(ns)
		if err := l.sysctls(ns, forward); err != nil {
			return err
		}
	}

	// The VPC: a bridge every VPC interface is a port of. STP off and no
	// forward delay so ports forward at once; no multicast snooping so
	// IPv6 neighbour discovery is flooded without needing a querier.
	r := runner{}
	r.ip(l.VPC, "link", "add", BridgeIf, "type", "bridge", "stp_state", "0", "forward_delay", "0", "mcast_snooping", "0")
	r.ip(l.VPC, "link", "set", BridgeIf, "up")

	// Node.
	r.veth(l.Node, NodePublicIf, l.Router, "node")
	r.veth(l.Node, VPCIf, l.VPC, "node")
	r.ip(l.VPC, "link", "set", "node", "master", BridgeIf, "up")
	r.addr(l.Node, NodePublicIf, l.NodePublic, 24)
	r.addr(l.Node, VPCIf, l.NodeVPC, 20)
	r.ip(l.Router, "link", "set", "node", "up")
	r.addr(l.Router, "node", l.RouterPublic, 24)
	if l.IPv6 {
		r.addr(l.Node, NodePublicIf, l.NodePublic6, 64)
		r.addr(l.Node, VPCIf, l.NodeVPC6, 64)
		r.addr(l.Router, "node", l.RouterPublic6, 64)
	}
	r.ip(l.Node, "link", "set", NodePublicIf, "up")
	r.ip(l.Node, "link", "set", VPCIf, "up")
	r.ip(l.Node, "route", "add", "default", "via", l.RouterPublic.String(), "dev", NodePublicIf)
	if l.IPv6 {
		r.ip(l.Node, "-6", "route", "add", "default", "via", l.RouterPublic6.String(), "dev", NodePublicIf)
	}

	// Gateways.
	for i, gw := range l.Gateways {
		port := "gw" + strconv.Itoa(i)
		r.veth(gw, VPCIf, l.VPC, port)
		r.ip(l.VPC, "link", "set", port, "master", BridgeIf, "up")
		r.veth(gw, UplinkIf, l.Router, port)
		r.addr(gw, VPCIf, l.GatewayVPC[i], 20)
		r.addr(gw, UplinkIf, l.GatewayUplink[i], 30)
		r.addr(l.Router, port, l.RouterUplink[i], 30)
		if l.IPv6 {
			r.addr(gw, VPCIf, l.GatewayVPC6[i], 64)
			r.addr(gw, UplinkIf, l.GatewayUplink6[i], 64)
			r.addr(l.Router, port, l.RouterUplink6[i], 64)
		}
		r.ip(gw, "link", "set", VPCIf, "up")
		r.ip(gw, "link", "set", UplinkIf, "up")
		r.ip(l.Router, "link", "set", port, "up")
		r.ip(gw, "route", "add", "default", "via", l.RouterUplink[i].String(), "dev", UplinkIf)
		if l.IPv6 {
			r.ip(gw, "-6", "route", "add", "default", "via", l.RouterUplink6[i].String(), "dev", UplinkIf)
		}
	}

	// External host.
	r.veth(l.External, ExternalIf, l.Router, "ext")
	r.addr(l.External, ExternalIf, l.ExternalAddr, 24)
	r.addr(l.Router, "ext", l.RouterExt, 24)
	if l.IPv6 {
		r.addr(l.External, ExternalIf, l.ExternalAddr6, 64)
		r.addr(l.Router, "ext", l.RouterExt6, 64)
	}
	r.ip(l.External, "link", "set", ExternalIf, "up")
	r.ip(l.Router, "link", "set", "ext", "up")
	r.ip(l.External, "route", "add", "default", "via", l.RouterExt.String(), "dev", ExternalIf)
	if l.IPv6 {
		r.ip(l.External, "-6", "route", "add", "default", "via", l.RouterExt6.String(), "dev", ExternalIf)
	}

	// Replies to VPC-sourced traffic (the node's vpc0 address, after a
	// policy route sent it out through a gateway) return through gateway 0.
	r.ip(l.Router, "route", "add", l.VPCPrefix.String(), "via", l.GatewayUplink[0].String(), "dev", "gw0")
	if l.IPv6 {
		r.ip(l.Router, "-6", "route", "add", l.VPCPrefix6.String(), "via", l.GatewayUplink6[0].String(), "dev", "gw0")
	}
	return r.err
}

func (l *Lab) isGateway(ns string) bool {
	for _, gw := range l.Gateways {
		if gw == ns {
			return true
		}
	}
	return false
}

// sysctls sets the namespace's kernel settings. They are written through
// /proc/sys from a thread inside the namespace: /proc/sys/net follows the
// netns of the task that reads it, so this needs no sysctl binary.
func (l *Lab) sysctls(ns string, forward bool) error {
	on := map[bool]string{false: "0", true: "1"}
	set := [][2]string{
		// Tests send asymmetric traffic (out via a gateway, back via the
		// router or not at all): reverse path filtering must not drop it.
		{"ipv4/conf/all/rp_filter", "0"},
		{"ipv4/conf/default/rp_filter", "0"},
		{"ipv4/ip_forward", on[forward]},
	}
	if l.IPv6 {
		set = append(set,
			[2]string{"ipv6/conf/all/disable_ipv6", "0"},
			[2]string{"ipv6/conf/default/disable_ipv6", "0"},
			// No duplicate address detection: addresses usable at once.
			[2]string{"ipv6/conf/all/accept_dad", "0"},
			[2]string{"ipv6/conf/default/accept_dad", "0"},
			// Keep IPv6 addresses over a link down, as IPv4 does, so
			// SetGatewayLink(i, true) restores the gateway fully.
			[2]string{"ipv6/conf/all/keep_addr_on_down", "1"},
			[2]string{"ipv6/conf/default/keep_addr_on_down", "1"},
			[2]string{"ipv6/conf/all/forwarding", on[forward]},
			[2]string{"ipv6/conf/default/forwarding", on[forward]},
		)
	}
	return netns.Do(ns, func() error {
		for _, kv := range set {
			if err := os.WriteFile("/proc/sys/net/"+kv[0], []byte(kv[1]), 0o644); err != nil {
				return fmt.Errorf("topology: sysctl net/%s=%s in %s: %w", kv[0], kv[1], ns, err)
			}
		}
		return nil
	})
}

// Close deletes every namespace New created, which also destroys their
// links. It may be called more than once.
func (l *Lab) Close() error {
	var errs []error
	for i := len(l.created) - 1; i >= 0; i-- {
		ns := l.created[i]
		if _, err := os.Stat(filepath.Join("/run/netns", ns)); os.IsNotExist(err) {
			continue
		}
		if err := netns.Delete(ns); err != nil {
			errs = append(errs, err)
		}
	}
	l.created = nil
	return errors.Join(errs...)
}

// Exec runs `ip netns exec ns args...` and returns its combined output.
func (l *Lab) Exec(ns string, args ...string) (string, error) {
	out, err := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("ip netns exec %s %s: %w: %s", ns, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// SetGatewayLink sets gateway i's VPC interface down or up, inside the
// gateway's namespace: the gateway then vanishes from the VPC (its bridge
// port loses carrier) as a failed instance would.
func (l *Lab) SetGatewayLink(i int, up bool) error {
	if i < 0 || i >= len(l.Gateways) {
		return fmt.Errorf("topology: no gateway %d", i)
	}
	state := "down"
	if up {
		state = "up"
	}
	var r runner
	r.ip(l.Gateways[i], "link", "set", VPCIf, state)
	return r.err
}

// GatewayForwarded returns the packets gateway i has received on its VPC
// interface (its rx_packets), to count traffic sent through it. The count
// includes the little ARP and neighbour discovery traffic the VPC carries.
func (l *Lab) GatewayForwarded(i int) (uint64, error) {
	if i < 0 || i >= len(l.Gateways) {
		return 0, fmt.Errorf("topology: no gateway %d", i)
	}
	// Not /sys/class/net: sysfs shows the namespace it was mounted in, not
	// that of the calling thread, so ask the kernel through ip instead.
	out, err := exec.Command("ip", "-n", l.Gateways[i], "-s", "-j", "link", "show", "dev", VPCIf).Output()
	if err != nil {
		return 0, fmt.Errorf("topology: reading gateway %d counters: %w", i, err)
	}
	var links []struct {
		Stats64 struct {
			RX struct {
				Packets uint64 `json:"packets"`
			} `json:"rx"`
		} `json:"stats64"`
	}
	if err := json.Unmarshal(out, &links); err != nil || len(links) != 1 {
		return 0, fmt.Errorf("topology: parsing gateway %d counters %q: %v", i, out, err)
	}
	return links[0].Stats64.RX.Packets, nil
}

// ListenUDP opens a UDP socket bound to addr inside namespace ns; it stays
// in that namespace for its life and can be read from any goroutine.
func ListenUDP(ns string, addr netip.AddrPort) (*net.UDPConn, error) {
	var conn *net.UDPConn
	err := netns.Do(ns, func() error {
		var err error
		conn, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(addr))
		return err
	})
	return conn, err
}

// SendUDP sends each payload as one datagram from namespace ns to dst,
// from an address the kernel chooses by its routes and rules there.
func SendUDP(ns string, dst netip.AddrPort, payloads ...[]byte) error {
	return netns.Do(ns, func() error {
		conn, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst))
		if err != nil {
			return err
		}
		defer conn.Close()
		for _, p := range payloads {
			if _, err := conn.Write(p); err != nil {
				return err
			}
		}
		return nil
	})
}

// runner runs ip commands until the first failure, which it keeps, so that
// building reads as a plain list of commands.
type runner struct{ err error }

func (r *runner) ip(ns string, args ...string) {
	if r.err != nil {
		return
	}
	args = append([]string{"-n", ns}, args...)
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		r.err = fmt.Errorf("topology: ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
}

// veth creates a veth pair inside ns with its peer placed directly in
// peerNS: no link ever exists in the machine's own namespace.
func (r *runner) veth(ns, name, peerNS, peer string) {
	r.ip(ns, "link", "add", name, "type", "veth", "peer", "name", peer, "netns", peerNS)
}

// addr adds an address; nodad makes IPv6 ones usable at once.
func (r *runner) addr(ns, dev string, a netip.Addr, bits int) {
	args := []string{"addr", "add", netip.PrefixFrom(a, bits).String(), "dev", dev}
	if a.Is6() {
		args = append(args, "nodad")
	}
	r.ip(ns, args...)
}
