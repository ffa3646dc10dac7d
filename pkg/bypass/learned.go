// Package bypass keeps track of the control-plane addresses a node must keep
// reaching through its main table, from sources that can fail or go quiet:
// the API server's EndpointSlices, DNS names (operator-given endpoints, the
// agent's and the kubelet's kubeconfig servers) looked up through the
// node's own resolvers. What it learns is sticky: a failed lookup, an empty
// answer or an API outage never drops an address, because the bypass of the
// address the node used a moment ago is what lets it reconnect.
package bypass

import (
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"
)

// Source names, as the NodeRouting status shows them next to each address:
// the API server's EndpointSlices, a name looked up ("dns <name>"), and
// where an IP literal was given.
const (
	SourceEndpointSlice     = "endpointslice default/kubernetes"
	SourceKubeconfig        = "kubeconfig"
	SourceKubeletKubeconfig = "kubelet-kubeconfig"
	SourceFlag              = "control-plane-endpoint"
	sourceDNSPrefix         = "dns "
)

// DNSSource is the source of the addresses a name resolves to.
func DNSSource(name string) string { return sourceDNSPrefix + strings.TrimSuffix(name, ".") }

// IsLearned reports whether source is one whose addresses are sticky (and
// restored from the NodeRouting after a restart): every control-plane
// source. An IP literal is sticky too: a kubelet whose kubeconfig was
// rewritten with another server keeps using the old one until it restarts.
func IsLearned(source string) bool {
	switch source {
	case SourceEndpointSlice, SourceKubeconfig, SourceKubeletKubeconfig, SourceFlag:
		return true
	}
	return strings.HasPrefix(source, sourceDNSPrefix)
}

// DefaultRetention is how long a source must answer without an address
// before the address is dropped.
const DefaultRetention = 24 * time.Hour

// MaxPerSource bounds what one source keeps (a name served from a large,
// rotating pool): past it, the address seen longest ago goes first.
const MaxPerSource = 64

// Learned is the sticky set. An address learned from a source stays until
// that source has answered, for Retention, with other addresses only; a
// source that fails, answers empty or is not asked (the API server is down)
// does not age what it gave. A source no longer configured ages like one
// answering without them, so an endpoint removed from the flags goes after
// Retention, never at once. It is safe for concurrent use.
type Learned struct {
	Retention time.Duration

	mu sync.Mutex
	// seen[addr][source] is when source last listed addr.
	seen map[netip.Addr]map[string]time.Time
	// answered[source] is when source last gave a non-empty answer.
	answered map[string]time.Time
}

// NewLearned returns an empty set that drops what its sources have not
// listed for retention.
func NewLearned(retention time.Duration) *Learned {
	return &Learned{Retention: retention, seen: map[netip.Addr]map[string]time.Time{}, answered: map[string]time.Time{}}
}

// Observe records a source's answer at now and returns the addresses that
// were not in the set before. An empty answer changes nothing.
func (l *Learned) Observe(source string, addrs []netip.Addr, now time.Time) (added []netip.Addr) {
	if len(addrs) == 0 {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.answered[source] = now
	for _, a := range addrs {
		a = a.Unmap().WithZone("")
		if !a.IsValid() {
			continue
		}
		sources, ok := l.seen[a]
		if !ok {
			sources = map[string]time.Time{}
			l.seen[a] = sources
			added = append(added, a)
		}
		sources[source] = now
	}
	l.trim(source)
	return added
}

// trim keeps at most MaxPerSource addresses from source.
func (l *Learned) trim(source string) {
	var mine []netip.Addr
	for a, sources := range l.seen {
		if _, ok := sources[source]; ok {
			mine = append(mine, a)
		}
	}
	if len(mine) <= MaxPerSource {
		return
	}
	// Newest first; ties by address, so the outcome does not depend on
	// map order.
	slices.SortFunc(mine, func(x, y netip.Addr) int {
		if c := l.seen[y][source].Compare(l.seen[x][source]); c != 0 {
			return c
		}
		return x.Compare(y)
	})
	for _, a := range mine[MaxPerSource:] {
		l.forget(a, source)
	}
}

func (l *Learned) forget(a netip.Addr, source string) {
	delete(l.seen[a], source)
	if len(l.seen[a]) == 0 {
		delete(l.seen, a)
	}
}

// Restore puts back what an earlier process had learned (read from the
// NodeRouting it wrote), at now. An address still listed then counts as
// seen now; one its sources had stopped listing keeps its unlisted time
// (Entry.Unlisted), so a restart neither shortens nor lengthens its life.
func (l *Learned) Restore(addr netip.Addr, sources []string, unlisted, now time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	seen := now
	if !unlisted.IsZero() && unlisted.Before(now) {
		seen = unlisted
	}
	addr = addr.Unmap().WithZone("")
	for _, s := range sources {
		if !IsLearned(s) {
			continue
		}
		if l.seen[addr] == nil {
			l.seen[addr] = map[string]time.Time{}
		}
		// What this process has seen already is newer; and the source's
		// answers are left alone: until it answers again, nothing ages.
		if _, ok := l.seen[addr][s]; !ok {
			l.seen[addr][s] = seen
		}
	}
}

// Expire drops what has aged out at now. configured says whether a source
// is still one the agent asks; one that is not ages as if it answered now.
func (l *Learned) Expire(now time.Time, configured func(source string) bool) (dropped []netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for a, sources := range l.seen {
		for s, seen := range sources {
			answered := l.answered[s]
			if !configured(s) {
				answered = now
			}
			if answered.Sub(seen) > l.Retention {
				delete(sources, s)
			}
		}
		if len(sources) == 0 {
			delete(l.seen, a)
			dropped = append(dropped, a)
		}
	}
	for s := range l.answered {
		if !configured(s) && !l.holds(s) {
			delete(l.answered, s)
		}
	}
	slices.SortFunc(dropped, netip.Addr.Compare)
	return dropped
}

func (l *Learned) holds(source string) bool {
	for _, sources := range l.seen {
		if _, ok := sources[source]; ok {
			return true
		}
	}
	return false
}

// Entry is one address and the sources that listed it.
type Entry struct {
	Addr    netip.Addr
	Sources []string
	// Unlisted is, for an address no source lists any more (each has
	// answered without it since), when one last listed it; zero while one
	// still does. It changes once, so a status carrying it is not
	// rewritten at every lookup.
	Unlisted time.Time
}

// Entries lists the set, by address, each with its sources sorted.
func (l *Learned) Entries() []Entry {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]Entry, 0, len(l.seen))
	for a, sources := range l.seen {
		e := Entry{Addr: a}
		listed := false
		for s, seen := range sources {
			e.Sources = append(e.Sources, s)
			if !l.answered[s].After(seen) {
				listed = true
			}
			if seen.After(e.Unlisted) {
				e.Unlisted = seen
			}
		}
		if listed {
			e.Unlisted = time.Time{}
		}
		slices.Sort(e.Sources)
		out = append(out, e)
	}
	slices.SortFunc(out, func(x, y Entry) int { return x.Addr.Compare(y.Addr) })
	return out
}

// Has reports whether addr is in the set.
func (l *Learned) Has(addr netip.Addr) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	_, ok := l.seen[addr.Unmap().WithZone("")]
	return ok
}

// From lists the addresses source has given, sorted.
func (l *Learned) From(source string) []netip.Addr {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []netip.Addr
	for a, sources := range l.seen {
		if _, ok := sources[source]; ok {
			out = append(out, a)
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}
