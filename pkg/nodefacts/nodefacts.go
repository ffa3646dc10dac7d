// Package nodefacts reads what the planner needs to know about a node from
// its kernel (links, addresses, main-table routes) and its resolver
// configuration (DNS servers).
package nodefacts

import (
	"bufio"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/routing-agent/routing-agent/pkg/nlutil"
	"github.com/routing-agent/routing-agent/pkg/planner"
)

// Read fills the kernel-derived fields of a planner.Node through h.
func Read(h *netlink.Handle) (planner.Node, error) {
	var node planner.Node
	links, err := nlutil.RetryDump(h.LinkList)
	if err != nil {
		return node, fmt.Errorf("listing links: %w", err)
	}
	for _, l := range links {
		attrs := l.Attrs()
		node.Links = append(node.Links, planner.Link{Index: attrs.Index, Name: attrs.Name})
	}
	addrs, err := nlutil.RetryDump(func() ([]netlink.Addr, error) { return h.AddrList(nil, netlink.FAMILY_ALL) })
	if err != nil {
		return node, fmt.Errorf("listing addresses: %w", err)
	}
	for _, a := range addrs {
		node.Addresses = append(node.Addresses, planner.Address{LinkIndex: a.LinkIndex, Prefix: nlutil.Prefix(a.IPNet, a.IP.To4() == nil)})
	}
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := nlutil.RetryDump(func() ([]netlink.Route, error) {
			return h.RouteListFiltered(family, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
		})
		if err != nil {
			return node, fmt.Errorf("listing main routes: %w", err)
		}
		for _, r := range routes {
			if r.Type != unix.RTN_UNICAST {
				continue
			}
			m := planner.MainRoute{Dst: nlutil.Prefix(r.Dst, family == netlink.FAMILY_V6), LinkIndex: r.LinkIndex, Metric: r.Priority}
			if family == netlink.FAMILY_V6 && m.Dst.Addr().IsLinkLocalUnicast() || m.Dst.Addr().IsMulticast() {
				continue // fe80::/64 and ff00::/8 on every v6 link say nothing about the node's networks
			}
			if r.Gw != nil {
				m.Gateway = nlutil.Addr(r.Gw)
			} else if len(r.MultiPath) > 0 {
				m.LinkIndex = r.MultiPath[0].LinkIndex
			}
			node.MainRoutes = append(node.MainRoutes, m)
		}
	}
	return node, nil
}

// StubResolver is systemd-resolved's local stub; when resolv.conf names it,
// the real upstream servers are in ResolvedUpstream.
var StubResolver = netip.MustParseAddr("127.0.0.53")

// ResolvedUpstream is systemd-resolved's list of upstream servers.
const ResolvedUpstream = "/run/systemd/resolve/resolv.conf"

// DNSServers reads the nameservers of a resolv.conf, following
// systemd-resolved's stub to its upstream file.
func DNSServers(resolvConf, upstream string) ([]netip.Addr, error) {
	servers, err := readNameservers(resolvConf)
	if err != nil {
		return nil, err
	}
	for _, s := range servers {
		if s == StubResolver {
			return readNameservers(upstream)
		}
	}
	return servers, nil
}

func readNameservers(path string) ([]netip.Addr, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return ParseNameservers(f)
}

// ParseNameservers returns the addresses of the nameserver lines of a
// resolv.conf, skipping what does not parse (zone suffixes are dropped).
func ParseNameservers(r io.Reader) ([]netip.Addr, error) {
	var out []netip.Addr
	scanner := bufio.NewScanner(r)
	for scanner.Scan() {
		fields := strings.Fields(scanner.Text())
		if len(fields) < 2 || fields[0] != "nameserver" {
			continue
		}
		addr, err := netip.ParseAddr(fields[1])
		if err != nil {
			continue
		}
		out = append(out, addr.WithZone(""))
	}
	return out, scanner.Err()
}
