// Package agent_test runs the real routing-agent binary on several nodes of
// a namespace lab against a real kube-apiserver, with the least-privileged
// identity and RBAC of manifests/rbac.yaml, and checks what reaches each
// node's kernel, its NodeRouting and the Route's Events.
package agent_test

import (
	"bufio"
	"context"
	"fmt"
	"io"

	"net/http"
	"os"
	"os/exec"
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
	"k8s.io/client-go/rest"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
	"github.com/routing-agent/routing-agent/generated/clientset/versioned"
	"github.com/routing-agent/routing-agent/pkg/lab/controlplane"
	"github.com/routing-agent/routing-agent/pkg/lab/netns"
	"github.com/routing-agent/routing-agent/pkg/lab/topology"
)

// env is the lab: nodes and gateways in namespaces, a control plane on
// the public network, and one agent process per node.
type env struct {
	t      testing.TB // the running (sub)test, for failures
	root   testing.TB // the test that owns the environment, for cleanups
	lab    *topology.Lab
	cp     *controlplane.ControlPlane
	client versioned.Interface
	kube   kubernetes.Interface
	bin    string
	dir    string
	agents []*agentProc
	// resync is the agents' --resync-period; args are more agent flags.
	resync string
	args   []string
	// names and labels of the Node objects, by lab node; default
	// worker-<i> with pool=egress.
	names  []string
	labels []map[string]string
}

type agentProc struct {
	node, ns string
	cmd      *exec.Cmd
	log      *os.File
	done     chan struct{}
}

func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// nodeName is the Kubernetes name of lab node i, unless env.names says.
func nodeName(i int) string { return fmt.Sprintf("worker-%d", i) }

func newEnv(t testing.TB, purpose string, nodes int) *env {
	return newEnvWith(t, purpose, nodes, "5s")
}

func newEnvWith(t testing.TB, purpose string, nodes int, resync string, args ...string) *env {
	return newEnvOpts(t, topology.Options{Purpose: purpose, Nodes: nodes}, resync, args...)
}

// newEnvOpts builds the lab from opts (a control plane is always added).
func newEnvOpts(t testing.TB, opts topology.Options, resync string, args ...string) *env {
	return newEnvNodes(t, opts, nil, nil, resync, args...)
}

// newEnvNodes also names the Node objects and sets their labels.
func newEnvNodes(t testing.TB, opts topology.Options, names []string, labels []map[string]string, resync string, args ...string) *env {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test builds network namespaces and must run as root (make test runs it as root)")
	}
	if err := netns.RemoveStale(); err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, root: t, dir: t.TempDir(), resync: resync, args: args, names: names, labels: labels}
	opts.ControlPlane = true
	lab, err := topology.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	e.lab = lab
	t.Cleanup(func() {
		if err := lab.Close(); err != nil {
			t.Error(err)
		}
	})

	cp, err := controlplane.Start(context.Background(), controlplane.Options{
		NetNS: lab.ControlPlane, Address: lab.ControlPlaneAddr.String(), CRDDir: filepath.Join(repoRoot(), "manifests", "crds"),
	})
	if err != nil {
		if cp != nil {
			t.Log(cp.Logs())
		}
		t.Fatal(err)
	}
	e.cp = cp
	t.Cleanup(cp.Stop) // registered after lab.Close, so it runs first
	// The test's own client must not be what is measured: no client-side throttling.
	admin := rest.CopyConfig(cp.Config)
	admin.QPS, admin.Burst = -1, 0
	e.client = versioned.NewForConfigOrDie(admin)
	e.kube = kubernetes.NewForConfigOrDie(admin)
	if out, err := cp.Kubectl("apply", "-f", filepath.Join(repoRoot(), "manifests", "rbac.yaml")).CombinedOutput(); err != nil {
		t.Fatalf("kubectl apply rbac: %v\n%s", err, out)
	}

	e.bin = filepath.Join(e.dir, "routing-agent")
	build := exec.Command("go", "build", "-o", e.bin, "./cmd/routing-agent")
	build.Dir = repoRoot()
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	if err := os.WriteFile(filepath.Join(e.dir, "resolv.conf"), []byte("nameserver 198.51.100.53\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for i := range lab.Nodes {
		name, labels := nodeName(i), map[string]string{"pool": "egress"}
		if i < len(e.names) {
			name, labels = e.names[i], e.labels[i]
		}
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
		if _, err := e.kube.CoreV1().Nodes().Create(context.Background(), node, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		e.agents = append(e.agents, &agentProc{node: name, ns: lab.Nodes[i]})
	}
	for i := range e.agents {
		e.startAgent(i)
	}
	for i := range e.agents {
		e.waitReady(i)
	}
	return e
}

// startAgent runs the agent of node i as the routing-agent service account.
func (e *env) startAgent(i int) {
	e.t.Helper()
	a := e.agents[i]
	kubeconfig, _, err := e.cp.KubeconfigFor("system:serviceaccount:routing-agent:routing-agent", "system:serviceaccounts", "system:authenticated")
	if err != nil {
		e.t.Fatal(err)
	}
	logPath := filepath.Join(e.dir, a.node+".log")
	a.log, err = os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		e.t.Fatal(err)
	}
	a.cmd = exec.Command("ip", "netns", "exec", a.ns, e.bin,
		"--kubeconfig", kubeconfig, "--node-name", a.node, "--resync-period", e.resync,
		"--resolv-conf", filepath.Join(e.dir, "resolv.conf"), "--http-address", "127.0.0.1:9464")
	a.cmd.Args = append(a.cmd.Args, e.args...)
	a.cmd.Stdout, a.cmd.Stderr = a.log, a.log
	a.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := a.cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	a.done = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { cmd.Wait(); close(done) }(a.cmd, a.done)
	e.root.Cleanup(func() { e.stopAgent(i, syscall.SIGTERM) })
}

// stopAgent signals node i's agent and waits for it to exit.
func (e *env) stopAgent(i int, sig syscall.Signal) {
	a := e.agents[i]
	if a.cmd == nil || a.cmd.Process == nil {
		return
	}
	select {
	case <-a.done:
		return
	default:
	}
	a.cmd.Process.Signal(sig)
	select {
	case <-a.done:
	case <-time.After(10 * time.Second):
		a.cmd.Process.Kill()
		<-a.done
	}
	a.log.Close()
}

func (e *env) logs(i int) string {
	data, _ := os.ReadFile(filepath.Join(e.dir, e.agents[i].node+".log"))
	return string(data)
}

// get fetches path from node i's agent HTTP server, inside its namespace.
func (e *env) get(i int, path string) (int, string, error) {
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DialContext: netns.Dialer(e.agents[i].ns)}}
	resp, err := client.Get("http://127.0.0.1:9464" + path)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), nil
}

func (e *env) waitReady(i int) {
	e.t.Helper()
	e.eventually(30*time.Second, fmt.Sprintf("agent %s ready", e.agents[i].node), func() (bool, string) {
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
		text, err := e.lab.Exec(e.agents[i].ns, append([]string{"ip"}, args...)...)
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
	out, err := e.lab.Exec(e.agents[i].ns, "ip", "route", "show", "table", "all", "proto", "245")
	if err != nil {
		e.t.Fatal(err)
	}
	return out
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
	nr, err := e.client.NetworkingV1alpha1().NodeRoutings().Get(context.Background(), e.agents[i].node, metav1.GetOptions{})
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
	if _, err := e.kube.CoreV1().Nodes().Patch(context.Background(), nodeName(i), "application/merge-patch+json", []byte(patch), metav1.PatchOptions{}); err != nil {
		e.t.Fatal(err)
	}
}
