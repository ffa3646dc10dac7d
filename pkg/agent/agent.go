// Package agent is the per-node controller: it watches Routes, its own Node
// and the API server's endpoints, and funnels every change into one
// coalesced reconcile of this node that plans (pkg/planner), applies
// (pkg/applier) and reports (NodeRouting status, Events, metrics). It has
// the shape of kubernetes/sample-controller: shared informers, listers and
// a rate-limited workqueue, here with a single key because the unit of work
// is the whole node.
package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	kubeinformers "k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	corelisters "k8s.io/client-go/listers/core/v1"
	discoverylisters "k8s.io/client-go/listers/discovery/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
	"github.com/routing-agent/routing-agent/generated/clientset/versioned"
	"github.com/routing-agent/routing-agent/generated/clientset/versioned/scheme"
	informers "github.com/routing-agent/routing-agent/generated/informers/externalversions"
	listers "github.com/routing-agent/routing-agent/generated/listers/networking/v1alpha1"
	"github.com/routing-agent/routing-agent/pkg/applier"
	"github.com/routing-agent/routing-agent/pkg/bypass"
	"github.com/routing-agent/routing-agent/pkg/kernelwatch"
	"github.com/routing-agent/routing-agent/pkg/planner"
	"github.com/routing-agent/routing-agent/pkg/prober"
)

// Options configure an Agent.
type Options struct {
	// NodeName is the Node this agent serves.
	NodeName string
	// Planner is the table range, rule band, protocol and bypass config.
	Planner planner.Config
	// ResyncPeriod bounds how long drift (a rule or route changed by hand)
	// can last; netlink notifications repair route and rule drift sooner.
	ResyncPeriod time.Duration
	// ResolvConf and ResolvedUpstream locate the node's DNS servers, as
	// paths of the node; HostRoot is where the node's root directory is
	// mounted ("" when the agent runs on the node itself).
	ResolvConf, ResolvedUpstream, HostRoot string
	// DNSServers are upstream servers given by the operator: those a
	// loopback resolver such as dnsmasq forwards to without saying so.
	DNSServers []netip.Addr
	// ControlPlane are the API servers named by the operator and by the
	// agent's own kubeconfig.
	ControlPlane []ControlPlaneHost
	// KubeletKubeconfig is the kubelet's kubeconfig, a path of the node:
	// its servers are control-plane endpoints too. A missing file is no
	// source; "" for none.
	KubeletKubeconfig string
	// ResolveInterval is how often control-plane names are looked up.
	ResolveInterval time.Duration
	// Learned holds the learned control-plane addresses, shared with the
	// Dialer of the agent's own API connections; Resolver asks the node's
	// DNS servers. Dialer is that connection's dialer: the agent puts in
	// the bypass rule of a newly resolved address before the dial, and
	// gives it the other ways to the API server (Fallbacks).
	Learned  *bypass.Learned
	Resolver *bypass.Resolver
	Dialer   *bypass.Dialer
	// ManageSysctls sets the ECMP L4 hashing sysctls.
	ManageSysctls bool
	// SysctlRoot is where sysctls live, normally /proc/sys.
	SysctlRoot string
	// Probe paces the gateway health probes.
	Probe prober.Config
	// Marker writes the connection-marking nftables table (pkg/connmark) in
	// the agent's own namespace; nil leaves nftables alone.
	Marker applier.Marker
	// APIProbeInterval is how often, at most, the agent asks an API server
	// it cannot reach whether it is ready again (see apiGate); 0 for
	// DefaultAPIProbeInterval.
	APIProbeInterval time.Duration
	// DumpHandle, when set, is a netlink handle of its own in the
	// namespace of the agent's handle: with it, the agent keeps a view of
	// what it owns in the kernel current from netlink notifications and a
	// reconcile dumps only what changed (one table, the rules), and the
	// node's main table alone. Without it, every reconcile reads every
	// owned route and rule.
	DumpHandle *netlink.Handle
	// KernelNamespace is the network namespace whose notifications the
	// agent watches; nil is the process's own (that of its handle, for the
	// agent itself).
	KernelNamespace *netns.NsHandle
	// StartupTaint, when set, is the key of a taint the node registers
	// with (kubelet --register-with-taints) to keep workloads off it until
	// its Routes are in place; the agent removes it from its own Node after
	// its first successful apply.
	StartupTaint string
}

// markingRetry is how long the agent plans without connection marking
// after the kernel refused its nftables table, before trying again.
const markingRetry = time.Minute

// key is the workqueue's only item: the node is reconciled as a whole.
const key = "node"

// Agent reconciles one node.
type Agent struct {
	opts    Options
	log     logr.Logger
	client  versioned.Interface
	kube    kubernetes.Interface
	handle  *netlink.Handle
	applier *applier.Applier
	// view keeps what the applier diffs against current; nil without
	// Options.DumpHandle.
	view    *applier.View
	metrics *metrics
	prober  *prober.Prober

	// gate holds the informers' list and watch calls while the API server
	// is unreachable, so that they resume as soon as it is back.
	gate         *apiGate
	routeFactory informers.SharedInformerFactory
	selfFactory  informers.SharedInformerFactory // this node's NodeRouting
	nodeFactory  kubeinformers.SharedInformerFactory
	epFactory    kubeinformers.SharedInformerFactory
	routes       listers.RouteLister
	nodes        corelisters.NodeLister
	slices       discoverylisters.EndpointSliceLister
	synced       []cache.InformerSynced

	queue    workqueue.TypedRateLimitingInterface[string]
	recorder record.EventRecorder

	// pending holds when the agent first saw each Route change not yet in
	// the kernel, for the apply-latency metric.
	pendingMu sync.Mutex
	pending   map[string]time.Time

	// knownGateways are those the NodeRouting of the previous agent on
	// this node listed; nil when there was none.
	knownGateways map[netip.Addr]bool
	// previousLayout is where the previous agent wrote, when that was not
	// where this one writes; cleared once its leftovers are removed.
	previousLayout *v1alpha1.KernelLayout

	// kernelMu serializes the applier: reconciles, and the bypass rules
	// of learned addresses put in between them.
	kernelMu sync.Mutex
	// bypassMu guards problems and hosts (the control-plane hosts of the
	// last lookup round), written by the resolver and reconcile.
	bypassMu sync.Mutex
	problems bypassProblems
	hosts    []ControlPlaneHost
	learned  string // the learned set at the last lookup round, printed
	dnsWatch *dnsWatch

	// Only the reconcile goroutine touches these.
	last *planner.Plan
	// memo carries from one plan to the next where the last plan put the
	// dispatch's rules, which the next keeps them at, and the dispatch
	// itself while the Routes' destinations stay as they are.
	memo   planner.Memo
	facts  factsCache
	tables map[string]uint32
	status statusState

	// marking remembers a connection-marking table the kernel refused
	// (no nf_tables): the agent plans without marking until retryAt.
	marking struct {
		err     error
		retryAt time.Time
	}

	statusWriter *statusWriter
	taints       *taintRemover

	ready atomic.Bool
}

// SetNamespace makes the agent's kernel writes go out in batches through a
// netlink socket of their own in ns, the namespace of its handle, with
// nexthop objects where the kernel has them (applier.SetNamespace).
func (a *Agent) SetNamespace(ns netns.NsHandle) error { return a.applier.SetNamespace(ns) }

// New wires informers and the workqueue; Run starts them.
func New(opts Options, client versioned.Interface, kube kubernetes.Interface, handle *netlink.Handle, log logr.Logger) *Agent {
	a := &Agent{
		opts:    opts,
		log:     log,
		client:  client,
		kube:    kube,
		handle:  handle,
		metrics: newMetrics(),
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.DefaultTypedControllerRateLimiter[string](),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "routing-agent"}),
		pending: map[string]time.Time{},
		tables:  map[string]uint32{},
		status:  statusState{writes: map[string]int64{}},
	}
	a.applier = applier.New(handle, opts.Planner, log.WithName("kernel"))
	if opts.Marker != nil {
		a.applier.SetMarker(opts.Marker)
	}
	if opts.DumpHandle != nil {
		view, err := a.applier.UseView(opts.DumpHandle)
		if err != nil {
			log.Error(err, "no kernel view: every reconcile reads every owned route and rule")
		}
		a.view = view
	}
	if a.opts.Learned == nil {
		a.opts.Learned = bypass.NewLearned(bypass.DefaultRetention)
	}
	if a.opts.ResolveInterval <= 0 {
		a.opts.ResolveInterval = 30 * time.Second
	}
	if a.opts.Dialer != nil {
		a.opts.Dialer.SetOnNew(a.ensureBypass)
		a.opts.Dialer.SetFallbacks(a.Fallbacks)
	}
	// The resolver files changing reconcile at once, to bypass a new DNS
	// server before the node's lookups need it.
	a.dnsWatch = newDNSWatch(log.WithName("dns"), func() { a.queue.AddAfter(key, 50*time.Millisecond) })
	a.statusWriter = newStatusWriter(a)
	a.taints = newTaintRemover(a)
	// A gateway changing health reconciles at once: that is the failover.
	a.prober = prober.New(opts.Probe, log.WithName("prober"), func() { a.queue.Add(key) },
		func(gw netip.Addr, rtt time.Duration) {
			a.metrics.probeRTT.WithLabelValues(gw.String()).Observe(rtt.Seconds())
		})

	// Every informer lists and watches through the gate: registered with
	// InformerFor first, it is the one the factory's typed accessors (and
	// their listers) return. The selectors are the ListWatch's, since a
	// factory's own options do not reach an informer it did not build.
	a.gate = newAPIGate(log.WithName("api"), readyz(kube.Discovery().RESTClient()), opts.APIProbeInterval)
	onlySelf := func(o *metav1.ListOptions) { o.FieldSelector = "metadata.name=" + opts.NodeName }

	a.routeFactory = informers.NewSharedInformerFactory(client, 0)
	routeAPI := client.NetworkingV1alpha1().Routes()
	a.routeFactory.InformerFor(&v1alpha1.Route{}, gatedInformer[versioned.Interface](listWatch(a.gate, nil, routeAPI.List, routeAPI.Watch), &v1alpha1.Route{}))
	routeInformer := a.routeFactory.Networking().V1alpha1().Routes()
	a.routes = routeInformer.Lister()

	// Only this node: a field selector keeps the other nodes' updates (and
	// their heartbeats) off this agent's watch.
	a.nodeFactory = kubeinformers.NewSharedInformerFactory(kube, 0)
	nodeAPI := kube.CoreV1().Nodes()
	a.nodeFactory.InformerFor(&corev1.Node{}, gatedInformer[kubernetes.Interface](listWatch(a.gate, onlySelf, nodeAPI.List, nodeAPI.Watch), &corev1.Node{}))
	nodeInformer := a.nodeFactory.Core().V1().Nodes()
	a.nodes = nodeInformer.Lister()

	a.epFactory = kubeinformers.NewSharedInformerFactory(kube, 0)
	sliceAPI := kube.DiscoveryV1().EndpointSlices(metav1.NamespaceDefault)
	apiServerOnly := func(o *metav1.ListOptions) { o.LabelSelector = discoveryv1.LabelServiceName + "=kubernetes" }
	a.epFactory.InformerFor(&discoveryv1.EndpointSlice{}, gatedInformer[kubernetes.Interface](listWatch(a.gate, apiServerOnly, sliceAPI.List, sliceAPI.Watch), &discoveryv1.EndpointSlice{}))
	sliceInformer := a.epFactory.Discovery().V1().EndpointSlices()
	a.slices = sliceInformer.Lister()

	// Its own NodeRouting only, to notice it being deleted (by a user, or
	// garbage-collected with a Node re-registered under the same name):
	// the writer then creates it again, tables and all.
	a.selfFactory = informers.NewSharedInformerFactory(client, 0)
	selfAPI := client.NetworkingV1alpha1().NodeRoutings()
	a.selfFactory.InformerFor(&v1alpha1.NodeRouting{}, gatedInformer[versioned.Interface](listWatch(a.gate, onlySelf, selfAPI.List, selfAPI.Watch), &v1alpha1.NodeRouting{}))
	selfInformer := a.selfFactory.Networking().V1alpha1().NodeRoutings().Informer()
	slimCaches(routeInformer.Informer(), nodeInformer.Informer(), sliceInformer.Informer(), selfInformer)
	_, _ = selfInformer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		DeleteFunc: func(any) {
			a.statusWriter.forget()
			a.queue.Add(key) // a status to write into the new one
		},
	})

	_, _ = routeInformer.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { a.routeChanged(obj) },
		UpdateFunc: func(old, obj any) { a.routeChanged(obj) },
		DeleteFunc: func(obj any) { a.routeChanged(obj) },
	})
	enqueue := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { a.queue.Add(key) },
		UpdateFunc: func(any, any) { a.queue.Add(key) },
		DeleteFunc: func(any) { a.queue.Add(key) },
	}
	_, _ = nodeInformer.Informer().AddEventHandler(enqueue)
	_, _ = sliceInformer.Informer().AddEventHandler(enqueue)
	a.synced = []cache.InformerSynced{routeInformer.Informer().HasSynced, nodeInformer.Informer().HasSynced, sliceInformer.Informer().HasSynced}
	return a
}

func (a *Agent) routeChanged(obj any) {
	if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = tomb.Obj
	}
	if r, ok := obj.(*v1alpha1.Route); ok {
		a.pendingMu.Lock()
		if _, seen := a.pending[r.Name]; !seen {
			a.pending[r.Name] = time.Now()
		}
		a.pendingMu.Unlock()
	}
	a.queue.Add(key)
}

// Run starts the informers and waits for their caches, then reconciles
// until ctx ends. Nothing touches the kernel before the caches are synced:
// an empty cache would look like "no Routes" and remove them all. When ctx
// ends, Run lets the reconcile in progress finish and returns, leaving the
// kernel as it is, so a restart or rolling update costs nothing.
func (a *Agent) Run(ctx context.Context) error {
	defer utilruntime.HandleCrash()
	defer a.queue.ShutDown()

	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: a.kube.CoreV1().Events("")})
	defer broadcaster.Shutdown()
	a.recorder = broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "routing-agent", Host: a.opts.NodeName})

	// Before the caches sync: a control-plane name that now resolves to a
	// new address gets its bypass rule at once, or an agent whose Routes
	// send the API server's new address through a gateway that drops it
	// would never sync.
	if a.opts.Resolver != nil {
		go a.runResolver(ctx)
	}
	go a.dnsWatch.run(ctx)
	go a.gate.run(ctx)
	a.routeFactory.Start(ctx.Done())
	a.nodeFactory.Start(ctx.Done())
	a.epFactory.Start(ctx.Done())
	a.selfFactory.Start(ctx.Done())
	a.log.Info("waiting for informer caches", "node", a.opts.NodeName)
	if !cache.WaitForCacheSync(ctx.Done(), a.synced...) {
		return errors.New("informer caches did not sync before shutdown")
	}
	a.loadTables(ctx)
	a.log.Info("caches synced; reconciling")

	if a.opts.ManageSysctls {
		changed, err := applier.EnsureSysctls(a.opts.SysctlRoot, applier.ECMPSysctls)
		if err != nil {
			return fmt.Errorf("setting ECMP hashing sysctls (--manage-sysctls=false to leave them): %w", err)
		}
		for _, name := range changed {
			a.log.Info("kernel change", "op", "sysctl "+name+"="+applier.ECMPSysctls[name])
		}
	}

	go a.prober.Run(ctx)
	go a.watchKernel(ctx)
	statusDone := make(chan struct{})
	go func() {
		defer close(statusDone)
		a.statusWriter.run(ctx)
	}()
	go func() {
		ticker := time.NewTicker(a.opts.ResyncPeriod)
		defer ticker.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-ticker.C:
				if a.view != nil {
					a.view.Invalidate() // the resync reads everything
				}
				a.facts.invalidate()
				a.queue.Add(key)
			}
		}
	}()
	if a.opts.StartupTaint != "" {
		go a.taints.run(ctx)
	}
	a.queue.Add(key)
	worker := make(chan struct{})
	go func() {
		defer close(worker)
		for a.processNext() {
		}
	}()
	<-ctx.Done()
	a.log.Info("stopping; finishing the reconcile in progress, and the kernel keeps its routes")
	a.queue.ShutDown()
	<-worker
	// The status of the last reconcile (where this agent wrote, for the
	// next one) is written before the process goes.
	<-statusDone
	a.statusWriter.flush()
	return nil
}

func (a *Agent) processNext() bool {
	item, shutdown := a.queue.Get()
	if shutdown {
		return false
	}
	defer a.queue.Done(item)
	if err := a.reconcile(); err != nil {
		a.metrics.reconcileErrors.Inc()
		a.log.Error(err, "reconcile failed; retrying")
		a.queue.AddRateLimited(item)
		return true
	}
	a.queue.Forget(item)
	return true
}

// watchKernel turns netlink notifications about routes, rules, links,
// addresses and nexthop objects into reconciles, so a route or rule deleted by hand or a link
// going down is dealt with in moments rather than at the next resync.
// Notifications missed while a subscription was down (the kernel drops one
// that overflows on a busy node, and kernelwatch resubscribes) reconcile
// at once. With a kernel view, they also mark what the next reconcile
// dumps again, and a stream that is down makes reconciles read everything.
func (a *Agent) watchKernel(ctx context.Context) {
	const kinds = kernelwatch.Routes | kernelwatch.Rules | kernelwatch.Links | kernelwatch.Addrs | kernelwatch.Nexthops
	view := a.view
	ev := kernelwatch.Watch(ctx, a.log.WithName("kernelwatch"), kernelwatch.Options{
		Kinds:     kinds,
		Namespace: a.opts.KernelNamespace,
		OnResubscribe: func(k kernelwatch.Kind) {
			if view != nil {
				view.Resubscribed(k)
			}
			a.facts.invalidate()
			a.queue.Add(key)
		},
		OnLost: func(k kernelwatch.Kind) {
			if view != nil {
				view.Lost(k)
			}
			a.facts.invalidate()
		},
	})
	if view != nil {
		if err := view.Watching(kinds); err != nil {
			a.log.Error(err, "no kernel view")
		}
	}
	// A short delay coalesces bursts. Without a view our own writes echo
	// back too, and the reconcile they cause finds nothing to do; the view
	// tells them from changes by others.
	const settle = 100 * time.Millisecond
	band := a.opts.Planner.PriorityBase
	inRange := func(t uint32) bool { return t >= a.opts.Planner.TableMin && t <= a.opts.Planner.TableMax }
	for {
		select {
		case <-ctx.Done():
			return
		case u := <-ev.Routes:
			t := uint32(u.Table)
			switch {
			case t == planner.MainTable:
				a.facts.invalidate()
				a.queue.AddAfter(key, settle)
			case view != nil:
				if view.RouteChanged(u) {
					a.queue.AddAfter(key, settle)
				}
			case inRange(t):
				a.queue.AddAfter(key, settle)
			}
		case u := <-ev.Rules:
			differs := view == nil || view.RuleChanged(u)
			// Only the band: a rule outside it is not the agent's to
			// judge. The echo of its own write asks for nothing.
			if p := int(u.Priority); differs && p >= band && p < band+planner.BandWidth {
				a.queue.AddAfter(key, settle)
			}
		case u := <-ev.Links:
			a.facts.invalidate()
			if view != nil {
				view.LinkChanged(int(u.Index))
			}
			a.queue.AddAfter(key, settle)
		case u := <-ev.Addrs:
			a.facts.invalidate()
			if view != nil {
				view.LinkChanged(u.LinkIndex)
			}
			a.queue.AddAfter(key, settle)
		case u := <-ev.Nexthops:
			// An object of the agent's deleted by someone else takes the
			// IPv4 routes through it with it, silently: only this tells.
			switch {
			case view != nil:
				if view.NexthopChanged(u) {
					a.queue.AddAfter(key, settle)
				}
			case u.Protocol == a.opts.Planner.Protocol || planner.OwnsNexthopID(a.opts.Planner.Protocol, u.ID):
				a.queue.AddAfter(key, settle)
			}
		}
	}
}

// Ready reports whether the caches have synced and the first apply is done.
func (a *Agent) Ready() bool { return a.ready.Load() }
