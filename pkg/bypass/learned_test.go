package bypass

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"
)

var (
	t0     = time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	vip1   = netip.MustParseAddr("198.51.100.100")
	vip2   = netip.MustParseAddr("198.51.100.101")
	ep     = netip.MustParseAddr("203.0.113.100")
	name   = DNSSource("api.example.com")
	always = func(string) bool { return true }
)

func addrs(a ...netip.Addr) []netip.Addr { return a }

// TestLearnedIsSticky walks the set through what a node meets: answers
// that move, fail, go empty, sources that go away, restarts.
func TestLearnedIsSticky(t *testing.T) {
	const retention = time.Hour
	type step struct {
		at       time.Duration // since t0
		observe  string        // source, or "" for none
		answer   []netip.Addr
		restore  []netip.Addr // restored with the observe source
		inConfig func(string) bool
		want     []netip.Addr // the set after the step's Expire
		added    []netip.Addr
	}
	for _, tc := range []struct {
		name  string
		steps []step
	}{{
		name: "a moved name keeps its old address for the retention period",
		steps: []step{
			{at: 0, observe: name, answer: addrs(vip1), want: addrs(vip1), added: addrs(vip1)},
			{at: time.Minute, observe: name, answer: addrs(vip2), want: addrs(vip1, vip2), added: addrs(vip2)},
			{at: 59 * time.Minute, observe: name, answer: addrs(vip2), want: addrs(vip1, vip2)},
			{at: 61*time.Minute + time.Second, observe: name, answer: addrs(vip2), want: addrs(vip2)},
		},
	}, {
		name: "a source that fails or answers empty never ages what it gave",
		steps: []step{
			{at: 0, observe: name, answer: addrs(vip1), want: addrs(vip1), added: addrs(vip1)},
			{at: 48 * time.Hour, want: addrs(vip1)},                             // failing: not observed
			{at: 96 * time.Hour, observe: name, answer: nil, want: addrs(vip1)}, // empty EndpointSlice or answer
		},
	}, {
		name: "an address two sources give stays while one still gives it",
		steps: []step{
			{at: 0, observe: name, answer: addrs(ep), want: addrs(ep), added: addrs(ep)},
			{at: time.Second, observe: SourceEndpointSlice, answer: addrs(ep), want: addrs(ep)},
			{at: 2 * time.Hour, observe: name, answer: addrs(vip1), want: addrs(vip1, ep), added: addrs(vip1)}, // the slice was not asked since: it still holds ep
			{at: 3 * time.Hour, observe: SourceEndpointSlice, answer: addrs(vip2), want: addrs(vip1, vip2), added: addrs(vip2)},
		},
	}, {
		name: "a source no longer configured ages from when it last gave the address",
		steps: []step{
			{at: 0, observe: name, answer: addrs(vip1), want: addrs(vip1), added: addrs(vip1)},
			{at: 30 * time.Minute, inConfig: func(s string) bool { return s != name }, want: addrs(vip1)},
			{at: 61 * time.Minute, inConfig: func(s string) bool { return s != name }, want: nil},
		},
	}, {
		name: "restored after a restart counts as seen at the restart",
		steps: []step{
			{at: 10 * time.Hour, observe: name, restore: addrs(vip1), want: addrs(vip1)},
			{at: 10*time.Hour + time.Minute, observe: name, answer: addrs(vip2), want: addrs(vip1, vip2), added: addrs(vip2)},
			{at: 11*time.Hour + 2*time.Minute, observe: name, answer: addrs(vip2), want: addrs(vip2)},
		},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			l := NewLearned(retention)
			for i, s := range tc.steps {
				now := t0.Add(s.at)
				var added []netip.Addr
				switch {
				case s.restore != nil:
					for _, a := range s.restore {
						l.Restore(a, []string{s.observe, "gateway"}, time.Time{}, now)
					}
				case s.observe != "":
					added = l.Observe(s.observe, s.answer, now)
				}
				inConfig := s.inConfig
				if inConfig == nil {
					inConfig = always
				}
				l.Expire(now, inConfig)
				var got []netip.Addr
				for _, e := range l.Entries() {
					got = append(got, e.Addr)
					if slices.Contains(e.Sources, "gateway") {
						t.Errorf("step %d: restored a source that is not learned: %v", i, e.Sources)
					}
				}
				if !slices.Equal(got, s.want) {
					t.Errorf("step %d (at %s): set %v, want %v", i, s.at, got, s.want)
				}
				if !slices.Equal(added, s.added) {
					t.Errorf("step %d: added %v, want %v", i, added, s.added)
				}
			}
		})
	}
}

func TestLearnedBoundsEachSource(t *testing.T) {
	l := NewLearned(time.Hour)
	for i := range MaxPerSource + 10 {
		l.Observe(name, addrs(netip.AddrFrom4([4]byte{198, 51, 100, byte(i)})), t0.Add(time.Duration(i)*time.Second))
	}
	l.Observe(SourceEndpointSlice, addrs(ep), t0)
	got := l.From(name)
	if len(got) != MaxPerSource {
		t.Fatalf("%d addresses kept from one source, want %d", len(got), MaxPerSource)
	}
	if got[0] != netip.AddrFrom4([4]byte{198, 51, 100, 10}) {
		t.Errorf("oldest kept is %s, want the 11th seen (the 10 seen longest ago go)", got[0])
	}
	if !l.Has(ep) {
		t.Error("another source's address was dropped")
	}
}

func TestLearnedSources(t *testing.T) {
	l := NewLearned(time.Hour)
	l.Observe(SourceEndpointSlice, addrs(ep), t0)
	l.Observe(name, addrs(ep, netip.MustParseAddr("::ffff:198.51.100.100")), t0)
	var got []string
	for _, e := range l.Entries() {
		got = append(got, fmt.Sprint(e.Addr, e.Sources))
	}
	want := []string{"198.51.100.100 [dns api.example.com]", "203.0.113.100 [dns api.example.com endpointslice default/kubernetes]"}
	if !slices.Equal(got, want) {
		t.Errorf("entries %q, want %q", got, want)
	}
	for source, learned := range map[string]bool{SourceEndpointSlice: true, name: true, SourceKubeconfig: true, SourceKubeletKubeconfig: true, SourceFlag: true, "gateway": false, "resolv.conf": false, "metadata": false} {
		if IsLearned(source) != learned {
			t.Errorf("IsLearned(%q) = %v", source, !learned)
		}
	}
}

// TestLearnedUnlistedSurvivesRestart: an address its source stopped listing
// keeps its unlisted time across a restart, so restarts cannot keep it
// for ever; one still listed counts as seen at the restart.
func TestLearnedUnlistedSurvivesRestart(t *testing.T) {
	before := NewLearned(time.Hour)
	before.Observe(name, addrs(vip1), t0)
	before.Observe(name, addrs(vip2), t0.Add(10*time.Minute))
	entries := before.Entries()
	if len(entries) != 2 || !entries[0].Unlisted.Equal(t0) || !entries[1].Unlisted.IsZero() {
		t.Fatalf("entries %+v: want %s unlisted since %s, %s listed", entries, vip1, t0, vip2)
	}
	// The status is written from Entries: it must not change while
	// nothing changes.
	before.Observe(name, addrs(vip2), t0.Add(20*time.Minute))
	if again := before.Entries(); fmt.Sprint(again) != fmt.Sprint(entries) {
		t.Errorf("entries changed with nothing new: %+v, were %+v", again, entries)
	}

	restart := t0.Add(30 * time.Minute)
	after := NewLearned(time.Hour)
	for _, e := range entries {
		after.Restore(e.Addr, e.Sources, e.Unlisted, restart)
	}
	now := t0.Add(61 * time.Minute)
	after.Observe(name, addrs(vip2), now)
	after.Expire(now, always)
	if after.Has(vip1) || !after.Has(vip2) {
		t.Errorf("after the restart: %+v; want %s gone (unlisted since %s, retention 1h) and %s kept", after.Entries(), vip1, t0, vip2)
	}
}
