package agent

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	metav1apply "k8s.io/client-go/applyconfigurations/meta/v1"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
	apply "github.com/routing-agent/routing-agent/generated/applyconfiguration/networking/v1alpha1"
	"github.com/routing-agent/routing-agent/pkg/applier"
	"github.com/routing-agent/routing-agent/pkg/planner"
	"github.com/routing-agent/routing-agent/pkg/prober"
)

// fieldManager owns the agent's fields in server-side apply.
const fieldManager = "routing-agent"

// statusState is what the reconcile goroutine remembers between runs.
type statusState struct {
	lastApply    *metav1.Time
	gwHealth     map[netip.Addr]prober.Health // for gateway Events
	condition    *metav1apply.ConditionApplyConfiguration
	bypassCond   *metav1apply.ConditionApplyConfiguration
	dns          []planner.Endpoint
	selectorErrs map[string]bool
	writes       map[string]int64
}

// routeState is a Route's RouteState for its result r.
func routeState(r planner.Result) *apply.RouteStateApplyConfiguration {
	state := apply.RouteState().WithName(r.Name).WithPhase(v1alpha1.RoutePhase(r.Phase)).WithObservedGeneration(r.Generation)
	if r.Reason != "" && r.Reason != planner.ReasonApplied {
		state.WithReason(r.Reason).WithMessage(bounded(r.Message))
	}
	if r.Table != 0 {
		state.WithTable(int32(r.Table))
	}
	if n := len(r.NotApplied); n > 0 {
		state.WithNotAppliedCount(int32(n))
		for _, d := range r.NotApplied[:min(n, v1alpha1.MaxReportedDestinations)] {
			state.WithNotAppliedDestinations(apply.DestinationState().WithDestination(d.Destination.String()).WithReason(d.Reason).WithMessage(boundedTo(d.Message, maxDestinationMessage)))
		}
	}
	return state
}

// buildStatus says what this node's NodeRouting should hold after a
// reconcile.
func (a *Agent) buildStatus(plan planner.Plan, gateways map[netip.Addr]prober.State, rep applier.Report, applyErr error, selectorErrs map[string]error) *apply.NodeRoutingStatusApplyConfiguration {
	st := &a.status
	now := metav1.Now()
	if rep.Changes > 0 || st.lastApply == nil {
		st.lastApply = &now
	}

	status := apply.NodeRoutingStatus()
	summary := apply.NodeRoutingSummary().WithApplied(0).WithInvalid(int32(len(selectorErrs))).WithConflict(0).WithGatewaysUp(0).WithGatewaysDown(0)
	routes := make([]*apply.RouteStateApplyConfiguration, 0, len(plan.Results)+len(selectorErrs))
	for _, r := range plan.Results {
		switch r.Phase {
		case planner.Applied:
			*summary.Applied++
		case planner.Invalid:
			*summary.Invalid++
		case planner.Conflict:
			*summary.Conflict++
		}
		routes = append(routes, routeState(r))
	}
	for name, err := range selectorErrs {
		routes = append(routes, apply.RouteState().WithName(name).WithPhase(v1alpha1.RouteInvalid).WithReason("InvalidNodeSelector").WithMessage(bounded(err.Error())))
	}
	slices.SortFunc(routes, func(x, y *apply.RouteStateApplyConfiguration) int { return strings.Compare(*x.Name, *y.Name) })
	status.WithRoutes(routes...)

	for _, g := range plan.Gateways {
		state, ok := gateways[g.Address]
		if !ok {
			state = prober.State{Health: prober.Unknown, Reason: prober.ReasonNotProbed, Since: now.Time}
		}
		switch state.Health {
		case prober.Down:
			*summary.GatewaysDown++
		case prober.Up:
			*summary.GatewaysUp++
		}
		status.WithGateways(apply.GatewayState().WithAddress(g.Address.String()).WithInterface(g.LinkName).
			WithHealth(v1alpha1.GatewayHealth(state.Health)).WithReason(state.Reason).WithSince(metav1.NewTime(state.Since.Truncate(time.Second))))
	}
	unlisted := map[netip.Addr]time.Time{}
	for _, e := range a.opts.Learned.Entries() {
		if !e.Unlisted.IsZero() {
			unlisted[e.Addr] = e.Unlisted
		}
	}
	for _, b := range plan.Bypass {
		address := b.Prefix.String()
		if b.Prefix.IsSingleIP() {
			address = b.Prefix.Addr().String()
		}
		entry := apply.BypassAddress().WithAddress(address).WithSources(b.Sources...)
		if t, ok := unlisted[b.Prefix.Addr()]; ok && b.Prefix.IsSingleIP() {
			entry.WithUnlistedSince(metav1.NewTime(t.Truncate(time.Second)))
		}
		status.WithBypass(entry)
	}
	status.WithForeignRules(rep.Foreign...)
	status.WithConnectionMarking(connectionMarking(a.opts.Planner, plan, rep, a.marking.err))
	status.WithSummary(summary).WithLastApplyTime(*st.lastApply)
	cfg := a.opts.Planner
	status.WithKernel(apply.KernelLayout().WithProtocol(int32(cfg.Protocol)).WithPriorityBase(int32(cfg.PriorityBase)).
		WithTableMin(int64(cfg.TableMin)).WithTableMax(int64(cfg.TableMax)))

	condStatus, reason, message := metav1.ConditionTrue, "Applied", "the kernel matches the plan"
	if applyErr != nil {
		condStatus, reason, message = metav1.ConditionFalse, "ApplyFailed", bounded(applyErr.Error())
	}
	if st.condition == nil || *st.condition.Status != condStatus || *st.condition.Message != message {
		st.condition = metav1apply.Condition().WithType("Applied").WithStatus(condStatus).WithReason(reason).WithMessage(message).WithLastTransitionTime(now)
	}
	ok, reason, message := a.bypassCondition()
	bypassStatus := metav1.ConditionTrue
	if !ok {
		bypassStatus = metav1.ConditionFalse
	}
	message = bounded(message)
	if st.bypassCond == nil || *st.bypassCond.Status != bypassStatus || *st.bypassCond.Message != message {
		st.bypassCond = metav1apply.Condition().WithType("BypassComplete").WithStatus(bypassStatus).WithReason(reason).WithMessage(message).WithLastTransitionTime(now)
	}
	status.WithConditions(st.condition, st.bypassCond)
	return status
}

// statusWriter server-side applies the NodeRouting on a goroutine of its
// own, so the kernel never waits for the API server: a slow, throttled or
// absent API server delays the report, never the routes. Only the latest
// status is kept; it is written when its content differs from what was
// last written, and retried with backoff until it is.
type statusWriter struct {
	a      *Agent
	mu     sync.Mutex
	node   *corev1.Node
	latest *apply.NodeRoutingStatusApplyConfiguration
	notify chan struct{}
	// forgotten is set when the NodeRouting was deleted.
	forgotten bool
	// Only run touches these.
	created bool
	// written is the digest of the status last written, not the status:
	// that is megabytes on a node with 10,000 Routes.
	written [sha256.Size]byte
}

func newStatusWriter(a *Agent) *statusWriter {
	return &statusWriter{a: a, notify: make(chan struct{}, 1)}
}

// offer hands over the status to write next, replacing any not yet written.
func (w *statusWriter) offer(node *corev1.Node, status *apply.NodeRoutingStatusApplyConfiguration) {
	w.mu.Lock()
	w.node, w.latest = node, status
	w.mu.Unlock()
	select {
	case w.notify <- struct{}{}:
	default:
	}
}

// forget makes the writer create the NodeRouting again and write the
// next status offered into it (or one offered and not written yet): the
// object was deleted. The caller has a reconcile offer one.
func (w *statusWriter) forget() {
	w.mu.Lock()
	w.forgotten = true
	w.mu.Unlock()
	select {
	case w.notify <- struct{}{}:
	default:
	}
}

func (w *statusWriter) run(ctx context.Context) {
	backoff := time.Second
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.notify:
		}
		w.mu.Lock()
		node, status := w.node, w.latest
		if w.forgotten {
			w.created, w.written, w.forgotten = false, [sha256.Size]byte{}, false
		}
		w.mu.Unlock()
		if status == nil {
			continue // nothing offered yet
		}
		if err := w.write(ctx, node, status); err != nil {
			w.a.log.Error(err, "writing NodeRouting; retrying", "node", w.a.opts.NodeName, "in", backoff)
			if unreachable(err) {
				w.a.gate.shut(err)
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
				backoff = min(2*backoff, 30*time.Second)
			case <-w.a.gate.reopened():
				// The API server is back: what was learned during the
				// outage (a moved API server's address) is written now,
				// not up to 30 s later, and a refusal from a server still
				// starting (RBAC not loaded yet) is retried as soon.
				backoff = time.Second
			}
			select { // try again with whatever is latest by then
			case w.notify <- struct{}{}:
			default:
			}
			continue
		}
		backoff = time.Second
		// Written, it is not kept (it is megabytes on a node with 10,000
		// Routes): a NodeRouting deleted is made again with the status of
		// the reconcile that forget asks for.
		w.mu.Lock()
		if w.latest == status {
			w.latest = nil
		}
		w.mu.Unlock()
	}
}

// flush writes, as the agent stops (after run has returned and the last
// reconcile is done), the status offered last if it is not written yet,
// for a few seconds at most: the next agent reads the layout
// it records (a restart with another band removes this one's by it), and a
// status written a moment before the stop would otherwise be lost.
func (w *statusWriter) flush() {
	w.mu.Lock()
	node, status := w.node, w.latest
	w.mu.Unlock()
	if status == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := w.write(ctx, node, status); err != nil {
		w.a.log.Error(err, "writing NodeRouting as the agent stops", "node", w.a.opts.NodeName)
	}
}

func (w *statusWriter) write(ctx context.Context, node *corev1.Node, status *apply.NodeRoutingStatusApplyConfiguration) error {
	content, err := json.Marshal(status)
	if err != nil {
		return err
	}
	digest := sha256.Sum256(content)
	if w.created && digest == w.written {
		return nil
	}
	nodeRoutings := w.a.client.NetworkingV1alpha1().NodeRoutings()
	opts := metav1.ApplyOptions{FieldManager: fieldManager, Force: true}
	name := w.a.opts.NodeName
	if !w.created {
		// The object itself, owned by the Node so it goes when the Node goes.
		owner := metav1apply.OwnerReference().WithAPIVersion("v1").WithKind("Node").WithName(node.Name).WithUID(node.UID)
		if _, err := nodeRoutings.Apply(ctx, apply.NodeRouting(name).WithOwnerReferences(owner), opts); err != nil {
			return err
		}
		w.created = true
	}
	_, err = nodeRoutings.ApplyStatus(ctx, apply.NodeRouting(name).WithStatus(status), opts)
	if apierrors.IsNotFound(err) {
		w.created = false // deleted under us: recreate next time
	}
	if err != nil {
		return err
	}
	w.a.metrics.statusWrites.Inc()
	w.written = digest
	return nil
}

// maxMessage bounds every message the agent writes into a NodeRouting: one
// refused 4,096-destination Route must not make a status larger than the
// API server stores (and every later write fail with it).
const maxMessage = 1024

// maxDestinationMessage bounds the message of each listed destination, so
// a Route's 32 of them add up to a few KiB at most.
const maxDestinationMessage = 256

// bounded cuts s to maxMessage bytes, on a rune boundary, saying so.
func bounded(s string) string { return boundedTo(s, maxMessage) }

func boundedTo(s string, limit int) string {
	if len(s) <= limit {
		return s
	}
	const more = " ... (cut)"
	cut := limit - len(more)
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + more
}

// withRejections puts the routes the kernel refused on the Routes they
// belong to: reason KernelRejected, and each refused destination among
// NotApplied. Those destinations fail closed behind their backstops; the
// Route's other destinations work.
func withRejections(results []planner.Result, rejected map[uint32][]applier.Rejection) []planner.Result {
	if len(rejected) == 0 {
		return results
	}
	out := slices.Clone(results)
	for i, r := range out {
		refused := rejected[r.Table]
		if r.Phase != planner.Applied || len(refused) == 0 {
			continue
		}
		r.NotApplied = slices.Clone(r.NotApplied)
		listed := map[netip.Prefix]bool{}
		for _, rej := range refused {
			// A throw is not this Route's destination, and a destination
			// whose live route and backstop were both refused is one.
			if rej.Route.Throw || listed[rej.Route.Dst] {
				continue
			}
			listed[rej.Route.Dst] = true
			r.NotApplied = append(r.NotApplied, planner.DestinationIssue{Destination: rej.Route.Dst, Reason: planner.ReasonKernelRejected, Message: bounded(rej.Err.Error())})
		}
		r.Reason = planner.ReasonKernelRejected
		r.Message = fmt.Sprintf("the kernel refused %d of this Route's routes (first: %v); their destinations fail closed (unreachable) until it accepts them", len(refused), refused[0].Err)
		out[i] = r
	}
	return out
}

// connectionMarking reports the nftables part of the plan as applied.
func connectionMarking(cfg planner.Config, plan planner.Plan, rep applier.Report, refused error) *apply.ConnectionMarkingApplyConfiguration {
	c := apply.ConnectionMarking().WithActive(rep.Marking).WithCollisions(rep.MarkCollisions...)
	if cfg.ConnMark != 0 {
		c.WithMark(fmt.Sprintf("%#x", cfg.ConnMark))
	}
	switch {
	case cfg.ConnMark == 0:
		c.WithMessage("turned off (--connmark=0): replies to connections from outside go back through main only by the source-address rules")
	case refused != nil:
		c.WithMessage(bounded("the nftables table cannot be written (" + refused.Error() + "); planned without marking, IPv6 source rules included, and tried again every minute"))
	case plan.ConnMark == nil:
		c.WithMessage("no Route is applied on this node")
	default:
		c.WithUnmarked(plan.ConnMark.Exclude...)
	}
	return c
}
