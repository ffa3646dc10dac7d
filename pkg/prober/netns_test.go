package prober

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"

	"github.com/routing-agent/routing-agent/pkg/lab/netns"
)

// The kernel tests run the prober in a child process that `ip netns exec`
// puts, every thread of it, into a node namespace: a probe stream opens its
// sockets on whatever thread it runs on, so entering a namespace on one
// locked thread (netns.Do) would leave them in the machine's own.
const labEnv = "ROUTING_AGENT_PROBER_LAB" // "node,gateway" namespaces, set in the child

// The lab: a node and a gateway namespace joined by a veth named link on
// both sides.
const link = "vpc0"

var (
	gw4 = netip.MustParseAddr("10.114.0.3")
	gw6 = netip.MustParseAddr("2001:db8:114::3")
)

type lab struct{ node, gateway string }

// inLab builds the lab and runs the calling test again inside its node
// namespace. In that child it returns the lab; in the parent it returns
// nil once the child is done, having failed the test if the child did.
func inLab(t *testing.T) *lab {
	t.Helper()
	if env := os.Getenv(labEnv); env != "" {
		node, gateway, _ := strings.Cut(env, ",")
		self, _ := os.Stat("/proc/self/ns/net")
		want, err := os.Stat("/run/netns/" + node)
		if err != nil || !os.SameFile(self, want) {
			t.Fatalf("the child must run inside namespace %s (%v)", node, err)
		}
		return &lab{node: node, gateway: gateway}
	}
	if os.Geteuid() != 0 {
		t.Fatal("this test builds network namespaces and must run as root (make test runs it as root)")
	}
	if err := netns.RemoveStale(); err != nil {
		t.Fatal(err)
	}
	l := &lab{node: netns.Name("prober-node"), gateway: netns.Name("prober-gw")}
	for _, ns := range []string{l.node, l.gateway} {
		if err := netns.Add(ns); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := netns.Delete(ns); err != nil {
				t.Error(err)
			}
		})
		// A tentative link-local address holds the first neighbour
		// solicitation back by a second (DAD); this test is about the
		// prober, not DAD.
		if err := netns.Do(ns, func() error {
			for _, conf := range []string{"all", "default"} {
				if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+conf+"/accept_dad", []byte("0"), 0o644); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.wire(); err != nil {
		t.Fatal(err)
	}

	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", l.node, self, "-test.run=^"+t.Name()+"$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), labEnv+"="+l.node+","+l.gateway)
	// ip netns exec execs the test binary in place: it dies with us.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.CombinedOutput()
	t.Logf("inside %s:\n%s", l.node, out)
	if err != nil {
		t.Fatalf("the test inside %s: %v", l.node, err)
	}
	return nil
}

// wire (re-)creates the veth, with 10.114.0.10/24 and 2001:db8:114::10/64
// on the node's end and the gateway addresses on the other, and waits
// until both ends are operationally up: until then the kernel drops what
// is sent (a veth's carrier comes up up to a second after the link).
func (l *lab) wire() error {
	for _, args := range [][]string{
		{"-n", l.node, "link", "add", link, "type", "veth", "peer", "name", link, "netns", l.gateway},
		{"-n", l.node, "addr", "add", "10.114.0.10/24", "dev", link},
		{"-n", l.node, "addr", "add", "2001:db8:114::10/64", "dev", link},
		{"-n", l.gateway, "addr", "add", gw4.String() + "/24", "dev", link},
		{"-n", l.gateway, "addr", "add", gw6.String() + "/64", "dev", link},
		{"-n", l.node, "link", "set", link, "up"},
		{"-n", l.gateway, "link", "set", link, "up"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	for _, ns := range []string{l.node, l.gateway} {
		for deadline := time.Now().Add(5 * time.Second); ; {
			out, err := exec.Command("ip", "-n", ns, "-j", "link", "show", "dev", link).Output()
			if err != nil {
				return fmt.Errorf("ip -n %s link show dev %s: %w", ns, link, err)
			}
			var links []struct {
				OperState string `json:"operstate"`
			}
			if err := json.Unmarshal(out, &links); err != nil {
				return fmt.Errorf("parsing ip -n %s link show dev %s: %w", ns, link, err)
			}
			if len(links) == 1 && links[0].OperState == "UP" {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("%s in %s not up: %s", link, ns, out)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	return nil
}

// unwire deletes the node's end of the veth, and with it the gateway's.
func (l *lab) unwire(t *testing.T) {
	t.Helper()
	if out, err := exec.Command("ip", "-n", l.node, "link", "del", link).CombinedOutput(); err != nil {
		t.Fatalf("deleting %s: %v: %s", link, err, out)
	}
}

// targets names both gateways on the node's current link.
func targets(t *testing.T) []Target {
	t.Helper()
	ifi, err := net.InterfaceByName(link)
	if err != nil {
		t.Fatal(err)
	}
	return []Target{{Addr: gw4, LinkIndex: ifi.Index, LinkName: link}, {Addr: gw6, LinkIndex: ifi.Index, LinkName: link}}
}

// run starts a prober with the default pace until the test ends; it logs
// into the returned buffer.
func run(t *testing.T) (*Prober, *logBuffer) {
	t.Helper()
	logs := &logBuffer{}
	p := New(DefaultConfig(), funcr.New(logs.add, funcr.Options{LogTimestamp: true}), func() {}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { p.Run(ctx); close(done) }()
	t.Cleanup(func() {
		cancel()
		<-done
		if t.Failed() {
			t.Logf("prober log:\n%s", logs)
		}
	})
	return p, logs
}

// await waits until every one of addrs is in health h for reason, and
// returns how long that took.
func await(t *testing.T, p *Prober, within time.Duration, h Health, reason string, addrs ...netip.Addr) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		states := p.States()
		ok := true
		for _, a := range addrs {
			s := states[a]
			ok = ok && s.Health == h && s.Reason == reason
		}
		if ok {
			return time.Since(start)
		}
		if time.Since(start) > within {
			t.Fatalf("not %s %s within %v: %+v", h, reason, within, states)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestRecreatedInterface: the node's interface towards its gateways is
// deleted and re-created under the same name (a new ifindex). The gateways
// go down at once and come back without restarting the prober, through Set
// with the new index as the agent's next reconcile does, and through the
// restart after send errors even before that.
func TestRecreatedInterface(t *testing.T) {
	l := inLab(t)
	if l == nil {
		return
	}
	p, _ := run(t)
	first := targets(t)
	p.Set(first)
	await(t, p, 5*time.Second, Up, ReasonAnswering, gw4, gw6)

	l.unwire(t)
	await(t, p, time.Second, Down, ReasonLinkDown, gw4, gw6)
	recreated := time.Now()
	if err := l.wire(); err != nil {
		t.Fatal(err)
	}
	second := targets(t)
	if second[0].LinkIndex == first[0].LinkIndex {
		t.Fatalf("the re-created %s kept ifindex %d", link, first[0].LinkIndex)
	}
	p.Set(second)
	took := await(t, p, 5*time.Second, Up, ReasonAnswering, gw4, gw6)
	t.Logf("Up again %v after Set with the new ifindex %d (%v after the interface was re-created)",
		took.Round(time.Millisecond), second[0].LinkIndex, time.Since(recreated).Round(time.Millisecond))

	// Without Set, the send errors on the dead interface reopen the socket,
	// which binds the new one. A second fall within the flap window takes
	// twice the answers.
	l.unwire(t)
	await(t, p, time.Second, Down, ReasonLinkDown, gw4, gw6)
	recreated = time.Now()
	if err := l.wire(); err != nil {
		t.Fatal(err)
	}
	await(t, p, 10*time.Second, Up, ReasonAnswering, gw4, gw6)
	t.Logf("without Set, Up again %v after the interface was re-created", time.Since(recreated).Round(time.Millisecond))
}

// TestUnopenableSocket: a gateway whose probe socket cannot be opened (its
// interface does not exist yet) goes Down with ProbeFailed after Fall
// intervals, and one seeded Down says ProbeFailed too; the error is logged
// once however often the open is retried, and both come back once the
// interface exists and they answer.
func TestUnopenableSocket(t *testing.T) {
	l := inLab(t)
	if l == nil {
		return
	}
	gone := targets(t)
	l.unwire(t)
	p, logs := run(t)
	p.Set(gone)
	p.SeedDown([]netip.Addr{gw6})
	took := await(t, p, 5*time.Second, Down, ReasonProbeFailed, gw4, gw6)
	t.Logf("Down (%s) %v after Set", ReasonProbeFailed, took.Round(time.Millisecond))
	time.Sleep(time.Second) // more tries: at 100, 200, 400, 800 ms... apart
	for _, gw := range []netip.Addr{gw4, gw6} {
		if n := logs.count("cannot open the probe socket", `"gateway"="`+gw.String()+`"`); n != 1 {
			t.Errorf("the open error of %s was logged %d times, want once:\n%s", gw, n, logs)
		}
	}

	if err := l.wire(); err != nil {
		t.Fatal(err)
	}
	took = await(t, p, 10*time.Second, Up, ReasonAnswering, gw4, gw6)
	t.Logf("Up %v after the interface appeared (the open retried with backoff)", took.Round(time.Millisecond))
}

// logBuffer collects a funcr logger's lines.
type logBuffer struct {
	mu    sync.Mutex
	lines []string
}

func (b *logBuffer) add(prefix, args string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.lines = append(b.lines, prefix+" "+args)
}

// count counts the lines that contain every one of parts.
func (b *logBuffer) count(parts ...string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	for _, l := range b.lines {
		if !slices.ContainsFunc(parts, func(p string) bool { return !strings.Contains(l, p) }) {
			n++
		}
	}
	return n
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.Join(b.lines, "\n")
}
