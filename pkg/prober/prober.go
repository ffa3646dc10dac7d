// Package prober tells which gateways answer. It ICMP-echoes each distinct
// gateway over the interface its routes use, one probe stream per gateway
// however many Routes share it, and also marks a gateway down at once when
// its interface loses its link or its neighbour entry fails.
//
// The rule for a gateway that has never answered: it starts Unknown and is
// used, so a new Route works at once; after Fall unanswered probes it is
// Down (reason NeverAnswered), like any other. Gateways must answer ICMP
// echo for health checks to work; when every gateway of a Route is down the
// planner keeps them all (fail closed), so a gateway that blocks ICMP never
// makes traffic leak, it only stops sharing the load with one that answers.
//
// A probe that cannot be sent (no socket, or a send error) is a miss too:
// after Fall of them the gateway is Down with reason ProbeFailed, and a
// gateway seeded Down says ProbeFailed at once, so a prober that cannot
// probe is seen rather than leaving gateways as they were. A probe socket
// is bound to an interface, that is to an ifindex: it is reopened after a
// send error and whenever Set names a new index (an interface deleted and
// re-created under the same name), and a socket that cannot be opened is
// retried with backoff. None of this is a recovery: health and counters
// carry over, and only answers bring a gateway back.
package prober

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"
)

// Health of a gateway.
type Health string

const (
	Unknown Health = "Unknown" // not answered yet; used
	Up      Health = "Up"
	Down    Health = "Down"
)

// Reasons for the last transition.
const (
	ReasonAnswering      = "Answering"
	ReasonProbeTimeout   = "ProbeTimeout"
	ReasonNeverAnswered  = "NeverAnswered"
	ReasonLinkDown       = "LinkDown"
	ReasonNeighborFailed = "NeighborFailed"
	ReasonNotProbed      = "NotProbed"
	// ReasonProbeFailed: probes could not be sent (the socket cannot be
	// opened, or sending fails); the error is in the agent's log.
	ReasonProbeFailed = "ProbeFailed"
	// ReasonNotInUse: the gateway was out of the kernel's nexthops when
	// the agent started (it had been taken down before a restart); it
	// stays out until it answers Rise probes.
	ReasonNotInUse = "NotInUseAtStart"
)

// Config sets the pace. The defaults detect a dead gateway in about
// Interval*Fall (1.5 s) and bring a recovered one back in Interval*Rise (1 s).
type Config struct {
	Interval time.Duration
	Timeout  time.Duration
	// Rise consecutive answers bring a down gateway back; Fall consecutive
	// misses take it down.
	Rise, Fall int
	// FlapWindow: a gateway that goes down again within this window of its
	// last fall needs twice as many answers to come back, per repeat (up to
	// 8x), so a flapping gateway does not churn the kernel. Zero disables.
	FlapWindow time.Duration
}

// DefaultConfig beats the anchor's 30 s by an order of magnitude: failover
// within 3 s (1.5 s to detect plus the kernel update).
func DefaultConfig() Config {
	return Config{Interval: 500 * time.Millisecond, Timeout: 500 * time.Millisecond, Rise: 2, Fall: 3, FlapWindow: 10 * time.Second}
}

// Validate rejects settings that cannot work.
func (c Config) Validate() error {
	switch {
	case c.Interval < 10*time.Millisecond:
		return fmt.Errorf("probe interval %s: at least 10ms", c.Interval)
	case c.Timeout <= 0 || c.Timeout > c.Interval:
		return fmt.Errorf("probe timeout %s: must be positive and at most the interval %s", c.Timeout, c.Interval)
	case c.Rise < 1 || c.Fall < 1:
		return fmt.Errorf("rise %d / fall %d: at least 1", c.Rise, c.Fall)
	}
	return nil
}

// Target is a gateway and the interface its routes leave through. The
// index tells a re-created interface from the one it replaced.
type Target struct {
	Addr      netip.Addr
	LinkIndex int
	LinkName  string
}

// State is what the prober knows of one gateway.
type State struct {
	Health Health
	Reason string
	Since  time.Time
	// RTT of the last answer.
	RTT time.Duration
}

// Prober probes a changing set of gateways.
type Prober struct {
	cfg      Config
	log      logr.Logger
	onChange func()
	onRTT    func(netip.Addr, time.Duration)

	mu  sync.Mutex
	gws map[netip.Addr]*gateway
	ctx context.Context
}

type gateway struct {
	target Target
	cancel context.CancelFunc // stops the probe stream
	state  State
	ok     int // consecutive answers
	missed int // consecutive misses
	falls  []time.Time
	ever   bool // has answered at least once
}

// New returns a prober; onChange is called (from the prober's goroutines)
// whenever a gateway's health or reason changes, onRTT for every answer.
func New(cfg Config, log logr.Logger, onChange func(), onRTT func(netip.Addr, time.Duration)) *Prober {
	if onRTT == nil {
		onRTT = func(netip.Addr, time.Duration) {}
	}
	return &Prober{cfg: cfg, log: log, onChange: onChange, onRTT: onRTT, gws: map[netip.Addr]*gateway{}}
}

// Run watches links and neighbours for the fast signals until ctx ends;
// probe streams started by Set stop with it too.
func (p *Prober) Run(ctx context.Context) {
	p.mu.Lock()
	p.ctx = ctx
	for _, g := range p.gws {
		p.startLocked(g)
	}
	p.mu.Unlock()
	p.watch(ctx)
}

// Set makes the probed gateways exactly targets: new ones start Unknown,
// gone ones stop. A gateway whose interface changed, by index (re-created
// under the same name) or by name, gets a new stream, since its socket is
// bound to the old one; it keeps its health and counters.
func (p *Prober) Set(targets []Target) {
	p.mu.Lock()
	defer p.mu.Unlock()
	want := map[netip.Addr]Target{}
	for _, t := range targets {
		want[t.Addr] = t
	}
	for addr, g := range p.gws {
		t, ok := want[addr]
		switch {
		case !ok:
			stopLocked(g)
			delete(p.gws, addr)
		case t != g.target:
			g.target = t
			stopLocked(g)
			if p.ctx != nil {
				p.startLocked(g)
			}
		}
	}
	for addr, t := range want {
		if _, ok := p.gws[addr]; ok {
			continue
		}
		g := &gateway{target: t, state: State{Health: Unknown, Reason: ReasonNotProbed, Since: time.Now()}}
		p.gws[addr] = g
		if p.ctx != nil {
			p.startLocked(g)
		}
	}
}

// SeedDown starts gateways of the current set as Down, as if they had
// just missed Fall probes, without calling onChange: a restarted agent
// carries over what its predecessor knew (see ReasonNotInUse) instead of
// putting a dead gateway back into use until probes find it dead again.
// A seeded gateway needs Rise answers to come back, like any Down one.
func (p *Prober) SeedDown(addrs []netip.Addr) {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	for _, addr := range addrs {
		g, ok := p.gws[addr]
		if !ok || g.state.Health == Down {
			continue
		}
		g.ok, g.missed = 0, p.cfg.Fall
		p.setLocked(g, Down, ReasonNotInUse, now)
	}
}

// States returns a copy of every gateway's state.
func (p *Prober) States() map[netip.Addr]State {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[netip.Addr]State, len(p.gws))
	for addr, g := range p.gws {
		out[addr] = g.state
	}
	return out
}

// Down returns the gateways that are down, for the planner.
func (p *Prober) Down() map[netip.Addr]bool {
	out := map[netip.Addr]bool{}
	for addr, s := range p.States() {
		if s.Health == Down {
			out[addr] = true
		}
	}
	return out
}

func (p *Prober) startLocked(g *gateway) {
	ctx, cancel := context.WithCancel(p.ctx)
	g.cancel = cancel
	go p.probe(ctx, g, g.target)
}

func stopLocked(g *gateway) {
	if g.cancel != nil {
		g.cancel()
		g.cancel = nil
	}
}

// outcome of one probe.
type outcome int

const (
	answered outcome = iota
	timedOut         // sent, not answered within the timeout
	failed           // not sent: no socket, or the send failed
)

// result records one probe of the stream whose context is ctx. A stream
// that Set has stopped records nothing, so that a late result of the old
// stream never counts against the new one.
func (p *Prober) result(ctx context.Context, g *gateway, o outcome, rtt time.Duration) {
	p.mu.Lock()
	if ctx.Err() != nil {
		p.mu.Unlock()
		return
	}
	addr, changed := g.target.Addr, false
	now := time.Now()
	if o == answered {
		g.ever, g.ok, g.missed = true, g.ok+1, 0
		g.state.RTT = rtt
		switch {
		case g.state.Health == Unknown:
			changed = p.setLocked(g, Up, ReasonAnswering, now)
		case g.state.Health == Down && g.ok >= p.riseNeeded(g, now):
			changed = p.setLocked(g, Up, ReasonAnswering, now)
		}
	} else {
		g.ok, g.missed = 0, g.missed+1
		switch {
		case g.state.Health != Down && g.missed >= p.cfg.Fall:
			reason := ReasonProbeTimeout
			switch {
			case o == failed:
				reason = ReasonProbeFailed
			case !g.ever:
				reason = ReasonNeverAnswered
			}
			changed = p.setLocked(g, Down, reason, now)
		case g.state.Health == Down && g.state.Reason == ReasonNotInUse && o == failed:
			// NotInUseAtStart only says it waits for probes; these cannot
			// be sent, and the status should say so. Still Down: Since stays.
			g.state.Reason = ReasonProbeFailed
			changed = true
		}
	}
	p.mu.Unlock()
	if o == answered {
		p.onRTT(addr, rtt)
	}
	if changed {
		p.onChange()
	}
}

// markDown takes every gateway matching at once (link or neighbour signal).
func (p *Prober) markDown(match func(*gateway) bool, reason string) {
	p.mu.Lock()
	changed := false
	now := time.Now()
	for _, g := range p.gws {
		if match(g) && g.state.Health != Down {
			g.ok, g.missed = 0, p.cfg.Fall
			changed = p.setLocked(g, Down, reason, now) || changed
		}
	}
	p.mu.Unlock()
	if changed {
		p.onChange()
	}
}

func (p *Prober) setLocked(g *gateway, h Health, reason string, now time.Time) bool {
	if h == Down {
		g.falls = append(g.falls, now)
	}
	changed := g.state.Health != h
	if changed {
		p.log.Info("gateway health", "gateway", g.target.Addr.String(), "link", g.target.LinkName, "from", string(g.state.Health), "to", string(h), "reason", reason)
	}
	g.state.Health, g.state.Reason, g.state.Since = h, reason, now
	return changed
}

// riseNeeded doubles Rise for every earlier fall inside the flap window.
func (p *Prober) riseNeeded(g *gateway, now time.Time) int {
	if p.cfg.FlapWindow <= 0 {
		return p.cfg.Rise
	}
	g.falls = slices.DeleteFunc(g.falls, func(t time.Time) bool { return now.Sub(t) > p.cfg.FlapWindow })
	repeats := min(max(len(g.falls)-1, 0), 3)
	return p.cfg.Rise << repeats
}

// The wait before reopening a probe socket: short after a send error,
// doubling while opening fails, so a stream that cannot open costs little
// and one that can comes back soon.
const (
	reopenMin = 100 * time.Millisecond
	reopenMax = 5 * time.Second
)

// stream is one gateway's probe stream: the socket it sends on, and what
// it needs to reopen that socket.
type stream struct {
	p       *Prober
	target  Target
	id      int
	replies chan int
	conn    net.PacketConn   // nil while there is none
	reopen  <-chan time.Time // fires when to try opening one
	backoff time.Duration    // the wait before the next try
	logged  map[string]bool  // errors logged since a probe was last sent
}

// probe sends one echo per interval over t's interface, first at once, and
// records each answer, timeout or failure until ctx ends.
func (p *Prober) probe(ctx context.Context, g *gateway, t Target) {
	s := &stream{p: p, target: t, id: rand.IntN(1 << 16), replies: make(chan int, 16), backoff: reopenMin, logged: map[string]bool{}}
	defer s.close()
	s.open(ctx)
	ticker := time.NewTicker(p.cfg.Interval)
	defer ticker.Stop()
	for seq := 1; ; seq = (seq + 1) & 0xffff {
		o, rtt := s.echo(ctx, seq)
		p.result(ctx, g, o, rtt)
	wait:
		for {
			select {
			case <-ctx.Done():
				return
			case <-s.reopen:
				s.open(ctx)
			case <-ticker.C:
				break wait
			}
		}
	}
}

// open opens the stream's socket, or schedules the next try.
func (s *stream) open(ctx context.Context) {
	conn, err := listen(ctx, s.target)
	if err != nil {
		s.trouble(ctx, err, "cannot open the probe socket; retrying, and until then the gateway counts as missing probes")
		s.reopen = time.After(s.backoff)
		s.backoff = min(2*s.backoff, reopenMax)
		return
	}
	s.conn, s.reopen, s.backoff = conn, nil, reopenMin
	go readReplies(conn, s.target.Addr, s.id, s.replies)
}

func (s *stream) close() {
	if s.conn != nil {
		s.conn.Close()
		s.conn = nil
	}
}

// echo sends echo request seq and waits for its answer. A send error
// closes the socket, which may be bound to an interface that is gone, and
// schedules a new one. Any errno does: a dead binding says ENODEV on IPv4
// but ENETUNREACH on IPv6, and a needless reopen costs one socket per
// interval at most.
func (s *stream) echo(ctx context.Context, seq int) (outcome, time.Duration) {
	if s.conn == nil {
		return failed, 0
	}
	var typ icmp.Type = ipv4.ICMPTypeEcho
	if s.target.Addr.Is6() {
		typ = ipv6.ICMPTypeEchoRequest
	}
	msg := icmp.Message{Type: typ, Body: &icmp.Echo{ID: s.id, Seq: seq, Data: []byte("routing-agent")}}
	packet, _ := msg.Marshal(nil) // ICMPv6 checksums are the kernel's on raw sockets
	sent := time.Now()
	if _, err := s.conn.WriteTo(packet, &net.IPAddr{IP: s.target.Addr.AsSlice()}); err != nil {
		s.trouble(ctx, err, "probe not sent; reopening the probe socket")
		s.close()
		s.reopen = time.After(s.backoff)
		return failed, 0
	}
	if len(s.logged) > 0 {
		s.p.log.Info("probes are sent again", s.keys()...)
		clear(s.logged)
	}
	timeout := time.NewTimer(s.p.cfg.Timeout)
	defer timeout.Stop()
	for {
		select {
		case <-ctx.Done():
			return timedOut, 0 // not recorded: the stream has stopped
		case got := <-s.replies:
			if got == seq {
				return answered, time.Since(sent)
			}
		case <-timeout.C:
			return timedOut, 0
		}
	}
}

// trouble logs err once until probes are sent again: a stream that keeps
// failing says how, not at every retry.
func (s *stream) trouble(ctx context.Context, err error, msg string) {
	if ctx.Err() != nil || s.logged[err.Error()] {
		return
	}
	s.logged[err.Error()] = true
	s.p.log.Error(err, msg, s.keys()...)
}

func (s *stream) keys() []any {
	return []any{"gateway", s.target.Addr.String(), "link", s.target.LinkName, "ifindex", s.target.LinkIndex}
}

// listen opens a raw ICMP socket bound to the gateway's interface, so the
// probe takes the path the gateway's routes take. The kernel resolves the
// name to an index here, once: hence the reopening above.
func listen(ctx context.Context, t Target) (net.PacketConn, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var err error
		if cerr := c.Control(func(fd uintptr) {
			err = unix.SetsockoptString(int(fd), unix.SOL_SOCKET, unix.SO_BINDTODEVICE, t.LinkName)
		}); cerr != nil {
			return cerr
		}
		return err
	}}
	if t.Addr.Is6() {
		return lc.ListenPacket(ctx, "ip6:ipv6-icmp", "::")
	}
	return lc.ListenPacket(ctx, "ip4:icmp", "0.0.0.0")
}

// readReplies passes on the sequence numbers of echo replies from gw with
// this stream's id (a raw socket sees every ICMP packet of the host).
func readReplies(conn net.PacketConn, gw netip.Addr, id int, out chan<- int) {
	proto := 1
	if gw.Is6() {
		proto = 58
	}
	buf := make([]byte, 1500)
	for {
		n, from, err := conn.ReadFrom(buf)
		if err != nil {
			return
		}
		src, ok := from.(*net.IPAddr)
		if !ok {
			continue
		}
		if addr, _ := netip.AddrFromSlice(src.IP); addr.Unmap() != gw {
			continue
		}
		msg, err := icmp.ParseMessage(proto, buf[:n])
		if err != nil || (msg.Type != ipv4.ICMPTypeEchoReply && msg.Type != ipv6.ICMPTypeEchoReply) {
			continue
		}
		if echo, ok := msg.Body.(*icmp.Echo); ok && echo.ID == id {
			select {
			case out <- echo.Seq:
			default:
			}
		}
	}
}
