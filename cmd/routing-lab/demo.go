package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/routing-agent/routing-agent/pkg/lab/cluster"
	"github.com/routing-agent/routing-agent/pkg/lab/kubenode"
	"github.com/routing-agent/routing-agent/pkg/lab/topology"
)

// The lab's two workers: the seed's node-selector examples pick one each.
var workers = []cluster.NodeSpec{
	{Name: "worker-pool-x", Labels: map[string]string{"doks.digitalocean.com/node-pool": "worker-pool"}},
	{Name: "worker-pool-y", Labels: map[string]string{"doks.digitalocean.com/node-pool": "other-pool"}},
}

var examples = []struct{ file, what string }{
	{"01-basic.yaml", "route 1.2.3.4/5 through one gateway, on every node"},
	{"02-ecmp.yaml", "the same through two gateways: ECMP"},
	{"03-default-override.yaml", "override the default route: egress through the NAT gateways"},
	{"04-node-selector.yaml", "only nodes of pool worker-pool (worker-pool-x)"},
	{"05-match-fields.yaml", "only the node named worker-pool-y"},
	{"06-single-gateway-default.yaml", "default route through a single gateway"},
}

type demoLab struct {
	ctx  context.Context
	repo string
	c    *cluster.Cluster
	step int
}

// steps: the lab, the install, each example, the failover, the delete.
var steps = 2 + len(examples) + 2

func (l *demoLab) progress(format string, args ...any) {
	l.step++
	fmt.Printf("\n[%d/%d] %s\n", l.step, steps, fmt.Sprintf(format, args...))
}

// demo builds the lab cluster with real kubelets, installs the agent from
// manifests/ with the image in archive (named image), and walks through
// the announcement's examples, a failover and a delete.
func demo(ctx context.Context, repo, binDir, archive, image string) (err error) {
	l := &demoLab{ctx: ctx, repo: repo}

	l.progress("building the lab: control plane 203.0.113.100 (etcd, kube-apiserver, controller-manager, scheduler),\n"+
		"      2 worker nodes running kubelet + containerd + runc (reaching the API server through a load balancer's VIP, %s),\n"+
		"      2 NAT gateways, internet router, external host 198.51.100.10, DNS server 198.51.100.53", cluster.APIVIPs[0])
	begin := time.Now()
	l.c, err = cluster.New(ctx, cluster.Options{
		Topology: topology.Options{Purpose: "demo", Nodes: len(workers), NAT: true},
		Nodes:    workers, Kubelets: true, Repo: repo, BinDir: binDir,
		KubeletServer: "https://" + cluster.APIVIPs[0].String() + ":6443",
	})
	if err != nil {
		return err
	}
	defer l.c.Close()
	stopWhoami, err := l.c.StartWhoami()
	if err != nil {
		return err
	}
	defer stopWhoami()
	fmt.Printf("  nodes Ready in %s\n", time.Since(begin).Round(100*time.Millisecond))
	l.kubectl("get", "nodes", "-L", "doks.digitalocean.com/node-pool")
	for i, w := range workers {
		fmt.Printf("  %s egress IP before any Route: %s\n", w.Name, l.egress(i))
	}

	l.progress("installing the agent as a user does: image %s loaded into the nodes' containerd,\n"+
		"      then kubectl apply -k of an overlay of manifests/ that names it", image)
	if err := l.c.LoadImage(archive); err != nil {
		return err
	}
	begin = time.Now()
	// The kubelets' kubeconfig is at EKS's path: mounted for the agent,
	// which keeps its server (the VIP) on the main table.
	if err := l.c.Install(cluster.InstallOptions{Image: image, KubeletKubeconfig: kubenode.KubeconfigPath}); err != nil {
		return err
	}
	overlay, _ := os.ReadFile(filepath.Join(l.c.Dir, "install", "kustomization.yaml"))
	fmt.Printf("  $ cat kustomization.yaml\n%s  $ kubectl apply --server-side -k .\n", indent(string(overlay), "    "))
	if err := l.c.WaitRollout(ctx, 2*time.Minute); err != nil {
		return err
	}
	fmt.Printf("  every agent pod Ready %s after the apply\n", time.Since(begin).Round(100*time.Millisecond))
	l.kubectl("get", "pods", "-n", cluster.AgentNamespace, "-o", "wide")

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
			fmt.Println("  what stays on the main table under the override, and why (the kubelet's VIP among them):")
			l.kubectl("get", "noderouting", workers[0].Name, "-o", `jsonpath={range .status.bypassAddresses[*]}{.address}{"\t"}{.sources}{"\n"}{end}`)
			fmt.Println("  replies to connections from outside go back the way they came: the agent's connection marks")
			l.run("    ", 0, "nft", "list", "table", "inet", "routing-agent")
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
	for i, w := range workers {
		out, _ := l.c.Exec(i, "ip", "rule")
		fmt.Printf("  %s: ip rule\n%s", w.Name, indent(out, "    "))
	}
	return nil
}

// failover silences gateway 10.114.0.4 while the default route goes
// through both gateways, and brings it back.
func (l *demoLab) failover() error {
	l.progress("failover: gateway 10.114.0.4 silently drops everything, then recovers")
	fmt.Printf("  egress from worker-pool-x over 12 connections: %s\n", l.egressMix(0, 12))
	if err := l.c.Net.SilenceGateway(1, true); err != nil {
		return err
	}
	took, err := l.waitGateways(0, "10.114.0.3")
	if err != nil {
		return err
	}
	fmt.Printf("  10.114.0.4 left worker-pool-x's route %s after it died (probes every 500ms, 3 misses)\n", took.Round(time.Millisecond))
	l.run("    ", 0, "ip", "route", "show", "table", "all", "default", "proto", "245")
	fmt.Printf("  egress over 12 connections: %s\n", l.egressMix(0, 12))
	l.kubectl("get", "noderouting", "worker-pool-x", "-o", "jsonpath={range .status.gateways[*]}  {.address} {.health} {.reason}{\"\\n\"}{end}")
	if err := l.c.Net.SilenceGateway(1, false); err != nil {
		return err
	}
	took, err = l.waitGateways(0, "10.114.0.3,10.114.0.4")
	if err != nil {
		return err
	}
	fmt.Printf("  10.114.0.4 answers again: back in the route after %s\n", took.Round(time.Millisecond))
	return nil
}

func (l *demoLab) waitGateways(i int, want string) (time.Duration, error) {
	begin := time.Now()
	for time.Since(begin) < 20*time.Second {
		out, _ := l.c.Net.Exec(l.c.Nodes[i].NS, "ip", "route", "show", "table", "all", "default", "proto", "245")
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
	return 0, fmt.Errorf("the default route of %s never had gateways %s", workers[i].Name, want)
}

// showNode prints what a user checks on a node.
func (l *demoLab) showNode(i int) {
	fmt.Printf("  --- %s\n", workers[i].Name)
	rules, _ := l.c.Exec(i, "ip", "rule")
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
			l.run("      ", i, "ip", "route", "show", "table", t)
		}
		l.run("      ", i, "ip", "route", "get", "1.2.3.4")
	}
	fmt.Printf("    egress IP seen by 198.51.100.10: %s\n", l.egress(i))
}

func (l *demoLab) run(prefix string, i int, args ...string) {
	out, err := l.c.Exec(i, args...)
	fmt.Printf("%s$ %s\n%s", prefix, strings.Join(args, " "), indent(out, prefix+"  "))
	if err != nil {
		fmt.Printf("%s  (%v)\n", prefix, err)
	}
}

// settle waits until every agent's NodeRouting reflects the current Routes.
func (l *demoLab) settle() error {
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		routes, err := l.c.Client.NetworkingV1alpha1().Routes().List(l.ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		gen := map[string]int64{}
		for _, r := range routes.Items {
			gen[r.Name] = r.Generation
		}
		ok := true
		for _, w := range workers {
			nr, err := l.c.Client.NetworkingV1alpha1().NodeRoutings().Get(l.ctx, w.Name, metav1.GetOptions{})
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

func (l *demoLab) kubectl(args ...string) error {
	fmt.Printf("  $ kubectl %s\n", strings.Join(args, " "))
	out, err := l.c.Kubectl(args...).CombinedOutput()
	fmt.Print(indent(string(out), "    "))
	if err != nil {
		return fmt.Errorf("kubectl %s: %w", strings.Join(args, " "), err)
	}
	return nil
}

// egress asks the external host which address node i's request came from.
func (l *demoLab) egress(i int) string {
	who, err := l.c.Egress(i)
	if err != nil {
		return "unreachable (" + err.Error() + ")"
	}
	switch who {
	case l.c.Net.GatewayUplink[0].String():
		who += " (NAT gateway 10.114.0.3)"
	case l.c.Net.GatewayUplink[1].String():
		who += " (NAT gateway 10.114.0.4)"
	case l.c.Nodes[i].Public.String():
		who += " (the node's own public address)"
	}
	return who
}

// egressMix counts the egress addresses of n new connections.
func (l *demoLab) egressMix(i, n int) string {
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

func indent(s, prefix string) string {
	s = strings.TrimRight(s, "\n")
	if s == "" {
		return ""
	}
	return prefix + strings.ReplaceAll(s, "\n", "\n"+prefix) + "\n"
}
