// Package agent_test runs the real routing-agent binary on several nodes of
// a namespace lab against a real kube-apiserver, with the least-privileged
// identity and RBAC of manifests/rbac.yaml, and checks what reaches each
// node's kernel, its NodeRouting and the Route's Events.
package agent_test

import (
	"bufio"
	"context"
	"fmt"

	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
	"github.com/routing-agent/routing-agent/generated/clientset/versioned"
	"github.com/routing-agent/routing-agent/pkg/lab/cluster"
	"github.com/routing-agent/routing-agent/pkg/lab/controlplane"
	"github.com/routing-agent/routing-agent/pkg/lab/netns"
	"github.com/routing-agent/routing-agent/pkg/lab/topology"
)

// env is the lab cluster with agent processes (pkg/lab/cluster) and what
// the tests ask of it.
type env struct {
	t    testing.TB // the running (sub)test, for failures
	root testing.TB // the test that owns the environment, for cleanups
	c    *cluster.Cluster
	// Shorthands for c.Net, c.CP, c.Client, c.Kube.
	lab    *topology.Lab
	cp     *controlplane.ControlPlane
	client versioned.Interface
	kube   kubernetes.Interface
	// resync is the agents' --resync-period; args are more agent flags.
	resync string
	args   []string
}

func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// nodeName is the Kubernetes name of lab node i by default.
func nodeName(i int) string { return fmt.Sprintf("worker-%d", i) }

func newEnv(t testing.TB, purpose string, nodes int) *env {
	return newEnvWith(t, purpose, nodes, "5s")
}

func newEnvWith(t testing.TB, purpose string, nodes int, resync string, args ...string) *env {
	return newEnvOpts(t, topology.Options{Purpose: purpose, Nodes: nodes}, resync, args...)
}

// newEnvOpts builds the lab from opts (a control plane is always added).
func newEnvOpts(t testing.TB, opts topology.Options, resync string, args ...string) *env {
	return newEnvNodes(t, opts, nil, resync, args...)
}

// newEnvNodes also names the Node objects and sets their labels, and
// starts an agent on every node.
func newEnvNodes(t testing.TB, opts topology.Options, nodes []cluster.NodeSpec, resync string, args ...string) *env {
	t.Helper()
	return newEnvCluster(t, cluster.Options{Topology: opts, Nodes: nodes}, resync, args...)
}

// newEnvCluster builds the cluster opts describe, with agent processes.
func newEnvCluster(t testing.TB, opts cluster.Options, resync string, args ...string) *env {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test builds network namespaces and must run as root (make test runs it as root)")
	}
	c, err := cluster.New(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Error(err)
		}
	})
	e := &env{t: t, root: t, c: c, lab: c.Net, cp: c.CP, client: c.Client, kube: c.Kube, resync: resync, args: args}
	for i := range c.Nodes {
		e.startAgent(i)
	}
	for i := range c.Nodes {
		e.waitReady(i)
	}
	return e
}

// ns and name are node i's network namespace and Node name.
func (e *env) ns(i int) string   { return e.c.Nodes[i].NS }
func (e *env) name(i int) string { return e.c.Nodes[i].Name }

// startAgent runs the agent of node i as the routing-agent service account.
func (e *env) startAgent(i int) {
	e.t.Helper()
	if err := e.c.StartAgent(i, append([]string{"--resync-period", e.resync}, e.args...)...); err != nil {
		e.t.Fatal(err)
	}
}

// stopAgent signals node i's agent and waits for it to exit.
func (e *env) stopAgent(i int, sig syscall.Signal) {
	if a := e.c.Nodes[i].Agent; a != nil {
		a.Signal(sig)
	}
}

func (e *env) logs(i int) string {
	if a := e.c.Nodes[i].Agent; a != nil {
		return a.Logs()
	}
	return ""
}

// get fetches path from node i's agent HTTP server, inside its namespace.
func (e *env) get(i int, path string) (int, string, error) {
	return e.c.AgentGet(i, path)
}

func (e *env) waitReady(i int) {
	e.t.Helper()
	e.eventually(30*time.Second, fmt.Sprintf("agent %s ready", e.name(i)), func() (bool, string) {
		code, body, err := e.get(i, "/readyz")
		return err == nil && code == 200, fmt.Sprintf("%d %s %v\nlog:\n%s", code, body, err, e.logs(i))
	})
}

// metric returns the sum of a metric's samples on node i (those whose
// line starts with name, labels included).
func (e *env) metric(i int, name string) float64 {
	e.t.Helper()
	_, body, err := e.get(i, "/metrics")
	if err != nil {
		e.t.Fatal(err)
	}
	total := 0.0
	scanner := bufio.NewScanner(strings.NewReader(body))
	for scanner.Scan() {
		line := scanner.Text()
		if strings.HasPrefix(line, name+" ") || strings.HasPrefix(line, name+"{") {
			fields := strings.Fields(line)
			v, _ := strconv.ParseFloat(fields[len(fields)-1], 64)
			total += v
		}
	}
	return total
}

// kernel returns the agent-owned routes and rules of node i.
func (e *env) kernel(i int) string {
	e.t.Helper()
	var out []string
	for _, args := range [][]string{{"-4", "rule"}, {"-6", "rule"}, {"route", "show", "table", "all", "proto", "245"}} {
		text, err := e.lab.Exec(e.ns(i), append([]string{"ip"}, args...)...)
		if err != nil {
			e.t.Fatalf("ip %v: %v", args, err)
		}
		for _, l := range strings.Split(text, "\n") {
			if strings.Contains(l, "245") || strings.HasPrefix(l, "\t") {
				out = append(out, l)
			}
		}
	}
	return strings.Join(out, "\n")
}

func (e *env) routesOn(i int) string {
	e.t.Helper()
	out, err := e.lab.Exec(e.ns(i), "ip", "route", "show", "table", "all", "proto", "245")
	if err != nil {
		e.t.Fatal(err)
	}
	return out
}

// routeThrough says whether ip route output holds a route for dst through
// via ("10.114.0.3 dev vpc0"), whether it names its gateway or a nexthop
// object (`nhid N via ...`).
func routeThrough(out, dst, via string) bool {
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, dst+" ") && strings.Contains(l, "via "+via) {
			return true
		}
	}
	return false
}

func (e *env) eventually(timeout time.Duration, what string, cond func() (bool, string)) {
	e.t.Helper()
	deadline := time.Now().Add(timeout)
	var detail string
	for time.Now().Before(deadline) {
		var ok bool
		if ok, detail = cond(); ok {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	e.t.Fatalf("%s: not within %s:\n%s", what, timeout, detail)
}

func (e *env) applyRoute(r *v1alpha1.Route) *v1alpha1.Route {
	e.t.Helper()
	ctx := context.Background()
	current, err := e.client.NetworkingV1alpha1().Routes().Get(ctx, r.Name, metav1.GetOptions{})
	if err == nil {
		current.Spec = r.Spec
		out, err := e.client.NetworkingV1alpha1().Routes().Update(ctx, current, metav1.UpdateOptions{})
		if err != nil {
			e.t.Fatal(err)
		}
		return out
	}
	out, err := e.client.NetworkingV1alpha1().Routes().Create(ctx, r, metav1.CreateOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	return out
}

func (e *env) deleteRoute(name string) {
	e.t.Helper()
	if err := e.client.NetworkingV1alpha1().Routes().Delete(context.Background(), name, metav1.DeleteOptions{}); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) nodeRouting(i int) *v1alpha1.NodeRouting {
	nr, err := e.client.NetworkingV1alpha1().NodeRoutings().Get(context.Background(), e.name(i), metav1.GetOptions{})
	if err != nil {
		return nil
	}
	return nr
}

func routeState(nr *v1alpha1.NodeRouting, name string) *v1alpha1.RouteState {
	if nr == nil {
		return nil
	}
	for i := range nr.Status.Routes {
		if nr.Status.Routes[i].Name == name {
			return &nr.Status.Routes[i]
		}
	}
	return nil
}

func newRoute(name string, destinations []string, gateways []string, pools ...string) *v1alpha1.Route {
	r := &v1alpha1.Route{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: v1alpha1.RouteSpec{Destinations: destinations, Gateways: gateways}}
	if len(pools) > 0 {
		r.Spec.NodeSelector = &corev1.NodeSelector{NodeSelectorTerms: []corev1.NodeSelectorTerm{{
			MatchExpressions: []corev1.NodeSelectorRequirement{{Key: "pool", Operator: corev1.NodeSelectorOpIn, Values: pools}},
		}}}
	}
	return r
}

func (e *env) setPool(i int, pool string) {
	e.t.Helper()
	patch := fmt.Sprintf(`{"metadata":{"labels":{"pool":%q}}}`, pool)
	if _, err := e.kube.CoreV1().Nodes().Patch(context.Background(), e.name(i), "application/merge-patch+json", []byte(patch), metav1.PatchOptions{}); err != nil {
		e.t.Fatal(err)
	}
}

// sysctl reads a sysctl (as "net/ipv4/...") in node i's namespace.
func (e *env) sysctl(i int, name string) string {
	e.t.Helper()
	var value []byte
	if err := netns.Do(e.ns(i), func() (err error) {
		value, err = os.ReadFile("/proc/sys/" + name)
		return err
	}); err != nil {
		e.t.Fatal(err)
	}
	return strings.TrimSpace(string(value))
}

// setSysctl writes a sysctl in node i's namespace.
func (e *env) setSysctl(i int, name, value string) {
	e.t.Helper()
	if err := netns.Do(e.ns(i), func() error { return os.WriteFile("/proc/sys/"+name, []byte(value), 0o644) }); err != nil {
		e.t.Fatal(err)
	}
}
