package connmark

// Helpers for tests that need root: everything they change lives in network
// namespaces named ra-<purpose>-<pid> that the test creates and removes, never
// in the machine's own namespace.

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/routing-agent/routing-agent/pkg/lab/netns"
)

// requireRoot fails (never skips) a test that cannot run without root.
func requireRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Fatal("this test needs root (it creates network namespaces); run it as root")
	}
}

// newNS creates the namespace ra-<purpose>-<pid> and removes it when the test
// ends, also when it fails.
func newNS(tb testing.TB, purpose string) string {
	tb.Helper()
	requireRoot(tb)
	name := netns.Name(purpose)
	if err := netns.Add(name); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := netns.Delete(name); err != nil {
			tb.Errorf("removing namespace: %v", err)
		}
	})
	return name
}

// nsFd opens the namespace for New; the fd is closed when the test ends.
func nsFd(tb testing.TB, ns string) int {
	tb.Helper()
	f, err := os.Open("/run/netns/" + ns)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { f.Close() })
	return int(f.Fd())
}

// inNS runs a command inside ns, with stdin when not empty.
func inNS(ns, stdin string, args ...string) (string, error) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// run is inNS that fails the test on error.
func run(tb testing.TB, ns string, args ...string) string {
	tb.Helper()
	out, err := inNS(ns, "", args...)
	if err != nil {
		tb.Fatalf("in %s: %v", ns, err)
	}
	return out
}

// script runs each non-empty line of lines as a command inside ns.
func script(tb testing.TB, ns, lines string) {
	tb.Helper()
	for _, l := range strings.Split(lines, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			run(tb, ns, strings.Fields(l)...)
		}
	}
}

// nft feeds an nft script to `nft -f -` inside ns.
func nft(tb testing.TB, ns, text string) {
	tb.Helper()
	if _, err := inNS(ns, text, "nft", "-f", "-"); err != nil {
		tb.Fatalf("in %s: %v\n%s", ns, err, text)
	}
}

// veth connects interface a in namespace nsA to b in nsB, both up. The pair is
// created inside nsA, so the machine's own namespace never holds it.
func veth(tb testing.TB, nsA, a, nsB, b string) {
	tb.Helper()
	run(tb, nsA, "ip", "link", "add", a, "type", "veth", "peer", "name", b, "netns", nsB)
	run(tb, nsA, "ip", "link", "set", a, "up")
	run(tb, nsB, "ip", "link", "set", b, "up")
}

// settle waits until no IPv6 address in ns is tentative: until the
// link-local addresses pass DAD, a fresh interface drops neighbour
// solicitations (they count as Ip6InNoRoutes).
func settle(tb testing.TB, ns string) {
	tb.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		out := run(tb, ns, "ip", "-6", "addr", "show", "tentative")
		if strings.TrimSpace(out) == "" {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("in %s: addresses still tentative:\n%s", ns, out)
		}
	}
}

// rxPackets reads an interface's received-packet counter inside ns.
func rxPackets(tb testing.TB, ns, ifname string) uint64 {
	tb.Helper()
	h, closeH, err := netns.NetlinkHandle(ns)
	if err != nil {
		tb.Fatal(err)
	}
	defer closeH()
	l, err := h.LinkByName(ifname)
	if err != nil {
		tb.Fatalf("in %s: %s: %v", ns, ifname, err)
	}
	return l.Attrs().Statistics.RxPackets
}

// serveTCP answers every connection to addr inside ns with greeting.
func serveTCP(tb testing.TB, ns, addr, greeting string) {
	tb.Helper()
	var ln net.Listener
	err := netns.Do(ns, func() (err error) {
		ln, err = net.Listen("tcp", addr)
		return err
	})
	if err != nil {
		tb.Fatalf("in %s: %v", ns, err)
	}
	tb.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			io.WriteString(c, greeting)
			c.Close()
		}
	}()
}

// fetch connects from src (an address of ns, no port) to dst and returns
// what the server says.
func fetch(ns, src, dst string, timeout time.Duration) (string, error) {
	var conn net.Conn
	err := netns.Do(ns, func() (err error) {
		d := net.Dialer{Timeout: timeout, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
		conn, err = d.DialContext(context.Background(), "tcp", dst)
		return err
	})
	if err != nil {
		return "", err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(timeout))
	b, err := io.ReadAll(conn)
	return string(b), err
}

var handleRE = regexp.MustCompile(`# handle (\d+)$`)

// ruleHandles returns the handles of the rules of one chain, in order, as
// `nft -a list chain` shows them.
func ruleHandles(tb testing.TB, ns, table, chain string) []string {
	tb.Helper()
	var hs []string
	for _, l := range strings.Split(run(tb, ns, "nft", "-a", "list", "chain", "inet", table, chain), "\n") {
		if m := handleRE.FindStringSubmatch(strings.TrimSpace(l)); m != nil && !strings.Contains(l, "chain ") && !strings.Contains(l, "table ") {
			hs = append(hs, m[1])
		}
	}
	return hs
}

var packetsRE = regexp.MustCompile(`counter packets (\d+)`)

// counter returns the packets of the first counter in an nft chain listing.
func counter(tb testing.TB, ns string, chain ...string) uint64 {
	tb.Helper()
	out := run(tb, ns, append([]string{"nft", "list", "chain"}, chain...)...)
	m := packetsRE.FindStringSubmatch(out)
	if m == nil {
		tb.Fatalf("no counter in %s", out)
	}
	n, _ := strconv.ParseUint(m[1], 10, 64)
	return n
}
