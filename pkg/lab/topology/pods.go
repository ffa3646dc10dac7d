package topology

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/routing-agent/routing-agent/pkg/lab/netns"
)

// Interface names of a pod's veth.
const (
	PodIf     = "eth0" // the pod's end
	PodNodeIf = "pod0" // the node's end, the pod's default gateway
)

// KubeProxyMasqueradeMark is the packet mark bit kube-proxy sets on the
// connections it masquerades (its --iptables-masquerade-bit 14 default);
// AddNodePort sets it the same way, so tests see another user of the mark
// next to the agent's bits.
const KubeProxyMasqueradeMark = 0x4000

// Pod is a pod's network namespace behind a node, connected the way a CNI
// plugin without an overlay does it: a veth to the node, the node's end as
// the pod's gateway, and nothing outside the node routes to the pod. The
// node masquerades what the pod sends out of its other interfaces, as
// clusters on networks that do not know pod addresses do (Cilium's,
// flannel's or Calico's masquerading), so the pod reaches the external host.
type Pod struct {
	NS       string     // netns of the pod
	Node     int        // the index of the node it is behind
	Addr     netip.Addr // 10.244.j.2 on the pod's eth0
	Addr6    netip.Addr // fd00:244:j::2 (j in decimal digits), with Options.IPv6
	NodeSide string     // the node's interface towards the pod, PodNodeIf

	// The addresses of NodeSide, 10.244.j.1 and fd00:244:j::1: the pod's
	// default gateways, and the source the pod sees on connections a
	// masquerading NodePort brings it.
	NodeAddr, NodeAddr6 netip.Addr
}

// AddPod puts a pod behind node j (see Pod), in a namespace named like the
// lab's others that Close removes, and turns on forwarding in the node. A
// node has at most one pod.
func (l *Lab) AddPod(j int) (*Pod, error) {
	if j < 0 || j >= len(l.Nodes) {
		return nil, fmt.Errorf("topology: no node %d", j)
	}
	if slices.ContainsFunc(l.pods, func(p *Pod) bool { return p.Node == j }) {
		return nil, fmt.Errorf("topology: node %d already has a pod, and the lab gives each node one", j)
	}
	p := &Pod{
		NS:       netns.Name(l.purpose + "-pod" + strconv.Itoa(j)),
		Node:     j,
		Addr:     netip.AddrFrom4([4]byte{10, 244, byte(j), 2}),
		NodeSide: PodNodeIf,
		NodeAddr: netip.AddrFrom4([4]byte{10, 244, byte(j), 1}),
	}
	if l.IPv6 {
		p.Addr6 = netip.MustParseAddr(fmt.Sprintf("fd00:244:%d::2", j))
		p.NodeAddr6 = netip.MustParseAddr(fmt.Sprintf("fd00:244:%d::1", j))
	}
	// As in build: a name that exists belongs to another live lab.
	if _, err := os.Stat(filepath.Join("/run/netns", p.NS)); err == nil {
		return nil, fmt.Errorf("topology: namespace %s already exists: another Lab in this process uses Purpose %q", p.NS, l.purpose)
	}
	if err := netns.Add(p.NS); err != nil {
		return nil, fmt.Errorf("topology: %w", err)
	}
	// Close removes it from now on; removing it here on failure also
	// destroys the veth, both ends, which is all a failure leaves in the
	// node but for the forwarding sysctls.
	l.created = append(l.created, p.NS)
	if err := l.setUpPod(p); err != nil {
		if derr := netns.Delete(p.NS); derr != nil {
			err = fmt.Errorf("%w (and removing %s: %v)", err, p.NS, derr)
		}
		return nil, err
	}
	l.pods = append(l.pods, p)
	return p, nil
}

func (l *Lab) setUpPod(p *Pod) error {
	node := l.Nodes[p.Node]
	// Before the veth exists, as in build: links take their namespace's
	// defaults when created.
	if err := l.sysctls(p.NS, false); err != nil {
		return err
	}
	// Only the forwarding settings in the node, not all of sysctls(node,
	// true): "all" ones such as disable_ipv6 would be copied onto every
	// interface, undoing what a test may have changed on one. Writing a
	// value already set changes nothing.
	forward := [][2]string{{"ipv4/ip_forward", "1"}}
	if l.IPv6 {
		forward = append(forward, [2]string{"ipv6/conf/all/forwarding", "1"})
	}
	if err := writeSysctls(node, forward); err != nil {
		return err
	}

	var r runner
	r.veth(p.NS, PodIf, node, PodNodeIf)
	r.addr(p.NS, PodIf, p.Addr, 24)
	r.addr(node, PodNodeIf, p.NodeAddr, 24)
	if l.IPv6 {
		r.addr(p.NS, PodIf, p.Addr6, 64)
		r.addr(node, PodNodeIf, p.NodeAddr6, 64)
	}
	r.ip(p.NS, "link", "set", PodIf, "up")
	r.ip(node, "link", "set", PodNodeIf, "up")
	r.ip(p.NS, "route", "add", "default", "via", p.NodeAddr.String(), "dev", PodIf)
	if l.IPv6 {
		r.ip(p.NS, "-6", "route", "add", "default", "via", p.NodeAddr6.String(), "dev", PodIf)
	}
	if r.err != nil {
		return r.err
	}

	// Masquerading in the postrouting hook, after the routing decision:
	// the node's routes and rules see the pod's own address. Replies to
	// NodePort connections are not new connections and pass untouched.
	t := "inet lab-pod"
	script := []string{
		"add table " + t,
		"add chain " + t + " post { type nat hook postrouting priority srcnat ; }",
		"add rule " + t + " post oifname != " + PodNodeIf + " ip saddr " + netip.PrefixFrom(p.Addr, 24).Masked().String() + " masquerade",
	}
	if l.IPv6 {
		script = append(script, "add rule "+t+" post oifname != "+PodNodeIf+" ip6 saddr "+netip.PrefixFrom(p.Addr6, 64).Masked().String()+" masquerade")
	}
	if err := nftScript(node, script); err != nil {
		return fmt.Errorf("topology: masquerading node %d's pod: %w", p.Node, err)
	}
	return waitUp(5*time.Second, p.NS, node)
}

// nodePortTable is each node's nftables table for AddNodePort.
const nodePortTable = "inet lab-nodeport"

// AddNodePort makes node j forward TCP connections to port on any of its
// own addresses (its public and VPC ones, IPv4 and, with Options.IPv6,
// IPv6) to pod's podPort, as kube-proxy does for a NodePort Service: DNAT
// in prerouting, so only connections that arrive at the node, not those
// the node opens itself. pod must be the one AddPod put behind node j: the
// lab has no pod network between nodes.
//
// With masquerade the connections are also source-NATed to the node's
// address towards the pod (NodeAddr), as kube-proxy does for
// externalTrafficPolicy Cluster, in kube-proxy's way: their first packet
// is marked with KubeProxyMasqueradeMark in the DNAT rule, before the node
// routes it, and postrouting masquerades what carries the mark.
//
// Each port of a node can be added once; ports of one node may differ in
// masquerade.
func (l *Lab) AddNodePort(j int, port uint16, pod *Pod, podPort uint16, masquerade bool) error {
	if j < 0 || j >= len(l.Nodes) {
		return fmt.Errorf("topology: no node %d", j)
	}
	if pod == nil || !slices.Contains(l.pods, pod) {
		return errors.New("topology: AddNodePort needs a pod AddPod added to this lab")
	}
	if pod.Node != j {
		return fmt.Errorf("topology: the pod is behind node %d, not %d, and the lab has no pod network between nodes", pod.Node, j)
	}
	if port == 0 || podPort == 0 {
		return fmt.Errorf("topology: NodePort %d to pod port %d: ports must not be 0", port, podPort)
	}
	if l.nodePorts[j][port] {
		return fmt.Errorf("topology: node %d already has NodePort %d", j, port)
	}

	t := nodePortTable
	var script []string
	if l.nodePorts[j] == nil {
		mark := fmt.Sprintf("0x%x", KubeProxyMasqueradeMark)
		script = []string{
			"add table " + t,
			"add chain " + t + " pre { type nat hook prerouting priority dstnat ; }",
			"add chain " + t + " post { type nat hook postrouting priority srcnat ; }",
			"add rule " + t + " post meta mark & " + mark + " == " + mark + " masquerade",
		}
	}
	// fib daddr type local: addressed to the node itself, whichever of its
	// addresses, as kube-proxy's KUBE-NODEPORTS matches.
	match := "fib daddr type local tcp dport " + strconv.Itoa(int(port))
	if masquerade {
		match += fmt.Sprintf(" meta mark set meta mark | 0x%x", KubeProxyMasqueradeMark)
	}
	script = append(script, "add rule "+t+" pre meta nfproto ipv4 "+match+" dnat ip to "+netip.AddrPortFrom(pod.Addr, podPort).String())
	if l.IPv6 {
		script = append(script, "add rule "+t+" pre meta nfproto ipv6 "+match+" dnat ip6 to "+netip.AddrPortFrom(pod.Addr6, podPort).String())
	}
	if err := nftScript(l.Nodes[j], script); err != nil {
		return fmt.Errorf("topology: NodePort %d on node %d: %w", port, j, err)
	}
	if l.nodePorts == nil {
		l.nodePorts = map[int]map[uint16]bool{}
	}
	if l.nodePorts[j] == nil {
		l.nodePorts[j] = map[uint16]bool{}
	}
	l.nodePorts[j][port] = true
	return nil
}

// ListenTCP opens a TCP listener on addr inside namespace ns; it stays in
// that namespace for its life. An unspecified IPv6 address ([::]) listens
// on IPv4 too.
func ListenTCP(ns string, addr netip.AddrPort) (net.Listener, error) {
	var ln net.Listener
	err := netns.Do(ns, func() error {
		var err error
		ln, err = net.Listen("tcp", addr.String())
		return err
	})
	return ln, err
}

// ServeEcho answers every connection ln accepts with the address it came
// from (an IP, IPv4 unmapped, and a newline) and closes it, until ln is
// closed; run it in a goroutine. Through DialTCP a test sees whether a
// connection was answered and what NAT made of its source.
func ServeEcho(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		c.SetWriteDeadline(time.Now().Add(time.Second))
		from := c.RemoteAddr().String()
		if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
			from = a.AddrPort().Addr().Unmap().String()
		}
		fmt.Fprintln(c, from)
		c.Close()
	}
}

// DialTCP connects from namespace ns to addr and returns the line the
// server writes, without its newline: from ServeEcho, the source address
// it saw. timeout bounds the connecting and, again, the reading.
func DialTCP(ns string, addr netip.AddrPort, timeout time.Duration) (string, error) {
	var c net.Conn
	err := netns.Do(ns, func() error {
		var err error
		c, err = net.DialTimeout("tcp", addr.String(), timeout)
		return err
	})
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("reading from %v: %w", addr, err)
	}
	return strings.TrimSuffix(line, "\n"), nil
}
