// Package kernelwatch keeps netlink notification streams alive.
//
// A subscription of github.com/vishvananda/netlink ends for good at its
// first receive error — ENOBUFS when a burst overflows the socket on a busy
// node — and leaves its reader with a closed channel and nothing more to
// come. Watch subscribes again, with backoff, and tells the caller, who must
// then resync whatever it derives from the stream: notifications were lost.
// It also watches ip rules and nexthop objects, for which the library has
// no subscription.
package kernelwatch

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/go-logr/logr"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Kind names one notification stream; Kinds combine with |.
type Kind uint8

const (
	Routes Kind = 1 << iota // IPv4 and IPv6 routes
	Links
	Addrs // IPv4 and IPv6 addresses
	Neighs
	Rules    // IPv4 and IPv6 ip rules
	Nexthops // nexthop objects (Linux 5.3 or later)
)

func (k Kind) String() string {
	switch k {
	case Routes:
		return "routes"
	case Links:
		return "links"
	case Addrs:
		return "addresses"
	case Neighs:
		return "neighbours"
	case Rules:
		return "rules"
	case Nexthops:
		return "nexthops"
	}
	return fmt.Sprintf("Kind(%#x)", uint8(k))
}

const (
	// DefaultReceiveBufferSize lets a socket queue a burst of 8,192 route
	// notifications (a cold apply of one 4,096-destination Route: each
	// destination's route and its backstop) while its reader is busy. The
	// kernel charges about 1,280 bytes per notification, IPv4 or IPv6, and
	// doubles the size asked for: 16 MiB holds some 26,000, the kernel's
	// default (net.core.rmem_default, 208 KiB) about 160. It is memory
	// only while notifications queue.
	DefaultReceiveBufferSize = 16 << 20
	// DefaultChannelSize is the capacity of each Events channel.
	DefaultChannelSize = 256
)

// Options choose the streams and size their buffers.
type Options struct {
	// Kinds are the streams to watch.
	Kinds Kind
	// Namespace is the network namespace to watch; it must stay open as
	// long as the watch runs, because resubscriptions use it. Nil means the
	// namespace of whichever thread subscribes, which is the process's own
	// for a process that lives in one namespace, like the agent; code that
	// switched only its own thread into a namespace must pass its handle.
	Namespace *netns.NsHandle
	// ReceiveBufferSize is each socket's receive buffer in bytes, forced
	// past net.core.rmem_max (SO_RCVBUFFORCE, which takes CAP_NET_ADMIN);
	// 0 means DefaultReceiveBufferSize.
	ReceiveBufferSize int
	// ChannelSize is the capacity of each Events channel; 0 means
	// DefaultChannelSize.
	ChannelSize int
	// OnResubscribe, if set, is called each time the stream of kind has
	// been subscribed again after it was lost or could not be opened.
	// Notifications were missed meanwhile: resync what depends on them.
	// It runs on the watch's own goroutines.
	OnResubscribe func(kind Kind)
	// OnLost, if set, is called each time the stream of kind is down:
	// when it could not be subscribed (from Watch itself, before it
	// returns, for the first attempt) or its subscription ended.
	// Notifications are missed until OnResubscribe. It runs on the
	// watch's own goroutines, or Watch's.
	OnLost func(kind Kind)
}

// Events carries the notifications of the streams asked for; the channel of
// a kind not asked for is nil, and a nil channel never delivers, so a select
// over all of them needs no special case. The channels are never closed:
// read them until the watch's context is done.
type Events struct {
	Routes   <-chan netlink.RouteUpdate
	Links    <-chan netlink.LinkUpdate
	Addrs    <-chan netlink.AddrUpdate
	Neighs   <-chan netlink.NeighUpdate
	Rules    <-chan RuleUpdate
	Nexthops <-chan NexthopUpdate
}

// Watch subscribes to the streams opts.Kinds names and keeps them
// subscribed until ctx is done. It returns once each has been subscribed or
// has failed to be (that failure is logged and retried), so a change made
// after Watch returns is seen by every stream that is up.
func Watch(ctx context.Context, log logr.Logger, opts Options) *Events {
	ns := netns.None()
	if opts.Namespace != nil {
		ns = *opts.Namespace
	}
	rcvbuf := opts.ReceiveBufferSize
	if rcvbuf <= 0 {
		rcvbuf = DefaultReceiveBufferSize
	}
	w := &watcher{ctx: ctx, log: log, size: opts.ChannelSize, onResubscribe: opts.OnResubscribe, onLost: opts.OnLost}
	if w.size <= 0 {
		w.size = DefaultChannelSize
	}
	if w.onResubscribe == nil {
		w.onResubscribe = func(Kind) {}
	}
	if w.onLost == nil {
		w.onLost = func(Kind) {}
	}

	ev := &Events{}
	if opts.Kinds&Routes != 0 {
		ev.Routes = start(w, Routes, func(ch chan<- netlink.RouteUpdate, done <-chan struct{}, onErr func(error)) error {
			return netlink.RouteSubscribeWithOptions(ch, done, netlink.RouteSubscribeOptions{
				Namespace: &ns, ErrorCallback: onErr, ReceiveBufferSize: rcvbuf, ReceiveBufferForceSize: true})
		})
	}
	if opts.Kinds&Links != 0 {
		ev.Links = start(w, Links, func(ch chan<- netlink.LinkUpdate, done <-chan struct{}, onErr func(error)) error {
			return netlink.LinkSubscribeWithOptions(ch, done, netlink.LinkSubscribeOptions{
				Namespace: &ns, ErrorCallback: onErr, ReceiveBufferSize: rcvbuf, ReceiveBufferForceSize: true})
		})
	}
	if opts.Kinds&Addrs != 0 {
		ev.Addrs = start(w, Addrs, func(ch chan<- netlink.AddrUpdate, done <-chan struct{}, onErr func(error)) error {
			return netlink.AddrSubscribeWithOptions(ch, done, netlink.AddrSubscribeOptions{
				Namespace: &ns, ErrorCallback: onErr, ReceiveBufferSize: rcvbuf, ReceiveBufferForceSize: true})
		})
	}
	if opts.Kinds&Neighs != 0 {
		ev.Neighs = start(w, Neighs, func(ch chan<- netlink.NeighUpdate, done <-chan struct{}, onErr func(error)) error {
			return netlink.NeighSubscribeWithOptions(ch, done, netlink.NeighSubscribeOptions{
				Namespace: &ns, ErrorCallback: onErr, ReceiveBufferSize: rcvbuf, ReceiveBufferForceSize: true})
		})
	}
	if opts.Kinds&Rules != 0 {
		ev.Rules = start(w, Rules, func(ch chan<- RuleUpdate, done <-chan struct{}, onErr func(error)) error {
			return subscribeRules(ns, rcvbuf, ch, done, onErr)
		})
	}
	if opts.Kinds&Nexthops != 0 {
		ev.Nexthops = start(w, Nexthops, func(ch chan<- NexthopUpdate, done <-chan struct{}, onErr func(error)) error {
			return subscribeNexthops(ns, rcvbuf, ch, done, onErr)
		})
	}
	return ev
}

// subscribeFunc opens one subscription with the library's contract: it
// sends updates on ch and closes ch when receiving fails, reports every
// error to onErr, and closes its socket once done is closed.
type subscribeFunc[T any] func(ch chan<- T, done <-chan struct{}, onErr func(error)) error

// watcher is what the streams of one Watch share.
type watcher struct {
	ctx           context.Context
	log           logr.Logger
	size          int
	onResubscribe func(Kind)
	onLost        func(Kind)
}

// stream keeps one kind subscribed and forwards its updates to out, which
// outlives every subscription.
type stream[T any] struct {
	ctx           context.Context
	log           logr.Logger
	kind          Kind
	subscribe     subscribeFunc[T]
	out           chan T
	onResubscribe func(Kind)
	onLost        func(Kind)
}

// subscription is one life of a stream: updates closes when it ends, and
// closing done ends it.
type subscription[T any] struct {
	updates <-chan T
	done    chan struct{}
}

func start[T any](w *watcher, kind Kind, subscribe subscribeFunc[T]) <-chan T {
	s := &stream[T]{ctx: w.ctx, log: w.log.WithValues("stream", kind.String()), kind: kind,
		subscribe: subscribe, out: make(chan T, w.size), onResubscribe: w.onResubscribe, onLost: w.onLost}
	sub, err := s.open()
	if err != nil {
		s.onLost(kind)
	}
	go s.run(sub, err)
	return s.out
}

// errEnded stands for whatever ended a subscription: the library reports
// the cause (logged by open's callback) and then only closes its channel.
var errEnded = errors.New("netlink subscription ended")

// run forwards sub, and each subscription after it, until ctx is done.
func (s *stream[T]) run(sub subscription[T], err error) {
	var b backoff
	for {
		var uptime time.Duration
		if err == nil {
			began := time.Now()
			s.forward(sub)
			if s.ctx.Err() != nil {
				return
			}
			uptime, err = time.Since(began), errEnded
			s.onLost(s.kind)
		}
		delay := b.next(uptime)
		s.log.Error(err, "resubscribing", "in", delay.String())
		select {
		case <-s.ctx.Done():
			return
		case <-time.After(delay):
		}
		if sub, err = s.open(); err == nil {
			s.log.Info("resubscribed; notifications were lost meanwhile")
			s.onResubscribe(s.kind)
		}
	}
}

// open subscribes once.
func (s *stream[T]) open() (subscription[T], error) {
	updates := make(chan T)
	done := make(chan struct{})
	onErr := func(err error) {
		select {
		case <-done: // the socket was closed on purpose
		default:
			s.log.Error(err, "netlink subscription")
		}
	}
	if err := s.subscribe(updates, done, onErr); err != nil {
		close(done) // stops whatever the library started before failing
		return subscription[T]{}, fmt.Errorf("subscribing to %s: %w", s.kind, err)
	}
	return subscription[T]{updates: updates, done: done}, nil
}

// forward passes sub's updates on until sub ends or ctx is done. Then it
// closes sub's socket, which the library leaves open after a receive error
// until done is closed, and drains updates so the library's reader, which
// may be blocked sending one, finishes.
func (s *stream[T]) forward(sub subscription[T]) {
	defer func() {
		close(sub.done)
		for range sub.updates {
		}
	}()
	for {
		select {
		case <-s.ctx.Done():
			return
		case u, ok := <-sub.updates:
			if !ok {
				return
			}
			select {
			case s.out <- u:
			case <-s.ctx.Done():
				return
			}
		}
	}
}

const (
	minBackoff = 100 * time.Millisecond
	maxBackoff = 10 * time.Second
	// healthyFor is how long a subscription must have lasted for its loss
	// to count as a new incident rather than one more failure in a row.
	healthyFor = 30 * time.Second
)

// backoff paces resubscriptions: minBackoff after a first failure, twice as
// long after each further one up to maxBackoff, and minBackoff again once a
// subscription has stayed up for healthyFor.
type backoff struct{ delay time.Duration }

// next returns how long to wait after a subscription that lasted uptime
// (zero when it could not be opened) has ended.
func (b *backoff) next(uptime time.Duration) time.Duration {
	if b.delay == 0 || uptime >= healthyFor {
		b.delay = minBackoff
	} else {
		b.delay = min(2*b.delay, maxBackoff)
	}
	return b.delay
}
