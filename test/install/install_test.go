// Package install_test installs the agent as users do — the image built
// without Docker, `kubectl apply -k` of manifests/ with an image override —
// onto lab nodes that run real kubelets, containerd and runc, and proves
// with packets what a user relies on: the seed's default override through
// NAT gateways, failover, rolling updates under traffic (also with a dead
// gateway) and the startup taint.
package install_test

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink/nl"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
	"github.com/routing-agent/routing-agent/pkg/agent"
	"github.com/routing-agent/routing-agent/pkg/lab/cluster"
	"github.com/routing-agent/routing-agent/pkg/lab/kubenode"
	"github.com/routing-agent/routing-agent/pkg/lab/netns"
	"github.com/routing-agent/routing-agent/pkg/lab/topology"
)

const (
	gw3, gw4 = "10.114.0.3", "10.114.0.4"
	// The announcement's default override names its Route "basic".
	overrideRoute = "basic"
)

func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// lab is the installed cluster and what the test asks of it.
type lab struct {
	t   *testing.T
	c   *cluster.Cluster
	ctx context.Context
	// images are the agent image references loaded on the nodes, in order.
	images []string
}

// TestInstallFromManifests is the user's path end to end. Its subtests
// run in order on one cluster.
func TestInstallFromManifests(t *testing.T) {
	ctx := context.Background()
	c, err := cluster.New(ctx, cluster.Options{
		Topology: topology.Options{Purpose: "install", Nodes: 2, NAT: true},
		Kubelets: true,
		// The kubelets reach the API server through a load balancer's VIP
		// beyond the nodes' default route, not the EndpointSlice's address:
		// a default override takes that path unless the agent bypasses it.
		KubeletServer: "https://" + cluster.APIVIPs[0].String() + ":6443",
		StartupTaints: []corev1.Taint{{Key: agent.DefaultStartupTaint, Effect: corev1.TaintEffectNoSchedule}},
	})
	if err != nil {
		t.Fatal(err)
	}
	l := &lab{t: t, c: c, ctx: ctx}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("agent pods:\n%s", c.AgentPodReport(ctx))
		}
		if err := c.Close(); err != nil {
			t.Error(err)
		}
	})
	// The gateways refuse anything for the control plane: an agent whose
	// API connection took the override would lose it, and this test.
	if err := c.Net.DropAPIPortAtGateways(); err != nil {
		t.Fatal(err)
	}
	for i := range c.Net.Gateways {
		if err := c.Net.CountExternalTraffic(i); err != nil {
			t.Fatal(err)
		}
	}
	stopWhoami, err := c.StartWhoami()
	if err != nil {
		t.Fatal(err)
	}
	defer stopWhoami()

	// A workload that arrives before the agent: the startup taint keeps it
	// off both nodes.
	workload := l.createWorkload()
	l.eventually(30*time.Second, "the workload pod unschedulable while the nodes carry the startup taint", func() (bool, string) {
		pod, err := c.Kube.CoreV1().Pods("default").Get(ctx, workload, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		for _, cond := range pod.Status.Conditions {
			if cond.Type == corev1.PodScheduled && cond.Status == corev1.ConditionFalse && cond.Reason == corev1.PodReasonUnschedulable {
				return strings.Contains(cond.Message, "untolerated taint"), cond.Message
			}
		}
		return false, fmt.Sprintf("%+v", pod.Status)
	})

	t.Run("install: kubectl apply -k with an image override", func(t *testing.T) {
		l.t = t
		ref := l.loadImage("lab-1")
		begin := time.Now()
		l.install(ref)
		for i, r := range l.waitAgentsReady(begin) {
			t.Logf("%s: agent pod seen %s after kubectl apply; its first apply done %s after that (/readyz)",
				c.Nodes[i].Name, r.created.Round(time.Millisecond), (r.ready - r.created).Round(time.Millisecond))
		}
		if err := c.WaitRollout(l.ctx, time.Minute); err != nil {
			t.Fatal(err)
		}
		t.Logf("kubectl apply to every agent pod Ready: %s", time.Since(begin).Round(time.Millisecond))
		for i := range c.Nodes {
			pod, err := c.AgentPod(ctx, i)
			if err != nil {
				t.Fatal(err)
			}
			if got := pod.Spec.Containers[0].Image; got != ref {
				t.Errorf("agent pod %s runs %s, want %s", pod.Name, got, ref)
			}
			if pod.Status.PodIP != c.Nodes[i].VPC.String() {
				t.Errorf("agent pod %s has IP %s, want the node's %s (host network)", pod.Name, pod.Status.PodIP, c.Nodes[i].VPC)
			}
		}
		// The ECMP sysctls, through the host's /proc/sys/net mounted at
		// /host/proc/sys/net: a new namespace starts with them at 0.
		for i, n := range c.Nodes {
			for _, name := range []string{"ipv4/fib_multipath_hash_policy", "ipv6/fib_multipath_hash_policy", "ipv4/fib_multipath_use_neigh"} {
				var value []byte
				if err := netns.Do(n.NS, func() (err error) {
					value, err = os.ReadFile("/proc/sys/net/" + name)
					return err
				}); err != nil {
					t.Fatal(err)
				}
				if strings.TrimSpace(string(value)) != "1" {
					t.Errorf("%s: net.%s = %s, want 1 (set by the agent pod)", c.Nodes[i].Name, strings.ReplaceAll(name, "/", "."), value)
				}
			}
		}
		// Metrics and probes on the InternalIP only, not the public address.
		if code, _, err := c.AgentGet(0, "/metrics"); err != nil || code != 200 {
			t.Errorf("metrics on the node's InternalIP: %d %v", code, err)
		}
		if l.listens(0, c.Nodes[0].Public.String()+":9464") || l.listens(0, "0.0.0.0:9464") {
			t.Error("the agent serves HTTP on the node's public address")
		}
	})

	t.Run("startup taint removed after the first apply; the workload runs", func(t *testing.T) {
		l.t = t
		for i := range c.Nodes {
			l.eventually(30*time.Second, c.Nodes[i].Name+" without the startup taint", func() (bool, string) {
				node, err := c.Kube.CoreV1().Nodes().Get(ctx, c.Nodes[i].Name, metav1.GetOptions{})
				if err != nil {
					return false, err.Error()
				}
				for _, taint := range node.Spec.Taints {
					if taint.Key == agent.DefaultStartupTaint {
						return false, fmt.Sprint(node.Spec.Taints)
					}
				}
				return true, ""
			})
		}
		l.eventually(time.Minute, "the workload pod running", func() (bool, string) {
			pod, err := c.Kube.CoreV1().Pods("default").Get(ctx, workload, metav1.GetOptions{})
			return err == nil && pod.Status.Phase == corev1.PodRunning, fmt.Sprintf("%+v %v", pod.Status, err)
		})
		l.checkTaintPolicy()
	})

	t.Run("the seed's default override through the NAT gateways", func(t *testing.T) {
		l.t = t
		if out, err := c.Kubectl("apply", "-f", filepath.Join(repoRoot(), "test", "testdata", "seed", "03-default-override.yaml")).CombinedOutput(); err != nil {
			t.Fatalf("kubectl apply: %v: %s", err, out)
		}
		for i := range c.Nodes {
			l.waitNexthops(i, gw3+","+gw4, 15*time.Second)
			// The table is filled before the rules lead to it: until they
			// do, the Route is not in effect yet and traffic takes main.
			l.eventually(5*time.Second, c.Nodes[i].Name+": the external host through the Route's table", func() (bool, string) {
				out, err := c.Net.Exec(c.Nodes[i].NS, "ip", "route", "get", c.Net.ExternalAddr.String())
				return err == nil && strings.Contains(out, " table "), out
			})
			seen := map[string]int{}
			for range 16 {
				who, err := c.Egress(i)
				if err != nil {
					t.Fatalf("%s: request to the external host: %v", c.Nodes[i].Name, err)
				}
				seen[who]++
			}
			t.Logf("%s: egress over 16 connections: %v", c.Nodes[i].Name, seen)
			for who := range seen {
				if who != c.Net.GatewayUplink[0].String() && who != c.Net.GatewayUplink[1].String() {
					t.Errorf("%s: the external host saw %s, not a NAT gateway", c.Nodes[i].Name, who)
				}
			}
			if len(seen) != 2 {
				t.Errorf("%s: connections used %d gateways, want both", c.Nodes[i].Name, len(seen))
			}
		}
		// The agents still reach the API server under the override (the
		// gateways drop control-plane traffic): they report it.
		l.eventually(15*time.Second, "NodeRoutings report the override Applied with both gateways Up", func() (bool, string) {
			for _, n := range c.Nodes {
				nr, err := c.Client.NetworkingV1alpha1().NodeRoutings().Get(ctx, n.Name, metav1.GetOptions{})
				if err != nil || len(nr.Status.Routes) != 1 || nr.Status.Routes[0].Phase != "Applied" || nr.Status.Summary.GatewaysUp != 2 {
					return false, fmt.Sprintf("%s: %v %+v", n.Name, err, nr)
				}
			}
			return true, ""
		})
	})

	t.Run("the kubelets stay Ready under the override: their API server VIP is bypassed", func(t *testing.T) {
		l.t = t
		vip := cluster.APIVIPs[0].String()
		for _, n := range c.Nodes {
			nr, err := c.Client.NetworkingV1alpha1().NodeRoutings().Get(ctx, n.Name, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			found := false
			for _, b := range nr.Status.Bypass {
				found = found || b.Address == vip && slices.Contains(b.Sources, "kubelet-kubeconfig")
			}
			if !found {
				t.Errorf("%s: the kubelet's server %s is not bypassed from its kubeconfig: %+v", n.Name, vip, nr.Status.Bypass)
			}
		}
		drops := l.guardDrops()
		renewed := map[string]time.Time{}
		for _, n := range c.Nodes {
			renewed[n.Name] = l.leaseRenewed(n.Name)
		}
		// The kubelets renew their leases every 10 s and post status; a
		// kubelet cut off would miss two renewals in this window.
		for range 25 {
			for _, n := range c.Nodes {
				node, err := c.Kube.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
				if err != nil {
					t.Fatal(err)
				}
				for _, cond := range node.Status.Conditions {
					if cond.Type == corev1.NodeReady && cond.Status != corev1.ConditionTrue {
						t.Fatalf("%s is %s under the override: %s", n.Name, cond.Status, cond.Message)
					}
				}
			}
			time.Sleep(time.Second)
		}
		for _, n := range c.Nodes {
			if now := l.leaseRenewed(n.Name); !now.After(renewed[n.Name]) {
				t.Errorf("%s: its kubelet did not renew its lease in 25 s under the override (last %s)", n.Name, now)
			}
		}
		if d := l.guardDrops() - drops; d != 0 {
			t.Errorf("%d packets for the API server's port reached the gateways (and were dropped)", d)
		}
	})

	t.Run("failover under traffic", func(t *testing.T) {
		l.t = t
		tr := l.traffic(0, 9100)
		onSurvivor := map[int]bool{}
		for _, port := range tr.Ports {
			onSurvivor[port] = l.flowGateway(0, port, 9100) == gw3
		}
		time.Sleep(300 * time.Millisecond)
		if err := c.Net.SilenceGateway(1, true); err != nil {
			t.Fatal(err)
		}
		took := l.waitNexthops(0, gw3, 10*time.Second)
		// How fast is measured by BenchmarkFailover (test/agent); here,
		// that it happens under the kubelet, and what it costs the flows.
		t.Logf("gateway %s silenced: out of worker-0's route after %s", gw4, took.Round(time.Millisecond))
		time.Sleep(300 * time.Millisecond)
		if err := c.Net.SilenceGateway(1, false); err != nil {
			t.Fatal(err)
		}
		back := l.waitNexthops(0, gw3+","+gw4, 10*time.Second)
		t.Logf("gateway %s answers again: back after %s", gw4, back.Round(time.Millisecond))
		_, lost := tr.Finish()
		survivors := 0
		for port, n := range lost {
			if onSurvivor[port] {
				survivors++
				if n != 0 {
					t.Errorf("flow %d on the surviving gateway lost %d datagrams", port, n)
				}
			}
		}
		if survivors == 0 {
			t.Fatal("no flow hashed to the surviving gateway: the test proves nothing")
		}
		l.waitBothUp()
	})

	t.Run("rolling update under traffic: no loss, no kernel write", func(t *testing.T) {
		l.t = t
		ref := l.loadImage("lab-2")
		watch := l.watchKernel()
		flows := l.trafficFromEveryNode(9200)
		time.Sleep(500 * time.Millisecond)
		old := l.agentPods()
		begin := time.Now()
		l.install(ref)
		l.waitReplaced(old, ref)
		t.Logf("rolling update of 2 nodes: %s", time.Since(begin).Round(time.Millisecond))
		time.Sleep(time.Second)
		for i, tr := range flows {
			sent, lost := tr.Finish()
			var total, dropped int64
			for port := range sent {
				total += sent[port]
				dropped += lost[port]
			}
			t.Logf("%s: %d datagrams over %d flows across the update, %d lost", c.Nodes[i].Name, total, len(sent), dropped)
			if dropped != 0 {
				t.Errorf("%s lost %d of %d datagrams across the rolling update: %v", c.Nodes[i].Name, dropped, total, lost)
			}
		}
		if changes := watch(); len(changes) != 0 {
			t.Errorf("routes or rules changed during the rolling update (nothing did):\n%s", strings.Join(changes, "\n"))
		}
		l.checkNoWrites()
	})

	t.Run("rolling update with a dead gateway: nothing sent to it", func(t *testing.T) {
		l.t = t
		if err := c.Net.SilenceGateway(1, true); err != nil {
			t.Fatal(err)
		}
		defer c.Net.SilenceGateway(1, false)
		for i := range c.Nodes {
			l.waitNexthops(i, gw3, 10*time.Second)
		}
		l.eventually(10*time.Second, "NodeRoutings report the dead gateway", func() (bool, string) {
			for _, n := range c.Nodes {
				nr, err := c.Client.NetworkingV1alpha1().NodeRoutings().Get(ctx, n.Name, metav1.GetOptions{})
				if err != nil || nr.Status.Summary.GatewaysDown != 1 {
					return false, fmt.Sprintf("%s: %v %+v", n.Name, err, nr)
				}
			}
			return true, ""
		})
		ref := l.loadImage("lab-3")
		watch := l.watchKernel()
		flows := l.trafficFromEveryNode(9300)
		time.Sleep(500 * time.Millisecond)
		before, err := c.Net.ExternalPackets(1)
		if err != nil {
			t.Fatal(err)
		}
		old := l.agentPods()
		l.install(ref)
		l.waitReplaced(old, ref)
		// Past the new agents' first probes: a dead gateway put back into
		// use would have drawn traffic by now.
		time.Sleep(2 * time.Second)
		after, err := c.Net.ExternalPackets(1)
		if err != nil {
			t.Fatal(err)
		}
		for i, tr := range flows {
			_, lost := tr.Finish()
			for port, n := range lost {
				if n != 0 {
					t.Errorf("%s: flow %d lost %d datagrams (every flow has the live gateway)", c.Nodes[i].Name, port, n)
				}
			}
		}
		t.Logf("packets for the external host reaching the dead gateway %s across the update: %d", gw4, after-before)
		if after != before {
			t.Errorf("%d packets went to the dead gateway across the rolling update", after-before)
		}
		if changes := watch(); len(changes) != 0 {
			t.Errorf("routes or rules changed during the rolling update:\n%s", strings.Join(changes, "\n"))
		}
		l.checkNoWrites()
		for i := range c.Nodes {
			if got := l.nexthops(i); got != gw3 {
				t.Errorf("%s: after the update the route holds %q, want only %s", c.Nodes[i].Name, got, gw3)
			}
		}
	})

	t.Run("the kubernetes Service leads nowhere: the agents come back through the kubelet's server", func(t *testing.T) {
		l.t = t
		// The agents dial the kubernetes Service; kube-proxy now sends it to
		// an endpoint that does not answer (here nothing serves it; on a
		// single-NIC node, a moved endpoint the override takes to gateways
		// that drop it). Their way back is the kubelet's server, a VIP they
		// keep on main, with TLS still checking the Service's address.
		moved := cluster.APIVIPs[1]
		if err := c.SetKubernetesEndpoint(netip.AddrPortFrom(moved, 6443)); err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := c.SetKubernetesEndpoint(netip.AddrPortFrom(c.Net.ControlPlaneAddr, 6443)); err != nil {
				t.Error(err)
			}
		}()
		restart := time.Now()
		c.CP.StopAPIServer() // every agent loses its connection
		if err := c.CP.StartAPIServer(ctx); err != nil {
			t.Fatal(err)
		}
		back := time.Since(restart)
		begin := time.Now()
		route := &v1alpha1.Route{ObjectMeta: metav1.ObjectMeta{Name: "after-move"}, Spec: v1alpha1.RouteSpec{Destinations: []string{"192.0.2.64/26"}, Gateways: []string{gw3}}}
		if _, err := c.Client.NetworkingV1alpha1().Routes().Create(ctx, route, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		defer c.Client.NetworkingV1alpha1().Routes().Delete(ctx, route.Name, metav1.DeleteOptions{})
		l.eventually(2*time.Minute, "a Route created after the move applied on every node", func() (bool, string) {
			for _, n := range c.Nodes {
				nr, err := c.Client.NetworkingV1alpha1().NodeRoutings().Get(ctx, n.Name, metav1.GetOptions{})
				if err != nil {
					return false, err.Error()
				}
				applied := false
				for _, r := range nr.Status.Routes {
					applied = applied || r.Name == route.Name && r.Phase == v1alpha1.RouteApplied
				}
				if !applied {
					return false, fmt.Sprintf("%s: %+v", n.Name, nr.Status.Routes)
				}
			}
			return true, ""
		})
		t.Logf("the Service sent to %s, where nothing answers, and the API server restarted (ready again after %s): a Route created then applied on every node %s later (each Service dial given up after 5 s, then the kubelet's server)", moved, back.Round(time.Millisecond), time.Since(begin).Round(time.Millisecond))
	})
}

// loadImage builds the agent image under a new tag, loads it on every node
// and returns its reference: a new tag is what changes the DaemonSet.
func (l *lab) loadImage(tag string) string {
	l.t.Helper()
	ref := "localhost/routing-agent:" + tag
	archive, err := l.c.BuildAgentImage(ref)
	if err != nil {
		l.t.Fatal(err)
	}
	if err := l.c.LoadImage(archive); err != nil {
		l.t.Fatal(err)
	}
	l.images = append(l.images, ref)
	return ref
}

// install applies the manifests again with the image ref, as a user
// upgrading does.
// install applies the overlay with image ref, the startup taint component
// and the kubelet's kubeconfig mounted (the nodes keep it at EKS's path).
func (l *lab) install(ref string) {
	l.t.Helper()
	if err := l.c.Install(cluster.InstallOptions{Image: ref, Components: []string{"startup-taint"}, KubeletKubeconfig: kubenode.KubeconfigPath}); err != nil {
		l.t.Fatal(err)
	}
}

// startup is when, after some moment, a node's agent pod was first seen
// in the API and when its agent first said ready (/readyz: caches synced
// and the first apply done).
type startup struct{ created, ready time.Duration }

// waitAgentsReady polls every node for its agent pod and the agent's
// /readyz, every 20 ms, and returns when each happened after since.
func (l *lab) waitAgentsReady(since time.Time) []startup {
	l.t.Helper()
	times := make([]startup, len(l.c.Nodes))
	var wg sync.WaitGroup
	for i := range l.c.Nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			deadline := time.Now().Add(time.Minute)
			for time.Now().Before(deadline) {
				if times[i].created == 0 {
					if _, err := l.c.AgentPod(l.ctx, i); err == nil {
						times[i].created = time.Since(since)
					}
				}
				if code, _, err := l.c.AgentGet(i, "/readyz"); err == nil && code == 200 {
					times[i].ready = time.Since(since)
					return
				}
				time.Sleep(20 * time.Millisecond)
			}
		}()
	}
	wg.Wait()
	for i, r := range times {
		if r.ready == 0 {
			l.t.Fatalf("the agent on %s never became ready", l.c.Nodes[i].Name)
		}
	}
	return times
}

func (l *lab) agentPods() map[string]bool {
	l.t.Helper()
	pods, err := l.c.Kube.CoreV1().Pods(cluster.AgentNamespace).List(l.ctx, metav1.ListOptions{})
	if err != nil {
		l.t.Fatal(err)
	}
	names := map[string]bool{}
	for _, p := range pods.Items {
		names[p.Name] = true
	}
	return names
}

// waitReplaced waits until the rollout to ref is complete: no pod of old
// is left and every node runs a Ready pod of ref.
func (l *lab) waitReplaced(old map[string]bool, ref string) {
	l.t.Helper()
	l.eventually(2*time.Minute, "every agent pod replaced by one running "+ref, func() (bool, string) {
		pods, err := l.c.Kube.CoreV1().Pods(cluster.AgentNamespace).List(l.ctx, metav1.ListOptions{})
		if err != nil {
			return false, err.Error()
		}
		ready := 0
		var state []string
		for _, p := range pods.Items {
			state = append(state, fmt.Sprintf("%s %s %s", p.Name, p.Spec.Containers[0].Image, p.Status.Phase))
			if old[p.Name] {
				return false, strings.Join(state, "\n")
			}
			if p.Spec.Containers[0].Image == ref && podReady(&p) {
				ready++
			}
		}
		return ready == len(l.c.Nodes), strings.Join(state, "\n")
	})
	if err := l.c.WaitRollout(l.ctx, time.Minute); err != nil {
		l.t.Fatal(err)
	}
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// checkNoWrites: the current agents, new since the last rollout, found
// the kernel right and wrote nothing to it.
func (l *lab) checkNoWrites() {
	l.t.Helper()
	for i, n := range l.c.Nodes {
		_, body, err := l.c.AgentGet(i, "/metrics")
		if err != nil {
			l.t.Fatal(err)
		}
		for _, line := range strings.Split(body, "\n") {
			if strings.HasPrefix(line, "routing_agent_netlink_writes_total{") && !strings.HasSuffix(line, " 0") {
				l.t.Errorf("%s: the new agent wrote to the kernel: %s", n.Name, line)
			}
		}
	}
}

// watchKernel records every route and rule change on every node until the
// returned function is called, which returns them. (It listens to the
// kernel's route and rule notification groups: a change undone at once is
// caught too, which comparing dumps would miss.)
func (l *lab) watchKernel() func() []string {
	l.t.Helper()
	var mu sync.Mutex
	var changes []string
	done := make(chan struct{})
	var wg sync.WaitGroup
	for _, n := range l.c.Nodes {
		target, err := vnetns.GetFromName(n.NS)
		if err != nil {
			l.t.Fatal(err)
		}
		sock, err := nl.SubscribeAt(target, vnetns.None(), unix.NETLINK_ROUTE,
			unix.RTNLGRP_IPV4_ROUTE, unix.RTNLGRP_IPV6_ROUTE, unix.RTNLGRP_IPV4_RULE, unix.RTNLGRP_IPV6_RULE)
		target.Close()
		if err != nil {
			l.t.Fatal(err)
		}
		if err := sock.SetReceiveTimeout(&unix.Timeval{Usec: 100000}); err != nil {
			l.t.Fatal(err)
		}
		wg.Add(1)
		go func(name string) {
			defer wg.Done()
			defer sock.Close()
			for {
				select {
				case <-done:
					return
				default:
				}
				msgs, _, err := sock.Receive()
				if err != nil {
					continue // the receive timeout
				}
				for _, m := range msgs {
					kind := map[uint16]string{unix.RTM_NEWROUTE: "new route", unix.RTM_DELROUTE: "deleted route",
						unix.RTM_NEWRULE: "new rule", unix.RTM_DELRULE: "deleted rule"}[m.Header.Type]
					if kind == "" {
						continue
					}
					rt := nl.DeserializeRtMsg(m.Data)
					mu.Lock()
					changes = append(changes, fmt.Sprintf("%s: %s, table %d, protocol %d", name, kind, rt.Table, rt.Protocol))
					mu.Unlock()
				}
			}
		}(n.Name)
	}
	return func() []string {
		close(done)
		wg.Wait()
		mu.Lock()
		defer mu.Unlock()
		return changes
	}
}

// traffic starts 16 UDP flows from node i to the external host's port.
func (l *lab) traffic(i int, port uint16) *cluster.Traffic {
	l.t.Helper()
	tr, err := cluster.StartTraffic(l.c.Net, l.c.Nodes[i].NS, port, 16, 10*time.Millisecond)
	if err != nil {
		l.t.Fatal(err)
	}
	return tr
}

// trafficFromEveryNode starts 16 UDP flows from every node, node i's to
// the external host's port base+i.
func (l *lab) trafficFromEveryNode(base uint16) []*cluster.Traffic {
	l.t.Helper()
	var flows []*cluster.Traffic
	for i := range l.c.Nodes {
		flows = append(flows, l.traffic(i, base+uint16(i)))
	}
	return flows
}

// flowGateway says which gateway node i's kernel hashes a UDP flow to.
func (l *lab) flowGateway(i, sport, dport int) string {
	l.t.Helper()
	gw, err := l.c.FlowGateway(i, sport, dport)
	if err != nil {
		l.t.Fatal(err)
	}
	return gw
}

// nexthops lists the gateways of node i's default override route.
func (l *lab) nexthops(i int) string {
	l.t.Helper()
	gws, err := l.c.Nexthops(i, "default")
	if err != nil {
		l.t.Fatal(err)
	}
	return gws
}

func (l *lab) waitNexthops(i int, want string, limit time.Duration) time.Duration {
	l.t.Helper()
	begin := time.Now()
	for time.Since(begin) < limit {
		if l.nexthops(i) == want {
			return time.Since(begin)
		}
		time.Sleep(5 * time.Millisecond)
	}
	l.t.Fatalf("%s: gateways %q, want %q after %s", l.c.Nodes[i].Name, l.nexthops(i), want, limit)
	return 0
}

// waitBothUp waits until both gateways are back in every node's route.
func (l *lab) waitBothUp() {
	for i := range l.c.Nodes {
		l.waitNexthops(i, gw3+","+gw4, 15*time.Second)
	}
}

// listens says whether something in node i listens on address (ss).
func (l *lab) listens(i int, address string) bool {
	l.t.Helper()
	out, err := l.c.Net.Exec(l.c.Nodes[i].NS, "ss", "-Htln")
	if err != nil {
		l.t.Fatal(err)
	}
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) >= 4 && f[3] == address {
			return true
		}
	}
	return false
}

// createWorkload creates a plain pod (the sandbox image, which every node
// has) that tolerates nothing, and returns its name.
func (l *lab) createWorkload() string {
	l.t.Helper()
	l.eventually(time.Minute, "the default service account", func() (bool, string) {
		_, err := l.c.Kube.CoreV1().ServiceAccounts("default").Get(l.ctx, "default", metav1.GetOptions{})
		return err == nil, fmt.Sprint(err)
	})
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "workload", Namespace: "default"},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{
			Name: "app", Image: "registry.k8s.io/pause:3.10", ImagePullPolicy: corev1.PullNever,
		}}},
	}
	if _, err := l.c.Kube.CoreV1().Pods("default").Create(l.ctx, pod, metav1.CreateOptions{}); err != nil {
		l.t.Fatal(err)
	}
	return pod.Name
}

// checkTaintPolicy proves the startup taint's permission is as narrow as
// the admission policy makes it: with the token the kubelet would mount
// into worker-0's agent pod, the agent may not touch worker-1, nor change
// anything of worker-0 but its startup taint.
func (l *lab) checkTaintPolicy() {
	l.t.Helper()
	pod, err := l.c.AgentPod(l.ctx, 0)
	if err != nil {
		l.t.Fatal(err)
	}
	token, err := l.c.Kube.CoreV1().ServiceAccounts(cluster.AgentNamespace).CreateToken(l.ctx, "routing-agent", &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{
			BoundObjectRef: &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		l.t.Fatal(err)
	}
	cfg := rest.AnonymousClientConfig(l.c.CP.Config)
	cfg.BearerToken = token.Status.Token
	asAgent := kubernetes.NewForConfigOrDie(cfg)
	taint := fmt.Sprintf(`{"spec":{"taints":[{"key":%q,"effect":"NoSchedule"}]}}`, agent.DefaultStartupTaint)
	for _, tc := range []struct {
		what, node, patch string
	}{
		// Only the node check can refuse this one: nothing changes.
		{"patch another node", l.c.Nodes[1].Name, `{}`},
		{"taint another node", l.c.Nodes[1].Name, taint},
		{"label its own node", l.c.Nodes[0].Name, `{"metadata":{"labels":{"pool":"elsewhere"}}}`},
		{"add a taint to its own node", l.c.Nodes[0].Name, taint},
		{"cordon its own node", l.c.Nodes[0].Name, `{"spec":{"unschedulable":true}}`},
		{"give its own node a finalizer", l.c.Nodes[0].Name, `{"metadata":{"finalizers":["example.com/hold"]}}`},
		{"give its own node an owner", l.c.Nodes[0].Name, `{"metadata":{"ownerReferences":[{"apiVersion":"v1","kind":"Namespace","name":"default","uid":"00000000-0000-0000-0000-000000000000"}]}}`},
	} {
		_, err := asAgent.CoreV1().Nodes().Patch(l.ctx, tc.node, types.MergePatchType, []byte(tc.patch), metav1.PatchOptions{})
		if !apierrors.IsForbidden(err) {
			l.t.Errorf("the agent's token may %s (%s): err = %v", tc.what, tc.node, err)
		} else {
			l.t.Logf("the agent may not %s: %v", tc.what, err)
		}
	}
	// What it may do, it can: an unchanged patch of its own Node passes.
	if _, err := asAgent.CoreV1().Nodes().Patch(l.ctx, l.c.Nodes[0].Name, types.MergePatchType, []byte(`{}`), metav1.PatchOptions{}); err != nil {
		l.t.Errorf("the agent's token cannot patch its own Node: %v", err)
	}
}

// guardDrops counts what the gateways dropped for the API server.
func (l *lab) guardDrops() uint64 {
	n, err := l.c.Net.APIPortDrops()
	if err != nil {
		l.t.Fatal(err)
	}
	return n
}

// leaseRenewed is when node's kubelet last renewed its Lease.
func (l *lab) leaseRenewed(node string) time.Time {
	lease, err := l.c.Kube.CoordinationV1().Leases("kube-node-lease").Get(l.ctx, node, metav1.GetOptions{})
	if err != nil {
		l.t.Fatal(err)
	}
	if lease.Spec.RenewTime == nil {
		return time.Time{}
	}
	return lease.Spec.RenewTime.Time
}

func (l *lab) eventually(timeout time.Duration, what string, cond func() (bool, string)) {
	l.t.Helper()
	var detail string
	err := wait.PollUntilContextTimeout(l.ctx, 50*time.Millisecond, timeout, true, func(context.Context) (bool, error) {
		var ok bool
		ok, detail = cond()
		return ok, nil
	})
	if err != nil {
		l.t.Fatalf("%s: not within %s:\n%s", what, timeout, detail)
	}
}

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "test/install runs kubelets and containerd in network namespaces: run it as root (make test does)")
		os.Exit(1)
	}
	if err := cluster.RemoveStale(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(m.Run())
}
