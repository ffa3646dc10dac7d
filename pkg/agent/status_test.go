package agent

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/routing-agent/routing-agent/pkg/applier"
	"github.com/routing-agent/routing-agent/pkg/planner"
)

func TestBounded(t *testing.T) {
	if got := bounded("short"); got != "short" {
		t.Errorf("bounded(short) = %q", got)
	}
	long := strings.Repeat("é", maxMessage) // two bytes a rune
	got := bounded(long)
	if len(got) > maxMessage || !utf8.ValidString(got) || !strings.HasSuffix(got, "(cut)") {
		t.Errorf("bounded(%d bytes) = %d bytes, valid UTF-8 %v, ends %q", len(long), len(got), utf8.ValidString(got), got[len(got)-8:])
	}
}

// A Route whose routes the kernel refused says so, with every refused
// destination; the other Routes' results are untouched, and messages stay
// bounded however many routes were refused.
func TestWithRejections(t *testing.T) {
	results := []planner.Result{
		{Name: "big", Phase: planner.Applied, Reason: planner.ReasonApplied, Table: 10001},
		{Name: "fine", Phase: planner.Applied, Reason: planner.ReasonApplied, Table: 10002},
		{Name: "invalid", Phase: planner.Invalid, Reason: planner.ReasonGatewayNotConnected},
	}
	var refused []applier.Rejection
	for i := range 4096 {
		dst := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 0}), 24)
		refused = append(refused, applier.Rejection{Route: planner.Route{Table: 10001, Dst: dst}, Err: errors.New("route replace " + dst.String() + ": invalid argument " + strings.Repeat("x", 2000))})
	}
	got := withRejections(results, map[uint32][]applier.Rejection{10001: refused})
	if got[0].Reason != planner.ReasonKernelRejected || len(got[0].NotApplied) != 4096 || got[0].NotApplied[0].Reason != planner.ReasonKernelRejected {
		t.Errorf("refused Route: reason %s, %d destinations not applied", got[0].Reason, len(got[0].NotApplied))
	}
	if !strings.Contains(got[0].Message, "refused 4096 of this Route's routes") {
		t.Errorf("message %q", got[0].Message)
	}
	if len(got[0].NotApplied[0].Message) > maxMessage {
		t.Errorf("a destination's message has %d bytes", len(got[0].NotApplied[0].Message))
	}
	if got[1].Reason != planner.ReasonApplied || got[2].Phase != planner.Invalid || results[0].Reason != planner.ReasonApplied {
		t.Errorf("other results changed, or the input was: %+v / %+v", got, results)
	}
}
