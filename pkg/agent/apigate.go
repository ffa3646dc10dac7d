package agent

import (
	"context"
	"errors"
	"math/rand/v2"
	"net"
	"net/url"
	"sync"
	"time"

	"github.com/go-logr/logr"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	utilnet "k8s.io/apimachinery/pkg/util/net"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
)

// DefaultAPIProbeInterval is how often, at most, the agent asks an
// unreachable API server's /readyz whether it is back.
const DefaultAPIProbeInterval = 3 * time.Second

// apiGate holds the informers' list and watch calls while the API server
// cannot be reached, and lets them go the moment it answers again.
//
// Why: a reflector backs off exponentially between failed list/watch
// attempts, up to a jittered [30 s, 60 s), and client-go (v0.37) offers no
// way to change that for a shared informer (ReflectorOptions.Backoff is not
// reachable through an informer factory) nor to restart one. After a 45 s
// outage that left a new Route up to a minute out of the kernel. Held here,
// a call fails about once per outage, so the reflector's backoff hardly
// grows (a step, about a second); meanwhile one cheap GET of /readyz every interval (jittered, and
// only while calls fail) tells when to retry, instead of each of the four
// reflectors guessing. A server that answers, even with an error (429,
// 5xx), is not held: client-go's own backoff is what a struggling server
// needs.
type apiGate struct {
	log logr.Logger
	// probe says whether the API server is ready again: nil when it is.
	probe    func(context.Context) error
	interval time.Duration
	// maxHold lets a held call try again even though the probe never
	// succeeded (a /readyz that keeps failing on a server that serves):
	// never later than client-go itself would have retried.
	maxHold time.Duration

	mu    sync.Mutex
	open  chan struct{} // closed while the API server is thought reachable
	since time.Time     // when it was found unreachable
	kick  chan struct{} // wakes run when the gate shuts
}

func newAPIGate(log logr.Logger, probe func(context.Context) error, interval time.Duration) *apiGate {
	if interval <= 0 {
		interval = DefaultAPIProbeInterval
	}
	g := &apiGate{log: log, probe: probe, interval: interval, maxHold: time.Minute,
		open: make(chan struct{}), kick: make(chan struct{}, 1)}
	close(g.open)
	return g
}

// readyz probes the API server's /readyz through the agent's own REST
// client: the same dialer, bypass rules and credentials as its watches.
// An answer other than 200 that is not the server being unavailable (401,
// 403, 404: readiness is not this identity's to see) counts as ready: the
// server answers, and the real call will tell.
func readyz(client rest.Interface) func(context.Context) error {
	return func(ctx context.Context) error {
		if client == nil { // a fake clientset: nothing to ask
			return nil
		}
		err := client.Get().AbsPath("/readyz").Do(ctx).Error()
		var status apierrors.APIStatus
		if err != nil && errors.As(err, &status) {
			if code := status.Status().Code; code > 0 && code < 500 && code != 429 {
				return nil
			}
		}
		return err
	}
}

// unreachable says whether err means the request got no answer from the
// API server: a dial, TLS or connection error, or the connection lost.
// An error status (429, 5xx) is an answer.
func unreachable(err error) bool {
	if err == nil {
		return false
	}
	var status apierrors.APIStatus
	if errors.As(err, &status) {
		return false
	}
	var urlErr *url.Error
	var netErr net.Error
	return errors.As(err, &urlErr) || errors.As(err, &netErr) ||
		utilnet.IsProbableEOF(err) || utilnet.IsConnectionReset(err) || utilnet.IsConnectionRefused(err)
}

// do runs call, holding it while the gate is shut, and shuts the gate when
// call finds the API server unreachable. An answer opens it again; so does
// call's success when it proves one (not a watch's: client-go hands back
// an empty watch, and no error, for a connection lost or timed out).
func do[T any](ctx context.Context, g *apiGate, successProves bool, call func(context.Context) (T, error)) (T, error) {
	for {
		if err := g.wait(ctx); err != nil {
			var zero T
			return zero, err
		}
		v, err := call(ctx)
		if ctx.Err() != nil {
			return v, err
		}
		if !unreachable(err) {
			if err != nil || successProves {
				g.reachable()
			}
			return v, err
		}
		g.shut(err)
	}
}

// wait returns when the gate is open, after maxHold, or when ctx ends.
func (g *apiGate) wait(ctx context.Context) error {
	g.mu.Lock()
	open := g.open
	g.mu.Unlock()
	select {
	case <-open:
		return nil
	default:
	}
	hold := time.NewTimer(g.maxHold)
	defer hold.Stop()
	select {
	case <-open:
	case <-hold.C:
	case <-ctx.Done():
		return ctx.Err()
	}
	return nil
}

func (g *apiGate) shut(err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	select {
	case <-g.open:
	default:
		return // already shut
	}
	g.open, g.since = make(chan struct{}), time.Now()
	g.log.Info("API server unreachable; informers wait for its /readyz", "err", err.Error(), "probeInterval", g.interval.String())
	select {
	case g.kick <- struct{}{}:
	default:
	}
}

func (g *apiGate) reachable() {
	g.mu.Lock()
	defer g.mu.Unlock()
	select {
	case <-g.open:
		return // already open
	default:
	}
	close(g.open)
	g.log.Info("API server reachable again; informers resume", "after", time.Since(g.since).Round(time.Millisecond).String())
}

// reopened is closed when the shut gate opens again; nil (never ready)
// while it is open. Callers outside the informers that back off on their
// own (the NodeRouting writer) wait on it too, so they catch up with them.
func (g *apiGate) reopened() <-chan struct{} {
	g.mu.Lock()
	defer g.mu.Unlock()
	select {
	case <-g.open:
		return nil
	default:
		return g.open
	}
}

// run probes while the gate is shut, until ctx ends.
func (g *apiGate) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-g.kick:
		}
		last := time.Now() // the call that shut the gate was the first try
		for !g.isOpen() {
			// Probes start between half the interval and all of it apart:
			// agents that lost the API server together do not come back
			// in step. A slow probe (the dialer gives the usual way 5 s
			// before the others) is followed at once, never overlapped.
			pause := time.NewTimer(max(0, g.interval/2+rand.N(g.interval/2+1)-time.Since(last)))
			select {
			case <-ctx.Done():
				pause.Stop()
				return
			case <-pause.C:
			}
			last = time.Now()
			probeCtx, cancel := context.WithTimeout(ctx, probeTimeout)
			err := g.probe(probeCtx)
			cancel()
			if err == nil {
				g.reachable()
			}
		}
	}
}

// probeTimeout bounds one /readyz probe; it outlasts the dialer's 5 s
// before it tries the other ways to the API server.
const probeTimeout = 10 * time.Second

func (g *apiGate) isOpen() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	select {
	case <-g.open:
		return true
	default:
		return false
	}
}

// gatedInformer builds, for an informer factory's InformerFor, the informer
// of obj on lw, with the indexers the generated informers have. C is the
// factory's clientset type; lw brings its own client. As in the generated
// informers, a client that cannot stream a list through a watch (the fake
// clientsets) says so to the reflector, which then lists: without it, a
// fake's watch sends every object into a channel of 100 and panics.
func gatedInformer[C any](lw *cache.ListWatch, obj runtime.Object) func(C, time.Duration) cache.SharedIndexInformer {
	return func(client C, resync time.Duration) cache.SharedIndexInformer {
		return cache.NewSharedIndexInformer(cache.ToListWatcherWithWatchListSemantics(lw, client), obj, resync, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	}
}

// listWatch is the ListerWatcher of an informer whose calls go through g;
// tweak, when not nil, narrows them (a field or label selector).
func listWatch[L runtime.Object](g *apiGate, tweak func(*metav1.ListOptions),
	list func(context.Context, metav1.ListOptions) (L, error),
	watchFn func(context.Context, metav1.ListOptions) (watch.Interface, error)) *cache.ListWatch {
	narrow := func(o metav1.ListOptions) metav1.ListOptions {
		if tweak != nil {
			tweak(&o)
		}
		return o
	}
	return &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			o = narrow(o)
			return do(ctx, g, true, func(ctx context.Context) (runtime.Object, error) { return list(ctx, o) })
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			o = narrow(o)
			return do(ctx, g, false, func(ctx context.Context) (watch.Interface, error) { return watchFn(ctx, o) })
		},
	}
}
