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
	"path/filepath"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/routing-agent/routing-agent/pkg/nlutil"
	"github.com/routing-agent/routing-agent/pkg/planner"
)

// Read fills the kernel-derived fields of a planner.Node through h.
func Read(h *netlink.Handle) (planner.Node, error) { return ReadThrough(h, h) }

// ReadThrough is Read with the main table dumped through routes: with
// strict checking on (netlink.Handle.SetStrictCheck) the kernel sends that
// table alone, where without it sends every table (the agent's thousands
// of routes too) for the library to filter.
func ReadThrough(h, routes *netlink.Handle) (planner.Node, error) {
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
			return routes.RouteListFiltered(family, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
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

// Loopback resolvers of systemd-resolved: its stub (127.0.0.53) and its
// proxy (127.0.0.54) forward to the servers listed in ResolvedUpstream.
var resolvedListeners = []netip.Addr{netip.MustParseAddr("127.0.0.53"), netip.MustParseAddr("127.0.0.54")}

// ResolvedUpstream is systemd-resolved's list of upstream servers.
const ResolvedUpstream = "/run/systemd/resolve/resolv.conf"

// Sources of DNS server addresses, as the NodeRouting status shows them.
const (
	SourceResolvConf = "resolv.conf"
	SourceResolved   = "systemd-resolved upstream"
)

// Resolvers is what the node's resolver configuration says.
type Resolvers struct {
	// Listed are resolv.conf's nameservers, in order: whom lookups ask.
	Listed []netip.Addr
	// Servers are where the node's DNS traffic really goes, to keep on the
	// main table: the listed servers that are not loopback and, for
	// systemd-resolved's loopback listeners, its upstream servers.
	Servers []planner.Endpoint
	// Hidden are loopback resolvers (dnsmasq on 127.0.0.1, say) whose
	// upstream servers the agent cannot read: they need --dns-server.
	Hidden []netip.Addr
	// Files are the files read, as opened (symbolic links followed), for
	// watching their directories.
	Files []string
}

// ReadResolvers reads resolv.conf and, when it names systemd-resolved,
// resolved's upstream list. hostRoot is where the node's root directory is
// mounted ("" when the agent runs on the node itself): a symbolic link such
// as /etc/resolv.conf -> /run/systemd/resolve/stub-resolv.conf is followed
// inside it. An unreadable upstream list is an error: the stub's servers
// would be unknown.
func ReadResolvers(resolvConf, resolvedUpstream, hostRoot string) (Resolvers, error) {
	var r Resolvers
	path, err := HostPath(hostRoot, resolvConf, &r.Files)
	if err != nil {
		return r, err
	}
	if r.Listed, err = readNameservers(path); err != nil {
		return r, err
	}
	seen := map[netip.Addr]bool{}
	add := func(a netip.Addr, source string) {
		if !seen[a] {
			seen[a] = true
			r.Servers = append(r.Servers, planner.Endpoint{Addr: a, Source: source})
		}
	}
	upstreamRead := false
	for _, a := range r.Listed {
		switch {
		case !a.IsLoopback():
			add(a, SourceResolvConf)
		case slices.Contains(resolvedListeners, a):
			if upstreamRead {
				continue
			}
			upstreamRead = true
			path, err := HostPath(hostRoot, resolvedUpstream, &r.Files)
			if err != nil {
				return r, fmt.Errorf("%s names systemd-resolved (%s): %w", resolvConf, a, err)
			}
			upstream, err := readNameservers(path)
			if err != nil {
				return r, fmt.Errorf("%s names systemd-resolved (%s): %w", resolvConf, a, err)
			}
			for _, u := range upstream {
				if !u.IsLoopback() {
					add(u, SourceResolved)
				}
			}
		default:
			r.Hidden = append(r.Hidden, a)
		}
	}
	return r, nil
}

// HostPath is where path of the node is found under hostRoot, following a
// symbolic link at its end the way the node would (an absolute target is
// taken from the node's root, not the container's). Every path on the way
// is appended to visited.
func HostPath(hostRoot, path string, visited *[]string) (string, error) {
	for range 16 {
		// Cleaned from the root first: a target with "..", such as
		// /../../etc, must not climb out of hostRoot.
		full := filepath.Join(hostRoot, filepath.Clean("/"+path))
		*visited = append(*visited, full)
		fi, err := os.Lstat(full)
		if err != nil {
			return "", err
		}
		if fi.Mode()&os.ModeSymlink == 0 {
			return full, nil
		}
		target, err := os.Readlink(full)
		if err != nil {
			return "", err
		}
		if !filepath.IsAbs(target) {
			target = filepath.Join(filepath.Dir(path), target)
		}
		path = target
	}
	return "", fmt.Errorf("%s: too many levels of symbolic links", path)
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
