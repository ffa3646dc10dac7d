package kernelwatch

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	labnetns "github.com/routing-agent/routing-agent/pkg/lab/netns"
	"github.com/routing-agent/routing-agent/pkg/nlbatch"
)

func TestBackoff(t *testing.T) {
	var b backoff
	var got []time.Duration
	for range 9 { // a subscription that keeps failing at once
		got = append(got, b.next(0))
	}
	want := []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond, 800 * time.Millisecond,
		1600 * time.Millisecond, 3200 * time.Millisecond, 6400 * time.Millisecond, 10 * time.Second, 10 * time.Second}
	if !slices.Equal(got, want) {
		t.Errorf("delays %v, want %v", got, want)
	}
	if d := b.next(healthyFor - time.Second); d != maxBackoff {
		t.Errorf("after a short life: %v, want %v", d, maxBackoff)
	}
	if d := b.next(healthyFor); d != minBackoff {
		t.Errorf("after a healthy period: %v, want %v", d, minBackoff)
	}
}

// namespace is a network namespace of the test's own.
type namespace struct {
	name   string
	handle netns.NsHandle
}

// newNamespace creates ra-<purpose>-<pid> with a veth pair kw0/kw1 up and
// 192.0.2.1/24 on kw0, and removes it when the test ends.
func newNamespace(t *testing.T, purpose string) *namespace {
	t.Helper()
	name := labnetns.Name(purpose)
	if err := labnetns.Add(name); err != nil {
		t.Fatalf("creating namespace: %v", err)
	}
	t.Cleanup(func() {
		if err := labnetns.Delete(name); err != nil {
			t.Errorf("removing namespace: %v", err)
		}
	})
	h, err := netns.GetFromName(name)
	if err != nil {
		t.Fatalf("opening namespace: %v", err)
	}
	t.Cleanup(func() { h.Close() })
	n := &namespace{name: name, handle: h}
	n.ip(t, "link", "add", "kw0", "type", "veth", "peer", "name", "kw1")
	n.ip(t, "link", "set", "kw0", "up")
	n.ip(t, "link", "set", "kw1", "up")
	n.ip(t, "addr", "add", "192.0.2.1/24", "dev", "kw0")
	return n
}

func (n *namespace) ip(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", append([]string{"-n", n.name}, args...)...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// batch runs `ip -batch` of commands in the namespace.
func (n *namespace) batch(t *testing.T, commands []string) {
	t.Helper()
	cmd := exec.Command("ip", "-n", n.name, "-batch", "-")
	cmd.Stdin = strings.NewReader(strings.Join(commands, "\n") + "\n")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("ip -batch: %v: %s", err, out)
	}
}

// routeSockets counts the NETLINK_ROUTE sockets user space holds open in
// the namespace (the kernel's own has port id 0).
func (n *namespace) routeSockets(t *testing.T) int {
	t.Helper()
	out, err := exec.Command("ip", "netns", "exec", n.name, "cat", "/proc/net/netlink").Output()
	if err != nil {
		t.Fatalf("reading the namespace's netlink sockets: %v", err)
	}
	count := 0
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	sc.Scan() // header
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) > 2 && f[1] == "0" && f[2] != "0" {
			count++
		}
	}
	return count
}

// watch runs Watch in the namespace until the test ends, then checks that
// it left no socket and no goroutine behind.
func (n *namespace) watch(t *testing.T, opts Options) *Events {
	t.Helper()
	goroutines := runtime.NumGoroutine()
	ctx, cancel := context.WithCancel(context.Background())
	opts.Namespace = &n.handle
	ev := Watch(ctx, testr.New(t), opts)
	t.Cleanup(func() {
		cancel()
		eventually(t, 2*time.Second, "the watch's sockets and goroutines to be gone", func() bool {
			return n.routeSockets(t) == 0 && runtime.NumGoroutine() <= goroutines
		})
	})
	return ev
}

func eventually(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(within); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("waited %v for %s", within, what)
		}
	}
}

// next returns the first update on ch that match accepts, skipping others.
func next[T any](t *testing.T, ch <-chan T, within time.Duration, what string, match func(T) bool) T {
	t.Helper()
	timeout := time.After(within)
	for {
		select {
		case u := <-ch:
			if match(u) {
				return u
			}
		case <-timeout:
			t.Fatalf("no %s within %v", what, within)
		}
	}
}

func TestWatchInNamespace(t *testing.T) {
	n := newNamespace(t, "kwatch")
	ev := n.watch(t, Options{Kinds: Routes | Links | Addrs | Neighs | Rules | Nexthops})
	const within = time.Second

	n.ip(t, "link", "set", "kw1", "down")
	next(t, ev.Links, within, "link update for kw1", func(u netlink.LinkUpdate) bool {
		return u.Attrs().Name == "kw1" && u.Attrs().Flags&net.FlagUp == 0
	})
	n.ip(t, "addr", "add", "192.0.2.9/24", "dev", "kw0")
	next(t, ev.Addrs, within, "address update for 192.0.2.9", func(u netlink.AddrUpdate) bool {
		return u.NewAddr && u.LinkAddress.IP.String() == "192.0.2.9"
	})
	n.ip(t, "neigh", "add", "192.0.2.2", "lladdr", "02:00:00:00:00:02", "dev", "kw0", "nud", "permanent")
	next(t, ev.Neighs, within, "neighbour update for 192.0.2.2", func(u netlink.NeighUpdate) bool {
		return u.Type == unix.RTM_NEWNEIGH && u.IP.String() == "192.0.2.2"
	})
	n.ip(t, "route", "add", "198.51.100.0/24", "via", "192.0.2.2", "table", "10061", "proto", "245")
	next(t, ev.Routes, within, "route update for 198.51.100.0/24 in table 10061", func(u netlink.RouteUpdate) bool {
		return u.Type == unix.RTM_NEWROUTE && u.Table == 10061 && u.Dst != nil && u.Dst.String() == "198.51.100.0/24"
	})

	n.ip(t, "nexthop", "add", "id", "4110417921", "blackhole", "protocol", "245")
	next(t, ev.Nexthops, within, "nexthop object 4110417921 added", func(u NexthopUpdate) bool {
		return u.Type == unix.RTM_NEWNEXTHOP && u.ID == 4110417921 && u.Protocol == 245 && u.Blackhole
	})
	n.ip(t, "nexthop", "add", "id", "4110483457", "group", "4110417921", "protocol", "245")
	next(t, ev.Nexthops, within, "nexthop group 4110483457 added", func(u NexthopUpdate) bool {
		return u.Type == unix.RTM_NEWNEXTHOP && u.ID == 4110483457 && len(u.Group) == 1 && u.Group[0] == 4110417921
	})
	n.ip(t, "nexthop", "del", "id", "4110483457")
	next(t, ev.Nexthops, within, "nexthop group 4110483457 deleted", func(u NexthopUpdate) bool {
		return u.Type == unix.RTM_DELNEXTHOP && u.ID == 4110483457
	})

	n.ip(t, "rule", "add", "priority", "30300", "lookup", "10061", "protocol", "245")
	want := RuleUpdate{Type: unix.RTM_NEWRULE, Rule: nlbatch.Rule{Family: unix.AF_INET, Priority: 30300, Table: 10061, Protocol: 245, SuppressPrefixlen: -1}}
	next(t, ev.Rules, within, fmt.Sprintf("rule update %+v", want), func(u RuleUpdate) bool { return u == want })
	n.ip(t, "-6", "rule", "add", "priority", "30300", "lookup", "10061", "protocol", "245")
	want.Family = unix.AF_INET6
	next(t, ev.Rules, within, fmt.Sprintf("rule update %+v", want), func(u RuleUpdate) bool { return u == want })
	// One the agent could never have written: an echo of none of its own.
	n.ip(t, "rule", "add", "priority", "30300", "iif", "lo", "lookup", "10061", "protocol", "245")
	next(t, ev.Rules, within, "the iif rule, Other", func(u RuleUpdate) bool { return u.Priority == 30300 && u.Other })

	// Latency from starting `ip rule del` to its notification in hand.
	const trials = 20
	var latencies []time.Duration
	for range trials {
		n.ip(t, "rule", "add", "priority", "30301", "lookup", "10062")
		next(t, ev.Rules, within, "the added rule", func(u RuleUpdate) bool { return u.Type == unix.RTM_NEWRULE && u.Priority == 30301 })
		cmd := exec.Command("ip", "-n", n.name, "rule", "del", "priority", "30301")
		began := time.Now()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		next(t, ev.Rules, within, "the deleted rule", func(u RuleUpdate) bool { return u.Type == unix.RTM_DELRULE && u.Priority == 30301 })
		latencies = append(latencies, time.Since(began))
		if err := cmd.Wait(); err != nil {
			t.Fatalf("ip rule del: %v", err)
		}
	}
	slices.Sort(latencies)
	t.Logf("ip rule del to notification, %d trials: min %v, p50 %v, max %v",
		trials, latencies[0], latencies[trials/2], latencies[trials-1])
}

// TestResubscribesAfterOverflow overflows the smallest receive buffer the
// kernel allows while nobody reads, which is what a burst does to a busy
// node: the kernel drops notifications and fails the next receive with
// ENOBUFS, after which the library's subscription is dead.
func TestResubscribesAfterOverflow(t *testing.T) {
	n := newNamespace(t, "kwresub")
	resubscribed := make(chan Kind, 16)
	var mu sync.Mutex
	lost := map[Kind]bool{}
	ev := n.watch(t, Options{Kinds: Routes | Rules, ReceiveBufferSize: 1, ChannelSize: 1,
		OnResubscribe: func(k Kind) {
			mu.Lock()
			defer mu.Unlock()
			if !lost[k] {
				t.Errorf("%v resubscribed without being reported lost first", k)
			}
			resubscribed <- k
		},
		OnLost: func(k Kind) {
			mu.Lock()
			defer mu.Unlock()
			lost[k] = true
		}})

	var burst []string
	for i := range 500 {
		burst = append(burst,
			fmt.Sprintf("route add 10.%d.%d.0/24 dev kw0 table 10061", i/256, i%256),
			fmt.Sprintf("rule add priority %d lookup 10061", 20000+i))
	}
	n.batch(t, burst)

	// Reading again lets each subscription reach the error.
	pending := map[Kind]bool{Routes: true, Rules: true}
	timeout := time.After(5 * time.Second)
	for len(pending) > 0 {
		select {
		case <-ev.Routes:
		case <-ev.Rules:
		case k := <-resubscribed:
			delete(pending, k)
		case <-timeout:
			t.Fatalf("no resubscription of %v within 5s", pending)
		}
	}

	// The new subscriptions work, and the dead ones' sockets are closed.
	n.ip(t, "rule", "add", "priority", "31999", "lookup", "10062")
	next(t, ev.Rules, time.Second, "rule update after resubscribing", func(u RuleUpdate) bool { return u.Priority == 31999 })
	n.ip(t, "route", "add", "192.0.2.128/25", "dev", "kw0", "table", "10062")
	next(t, ev.Routes, time.Second, "route update after resubscribing", func(u netlink.RouteUpdate) bool { return u.Table == 10062 })
	if got := n.routeSockets(t); got != 2 {
		t.Errorf("%d NETLINK_ROUTE sockets open in the namespace, want 2 (routes and rules)", got)
	}
}

// TestBurstFitsDefaultBuffer adds the 8,192 routes of a 4,096-destination
// Route (each destination and its backstop) in one
// go while nobody reads: the default receive buffer must hold them all.
func TestBurstFitsDefaultBuffer(t *testing.T) {
	n := newNamespace(t, "kwburst")
	resubscribed := make(chan Kind, 1)
	ev := n.watch(t, Options{Kinds: Routes, OnResubscribe: func(k Kind) { resubscribed <- k }})

	const routes = 8192
	var burst []string
	for i := range routes {
		burst = append(burst, fmt.Sprintf("route add 10.%d.%d.0/24 via 192.0.2.2 table 10061 proto 245", i/256, i%256))
	}
	n.batch(t, burst)

	seen := 0
	timeout := time.After(5 * time.Second)
	for seen < routes {
		select {
		case u := <-ev.Routes:
			if u.Table == 10061 {
				seen++
			}
		case k := <-resubscribed:
			t.Fatalf("%v resubscribed after %d of %d routes: the burst overflowed the buffer", k, seen, routes)
		case <-timeout:
			t.Fatalf("%d of %d route updates within 5s", seen, routes)
		}
	}
}
