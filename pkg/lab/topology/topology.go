// Package topology builds, in network namespaces, a small simulated cloud
// VPC for tests of the routing agent: worker nodes with a public uplink and
// a VPC interface, gateway hosts on the same VPC bridge that forward to an
// "internet" router, an external host behind that router and, optionally, a
// control plane host on the nodes' public network and pods behind the nodes.
//
//	External ── Router ── public bridge br-pub, 203.0.113.1/24 (in Router)
//	198.51.100.10 │           │                           │
//	198.51.100.53 │         pub0 Node j vpc0 ──┐        eth0 ControlPlane
//	              │   203.0.113.(10+j)  pod0   │        203.0.113.100
//	              │        10.244.j.1    │     │
//	              │                    eth0    │
//	              │      10.244.j.2    Pod j   │
//	              │     (AddPod)        10.114.0.(10+j)
//	              │ 192.0.2.(4i+1)/30          │
//	              └── up0 Gateway i vpc0 ── VPC bridge br0 (in VPC)
//	                      10.114.0.(3+i)
//
// The public network is one L2 segment: nodes and the control plane reach
// each other on it directly, and everything else through the router.
//
// With Options.SingleNIC a node has no vpc0: its pub0 holds both its public
// and its VPC address, and the two bridges are joined into one L2 segment
// by a veth (port "vpc" of br-pub, port "pub" of br0), as on a cloud whose
// instances have one NIC:
//
//	Router br-pub ── vpc ══ pub ── br0 VPC
//	          │                     │
//	        pub0 Node j           vpc0 Gateway i
//	203.0.113.(10+j), 10.114.0.(10+j)
//
// The external host's second address, 198.51.100.53 (ExternalDNS), is the
// nameserver the lab's nodes are configured with: a caller serves DNS there
// (package dnsserver). AddAPIVIP makes the router a TCP load balancer in
// front of the control plane's API server, as a cloud's would be. AddPod
// and AddNodePort put a pod behind a node and a kube-proxy-like NodePort in
// front of it.
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
// Router) the port towards a host is named after that host ("node" for node
// 0, "node1", "gw0", "ext", "cp"; with Options.SingleNIC "vpc" in the Router
// and "pub" in the VPC for the veth joining the two bridges).
const (
	NodePublicIf = "pub0"   // node's uplink, a port of the router's public bridge
	VPCIf        = "vpc0"   // gateways' and (without SingleNIC) nodes' interface on the VPC bridge
	UplinkIf     = "up0"    // gateway's uplink to the router
	ExternalIf   = "eth0"   // external host's link to the router
	BridgeIf     = "br0"    // the VPC bridge, in the VPC namespace
	PublicBridge = "br-pub" // the public segment's bridge, in the Router namespace
	ControlIf    = "eth0"   // control plane host's link to the public bridge
)

// routerPublicMAC is br-pub's fixed MAC: frames a node sends to it are what
// leaves the node through its default route, via 203.0.113.1.
const routerPublicMAC = "02:00:cb:00:71:01"

// MaxGateways bounds Options.Gateways: gateway i's uplink is the /30 at
// 192.0.2.4i, so 63 is the last one that fits. But gateway i's VPC address
// is 10.114.0.(3+i) and node 0's 10.114.0.10: layouts that give one address
// to two hosts, here Gateways > 7, are refused.
const MaxGateways = 63

// MaxNodes bounds Options.Nodes: node j's public address is 203.0.113.(10+j),
// below the control plane's 203.0.113.100.
const MaxNodes = 90

// Options chooses the lab's layout; the zero value is the default one.
type Options struct {
	Purpose  string // used in namespace names, default "lab"
	Gateways int    // number of gateway hosts, default 2
	IPv6     bool   // also configure the IPv6 addresses

	Nodes        int  // number of worker nodes, default 1
	ControlPlane bool // add a control plane host on the public network
	// NAT makes the gateways masquerade what they forward out of their
	// uplinks (nftables), as a NAT gateway gives a static egress IP.
	NAT bool
	// SingleNIC gives each node one interface, pub0, holding both its
	// public and its VPC addresses, on one L2 segment with the router and
	// the gateways (see the package comment).
	SingleNIC bool
}

// Lab is a built topology. Namespace names are those of `ip netns`.
type Lab struct {
	Node     string   // netns of the (first) worker node, Nodes[0]
	Nodes    []string // netns of the worker nodes, in order
	Gateways []string // netns of the gateway hosts, in order
	Router   string   // netns of the "internet" router
	External string   // netns of the external host
	VPC      string   // netns holding the VPC bridge

	// ControlPlane is the netns of the control plane host, on the public
	// network with ControlPlaneAddr; set only with Options.ControlPlane.
	ControlPlane string

	IPv6      bool // whether the IPv6 addresses below are configured
	NAT       bool // whether the gateways masquerade (Options.NAT)
	SingleNIC bool // Options.SingleNIC

	// NodeVPCIf is the node interface holding the VPC addresses: VPCIf, or
	// NodePublicIf with SingleNIC.
	NodeVPCIf string

	NodePublic    netip.Addr   // 203.0.113.10 on the node's pub0, NodePublics[0]
	NodePublics   []netip.Addr // 203.0.113.(10+j) on node j's pub0
	RouterPublic  netip.Addr   // 203.0.113.1, the nodes' default gateway
	NodeVPC       netip.Addr   // 10.114.0.10 on the node's NodeVPCIf, NodeVPCs[0]
	NodeVPCs      []netip.Addr // 10.114.0.(10+j) on node j's NodeVPCIf
	GatewayVPC    []netip.Addr // 10.114.0.(3+i) on gateway i's vpc0
	GatewayUplink []netip.Addr // 192.0.2.(4i+2) on gateway i's up0
	RouterUplink  []netip.Addr // 192.0.2.(4i+1), the router's end of gateway i's uplink
	ExternalAddr  netip.Addr   // 198.51.100.10 on the external host
	ExternalDNS   netip.Addr   // 198.51.100.53, the external host's second address, for a DNS server
	RouterExt     netip.Addr   // 198.51.100.1, the external host's gateway
	VPCPrefix     netip.Prefix // 10.114.0.0/20

	ControlPlaneAddr netip.Addr // 203.0.113.100, with Options.ControlPlane

	// Set only with Options.IPv6. A node's, or the control plane's, IPv6
	// addresses end in the digits of its IPv4 one: node 1 has
	// 203.0.113.11 and 2001:db8:203::11.
	NodePublic6    netip.Addr   // 2001:db8:203::10, NodePublics6[0]
	NodePublics6   []netip.Addr // 2001:db8:203::(10+j) on node j's pub0, in decimal digits
	RouterPublic6  netip.Addr   // 2001:db8:203::1
	NodeVPC6       netip.Addr   // fd00:114::10, NodeVPCs6[0]
	NodeVPCs6      []netip.Addr // fd00:114::(10+j) on node j's NodeVPCIf, in decimal digits
	GatewayVPC6    []netip.Addr // fd00:114::(3+i)
	GatewayUplink6 []netip.Addr // 2001:db8:192:i::2
	RouterUplink6  []netip.Addr // 2001:db8:192:i::1
	ExternalAddr6  netip.Addr   // 2001:db8:100::10
	RouterExt6     netip.Addr   // 2001:db8:100::1
	VPCPrefix6     netip.Prefix // fd00:114::/64

	ControlPlaneAddr6 netip.Addr // 2001:db8:203::100, with both options

	purpose string
	created []string // namespaces New made, in creation order, for Close

	apiLB   bool                // AddAPIVIP has set up the router's load balancer table
	apiVIPs map[netip.Addr]bool // VIPs AddAPIVIP added: true while served, false once removed

	pods      []*Pod                  // what AddPod added, in order
	nodePorts map[int]map[uint16]bool // node → ports AddNodePort DNATs there
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
	if opts.Nodes == 0 {
		opts.Nodes = 1
	}
	if opts.Nodes < 0 || opts.Nodes > MaxNodes {
		return nil, fmt.Errorf("topology: Nodes = %d, want 1..%d", opts.Nodes, MaxNodes)
	}
	if strings.ContainsAny(opts.Purpose, "/ \t\n") {
		return nil, fmt.Errorf("topology: Purpose %q must not contain '/' or spaces", opts.Purpose)
	}

	name := func(role string) string { return netns.Name(opts.Purpose + "-" + role) }
	l := &Lab{
		Router:    name("router"),
		External:  name("ext"),
		VPC:       name("vpc"),
		IPv6:      opts.IPv6,
		NAT:       opts.NAT,
		SingleNIC: opts.SingleNIC,
		NodeVPCIf: VPCIf,
		purpose:   opts.Purpose,

		RouterPublic: netip.MustParseAddr("203.0.113.1"),
		ExternalAddr: netip.MustParseAddr("198.51.100.10"),
		ExternalDNS:  netip.MustParseAddr("198.51.100.53"),
		RouterExt:    netip.MustParseAddr("198.51.100.1"),
		VPCPrefix:    netip.MustParsePrefix("10.114.0.0/20"),
	}
	for j := range opts.Nodes {
		l.Nodes = append(l.Nodes, name(nodeRole(j)))
		l.NodePublics = append(l.NodePublics, netip.AddrFrom4([4]byte{203, 0, 113, byte(10 + j)}))
		l.NodeVPCs = append(l.NodeVPCs, netip.AddrFrom4([4]byte{10, 114, 0, byte(10 + j)}))
	}
	l.Node, l.NodePublic, l.NodeVPC = l.Nodes[0], l.NodePublics[0], l.NodeVPCs[0]
	if l.SingleNIC {
		l.NodeVPCIf = NodePublicIf
	}
	if opts.ControlPlane {
		l.ControlPlane = name("cp")
		l.ControlPlaneAddr = netip.MustParseAddr("203.0.113.100")
	}
	for i := range opts.Gateways {
		l.Gateways = append(l.Gateways, name("gw"+strconv.Itoa(i)))
		l.GatewayVPC = append(l.GatewayVPC, netip.AddrFrom4([4]byte{10, 114, 0, byte(3 + i)}))
		l.GatewayUplink = append(l.GatewayUplink, netip.AddrFrom4([4]byte{192, 0, 2, byte(4*i + 2)}))
		l.RouterUplink = append(l.RouterUplink, netip.AddrFrom4([4]byte{192, 0, 2, byte(4*i + 1)}))
	}
	if opts.IPv6 {
		l.RouterPublic6 = netip.MustParseAddr("2001:db8:203::1")
		for j := range opts.Nodes {
			l.NodePublics6 = append(l.NodePublics6, netip.MustParseAddr(fmt.Sprintf("2001:db8:203::%d", 10+j)))
			l.NodeVPCs6 = append(l.NodeVPCs6, netip.MustParseAddr(fmt.Sprintf("fd00:114::%d", 10+j)))
		}
		l.NodePublic6, l.NodeVPC6 = l.NodePublics6[0], l.NodeVPCs6[0]
		if opts.ControlPlane {
			l.ControlPlaneAddr6 = netip.MustParseAddr("2001:db8:203::100")
		}
		l.ExternalAddr6 = netip.MustParseAddr("2001:db8:100::10")
		l.RouterExt6 = netip.MustParseAddr("2001:db8:100::1")
		l.VPCPrefix6 = netip.MustParsePrefix("fd00:114::/64")
		for i := range opts.Gateways {
			l.GatewayVPC6 = append(l.GatewayVPC6, netip.MustParseAddr(fmt.Sprintf("fd00:114::%x", 3+i)))
			l.GatewayUplink6 = append(l.GatewayUplink6, netip.MustParseAddr(fmt.Sprintf("2001:db8:192:%x::2", i)))
			l.RouterUplink6 = append(l.RouterUplink6, netip.MustParseAddr(fmt.Sprintf("2001:db8:192:%x::1", i)))
		}
	}
	if err := l.checkUnique(); err != nil {
		return nil, err
	}
	return l, nil
}

// nodeRole names node j's namespace: node 0 keeps the single-node lab's
// name.
func nodeRole(j int) string {
	if j == 0 {
		return "node"
	}
	return "node" + strconv.Itoa(j)
}

// nodePort names the port towards node j in the Router and VPC namespaces.
func nodePort(j int) string { return nodeRole(j) }

// checkUnique refuses a layout that gives one address to two hosts: gateway
// i's VPC address 10.114.0.(3+i) meets node 0's 10.114.0.10 from i = 7 on.
func (l *Lab) checkUnique() error {
	_, err := l.owners()
	return err
}

// owners maps every address of the lab to the host holding it, or fails on
// an address given to two hosts.
func (l *Lab) owners() (map[netip.Addr]string, error) {
	owner := map[netip.Addr]string{}
	var err error
	add := func(who string, addrs ...netip.Addr) {
		for _, a := range addrs {
			if !a.IsValid() || err != nil {
				continue
			}
			if prev, ok := owner[a]; ok {
				err = fmt.Errorf("topology: %d nodes and %d gateways would give %v to both %s and %s", len(l.Nodes), len(l.Gateways), a, prev, who)
			}
			owner[a] = who
		}
	}
	add("the router", l.RouterPublic, l.RouterPublic6, l.RouterExt, l.RouterExt6)
	add("the external host", l.ExternalAddr, l.ExternalDNS, l.ExternalAddr6)
	add("the control plane", l.ControlPlaneAddr, l.ControlPlaneAddr6)
	for j := range l.Nodes {
		add("node "+strconv.Itoa(j), l.NodePublics[j], l.NodeVPCs[j])
		if l.IPv6 {
			add("node "+strconv.Itoa(j), l.NodePublics6[j], l.NodeVPCs6[j])
		}
	}
	for i := range l.Gateways {
		add("gateway "+strconv.Itoa(i), l.GatewayVPC[i], l.GatewayUplink[i], l.RouterUplink[i])
		if l.IPv6 {
			add("gateway "+strconv.Itoa(i), l.GatewayVPC6[i], l.GatewayUplink6[i], l.RouterUplink6[i])
		}
	}
	for _, p := range l.pods {
		add("node "+strconv.Itoa(p.Node), p.NodeAddr, p.NodeAddr6)
		add("node "+strconv.Itoa(p.Node)+"'s pod", p.Addr, p.Addr6)
	}
	return owner, err
}

// NodeIndex returns j for ns == Nodes[j], or -1 if ns is no node of l.
func (l *Lab) NodeIndex(ns string) int {
	for j, n := range l.Nodes {
		if n == ns {
			return j
		}
	}
	return -1
}

// setUp builds the lab l describes, or tears down what it built and fails.
func (l *Lab) setUp() error {
	err := l.build()
	if err == nil && l.NAT {
		err = l.masquerade()
	}
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

// masquerade makes every gateway source-NAT what it forwards out of its
// uplink to its uplink address.
func (l *Lab) masquerade() error {
	families := []string{"ip"}
	if l.IPv6 {
		families = append(families, "ip6") // a NAT gateway gives a static egress IP in both
	}
	for _, ns := range l.Gateways {
		var rules []string
		for _, f := range families {
			rules = append(rules,
				"add table "+f+" nat",
				"add chain "+f+" nat post { type nat hook postrouting priority 100 ; }",
				"add rule "+f+" nat post oifname "+UplinkIf+" masquerade")
		}
		for _, rule := range rules {
			if out, err := exec.Command("ip", append([]string{"netns", "exec", ns, "nft"}, strings.Fields(rule)...)...).CombinedOutput(); err != nil {
				return fmt.Errorf("topology: nft %s in %s: %v: %s", rule, ns, err, out)
			}
		}
	}
	return nil
}

// waitOperUp waits until every link of the lab (but loopback) is
// operationally up: a veth reports LOWERLAYERDOWN or DOWN for a moment after
// both ends are set up, and a node agent rightly treats such a link's
// gateways as unreachable.
func (l *Lab) waitOperUp(timeout time.Duration) error {
	namespaces := l.all()
	for _, p := range l.pods {
		namespaces = append(namespaces, p.NS)
	}
	return waitUp(timeout, namespaces...)
}

// waitUp waits until every link but loopback in namespaces is operationally
// up.
func waitUp(timeout time.Duration, namespaces ...string) error {
	deadline := time.Now().Add(timeout)
	for _, ns := range namespaces {
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
	all := []string{l.Node, l.Router, l.External, l.VPC}
	all = append(all, l.Gateways...)
	all = append(all, l.Nodes[1:]...)
	if l.ControlPlane != "" {
		all = append(all, l.ControlPlane)
	}
	return all
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

	// The public network: a bridge in the Router namespace holding the
	// router's address, with a port per node and one for the control plane.
	// Its MAC is fixed (02:00 and 203.0.113.1) rather than taken from the
	// lowest port, so it never changes under the hosts' neighbour caches.
	r.ip(l.Router, "link", "add", PublicBridge, "address", routerPublicMAC, "type", "bridge", "stp_state", "0", "forward_delay", "0", "mcast_snooping", "0")
	r.addr(l.Router, PublicBridge, l.RouterPublic, 24)
	if l.IPv6 {
		r.addr(l.Router, PublicBridge, l.RouterPublic6, 64)
	}
	r.ip(l.Router, "link", "set", "dev", PublicBridge, "up")

	// With SingleNIC the public network and the VPC are one L2 segment, as
	// behind a cloud instance's only NIC: a veth joins the two bridges
	// (one link, so no loop).
	if l.SingleNIC {
		r.veth(l.Router, "vpc", l.VPC, "pub")
		r.ip(l.Router, "link", "set", "vpc", "master", PublicBridge, "up")
		r.ip(l.VPC, "link", "set", "pub", "master", BridgeIf, "up")
	}

	// Nodes. The public address goes first on pub0: with SingleNIC it is
	// then the source the kernel picks where no subnet decides.
	for j, node := range l.Nodes {
		port := nodePort(j)
		r.veth(node, NodePublicIf, l.Router, port)
		r.ip(l.Router, "link", "set", port, "master", PublicBridge, "up")
		if !l.SingleNIC {
			r.veth(node, VPCIf, l.VPC, port)
			r.ip(l.VPC, "link", "set", port, "master", BridgeIf, "up")
		}
		r.addr(node, NodePublicIf, l.NodePublics[j], 24)
		r.addr(node, l.NodeVPCIf, l.NodeVPCs[j], 20)
		if l.IPv6 {
			r.addr(node, NodePublicIf, l.NodePublics6[j], 64)
			r.addr(node, l.NodeVPCIf, l.NodeVPCs6[j], 64)
		}
		r.ip(node, "link", "set", NodePublicIf, "up")
		if !l.SingleNIC {
			r.ip(node, "link", "set", VPCIf, "up")
		}
		r.ip(node, "route", "add", "default", "via", l.RouterPublic.String(), "dev", NodePublicIf)
		if l.IPv6 {
			r.ip(node, "-6", "route", "add", "default", "via", l.RouterPublic6.String(), "dev", NodePublicIf)
		}
	}

	// Control plane host.
	if l.ControlPlane != "" {
		r.veth(l.ControlPlane, ControlIf, l.Router, "cp")
		r.ip(l.Router, "link", "set", "cp", "master", PublicBridge, "up")
		r.addr(l.ControlPlane, ControlIf, l.ControlPlaneAddr, 24)
		if l.IPv6 {
			r.addr(l.ControlPlane, ControlIf, l.ControlPlaneAddr6, 64)
		}
		r.ip(l.ControlPlane, "link", "set", ControlIf, "up")
		r.ip(l.ControlPlane, "route", "add", "default", "via", l.RouterPublic.String(), "dev", ControlIf)
		if l.IPv6 {
			r.ip(l.ControlPlane, "-6", "route", "add", "default", "via", l.RouterPublic6.String(), "dev", ControlIf)
		}
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
	// The DNS address second: in the same /24 it becomes a secondary
	// address, so what the external host sends still comes from
	// ExternalAddr unless a socket is bound to ExternalDNS. The router
	// reaches it on its connected 198.51.100.0/24, like ExternalAddr.
	r.addr(l.External, ExternalIf, l.ExternalDNS, 24)
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
	// The bridges are switches, not firewalls: with br_netfilter loaded
	// (its settings are per namespace, on by default) the frames they
	// bridge would go through the hub's IP hooks, and the router's NAT
	// (AddAPIVIP) would rewrite what a node sends to a gateway across
	// br-pub with SingleNIC. Only a loaded br_netfilter has these files,
	// in every namespace alike, so a look in this thread's one is enough.
	if _, err := os.Stat("/proc/sys/net/bridge"); err == nil && (ns == l.Router || ns == l.VPC) {
		for _, f := range []string{"iptables", "ip6tables", "arptables"} {
			set = append(set, [2]string{"bridge/bridge-nf-call-" + f, "0"})
		}
	}
	return writeSysctls(ns, set)
}

// writeSysctls writes settings under /proc/sys/net from a thread inside ns.
func writeSysctls(ns string, set [][2]string) error {
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
// port loses carrier) as a failed instance would. Up returns once every
// link of the lab is operationally up again, so the first packet after it
// is not lost to a port still coming up.
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
	if r.err != nil || !up {
		return r.err
	}
	return l.waitOperUp(5 * time.Second)
}

// SilenceGateway makes gateway i drop every IP packet it receives on the
// VPC (probes, forwarded traffic) while its link and ARP stay up, the way a
// hung or firewalled gateway fails; on=false lifts it. It is a blackhole
// rule ahead of all others, with the local table's rule moved behind it
// (rules of equal priority keep their insertion order). Kernels here have
// neither tc classifiers nor netem to do it otherwise.
func (l *Lab) SilenceGateway(i int, on bool) error {
	if i < 0 || i >= len(l.Gateways) {
		return fmt.Errorf("topology: no gateway %d", i)
	}
	ns := l.Gateways[i]
	cmds := [][]string{{"rule", "del", "priority", "5"}}
	if on {
		cmds = [][]string{{"rule", "add", "priority", "5", "iif", VPCIf, "blackhole"}}
		if rules, _ := l.Exec(ns, "ip", "rule"); strings.HasPrefix(rules, "0:\tfrom all lookup local\n") {
			cmds = append([][]string{{"rule", "add", "priority", "10", "lookup", "local"}, {"rule", "del", "priority", "0"}}, cmds...)
		}
	}
	for _, c := range cmds {
		if out, err := l.Exec(ns, append([]string{"ip"}, c...)...); err != nil {
			return fmt.Errorf("topology: silencing gateway %d: %w: %s", i, err, out)
		}
	}
	return nil
}

// GatewayForwarded returns the packets gateway i has received on its VPC
// interface (its rx_packets), to count traffic sent through it. The count
// includes the little ARP and neighbour discovery traffic the VPC carries
// (with SingleNIC, the public network's too).
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

// CountExternalTraffic starts counting, on gateway i, the packets it
// receives from the VPC for the external host's network (198.51.100.0/24):
// traffic sent through the gateway, as opposed to the probes, ARP and
// neighbour discovery addressed to it. An nftables counter ahead of every
// other hook, so it counts packets the gateway then drops too
// (SilenceGateway); ExternalPackets reads it.
func (l *Lab) CountExternalTraffic(i int) error {
	if i < 0 || i >= len(l.Gateways) {
		return fmt.Errorf("topology: no gateway %d", i)
	}
	external := netip.PrefixFrom(l.ExternalAddr, 24).Masked()
	for _, rule := range []string{
		"add table inet lab-count",
		"add chain inet lab-count pre { type filter hook prerouting priority -400 ; }",
		"add rule inet lab-count pre iifname " + VPCIf + " ip daddr " + external.String() + " counter",
	} {
		if out, err := l.Exec(l.Gateways[i], append([]string{"nft"}, strings.Fields(rule)...)...); err != nil {
			return fmt.Errorf("topology: counting on gateway %d: %w: %s", i, err, out)
		}
	}
	return nil
}

// ExternalPackets returns what CountExternalTraffic has counted on gateway i.
func (l *Lab) ExternalPackets(i int) (uint64, error) {
	if i < 0 || i >= len(l.Gateways) {
		return 0, fmt.Errorf("topology: no gateway %d", i)
	}
	n, err := l.counted(l.Gateways[i], "inet", "lab-count", "pre")
	if err != nil {
		return 0, fmt.Errorf("topology: gateway %d: %w (CountExternalTraffic first)", i, err)
	}
	return n, nil
}

// CountUplinkTraffic starts counting the packets node j sends through its
// own default route, to the router's MAC out of pub0, for the external
// host's network (198.51.100.0/24, 2001:db8:100::/64): the wrong path for
// traffic a Route sends through a gateway. The counter sits on the router's
// end of that link (netdev ingress), outside the node and ahead of
// everything the node could do to the packet; UplinkPackets reads it.
//
// It counts by destination MAC because, with SingleNIC, pub0 also carries
// what the node sends to a gateway, across the router's bridge: those
// frames, addressed to the gateway, are not counted.
func (l *Lab) CountUplinkTraffic(j int) error {
	if j < 0 || j >= len(l.Nodes) {
		return fmt.Errorf("topology: no node %d", j)
	}
	table := "lab-uplink-" + nodePort(j)
	rule := "add rule netdev " + table + " in ether daddr " + routerPublicMAC
	rules := []string{
		"add table netdev " + table,
		"add chain netdev " + table + " in { type filter hook ingress device " + nodePort(j) + " priority -500 ; }",
		rule + " ip daddr " + netip.PrefixFrom(l.ExternalAddr, 24).Masked().String() + " counter",
	}
	if l.IPv6 {
		rules = append(rules, rule+" ip6 daddr "+netip.PrefixFrom(l.ExternalAddr6, 64).Masked().String()+" counter")
	}
	for _, rule := range rules {
		if out, err := l.Exec(l.Router, append([]string{"nft"}, strings.Fields(rule)...)...); err != nil {
			return fmt.Errorf("topology: counting node %d's uplink: %w: %s", j, err, out)
		}
	}
	return nil
}

// UplinkPackets returns what CountUplinkTraffic has counted for node j.
func (l *Lab) UplinkPackets(j int) (uint64, error) {
	if j < 0 || j >= len(l.Nodes) {
		return 0, fmt.Errorf("topology: no node %d", j)
	}
	n, err := l.counted(l.Router, "netdev", "lab-uplink-"+nodePort(j), "in")
	if err != nil {
		return 0, fmt.Errorf("topology: node %d's uplink: %w (CountUplinkTraffic first)", j, err)
	}
	return n, nil
}

// DropAPIPortAtGateways makes every gateway drop, and count, what it would
// forward to the API server: TCP to APIPort anywhere and, with a control
// plane, anything to its address. That is an API server that allow-lists
// node addresses, seen through a Route's NAT gateway: a control-plane
// connection that takes a Route dies, and APIPortDrops says so.
func (l *Lab) DropAPIPortAtGateways() error {
	rules := fmt.Sprintf("add table ip guard ; add chain ip guard forwarded { type filter hook forward priority 0 ; } ; add rule ip guard forwarded tcp dport %d counter drop", APIPort)
	if l.ControlPlaneAddr.IsValid() {
		rules += " ; add rule ip guard forwarded ip daddr " + l.ControlPlaneAddr.String() + " counter drop"
	}
	for _, gw := range l.Gateways {
		if out, err := l.Exec(gw, "nft", rules); err != nil {
			return fmt.Errorf("topology: the API guard on %s: %w: %s", gw, err, out)
		}
	}
	return nil
}

// APIPortDrops counts what the gateways dropped for the API server since
// DropAPIPortAtGateways.
func (l *Lab) APIPortDrops() (uint64, error) {
	var total uint64
	for _, gw := range l.Gateways {
		n, err := l.counted(gw, "ip", "guard", "forwarded")
		if err != nil {
			return 0, fmt.Errorf("topology: API guard counters of %s: %w", gw, err)
		}
		total += n
	}
	return total, nil
}

// counted sums the packets of every counter in an nftables chain.
func (l *Lab) counted(ns, family, table, chain string) (uint64, error) {
	out, err := l.Exec(ns, "nft", "-j", "list", "chain", family, table, chain)
	if err != nil {
		return 0, err
	}
	var listing struct {
		Nftables []struct {
			Rule *struct {
				Expr []struct {
					Counter *struct {
						Packets uint64 `json:"packets"`
					} `json:"counter"`
				} `json:"expr"`
			} `json:"rule"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal([]byte(out), &listing); err != nil {
		return 0, fmt.Errorf("parsing nft counters of %s %s %s: %w", family, table, chain, err)
	}
	var total uint64
	found := false
	for _, item := range listing.Nftables {
		if item.Rule == nil {
			continue
		}
		for _, e := range item.Rule.Expr {
			if e.Counter != nil {
				total, found = total+e.Counter.Packets, true
			}
		}
	}
	if !found {
		return 0, fmt.Errorf("no counter in %s %s %s", family, table, chain)
	}
	return total, nil
}

// APIPort is the port AddAPIVIP balances: the API server's.
const APIPort = 6443

// apiLBTable is the Router's nftables table for AddAPIVIP. Its sets say
// which VIPs are served ("vips") and which were served and no longer are
// ("removed"), so that a VIP is added or removed by changing one element,
// independently of the others, and the rules never change.
const apiLBTable = "lab-apilb"

// AddAPIVIP makes the router a load balancer for the API server: TCP to
// vip:6443, from any host whose route to vip goes through the router,
// reaches ControlPlaneAddr:6443. It needs Options.ControlPlane. vip must be
// an IPv4 address that no host of the lab holds and outside the networks
// the nodes are connected to (203.0.113.0/24, the VPC, a pod's /24): a
// node must reach it through its default route, 203.0.113.1, as
// 198.51.100.100 is; on a connected network it would ask for vip's MAC and
// nobody would answer.
//
// The router DNATs the connection to the control plane and masquerades it
// to its own public address, 203.0.113.1, which the API server then sees as
// the client: the control plane shares the nodes' L2 segment, so without
// the SNAT its replies would go straight to the node, bypassing the router
// and the reverse translation, and the node would drop them. A node that
// reaches vip through a Route's NAT gateway instead arrives at the router
// from that gateway's uplink address (without NAT, from its VPC address,
// answered through gateway 0); the API server sees 203.0.113.1 either way.
//
// Adding a VIP already added does nothing.
func (l *Lab) AddAPIVIP(vip netip.Addr) error {
	if l.ControlPlane == "" {
		return errors.New("topology: AddAPIVIP needs a lab built with Options.ControlPlane")
	}
	if !vip.Is4() {
		return fmt.Errorf("topology: API VIP %v is not an IPv4 address", vip)
	}
	owners, _ := l.owners()
	if who, ok := owners[vip]; ok {
		return fmt.Errorf("topology: API VIP %v is an address of %s", vip, who)
	}
	connected := []netip.Prefix{netip.PrefixFrom(l.RouterPublic, 24).Masked(), l.VPCPrefix}
	for _, p := range l.pods {
		connected = append(connected, netip.PrefixFrom(p.NodeAddr, 24).Masked())
	}
	for _, p := range connected {
		if p.Contains(vip) {
			return fmt.Errorf("topology: API VIP %v is inside %v, which nodes reach without the router", vip, p)
		}
	}
	served, known := l.apiVIPs[vip]
	if served {
		return nil
	}
	var script []string
	if !l.apiLB {
		// The router sends the translated packets back out of br-pub, the
		// interface they came in on: plainly forwarded, that makes it send
		// the node an ICMP redirect naming the control plane as the next
		// hop, which the node (accept_redirects is on for hosts) would
		// follow straight past the load balancer. This kernel sends none
		// for the DNATed connections, but nothing promises that: redirects
		// go off.
		if err := netns.Do(l.Router, func() error {
			for _, conf := range []string{"all", PublicBridge} {
				if err := os.WriteFile("/proc/sys/net/ipv4/conf/"+conf+"/send_redirects", []byte("0"), 0o644); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			return fmt.Errorf("topology: turning off the router's ICMP redirects: %w", err)
		}
		t := "ip " + apiLBTable
		backend := netip.AddrPortFrom(l.ControlPlaneAddr, APIPort)
		script = []string{
			"add table " + t,
			"add set " + t + " vips { type ipv4_addr ; }",
			"add set " + t + " removed { type ipv4_addr ; }",
			"add chain " + t + " pre { type nat hook prerouting priority dstnat ; }",
			"add rule " + t + " pre ip daddr @vips tcp dport " + strconv.Itoa(APIPort) + " dnat to " + backend.String(),
			"add chain " + t + " post { type nat hook postrouting priority srcnat ; }",
			"add rule " + t + " post ct status dnat ct original ip daddr @vips masquerade",
			// NAT chains see only a connection's first packet: what was
			// translated for a VIP since removed is dropped here, both
			// ways, so established connections stop with their VIP.
			"add chain " + t + " gone { type filter hook forward priority filter ; }",
			"add rule " + t + " gone ct status dnat ct original ip daddr @removed drop",
		}
	}
	if known {
		// Removed before: stop dropping its old connections' packets
		// (nft refuses to delete an element that is not there).
		script = append(script, "delete element ip "+apiLBTable+" removed { "+vip.String()+" }")
	}
	script = append(script, "add element ip "+apiLBTable+" vips { "+vip.String()+" }")
	if err := nftScript(l.Router, script); err != nil {
		return fmt.Errorf("topology: adding API VIP %v: %w", vip, err)
	}
	l.apiLB = true
	if l.apiVIPs == nil {
		l.apiVIPs = map[netip.Addr]bool{}
	}
	l.apiVIPs[vip] = true
	return nil
}

// RemoveAPIVIP stops what AddAPIVIP(vip) started: new connections to
// vip:6443 go unanswered (the router sends them on towards 198.51.100.0/24
// or wherever vip's route leads, where no host holds it) and packets of
// connections established through vip are dropped in both directions, as
// when a cloud deletes a load balancer. Adding vip again revives those of
// its connections whose ends still hold them.
func (l *Lab) RemoveAPIVIP(vip netip.Addr) error {
	if !l.apiVIPs[vip] {
		return fmt.Errorf("topology: %v is not an API VIP of this lab", vip)
	}
	if err := nftScript(l.Router, []string{
		"delete element ip " + apiLBTable + " vips { " + vip.String() + " }",
		"add element ip " + apiLBTable + " removed { " + vip.String() + " }",
	}); err != nil {
		return fmt.Errorf("topology: removing API VIP %v: %w", vip, err)
	}
	l.apiVIPs[vip] = false
	return nil
}

// nftScript runs nft commands, one per line, as one transaction in ns:
// they all apply or none does.
func nftScript(ns string, cmds []string) error {
	cmd := exec.Command("ip", "netns", "exec", ns, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(strings.Join(cmds, "\n") + "\n")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft in %s: %v: %s", ns, err, strings.TrimSpace(string(out)))
	}
	return nil
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
