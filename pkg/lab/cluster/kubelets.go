package cluster

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"sigs.k8s.io/yaml"

	"github.com/routing-agent/routing-agent/pkg/lab/kubenode"
)

// KubernetesService is the ClusterIP the API server gives the kubernetes
// Service (the first of the lab's 10.96.0.0/16): what in-cluster clients,
// the agent among them, dial.
var KubernetesService = netip.MustParseAddr("10.96.0.1")

// startKubelets starts every node's containerd and kubelet, loads the pod
// sandbox image, programs the kubernetes Service and waits until every
// Node is Ready.
func (c *Cluster) startKubelets(ctx context.Context) error {
	pause, err := c.pauseArchive()
	if err != nil {
		return err
	}
	for _, n := range c.Nodes {
		kubeconfig, err := c.kubeconfigFor(c.opts.KubeletServer, "system:node:"+n.Name, "system:nodes")
		if err != nil {
			return err
		}
		n.Kubelet, err = kubenode.Start(ctx, kubenode.Options{
			BinDir:       c.opts.BinDir,
			NetNS:        n.NS,
			Name:         n.Name,
			NodeIP:       n.VPC,
			Labels:       n.Labels,
			Taints:       c.opts.StartupTaints,
			PodCIDR:      netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(n.Index), 0}), 24),
			Kubeconfig:   kubeconfig,
			ClientCAFile: c.CP.CAFile,
			ResolvConf:   c.opts.ResolvConf,
			Dir:          filepath.Join(c.Dir, "nodes", n.Name),
			CgroupRoot:   c.cgroupRoot + "/" + n.Name,
			Output:       c.log,
		})
		if err != nil {
			return err
		}
		if err := n.Kubelet.ImportImage(pause); err != nil {
			return err
		}
		if err := c.kubeProxy(n, netip.AddrPortFrom(c.Net.ControlPlaneAddr, 6443), false); err != nil {
			return err
		}
	}
	return c.WaitNodesReady(ctx, 2*time.Minute)
}

// SetKubernetesEndpoint re-programs every node's kube-proxy rules to send
// the kubernetes Service to endpoint, as kube-proxy does once it has seen
// the API server's endpoint move.
func (c *Cluster) SetKubernetesEndpoint(endpoint netip.AddrPort) error {
	for _, n := range c.Nodes {
		if err := c.kubeProxy(n, endpoint, true); err != nil {
			return err
		}
	}
	return nil
}

// kubeProxy does for node n what kube-proxy would for the one Service the
// lab needs, the API server's: DNAT of KubernetesService:443 to its
// endpoint, for the node's own connections and its pods', and masquerade
// of what was DNATed, marked with kube-proxy's masquerade bit 0x4000 as
// kube-proxy marks it. replace deletes the rules made before, in the same
// nft transaction.
func (c *Cluster) kubeProxy(n *Node, endpoint netip.AddrPort, replace bool) error {
	dnat := fmt.Sprintf("ip daddr %s tcp dport 443 meta mark set meta mark | 0x4000 dnat to %s", KubernetesService, endpoint)
	prefix := ""
	if replace {
		prefix = "delete table ip lab-kube-proxy\n"
	}
	rules := prefix + fmt.Sprintf(`table ip lab-kube-proxy {
	chain output {
		type nat hook output priority -100; policy accept;
		%[1]s
	}
	chain prerouting {
		type nat hook prerouting priority -100; policy accept;
		%[1]s
	}
	chain postrouting {
		type nat hook postrouting priority 100; policy accept;
		meta mark & 0x4000 == 0x4000 masquerade
	}
}
`, dnat)
	path := filepath.Join(c.Dir, "kube-proxy-"+n.Name+".nft")
	if err := os.WriteFile(path, []byte(rules), 0o644); err != nil {
		return err
	}
	if out, err := c.Net.Exec(n.NS, "nft", "-f", path); err != nil {
		return fmt.Errorf("cluster: kube-proxy rules on %s: %w: %s", n.Name, err, out)
	}
	return nil
}

// WaitNodesReady waits until every Node reports Ready.
func (c *Cluster) WaitNodesReady(ctx context.Context, timeout time.Duration) error {
	var notReady []string
	err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		notReady = nil
		for _, n := range c.Nodes {
			node, err := c.Kube.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			if err != nil || !nodeReady(node) {
				notReady = append(notReady, n.Name)
			}
		}
		return len(notReady) == 0, nil
	})
	if err != nil {
		return fmt.Errorf("cluster: nodes %v not Ready within %s", notReady, timeout)
	}
	return nil
}

func nodeReady(node *corev1.Node) bool {
	for _, cond := range node.Status.Conditions {
		if cond.Type == corev1.NodeReady {
			return cond.Status == corev1.ConditionTrue
		}
	}
	return false
}

// InstallOptions say how to install the agent from manifests/.
type InstallOptions struct {
	// Image is the agent image (loaded with LoadImage), replacing
	// ImageName through kustomize's images:, as a user points the
	// manifests at their registry.
	Image string
	// Components are kustomize components of manifests/components to add,
	// e.g. "startup-taint".
	Components []string
	// Args are extra agent arguments, appended to the DaemonSet's.
	Args []string
	// KubeletKubeconfig, a path of the nodes, is mounted into the agent
	// pods (read-only, under /host) and passed as --kubelet-kubeconfig, as
	// a user on a distribution that keeps it outside /etc/kubernetes does.
	KubeletKubeconfig string
}

// Install applies manifests/ the way the README tells users to: an overlay
// that names the image, applied with `kubectl apply -k`. It returns once
// kubectl has applied it; WaitRollout waits for the agents.
func (c *Cluster) Install(opts InstallOptions) error {
	dir := filepath.Join(c.Dir, "install")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	kustomization, err := c.overlay(dir, opts)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), kustomization, 0o644); err != nil {
		return err
	}
	if out, err := c.Kubectl("apply", "--server-side", "-k", dir).CombinedOutput(); err != nil {
		return fmt.Errorf("cluster: kubectl apply -k manifests: %v: %s", err, out)
	}
	return nil
}

// overlay is the kustomization a user writes next to the manifests.
func (c *Cluster) overlay(dir string, opts InstallOptions) ([]byte, error) {
	manifests, err := filepath.Rel(dir, filepath.Join(c.opts.Repo, "manifests"))
	if err != nil {
		return nil, err
	}
	name, tag, ok := strings.Cut(opts.Image, ":")
	if !ok || strings.Contains(tag, "/") {
		return nil, fmt.Errorf("cluster: image %q needs an explicit tag", opts.Image)
	}
	k := map[string]any{
		"apiVersion": "kustomize.config.k8s.io/v1beta1",
		"kind":       "Kustomization",
		"resources":  []string{manifests},
		"images":     []map[string]string{{"name": ImageName, "newName": name, "newTag": tag}},
	}
	var components []string
	for _, comp := range opts.Components {
		components = append(components, filepath.Join(manifests, "components", comp))
	}
	if len(components) > 0 {
		k["components"] = components
	}
	var ops []map[string]any
	for _, arg := range opts.Args {
		ops = append(ops, map[string]any{"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": arg})
	}
	if path := opts.KubeletKubeconfig; path != "" {
		ops = append(ops,
			map[string]any{"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": "--kubelet-kubeconfig=" + path},
			map[string]any{"op": "add", "path": "/spec/template/spec/volumes/-", "value": map[string]any{
				"name": "kubelet-kubeconfig", "hostPath": map[string]string{"path": path, "type": "File"}}},
			map[string]any{"op": "add", "path": "/spec/template/spec/containers/0/volumeMounts/-", "value": map[string]any{
				"name": "kubelet-kubeconfig", "mountPath": "/host" + path, "readOnly": true}})
	}
	if len(ops) > 0 {
		patch, err := yaml.Marshal(ops)
		if err != nil {
			return nil, err
		}
		k["patches"] = []map[string]any{{
			"target": map[string]string{"kind": "DaemonSet", "name": "routing-agent"},
			"patch":  string(patch),
		}}
	}
	return yaml.Marshal(k)
}

// AgentNamespace and AgentDaemonSet are where manifests/ installs the agent.
const (
	AgentNamespace = "routing-agent"
	AgentDaemonSet = "routing-agent"
)

// WaitRollout waits until the DaemonSet runs its current template, ready,
// on every node.
func (c *Cluster) WaitRollout(ctx context.Context, timeout time.Duration) error {
	var ds *appsv1.DaemonSet
	err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		var err error
		ds, err = c.Kube.AppsV1().DaemonSets(AgentNamespace).Get(ctx, AgentDaemonSet, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		s := ds.Status
		return s.ObservedGeneration >= ds.Generation && s.DesiredNumberScheduled == int32(len(c.Nodes)) &&
			s.UpdatedNumberScheduled == s.DesiredNumberScheduled && s.NumberReady == s.DesiredNumberScheduled &&
			s.NumberUnavailable == 0, nil
	})
	if err != nil {
		status := "no DaemonSet"
		if ds != nil {
			status = fmt.Sprintf("%+v", ds.Status)
		}
		return fmt.Errorf("cluster: the agent DaemonSet did not roll out within %s: %s\n%s", timeout, status, c.AgentPodReport(ctx))
	}
	return nil
}

// AgentPod returns the agent pod on node i (the newest, during a rollout).
func (c *Cluster) AgentPod(ctx context.Context, i int) (*corev1.Pod, error) {
	pods, err := c.Kube.CoreV1().Pods(AgentNamespace).List(ctx, metav1.ListOptions{
		LabelSelector: "app.kubernetes.io/name=routing-agent",
		FieldSelector: "spec.nodeName=" + c.Nodes[i].Name,
	})
	if err != nil {
		return nil, err
	}
	var newest *corev1.Pod
	for j := range pods.Items {
		p := &pods.Items[j]
		if newest == nil || p.CreationTimestamp.After(newest.CreationTimestamp.Time) {
			newest = p
		}
	}
	if newest == nil {
		return nil, fmt.Errorf("cluster: no agent pod on %s", c.Nodes[i].Name)
	}
	return newest, nil
}

// AgentPodReport describes every agent pod and the logs of its node's
// agents: what to look at when an install does not come up.
func (c *Cluster) AgentPodReport(ctx context.Context) string {
	var b strings.Builder
	pods, err := c.Kube.CoreV1().Pods(AgentNamespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		return err.Error()
	}
	for _, p := range pods.Items {
		fmt.Fprintf(&b, "pod %s on %q: %s", p.Name, p.Spec.NodeName, p.Status.Phase)
		for _, cs := range p.Status.ContainerStatuses {
			fmt.Fprintf(&b, " ready=%v restarts=%d state=%+v", cs.Ready, cs.RestartCount, cs.State)
		}
		b.WriteString("\n")
	}
	events, _ := c.Kube.CoreV1().Events(AgentNamespace).List(ctx, metav1.ListOptions{})
	if events != nil {
		for _, e := range events.Items {
			if e.Type != corev1.EventTypeNormal {
				fmt.Fprintf(&b, "event %s %s: %s\n", e.InvolvedObject.Name, e.Reason, e.Message)
			}
		}
	}
	for _, n := range c.Nodes {
		if n.Kubelet != nil {
			b.WriteString(n.Kubelet.PodLogs(AgentNamespace, ""))
		}
	}
	return b.String()
}
