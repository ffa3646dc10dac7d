package agent

import (
	"context"
	"fmt"
	"math"
	"net/netip"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/wait"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
	"github.com/routing-agent/routing-agent/pkg/applier"
	"github.com/routing-agent/routing-agent/pkg/nodefacts"
	"github.com/routing-agent/routing-agent/pkg/planner"
	"github.com/routing-agent/routing-agent/pkg/prober"
	"github.com/routing-agent/routing-agent/pkg/selection"
)

// reconcile plans this node from the caches and the kernel, applies the
// plan and reports it. It runs on one goroutine at a time.
func (a *Agent) reconcile() error {
	defer releaseMemory() // after the unlock
	a.kernelMu.Lock()
	defer a.kernelMu.Unlock()
	begin := time.Now()
	changes := a.takePending()

	node, err := a.nodes.Get(a.opts.NodeName)
	if apierrors.IsNotFound(err) {
		// Without its Node the agent cannot tell which Routes select it;
		// it leaves the kernel as it is until the Node appears.
		a.log.Info("Node not found; leaving the kernel as it is", "node", a.opts.NodeName)
		return nil
	}
	if err != nil {
		return err
	}
	all, err := a.routes.List(labels.Everything())
	if err != nil {
		return err
	}
	selected, selectorErrs := selection.Filter(all, node)

	dumps := a.handle
	if a.view != nil {
		dumps = a.opts.DumpHandle // strict: the main table alone
	}
	facts, err := a.facts.get(a.view != nil && a.view.Watched(), func() (planner.Node, error) {
		return nodefacts.ReadThrough(a.handle, dumps)
	})
	if err != nil {
		return fmt.Errorf("reading the node's links, addresses and routes: %w", err)
	}
	facts.DNSServers = a.dnsServers()
	facts.ControlPlane = a.controlPlane(begin)

	cfg := a.opts.Planner
	if begin.Before(a.marking.retryAt) {
		// The table could not be written: plan as with marking off (the
		// IPv6 source rules come back) until the next try.
		cfg.ConnMark = 0
	}
	// This process's first reconcile starts from what the kernel holds:
	// where the dispatch sits, and which gateways were out of use.
	var kernel *applier.State
	if a.last == nil {
		kernel, _ = a.applier.Read() // on error, Apply reads again and reports it
	}
	input := planner.Input{Config: cfg, Node: facts, Routes: selected, Tables: a.tables, Down: a.prober.Down(), Layout: a.layout(kernel), Memo: &a.memo}
	plan := planner.Compute(input)
	if kernel != nil {
		plan = a.carryOverGatewayHealth(input, plan, kernel)
	}
	rep, applyErr := a.applier.Apply(plan)
	switch {
	case rep.MarkingErr != nil && cfg.ConnMark != 0:
		a.marking.err, a.marking.retryAt = rep.MarkingErr, begin.Add(markingRetry)
		a.queue.Add(key) // at once, planned without marking
	case cfg.ConnMark != 0:
		a.marking.err = nil
	}
	plan.Results = withRejections(plan.Results, rep.Rejected)
	if applyErr == nil && a.previousLayout != nil {
		a.removePreviousLayout()
	}
	a.metrics.reconcileDuration.Observe(time.Since(begin).Seconds())
	marking := 0.0
	if rep.Marking {
		marking = 1
	}
	a.metrics.connMarking.Set(marking)
	a.countWrites()
	if applyErr == nil {
		now := time.Now()
		for _, seen := range changes {
			a.metrics.applyLatency.Observe(now.Sub(seen).Seconds())
		}
		a.ready.Store(true)
		a.taints.applied(node)
	}

	clear(a.tables) // the room of a thousand names kept, not made again
	phases := map[planner.Phase]float64{planner.Applied: 0, planner.Invalid: float64(len(selectorErrs)), planner.Conflict: 0}
	for _, r := range plan.Results {
		if r.Table != 0 {
			a.tables[r.Name] = r.Table
		}
		phases[r.Phase]++
	}
	for phase, n := range phases {
		a.metrics.routes.WithLabelValues(string(phase)).Set(n)
	}
	a.prober.Set(probeTargets(plan))
	gateways := a.prober.States()

	a.metrics.gatewayUp.Reset()
	for _, g := range plan.Gateways {
		up := 1.0
		if g.Down {
			up = 0
		}
		a.metrics.gatewayUp.WithLabelValues(g.Address.String()).Set(up)
	}

	a.emitEvents(plan, selectorErrs)
	a.emitGatewayEvents(plan, gateways)
	// Only the results are compared next time: the tables and rules of
	// the plan go to the garbage collector.
	a.last = &planner.Plan{Results: plan.Results}
	a.statusWriter.offer(node, a.buildStatus(plan, gateways, rep, applyErr, selectorErrs))
	return applyErr
}

// layout is where the dispatch's rules sit, so that a change moves only
// the rules around it: as the last plan put them, or on this process's
// first reconcile as the kernel holds them (a restart rewrites nothing).
func (a *Agent) layout(kernel *applier.State) planner.Layout {
	switch {
	case a.memo.Layout() != nil:
		return a.memo.Layout()
	case kernel != nil:
		return kernel.Layout(a.opts.Planner.PriorityBase)
	}
	return nil
}

// removePreviousLayout removes, once this agent's own rules are in place,
// what an agent with another band, protocol or table range left on this
// node (its layout is in the NodeRouting it wrote).
func (a *Agent) removePreviousLayout() {
	l := a.previousLayout
	rep, err := a.applier.RemoveLayout(layoutConfig(a.opts.Planner, *l))
	if err != nil {
		a.log.Error(err, "removing what the previous agent left in its kernel layout; trying again next reconcile", "protocol", l.Protocol, "priorityBase", l.PriorityBase, "tables", fmt.Sprintf("%d-%d", l.TableMin, l.TableMax))
		return
	}
	if rep.Changes > 0 {
		a.log.Info("removed what the previous agent left in its kernel layout", "protocol", l.Protocol, "priorityBase", l.PriorityBase, "tables", fmt.Sprintf("%d-%d", l.TableMin, l.TableMax), "deletes", rep.Changes)
	}
	a.previousLayout = nil
}

// carryOverGatewayHealth, on the first reconcile of this process, starts
// Down the gateways its predecessor had taken out of the kernel's nexthops
// (gatewaysOutOfUse), and plans again with them down.
func (a *Agent) carryOverGatewayHealth(input planner.Input, plan planner.Plan, kernel *applier.State) planner.Plan {
	a.prober.Set(probeTargets(plan))
	out := gatewaysOutOfUse(plan, kernel, a.knownGateways)
	if len(out) == 0 {
		return plan
	}
	a.prober.SeedDown(out)
	a.log.Info("gateways out of use before this start stay down until they answer", "gateways", fmt.Sprint(out))
	input.Down = a.prober.Down()
	return planner.Compute(input)
}

func probeTargets(plan planner.Plan) []prober.Target {
	targets := make([]prober.Target, 0, len(plan.Gateways))
	for _, g := range plan.Gateways {
		targets = append(targets, prober.Target{Addr: g.Address, LinkIndex: g.LinkIndex, LinkName: g.LinkName})
	}
	return targets
}

// emitGatewayEvents records, on every Route using a gateway, when that
// gateway goes down or comes back on this node.
func (a *Agent) emitGatewayEvents(plan planner.Plan, states map[netip.Addr]prober.State) {
	if a.status.gwHealth == nil {
		a.status.gwHealth = map[netip.Addr]prober.Health{}
	}
	for _, g := range plan.Gateways {
		s, ok := states[g.Address]
		if !ok {
			continue
		}
		before, seen := a.status.gwHealth[g.Address]
		a.status.gwHealth[g.Address] = s.Health
		if a.recorder == nil || !seen || before == s.Health || (before == prober.Unknown && s.Health == prober.Up) {
			continue
		}
		for _, name := range g.Routes {
			route, err := a.routes.Get(name)
			if err != nil {
				continue
			}
			if s.Health == prober.Down {
				a.recorder.Eventf(route, corev1.EventTypeWarning, "GatewayDown", "node %s: gateway %s is down (%s); its traffic moves to the Route's other gateways", a.opts.NodeName, g.Address, s.Reason)
			} else {
				a.recorder.Eventf(route, corev1.EventTypeNormal, "GatewayUp", "node %s: gateway %s answers again and carries traffic", a.opts.NodeName, g.Address)
			}
		}
	}
}

// takePending hands over the Route changes seen so far.
func (a *Agent) takePending() []time.Time {
	a.pendingMu.Lock()
	defer a.pendingMu.Unlock()
	out := make([]time.Time, 0, len(a.pending))
	for name, seen := range a.pending {
		out = append(out, seen)
		delete(a.pending, name)
	}
	return out
}

// countWrites brings the netlink-writes metric up to the applier's
// cumulative counters.
func (a *Agent) countWrites() {
	w := &a.applier.Writes
	for op, n := range map[string]int64{
		"route_replace": w.RouteReplace.Load(), "route_delete": w.RouteDelete.Load(),
		"rule_add": w.RuleAdd.Load(), "rule_delete": w.RuleDelete.Load(),
		"nftables": w.Nftables.Load(), "nexthop_replace": w.NexthopReplace.Load(), "nexthop_delete": w.NexthopDelete.Load(),
	} {
		if d := n - a.status.writes[op]; d > 0 {
			a.metrics.netlinkWrites.WithLabelValues(op).Add(float64(d))
		}
		a.status.writes[op] = n
	}
}

// loadTables reads the table ids of the NodeRouting this agent wrote before
// it restarted, so Routes keep their tables even where hashes collided, and
// the gateways it knew (see gatewaysOutOfUse).
func (a *Agent) loadTables(ctx context.Context) {
	// Tried until it answers: without it the first reconcile would drop
	// the learned bypass addresses the previous agent kept.
	var nr *v1alpha1.NodeRouting
	err := wait.ExponentialBackoffWithContext(ctx, wait.Backoff{Duration: 200 * time.Millisecond, Factor: 2, Cap: 5 * time.Second, Steps: math.MaxInt32},
		func(ctx context.Context) (bool, error) {
			var err error
			nr, err = a.client.NetworkingV1alpha1().NodeRoutings().Get(ctx, a.opts.NodeName, metav1.GetOptions{})
			if err != nil && !apierrors.IsNotFound(err) {
				a.log.Info("reading this node's NodeRouting; trying again", "error", err.Error())
				return false, nil
			}
			return true, err
		})
	if err != nil {
		return // none yet, or shutting down
	}
	for _, r := range nr.Status.Routes {
		if r.Table > 0 {
			a.tables[r.Name] = uint32(r.Table)
		}
	}
	// What the previous agent learned stays bypassed: the EndpointSlices
	// or a name may now give nothing, or something else, while the node
	// still talks to an old address.
	for _, b := range nr.Status.Bypass {
		if addr, err := netip.ParseAddr(b.Address); err == nil {
			var unlisted time.Time
			if b.UnlistedSince != nil {
				unlisted = b.UnlistedSince.Time
			}
			a.opts.Learned.Restore(addr, b.Sources, unlisted, time.Now())
		}
	}
	a.knownGateways = map[netip.Addr]bool{}
	for _, g := range nr.Status.Gateways {
		if addr, err := netip.ParseAddr(g.Address); err == nil {
			a.knownGateways[addr] = true
		}
	}
	if l := nr.Status.Kernel; l != nil && !sameLayout(*l, a.opts.Planner) {
		// Checked before anything in it is deleted: a status anyone with
		// write access could have edited must not point at main or local.
		if err := layoutConfig(a.opts.Planner, *l).CheckLayout(); err != nil || l.Protocol < 0 || l.Protocol > 255 || l.TableMin < 0 || l.TableMax > 1<<32-1 {
			a.log.Error(err, "the previous kernel layout in the NodeRouting is not one an agent could have used; leaving it alone", "layout", fmt.Sprintf("%+v", *l))
		} else {
			a.previousLayout = l
		}
	}
}

// layoutConfig is cfg with the table range, band and protocol of l.
func layoutConfig(cfg planner.Config, l v1alpha1.KernelLayout) planner.Config {
	cfg.Protocol, cfg.PriorityBase, cfg.TableMin, cfg.TableMax = uint8(l.Protocol), int(l.PriorityBase), uint32(l.TableMin), uint32(l.TableMax)
	return cfg
}

// sameLayout reports whether l is where cfg writes.
func sameLayout(l v1alpha1.KernelLayout, cfg planner.Config) bool {
	return l.Protocol == int32(cfg.Protocol) && l.PriorityBase == int32(cfg.PriorityBase) &&
		l.TableMin == int64(cfg.TableMin) && l.TableMax == int64(cfg.TableMax)
}

// emitEvents records an Event on each Route whose fate on this node
// changed for the worse, or recovered.
func (a *Agent) emitEvents(plan planner.Plan, selectorErrs map[string]error) {
	if a.recorder == nil {
		return
	}
	var previous map[string]planner.Result
	if a.last != nil {
		previous = make(map[string]planner.Result, len(a.last.Results))
		for _, r := range a.last.Results {
			previous[r.Name] = r
		}
	}
	node := a.opts.NodeName
	for _, r := range plan.Results {
		before, had := previous[r.Name]
		if had && before.Phase == r.Phase && before.Reason == r.Reason && before.Table == r.Table {
			continue
		}
		route, err := a.routes.Get(r.Name)
		if err != nil {
			continue
		}
		switch {
		case r.Phase == planner.Applied && inTrouble(r.Reason):
			a.recorder.Eventf(route, corev1.EventTypeWarning, r.Reason, "node %s: %s", node, bounded(r.Message))
		case r.Phase == planner.Applied:
			// Only a recovery is news: an Event for every Route on every
			// node that applies it would be a million Events for a
			// thousand Routes on a thousand nodes.
			if had && before.Phase != planner.Applied {
				a.recorder.Eventf(route, corev1.EventTypeNormal, "Applied", "node %s: applied in table %d (was %s: %s)", node, r.Table, before.Phase, before.Reason)
			} else if had && before.Reason == planner.ReasonAllGatewaysDown {
				a.recorder.Eventf(route, corev1.EventTypeNormal, "GatewaysBack", "node %s: a gateway answers again; traffic flows", node)
			} else if had && inTrouble(before.Reason) {
				a.recorder.Eventf(route, corev1.EventTypeNormal, "Applied", "node %s: every destination in effect (was %s)", node, before.Reason)
			}
		default:
			a.recorder.Eventf(route, corev1.EventTypeWarning, string(r.Phase), "node %s: not applied (%s): %s", node, r.Reason, bounded(r.Message))
		}
	}
	for name, err := range selectorErrs {
		if a.status.selectorErrs[name] {
			continue
		}
		if route, getErr := a.routes.Get(name); getErr == nil {
			a.recorder.Eventf(route, corev1.EventTypeWarning, "Invalid", "node %s: nodeSelector cannot be evaluated: %v", node, err)
		}
	}
	a.status.selectorErrs = map[string]bool{}
	for name := range selectorErrs {
		a.status.selectorErrs[name] = true
	}
}

// inTrouble: reasons of a Route that is installed but not wholly in effect.
func inTrouble(reason string) bool {
	switch reason {
	case planner.ReasonAllGatewaysDown, planner.ReasonKernelRejected, planner.ReasonDestinationsNotApplied, planner.ReasonDestinationShadowed:
		return true
	}
	return false
}
