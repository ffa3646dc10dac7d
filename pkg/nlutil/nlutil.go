// Package nlutil holds the small conversions and retry every netlink reader
// in the agent needs.
package nlutil

import (
	"errors"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// dumpAttempts bounds retries of a dump the kernel interrupted because the
// table changed under it (NLM_F_DUMP_INTR): such a result is inconsistent.
const dumpAttempts = 5

// RetryDump runs dump until the kernel completes it uninterrupted.
func RetryDump[T any](dump func() ([]T, error)) ([]T, error) {
	var err error
	for range dumpAttempts {
		var out []T
		out, err = dump()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return out, err
		}
	}
	return nil, err
}

// NoIPv6 reports whether err says the kernel has no IPv6 at all (booted
// with ipv6.disable=1): a node without IPv6, not a failure.
func NoIPv6(err error) bool {
	return errors.Is(err, unix.EAFNOSUPPORT)
}

// Prefix converts a netlink destination to a netip.Prefix; nil, as the
// kernel reports a default route, is the family's /0.
func Prefix(n *net.IPNet, ipv6 bool) netip.Prefix {
	if n == nil {
		if ipv6 {
			return netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		}
		return netip.PrefixFrom(netip.IPv4Unspecified(), 0)
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(Addr(n.IP), ones)
}

// Addr converts a net.IP, unmapping IPv4-in-IPv6 forms.
func Addr(ip net.IP) netip.Addr {
	a, _ := netip.AddrFromSlice(ip)
	return a.Unmap()
}

// IPNet converts a netip.Prefix for netlink.
func IPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
