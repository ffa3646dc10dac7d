package prober

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/go-logr/logr"
)

var (
	gw0  = netip.MustParseAddr("10.114.0.3")
	vpc0 = Target{Addr: gw0, LinkIndex: 3, LinkName: "vpc0"}
)

// newTestProber has one gateway and counts health changes; probes are fed
// by hand through feed, so no socket is opened.
func newTestProber(cfg Config) (*Prober, *gateway, *int) {
	changes := 0
	p := New(cfg, logr.Discard(), func() { changes++ }, nil)
	p.Set([]Target{vpc0})
	return p, p.gws[gw0], &changes
}

// feed records outcomes as the gateway's running stream would.
func feed(p *Prober, g *gateway, outcomes ...outcome) {
	for _, o := range outcomes {
		p.result(context.Background(), g, o, time.Millisecond)
	}
}

func repeat(o outcome, n int) []outcome {
	out := make([]outcome, n)
	for i := range out {
		out[i] = o
	}
	return out
}

func TestNeverAnsweredIsUsedThenDown(t *testing.T) {
	p, g, changes := newTestProber(DefaultConfig())
	if len(p.Down()) != 0 || g.state.Health != Unknown {
		t.Fatalf("a new gateway must start Unknown and in use: %+v", g.state)
	}
	feed(p, g, timedOut, timedOut)
	if len(p.Down()) != 0 {
		t.Fatal("down after 2 misses; Fall is 3")
	}
	feed(p, g, timedOut)
	if s := p.States()[gw0]; s.Health != Down || s.Reason != ReasonNeverAnswered || *changes != 1 {
		t.Fatalf("after 3 misses: %+v, %d changes", s, *changes)
	}
}

// Probes that cannot be sent are misses like unanswered ones; the reason
// says which kind took the gateway down.
func TestMissReasons(t *testing.T) {
	for _, tc := range []struct {
		name     string
		outcomes []outcome
		health   Health
		reason   string
	}{
		{"cannot listen, fewer than Fall", repeat(failed, 2), Unknown, ReasonNotProbed},
		{"cannot listen", repeat(failed, 3), Down, ReasonProbeFailed},
		{"never answered", repeat(timedOut, 3), Down, ReasonNeverAnswered},
		{"answered, then cannot send", append([]outcome{answered}, repeat(failed, 3)...), Down, ReasonProbeFailed},
		{"answered, then timeouts", append([]outcome{answered}, repeat(timedOut, 3)...), Down, ReasonProbeTimeout},
		{"the last miss decides", []outcome{answered, timedOut, timedOut, failed}, Down, ReasonProbeFailed},
		{"misses not in a row", []outcome{answered, failed, failed, answered, failed, failed}, Up, ReasonAnswering},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, g, _ := newTestProber(DefaultConfig())
			feed(p, g, tc.outcomes...)
			if s := p.States()[gw0]; s.Health != tc.health || s.Reason != tc.reason {
				t.Errorf("%v: got %s (%s), want %s (%s)", tc.outcomes, s.Health, s.Reason, tc.health, tc.reason)
			}
		})
	}
}

func TestFallAndRise(t *testing.T) {
	p, g, changes := newTestProber(DefaultConfig())
	feed(p, g, answered)
	if g.state.Health != Up || *changes != 1 {
		t.Fatalf("first answer: %+v", g.state)
	}
	feed(p, g, repeat(timedOut, 3)...)
	if g.state.Health != Down || g.state.Reason != ReasonProbeTimeout {
		t.Fatalf("after 3 misses: %+v", g.state)
	}
	feed(p, g, answered)
	if g.state.Health != Down {
		t.Fatal("back up after one answer; Rise is 2")
	}
	feed(p, g, answered)
	if g.state.Health != Up || *changes != 3 {
		t.Fatalf("after 2 answers: %+v, %d changes", g.state, *changes)
	}
}

func TestFlapDampingDoublesRise(t *testing.T) {
	p, g, _ := newTestProber(DefaultConfig())
	feed(p, g, answered)
	cycle := func() int { // fall, then count answers until up again
		feed(p, g, repeat(timedOut, 3)...)
		n := 0
		for g.state.Health != Up {
			feed(p, g, answered)
			n++
		}
		return n
	}
	for i, want := range []int{2, 4, 8, 16, 16} {
		if got := cycle(); got != want {
			t.Errorf("flap %d: %d answers to come back, want %d", i+1, got, want)
		}
	}
	g.falls = []time.Time{time.Now().Add(-time.Minute)} // the window has passed
	if got := cycle(); got != 2 {
		t.Errorf("after the window: %d answers, want 2", got)
	}
}

func TestMarkDownByLinkAndNeighbour(t *testing.T) {
	p, g, changes := newTestProber(DefaultConfig())
	feed(p, g, answered)
	p.markDown(func(g *gateway) bool { return g.target.LinkIndex == 4 }, ReasonLinkDown)
	if g.state.Health != Up {
		t.Fatal("a link that is not the gateway's took it down")
	}
	p.markDown(func(g *gateway) bool { return g.target.LinkIndex == 3 }, ReasonLinkDown)
	if s := p.States()[gw0]; s.Health != Down || s.Reason != ReasonLinkDown || *changes != 2 {
		t.Fatalf("link down: %+v", s)
	}
	feed(p, g, answered, answered)
	if g.state.Health != Up {
		t.Fatalf("answers after link down: %+v", g.state)
	}
}

// A link signal explains failing probes better than ProbeFailed would.
func TestProbeFailuresKeepLinkDown(t *testing.T) {
	p, g, changes := newTestProber(DefaultConfig())
	feed(p, g, answered)
	p.markDown(func(g *gateway) bool { return true }, ReasonLinkDown)
	feed(p, g, repeat(failed, 5)...)
	if s := p.States()[gw0]; s.Health != Down || s.Reason != ReasonLinkDown || *changes != 2 {
		t.Fatalf("after failures on a down link: %+v, %d changes", s, *changes)
	}
}

func TestSetKeepsStateAndDropsGone(t *testing.T) {
	p, g, _ := newTestProber(DefaultConfig())
	feed(p, g, answered)
	other := netip.MustParseAddr("10.114.0.4")
	p.Set([]Target{vpc0, {Addr: other, LinkIndex: 3, LinkName: "vpc0"}})
	states := p.States()
	if states[gw0].Health != Up || states[other].Health != Unknown {
		t.Errorf("states after adding a gateway: %+v", states)
	}
	p.Set([]Target{{Addr: other, LinkIndex: 3, LinkName: "vpc0"}})
	if _, ok := p.States()[gw0]; ok {
		t.Error("a gateway no Route uses is still probed")
	}
}

// Set restarts a gateway's stream when its socket would be bound to the
// wrong interface, and only then; the gateway keeps its state, so the new
// stream goes on counting where the old one stopped.
func TestSetRestartsStreamWhenTheLinkChanges(t *testing.T) {
	other := Target{Addr: netip.MustParseAddr("10.114.0.4"), LinkIndex: 3, LinkName: "vpc0"}
	for _, tc := range []struct {
		name    string
		targets []Target
		restart bool
	}{
		{"same", []Target{vpc0}, false},
		{"another gateway added", []Target{other, vpc0}, false},
		{"listed twice", []Target{vpc0, vpc0}, false},
		{"re-created under the same name", []Target{{Addr: gw0, LinkIndex: 7, LinkName: "vpc0"}}, true},
		{"renamed", []Target{{Addr: gw0, LinkIndex: 3, LinkName: "eth1"}}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, g, _ := newTestProber(DefaultConfig())
			feed(p, g, answered, timedOut, timedOut) // Up, one miss from Fall
			stops := 0
			g.cancel = func() { stops++ } // the stream Run would have started
			before := *g

			p.Set(tc.targets)
			if got := p.gws[gw0]; got != g {
				t.Fatal("Set replaced the gateway instead of keeping it")
			}
			if restarted := stops == 1; restarted != tc.restart {
				t.Fatalf("restarted: %v, want %v", restarted, tc.restart)
			}
			if g.state != before.state || g.ok != before.ok || g.missed != before.missed || g.ever != before.ever || len(g.falls) != len(before.falls) {
				t.Fatalf("state changed across Set: %+v, was %+v", g, before)
			}
			feed(p, g, timedOut)
			if g.state.Health != Down || g.state.Reason != ReasonProbeTimeout {
				t.Errorf("third miss in a row, across Set: %+v", g.state)
			}
		})
	}
}

// A stream Set has stopped may still finish a probe; it must not count.
func TestStoppedStreamRecordsNothing(t *testing.T) {
	p, g, changes := newTestProber(DefaultConfig())
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for range 5 {
		p.result(ctx, g, failed, 0)
	}
	if g.state.Health != Unknown || g.missed != 0 || *changes != 0 {
		t.Fatalf("a stopped stream's results counted: %+v, missed %d", g.state, g.missed)
	}
}

func TestConfigValidate(t *testing.T) {
	if err := DefaultConfig().Validate(); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []Config{
		{Interval: time.Millisecond, Timeout: time.Millisecond, Rise: 1, Fall: 1},
		{Interval: time.Second, Timeout: 2 * time.Second, Rise: 1, Fall: 1},
		{Interval: time.Second, Timeout: time.Second, Rise: 0, Fall: 1},
	} {
		if bad.Validate() == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
}

// A gateway seeded Down stays out of use, without a change callback, until
// Rise answers bring it back; unknown addresses are ignored.
func TestSeedDown(t *testing.T) {
	p, g, changes := newTestProber(DefaultConfig())
	p.SeedDown([]netip.Addr{gw0, netip.MustParseAddr("10.114.0.99")})
	if s := p.States()[gw0]; s.Health != Down || s.Reason != ReasonNotInUse || *changes != 0 {
		t.Fatalf("seeded: %+v, %d changes", s, *changes)
	}
	if len(p.States()) != 1 {
		t.Errorf("seeding an address outside the set added it: %v", p.States())
	}
	feed(p, g, answered)
	if g.state.Health != Down {
		t.Fatal("a seeded gateway came back after one answer; Rise is 2")
	}
	feed(p, g, answered)
	if g.state.Health != Up || *changes != 1 {
		t.Fatalf("after 2 answers: %+v, %d changes", g.state, *changes)
	}
}

// A seeded gateway whose probes cannot be sent stays Down and says why at
// once (one change, for the status); only answers bring it back.
func TestSeededGatewayThatCannotBeProbed(t *testing.T) {
	p, g, changes := newTestProber(DefaultConfig())
	p.SeedDown([]netip.Addr{gw0})
	since := g.state.Since
	feed(p, g, repeat(failed, 4)...)
	if s := p.States()[gw0]; s.Health != Down || s.Reason != ReasonProbeFailed || !s.Since.Equal(since) || *changes != 1 {
		t.Fatalf("seeded, cannot probe: %+v (seeded at %v), %d changes", s, since, *changes)
	}
	feed(p, g, answered, answered)
	if s := p.States()[gw0]; s.Health != Up || *changes != 2 {
		t.Fatalf("after 2 answers: %+v, %d changes", s, *changes)
	}
}
