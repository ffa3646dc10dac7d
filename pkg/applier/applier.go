// Package applier makes the kernel match a planner.Plan over netlink: it
// reads what the agent owns (its protocol number, in its table range and
// rule band), diffs it against the plan and writes only the difference, in
// an order that never opens a gap: routes are replaced in place
// (RouteReplace, never delete+add), new rules are added before stale ones
// are removed, and a table is emptied only after its rule is gone.
package applier

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"

	"github.com/go-logr/logr"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/routing-agent/routing-agent/pkg/nlutil"
	"github.com/routing-agent/routing-agent/pkg/planner"
)

// Applier writes plans into one network namespace through a netlink handle.
type Applier struct {
	h   *netlink.Handle
	cfg planner.Config
	log logr.Logger
	// Writes counts every netlink write since the Applier was made.
	Writes Counters
}

// Counters count netlink writes by kind.
type Counters struct {
	RouteReplace, RouteDelete, RuleAdd, RuleDelete atomic.Int64
}

// Total is the number of writes of every kind.
func (c *Counters) Total() int64 {
	return c.RouteReplace.Load() + c.RouteDelete.Load() + c.RuleAdd.Load() + c.RuleDelete.Load()
}

// New returns an Applier that writes through h with the table range, band
// and protocol of cfg.
func New(h *netlink.Handle, cfg planner.Config, log logr.Logger) *Applier {
	return &Applier{h: h, cfg: cfg, log: log}
}

// Report says what one Apply found and did.
type Report struct {
	// Changes is the number of netlink writes made.
	Changes int
	// Foreign are rules inside the band the agent did not create; they are
	// left alone.
	Foreign []string
}

// Apply makes the kernel match plan. It keeps going past a failed write so
// one bad route cannot hold back the others, and returns every error.
func (a *Applier) Apply(plan planner.Plan) (Report, error) {
	actual, err := a.Read()
	if err != nil {
		return Report{}, err
	}
	rep := Report{Foreign: actual.Foreign}
	var errs []error
	do := func(what string, op func() error, counter *atomic.Int64) {
		if err := op(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", what, err))
			return
		}
		counter.Add(1)
		rep.Changes++
		a.log.Info("kernel change", "op", what)
	}

	// 1. Routes: fill and repair tables before any rule points at them.
	wanted := map[routeKey]bool{}
	for _, r := range plan.Routes {
		key := routeKey{r.Table, r.Dst}
		wanted[key] = true
		if have, ok := actual.Routes[key]; ok && sameRoute(have, r) {
			continue
		}
		nl := a.toNetlinkRoute(r)
		do(r.Batch(a.cfg.Protocol), func() error { return a.h.RouteReplace(nl) }, &a.Writes.RouteReplace)
	}

	// 2. Rules: add what is missing, then remove what is stale or doubled.
	wantedRules := map[string]bool{}
	for _, r := range plan.Rules {
		key := a.ruleKey(r)
		wantedRules[key] = true
		if len(actual.Rules[key]) > 0 {
			continue
		}
		nl := a.toNetlinkRule(r)
		do(key, func() error { return a.h.RuleAdd(nl) }, &a.Writes.RuleAdd)
	}
	for _, key := range sortedKeys(actual.Rules) {
		have := actual.Rules[key]
		extra := have
		if wantedRules[key] {
			extra = have[1:]
		}
		for _, r := range extra {
			nl := a.toNetlinkRule(r)
			do(strings.Replace(key, "rule add", "rule del", 1), func() error { return a.h.RuleDel(nl) }, &a.Writes.RuleDelete)
		}
	}

	// 3. Routes nobody wants any more, now that no rule of ours leads to
	// a table that is being emptied.
	for _, key := range sortedRouteKeys(actual.Routes) {
		if wanted[key] {
			continue
		}
		nl := a.toNetlinkRoute(actual.Routes[key])
		do(fmt.Sprintf("route del %s table %d", key.Dst, key.Table), func() error { return a.h.RouteDel(nl) }, &a.Writes.RouteDelete)
	}
	return rep, errors.Join(errs...)
}

// Cleanup removes everything the agent owns, and nothing else.
func (a *Applier) Cleanup() (Report, error) {
	return a.Apply(planner.Plan{})
}

func sameRoute(have, want planner.Route) bool {
	if have.Throw != want.Throw || len(have.Nexthops) != len(want.Nexthops) {
		return false
	}
	for i := range have.Nexthops {
		if have.Nexthops[i].Gateway != want.Nexthops[i].Gateway || have.Nexthops[i].LinkIndex != want.Nexthops[i].LinkIndex {
			return false
		}
	}
	return true
}

func (a *Applier) toNetlinkRoute(r planner.Route) *netlink.Route {
	nl := &netlink.Route{
		Table:    int(r.Table),
		Dst:      nlutil.IPNet(r.Dst),
		Protocol: netlink.RouteProtocol(a.cfg.Protocol),
		Family:   family(r.Dst.Addr()),
	}
	switch {
	case r.Throw:
		nl.Type = unix.RTN_THROW
	case len(r.Nexthops) == 1:
		nl.Gw, nl.LinkIndex = net.IP(r.Nexthops[0].Gateway.AsSlice()), r.Nexthops[0].LinkIndex
	default:
		for _, nh := range r.Nexthops {
			nl.MultiPath = append(nl.MultiPath, &netlink.NexthopInfo{LinkIndex: nh.LinkIndex, Gw: net.IP(nh.Gateway.AsSlice())})
		}
	}
	return nl
}

func (a *Applier) toNetlinkRule(r planner.Rule) *netlink.Rule {
	nl := netlink.NewRule()
	nl.Priority = r.Priority
	nl.Table = int(r.Table)
	nl.Protocol = a.cfg.Protocol
	nl.SuppressPrefixlen = r.SuppressPrefixlen
	nl.Family = netlink.FAMILY_V4
	if r.IPv6 {
		nl.Family = netlink.FAMILY_V6
	}
	if r.Src.IsValid() {
		nl.Src = nlutil.IPNet(r.Src)
	}
	if r.Dst.IsValid() {
		nl.Dst = nlutil.IPNet(r.Dst)
	}
	return nl
}

func family(a netip.Addr) int {
	if a.Is6() {
		return netlink.FAMILY_V6
	}
	return netlink.FAMILY_V4
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func sortedRouteKeys(m map[routeKey]planner.Route) []routeKey {
	keys := make([]routeKey, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b routeKey) int {
		if a.Table != b.Table {
			return int(a.Table) - int(b.Table)
		}
		return a.Dst.Addr().Compare(b.Dst.Addr())
	})
	return keys
}
