package prober

import (
	"net/netip"
	"testing"
	"time"

	"github.com/go-logr/logr"
)

// newTestProber has one gateway and counts health changes; probes are fed
// by hand through result, so no socket is opened.
func newTestProber(cfg Config) (*Prober, *gateway, *int) {
	changes := 0
	p := New(cfg, logr.Discard(), func() { changes++ }, nil)
	gw := netip.MustParseAddr("10.114.0.3")
	p.Set([]Target{{Addr: gw, Link: "vpc0"}})
	return p, p.gws[gw], &changes
}

func TestNeverAnsweredIsUsedThenDown(t *testing.T) {
	p, g, changes := newTestProber(DefaultConfig())
	if len(p.Down()) != 0 || g.state.Health != Unknown {
		t.Fatalf("a new gateway must start Unknown and in use: %+v", g.state)
	}
	p.result(g, false, 0)
	p.result(g, false, 0)
	if len(p.Down()) != 0 {
		t.Fatal("down after 2 misses; Fall is 3")
	}
	p.result(g, false, 0)
	if s := p.States()[g.target.Addr]; s.Health != Down || s.Reason != ReasonNeverAnswered || *changes != 1 {
		t.Fatalf("after 3 misses: %+v, %d changes", s, *changes)
	}
}

func TestFallAndRise(t *testing.T) {
	p, g, changes := newTestProber(DefaultConfig())
	p.result(g, true, time.Millisecond)
	if g.state.Health != Up || *changes != 1 {
		t.Fatalf("first answer: %+v", g.state)
	}
	for range 3 {
		p.result(g, false, 0)
	}
	if g.state.Health != Down || g.state.Reason != ReasonProbeTimeout {
		t.Fatalf("after 3 misses: %+v", g.state)
	}
	p.result(g, true, time.Millisecond)
	if g.state.Health != Down {
		t.Fatal("back up after one answer; Rise is 2")
	}
	p.result(g, true, time.Millisecond)
	if g.state.Health != Up || *changes != 3 {
		t.Fatalf("after 2 answers: %+v, %d changes", g.state, *changes)
	}
}

func TestFlapDampingDoublesRise(t *testing.T) {
	p, g, _ := newTestProber(DefaultConfig())
	p.result(g, true, 0)
	cycle := func() int { // fall, then count answers until up again
		for range 3 {
			p.result(g, false, 0)
		}
		n := 0
		for g.state.Health != Up {
			p.result(g, true, 0)
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
	p.result(g, true, 0)
	p.markDown(func(g *gateway) bool { return g.target.Link == "other0" }, ReasonLinkDown)
	if g.state.Health != Up {
		t.Fatal("a link that is not the gateway's took it down")
	}
	p.markDown(func(g *gateway) bool { return g.target.Link == "vpc0" }, ReasonLinkDown)
	if s := p.States()[g.target.Addr]; s.Health != Down || s.Reason != ReasonLinkDown || *changes != 2 {
		t.Fatalf("link down: %+v", s)
	}
	p.result(g, true, 0)
	p.result(g, true, 0)
	if g.state.Health != Up {
		t.Fatalf("answers after link down: %+v", g.state)
	}
}

func TestSetKeepsStateAndDropsGone(t *testing.T) {
	p, g, _ := newTestProber(DefaultConfig())
	p.result(g, true, 0)
	other := netip.MustParseAddr("10.114.0.4")
	p.Set([]Target{{Addr: g.target.Addr, Link: "vpc0"}, {Addr: other, Link: "vpc0"}})
	states := p.States()
	if states[g.target.Addr].Health != Up || states[other].Health != Unknown {
		t.Errorf("states after adding a gateway: %+v", states)
	}
	p.Set([]Target{{Addr: other, Link: "vpc0"}})
	if _, ok := p.States()[g.target.Addr]; ok {
		t.Error("a gateway no Route uses is still probed")
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
	p.SeedDown([]netip.Addr{g.target.Addr, netip.MustParseAddr("10.114.0.99")})
	if s := p.States()[g.target.Addr]; s.Health != Down || s.Reason != ReasonNotInUse || *changes != 0 {
		t.Fatalf("seeded: %+v, %d changes", s, *changes)
	}
	if len(p.States()) != 1 {
		t.Errorf("seeding an address outside the set added it: %v", p.States())
	}
	p.result(g, true, time.Millisecond)
	if g.state.Health != Down {
		t.Fatal("a seeded gateway came back after one answer; Rise is 2")
	}
	p.result(g, true, time.Millisecond)
	if g.state.Health != Up || *changes != 1 {
		t.Fatalf("after 2 answers: %+v, %d changes", g.state, *changes)
	}
}
