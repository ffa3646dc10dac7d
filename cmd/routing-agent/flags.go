package main

import (
	"flag"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/routing-agent/routing-agent/pkg/planner"
)

// plannerFlags registers the flags that say where in the kernel the agent
// may write; plan, cleanup and the agent share them so that they agree.
func plannerFlags(fs *flag.FlagSet) *planner.Config {
	cfg := planner.DefaultConfig()
	fs.Func("table-min", fmt.Sprintf("lowest routing table id given to a Route (default %d)", cfg.TableMin), uintFlag(&cfg.TableMin))
	fs.Func("table-max", fmt.Sprintf("highest routing table id given to a Route (default %d)", cfg.TableMax), uintFlag(&cfg.TableMax))
	fs.IntVar(&cfg.PriorityBase, "priority-base", cfg.PriorityBase,
		fmt.Sprintf("first ip rule priority of the agent's band; the band spans %d priorities and must end before main's 32766", planner.BandWidth))
	fs.Func("protocol", fmt.Sprintf("routing protocol number stamped on the agent's routes and rules (default %d)", cfg.Protocol), func(s string) error {
		var v uint32
		if err := uintFlag(&v)(s); err != nil {
			return err
		}
		if v < 5 || v > 255 {
			return fmt.Errorf("%d is outside 5-255 (0-4 belong to the kernel and static routes)", v)
		}
		cfg.Protocol = uint8(v)
		return nil
	})
	fs.Func("metadata-address", "metadata service addresses kept on the main table, IPv4 or IPv6; comma-separated, empty for none (default 169.254.169.254,fd00:ec2::254,fd20:ce::254)", func(s string) error {
		addrs, err := parseList(s, netip.ParseAddr)
		cfg.Metadata = addrs
		return err
	})
	fs.Func("connmark", fmt.Sprintf("conntrack and packet mark bit(s) of connections that came in from outside, whose replies go back through main (default %#x; 0 turns marking off). Must stay clear of kube-proxy's 0x4000 and 0x8000 and of what the CNI uses (Calico 0xffff0000, Cilium 0x0f00)", planner.DefaultConnMark), func(s string) error {
		v, err := strconv.ParseUint(s, 0, 32)
		if err != nil {
			return fmt.Errorf("%q is not a number (0x2000 or 8192)", s)
		}
		if v&kubeProxyMarks != 0 {
			return fmt.Errorf("%#x overlaps kube-proxy's masquerade and drop marks (%#x)", v, kubeProxyMarks)
		}
		cfg.ConnMark = uint32(v)
		return nil
	})
	fs.Func("bypass", "extra CIDRs that always use the main table, comma-separated", func(s string) error {
		prefixes, err := parseList(s, netip.ParsePrefix)
		cfg.ExtraBypass = prefixes
		return err
	})
	return &cfg
}

// kubeProxyMarks are kube-proxy's masquerade (0x4000) and drop (0x8000)
// bits, on every node that runs it.
const kubeProxyMarks = 0x4000 | 0x8000

// checkPlannerConfig rejects a band or range that would collide with the
// kernel's own tables and rules.
func checkPlannerConfig(cfg *planner.Config) error {
	if err := cfg.CheckLayout(); err != nil {
		return fmt.Errorf("--table-min, --table-max, --priority-base, --protocol: %w", err)
	}
	return nil
}

func uintFlag(dst *uint32) func(string) error {
	return func(s string) error {
		var v uint32
		if _, err := fmt.Sscanf(s, "%d", &v); err != nil {
			return fmt.Errorf("%q is not a number", s)
		}
		*dst = v
		return nil
	}
}

func parseList[T any](s string, parse func(string) (T, error)) ([]T, error) {
	var out []T
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		v, err := parse(part)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, nil
}
