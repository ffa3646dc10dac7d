package agent

import (
	"errors"
	"testing"

	"github.com/routing-agent/routing-agent/pkg/planner"
)

// TestFactsCache: the node is read again whenever the kernel watch cannot
// vouch for the kept facts (not watched, made stale, never read, the last
// read failed), a change made stale during a read is read next time, and
// only then are the kept facts handed out.
func TestFactsCache(t *testing.T) {
	var c factsCache
	reads := 0
	var failing error
	var during func()
	read := func() (planner.Node, error) {
		reads++
		if during != nil {
			during()
		}
		return planner.Node{Links: []planner.Link{{Index: reads, Name: "eth0"}}}, failing
	}
	for _, step := range []struct {
		what     string
		watched  bool
		before   func()
		during   func()
		failing  error
		wantRead bool
	}{
		{what: "first, not watched", wantRead: true},
		{what: "again, not watched", wantRead: true},
		{what: "watched, never read while watched", watched: true, wantRead: true},
		{what: "watched, nothing changed", watched: true},
		{what: "a notification", watched: true, before: c.invalidate, wantRead: true},
		{what: "kept again", watched: true},
		{what: "the watch down", wantRead: true},
		{what: "watched again", watched: true, wantRead: true},
		{what: "changed during the read", watched: true, before: c.invalidate, during: c.invalidate, wantRead: true},
		{what: "that change read", watched: true, wantRead: true},
		{what: "a read fails", watched: true, before: c.invalidate, failing: errors.New("dump interrupted"), wantRead: true},
		{what: "after a failed read", watched: true, wantRead: true},
		{what: "kept", watched: true},
	} {
		if step.before != nil {
			step.before()
		}
		during, failing = step.during, step.failing
		before := reads
		n, err := c.get(step.watched, read)
		if !errors.Is(err, step.failing) {
			t.Fatalf("%s: error %v, want %v", step.what, err, step.failing)
		}
		if read := reads > before; read != step.wantRead {
			t.Fatalf("%s: read the node %v, want %v", step.what, read, step.wantRead)
		}
		if err == nil && n.Links[0].Index != reads {
			t.Fatalf("%s: facts of read %d handed out, the last read is %d", step.what, n.Links[0].Index, reads)
		}
	}
}
