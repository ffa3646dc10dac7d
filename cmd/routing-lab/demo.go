package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/routing-agent/routing-agent/generated/clientset/versioned"
	"github.com/routing-agent/routing-agent/pkg/lab/controlplane"
	"github.com/routing-agent/routing-agent/pkg/lab/netns"
	"github.com/routing-agent/routing-agent/pkg/lab/topology"
)

// The lab's two workers: the seed's node-selector examples pick one each.
var workers = []struct{ name, pool string }{
	{"worker-pool-x", "worker-pool"},
	{"worker-pool-y", "other-pool"},
}

var examples = []struct{ file, what string }{
	{"01-basic.yaml", "route 1.2.3.4/5 through one gateway, on every node"},
	{"02-ecmp.yaml", "the same through two gateways: ECMP"},
	{"03-default-override.yaml", "override the default route: egress through the NAT gateways"},
	{"04-node-selector.yaml", "only nodes of pool worker-pool (worker-pool-x)"},
	{"05-match-fields.yaml", "only the node named worker-pool-y"},
	{"06-single-gateway-default.yaml", "default route through a single gateway"},
}

type lab struct {
	ctx    context.Context
	repo   string
	net    *topology.Lab
	cp     *controlplane.ControlPlane
	client versioned.Interface
	kube   kubernetes.Interface
	agents []*exec.Cmd
	dir    string
	step   int
}

const steps = 6 + 5

func (l *lab) progress(format string, args ...any) {
	l.step++
	fmt.Printf("\n[%d/%d] %s\n", l.step, steps, fmt.Sprintf(format, args...))
}

func demo(ctx context.Context, repo, agent, binDir string) (err error) {
	l := &lab{ctx: ctx, repo: repo}
	defer l.teardown()

	l.progress("building the lab: 2 worker nodes, 2 NAT gateways, internet router, external host 198.51.100.10, control plane 203.0.113.100")
	if err := netns.RemoveStale(); err != nil {
		return err
	}
	if l.net, err = topology.New(topology.Options{Purpose: "demo", Nodes: len(workers), ControlPlane: true, NAT: true}); err != nil {
		return err
	}
	if l.dir, err = os.MkdirTemp("", "routing-lab-"); err != nil {
		return err
	}
	stopWhoami, err := l.whoami()
	if err != nil {
		return err
	}
	defer stopWhoami()

	l.progress("starting etcd and kube-apiserver (built from Go modules) on 203.0.113.100:6443")
	l.cp, err = controlplane.Start(ctx, controlplane.Options{BinDir: binDir, NetNS: l.net.ControlPlane,
		Address: l.net.ControlPlaneAddr.String(), CRDDir: filepath.Join(repo, "manifests", "crds")})
	if err != nil {
		return err
	}
	fmt.Printf("  API server ready in %s; CRDs installed\n", l.cp.Ready.Round(time.Millisecond))
	l.client, l.kube = versioned.NewForConfigOrDie(l.cp.Config), kubernetes.NewForConfigOrDie(l.cp.Config)
	if err := l.kubectl("apply", "-f", filepath.Join(repo, "manifests", "rbac.yaml")); err != nil {
		return err
	}
	for _, w := range workers {
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: w.name, Labels: map[string]string{"doks.digitalocean.com/node-pool": w.pool}}}
		if _, err := l.kube.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil {
			return err
		}
	}

	l.progress("starting routing-agent on each node, as its service account")
	for i := range workers {
		if err := l.startAgent(agent, i); err != nil {
			return err
		}
	}
	for i := range workers {
		fmt.Printf("  %s (%s, public %s, VPC %s): ready\n", workers[i].name, workers[i].pool, l.net.NodePublics[i], l.net.NodeVPCs[i])
	}
	for i := range workers {
		fmt.Printf("  %s egress IP before any Route: %s\n", workers[i].name, l.egress(i))
	}

	for n, ex := range examples {
		l.progress("%s: %s", ex.file, ex.what)
		if err := l.kubectl("apply", "-f", filepath.Join(repo, "test", "testdata", "seed", ex.file)); err != nil {
			return err
		}
		if err := l.settle(); err != nil {
			return err
		}
		for i := range workers {
			l.showNode(i)
		}
		l.kubectl("get", "noderoutings")
		if n == 2 {
			if err := l.failover(); err != nil {
				return err
			}
		}
	}

	l.progress("deleting the Route: every node's kernel goes back to how it was")
	if err := l.kubectl("delete", "route", "basic"); err != nil {
		return err
	}
	if err := l.settle(); err != nil {
		return err
	}
	for i := range workers {
		out, _ := l.net.Exec(l.net.Nodes[i], "ip", "rule")
		fmt.Printf("  %s: ip rule\n%s", workers[i].name, indent(out, "    "))
	}
	return nil
}

// failover kills gateway 10.114.0.4 while the default route goes through
// both gateways, and brings it back.
func (l *lab) failover() error {
	l.progress("failover: gateway 10.114.0.4 silently drops everything, then recovers")
	fmt.Printf("  egress from worker-pool-x over 12 connections: %s\n", l.egressMix(0, 12))
	if err := l.net.SilenceGateway(1, true); err != nil {
		return err
	}
	took, err := l.waitGateways(0, "10.114.0.3")
	if err != nil {
		return err
	}
	fmt.Printf("  10.114.0.4 left worker-pool-x's route %s after it died (probes every 500ms, 3 misses)\n", took.Round(time.Millisecond))
	l.run("    ", l.net.Nodes[0], "ip", "route", "show", "table", "all", "default", "proto", "245")
	fmt.Printf("  egress over 12 connections: %s\n", l.egressMix(0, 12))
	l.kubectl("get", "noderouting", "worker-pool-x", "-o", "jsonpath={range .status.gateways[*]}  {.address} {.health} {.reason}{\"\\n\"}{end}")
	if err := l.net.SilenceGateway(1, false); err != nil {
		return err
	}
	took, err = l.waitGateways(0, "10.114.0.3,10.114.0.4")
	if err != nil {
		return err
	}
	fmt.Printf("  10.114.0.4 answers again: back in the route after %s\n", took.Round(time.Millisecond))
	return nil
}

func (l *lab) waitGateways(i int, want string) (time.Duration, error) {
	begin := time.Now()
	for time.Since(begin) < 20*time.Second {
		out, _ := l.net.Exec(l.net.Nodes[i], "ip", "route", "show", "table", "all", "default", "proto", "245")
		var got []string
		for _, gw := range []string{"10.114.0.3", "10.114.0.4"} {
			if strings.Contains(out, "via "+gw+" ") {
				got = append(got, gw)
			}
		}
		if strings.Join(got, ",") == want {
			return time.Since(begin), nil
		}
		select {
		case <-l.ctx.Done():
			return 0, l.ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
	return 0, fmt.Errorf("the default route of %s never had gateways %s", workers[i].name, want)
}

// showNode prints what a user checks on a node.
func (l *lab) showNode(i int) {
	ns := l.net.Nodes[i]
	fmt.Printf("  --- %s\n", workers[i].name)
	rules, _ := l.net.Exec(ns, "ip", "rule")
	var band []string
	for _, r := range strings.Split(rules, "\n") {
		if strings.Contains(r, "proto 245") {
			band = append(band, r)
		}
	}
	if len(band) == 0 {
		fmt.Println("    (not selected: no rules, no routes)")
	} else {
		fmt.Printf("    $ ip rule   (the agent's band)\n%s", indent(strings.Join(band, "\n"), "      "))
		tables := map[string]bool{}
		for _, r := range band {
			f := strings.Fields(r)
			for j := 0; j+1 < len(f); j++ {
				if f[j] == "lookup" && f[j+1] != "main" {
					tables[f[j+1]] = true
				}
			}
		}
		for t := range tables {
			l.run("      ", ns, "ip", "route", "show", "table", t)
		}
		l.run("      ", ns, "ip", "route", "get", "1.2.3.4")
	}
	fmt.Printf("    egress IP seen by 198.51.100.10: %s\n", l.egress(i))
}

func (l *lab) run(prefix, ns string, args ...string) {
	out, err := l.net.Exec(ns, args...)
	fmt.Printf("%s$ %s\n%s", prefix, strings.Join(args, " "), indent(out, prefix+"  "))
	if err != nil {
		fmt.Printf("%s  (%v)\n", prefix, err)
	}
}

// settle waits until every agent's NodeRouting reflects the current Routes.
func (l *lab) settle() error {
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		routes, err := l.client.NetworkingV1alpha1().Routes().List(l.ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		gen := map[string]int64{}
		for _, r := range routes.Items {
			gen[r.Name] = r.Generation
		}
		ok := true
		for _, w := range workers {
			nr, err := l.client.NetworkingV1alpha1().NodeRoutings().Get(l.ctx, w.name, metav1.GetOptions{})
			if err != nil {
				ok = false
				break
			}
			for _, s := range nr.Status.Routes {
				if g, exists := gen[s.Name]; !exists || s.ObservedGeneration != g {
					ok = false
				}
			}
		}
		if ok {
			time.Sleep(300 * time.Millisecond) // let unselected nodes finish too
			return nil
		}
		select {
		case <-l.ctx.Done():
			return l.ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return fmt.Errorf("the nodes did not report the current Routes within 20s")
}

func (l *lab) kubectl(args ...string) error {
	fmt.Printf("  $ kubectl %s\n", strings.Join(args, " "))
	out, err := l.cp.Kubectl(args...).CombinedOutput()
	fmt.Print(indent(string(out), "    "))
	if err != nil {
		return fmt.Errorf("kubectl %s: %w", strings.Join(args, " "), err)
	}
	return nil
}

func (l *lab) startAgent(bin string, i int) error {
	kubeconfig, _, err := l.cp.KubeconfigFor("system:serviceaccount:routing-agent:routing-agent", "system:serviceaccounts", "system:authenticated")
	if err != nil {
		return err
	}
	resolv := filepath.Join(l.dir, "resolv.conf")
	if err := os.WriteFile(resolv, []byte("nameserver 198.51.100.53\n"), 0o644); err != nil {
		return err
	}
	logFile, err := os.Create(filepath.Join(l.dir, workers[i].name+".log"))
	if err != nil {
		return err
	}
	cmd := exec.Command("ip", "netns", "exec", l.net.Nodes[i], bin, "--kubeconfig", kubeconfig, "--node-name", workers[i].name,
		"--resolv-conf", resolv, "--http-address", "127.0.0.1:9464")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return err
	}
	l.agents = append(l.agents, cmd)
	client := &http.Client{Timeout: time.Second, Transport: &http.Transport{DialContext: netns.Dialer(l.net.Nodes[i])}}
	for start := time.Now(); time.Since(start) < 30*time.Second; time.Sleep(100 * time.Millisecond) {
		if resp, err := client.Get("http://127.0.0.1:9464/readyz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
	}
	log, _ := os.ReadFile(logFile.Name())
	return fmt.Errorf("the agent on %s did not become ready:\n%s", workers[i].name, log)
}

// whoami serves, on the external host, the source address of each request.
func (l *lab) whoami() (func(), error) {
	var ln net.Listener
	if err := netns.Do(l.net.External, func() (err error) {
		ln, err = net.Listen("tcp", net.JoinHostPort(l.net.ExternalAddr.String(), "80"))
		return err
	}); err != nil {
		return nil, err
	}
	server := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		fmt.Fprint(w, host)
	}), ReadHeaderTimeout: 2 * time.Second}
	go server.Serve(ln)
	return func() { server.Close() }, nil
}

// egress asks the external host which address node i's request came from.
func (l *lab) egress(i int) string {
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DialContext: netns.Dialer(l.net.Nodes[i]), DisableKeepAlives: true}}
	resp, err := client.Get("http://" + l.net.ExternalAddr.String() + "/")
	if err != nil {
		return "unreachable (" + err.Error() + ")"
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	who := string(body)
	switch who {
	case l.net.GatewayUplink[0].String():
		who += " (NAT gateway 10.114.0.3)"
	case l.net.GatewayUplink[1].String():
		who += " (NAT gateway 10.114.0.4)"
	case l.net.NodePublics[i].String():
		who += " (the node's own public address)"
	}
	return who
}

// egressMix counts the egress addresses of n new connections.
func (l *lab) egressMix(i, n int) string {
	count := map[string]int{}
	for range n {
		count[l.egress(i)]++
	}
	var parts []string
	for who, c := range count {
		parts = append(parts, fmt.Sprintf("%d× %s", c, who))
	}
	sort.Strings(parts)
	return strings.Join(parts, ", ")
}

func (l *lab) teardown() {
	for _, a := range l.agents {
		a.Process.Signal(syscall.SIGTERM)
		a.Wait()
	}
	if l.cp != nil {
		l.cp.Stop()
	}
	if l.net != nil {
		l.net.Close()
	}
	if l.dir != "" {
		os.RemoveAll(l.dir)
	}
}

func indent(s, prefix string) string {
	s = strings.TrimRight(s, "\n")
	if s == "" {
		return ""
	}
	return prefix + strings.ReplaceAll(s, "\n", "\n"+prefix) + "\n"
}
