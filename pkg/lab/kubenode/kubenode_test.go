package kubenode_test

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"

	"github.com/routing-agent/routing-agent/pkg/lab/controlplane"
	"github.com/routing-agent/routing-agent/pkg/lab/kubenode"
	"github.com/routing-agent/routing-agent/pkg/lab/netns"
	"github.com/routing-agent/routing-agent/pkg/lab/topology"
	"github.com/routing-agent/routing-agent/pkg/ociimage"
)

// TestNodeRunsHostNetworkPodsInItsNamespace: a lab node's kubelet
// registers its Node with labels and taints and gets Ready; the scheduler
// places a host-network pod there and containerd runs it inside the node's
// network namespace, not the machine's; Stop leaves no process, cgroup or
// file behind.
func TestNodeRunsHostNetworkPodsInItsNamespace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test builds network namespaces and runs a kubelet: it must run as root (make test does)")
	}
	if err := netns.RemoveStale(); err != nil {
		t.Fatal(err)
	}
	if err := kubenode.RemoveStale(); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	lab, err := topology.New(topology.Options{Purpose: "kubenode", ControlPlane: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lab.Close() })
	cp, err := controlplane.Start(ctx, controlplane.Options{NetNS: lab.ControlPlane, Address: lab.ControlPlaneAddr.String(), Controllers: true})
	if err != nil {
		if cp != nil {
			t.Log(cp.Logs())
		}
		t.Fatal(err)
	}
	t.Cleanup(cp.Stop)
	kube := kubernetes.NewForConfigOrDie(cp.Config)

	dir := t.TempDir()
	pause := filepath.Join(dir, "pause.tar")
	img, err := ociimage.Build(ociimage.Spec{Files: []ociimage.File{{Path: "/pause", Source: filepath.Join(os.Getenv(controlplane.BinDirEnv), "pause")}}, Entrypoint: []string{"/pause"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := ociimage.WriteArchive(pause, kubenode.SandboxImage, img); err != nil {
		t.Fatal(err)
	}
	kubeconfig, _, err := cp.KubeconfigFor("system:node:worker-0", "system:nodes")
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	cgroupRoot := "/" + netns.Name("kubenode") + "/worker-0"
	t.Cleanup(func() {
		if err := kubenode.RemoveCgroupTree(filepath.Dir(cgroupRoot)); err != nil {
			t.Error(err)
		}
	})
	nodeDir := filepath.Join(dir, "worker-0")
	begin := time.Now()
	node, err := kubenode.Start(ctx, kubenode.Options{
		BinDir: os.Getenv(controlplane.BinDirEnv), NetNS: lab.Node, Name: "worker-0", NodeIP: lab.NodeVPC,
		Labels:  map[string]string{"pool": "egress"},
		Taints:  []corev1.Taint{{Key: "example.com/startup", Effect: corev1.TaintEffectNoSchedule}},
		PodCIDR: netip.MustParsePrefix("10.244.0.0/24"), Kubeconfig: kubeconfig, ClientCAFile: cp.CAFile,
		ResolvConf: "nameserver 198.51.100.53\n", Dir: nodeDir, CgroupRoot: cgroupRoot, Output: &logs,
	})
	if err != nil {
		t.Fatalf("%v\n%s", err, logs.String())
	}
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			node.Stop()
		}
		if t.Failed() {
			t.Logf("node output:\n%s", logs.String())
		}
	})
	if err := node.ImportImage(pause); err != nil {
		t.Fatal(err)
	}

	var got *corev1.Node
	err = wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 2*time.Minute, true, func(ctx context.Context) (bool, error) {
		got, err = kube.CoreV1().Nodes().Get(ctx, "worker-0", metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		for _, c := range got.Status.Conditions {
			if c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue {
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("Node worker-0 not Ready: %+v", got)
	}
	t.Logf("kubelet start to Node Ready: %s", time.Since(begin).Round(time.Millisecond))
	if got.Labels["pool"] != "egress" || len(got.Spec.Taints) == 0 || got.Spec.Taints[0].Key != "example.com/startup" {
		t.Errorf("Node registered with labels %v, taints %v", got.Labels, got.Spec.Taints)
	}
	if got.Status.Addresses[0].Address != lab.NodeVPC.String() {
		t.Errorf("Node addresses %v, want InternalIP %s", got.Status.Addresses, lab.NodeVPC)
	}

	// A host-network pod in a privileged namespace (the lab's default
	// Pod Security level is baseline), tolerating the startup taint.
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "hostnet", Labels: map[string]string{"pod-security.kubernetes.io/enforce": "privileged"}}}
	if _, err := kube.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// The controller manager gives the namespace its default service
	// account, which admission wants before any pod.
	err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		_, err := kube.CoreV1().ServiceAccounts("hostnet").Get(ctx, "default", metav1.GetOptions{})
		return err == nil, nil
	})
	if err != nil {
		t.Fatal("no default service account in namespace hostnet")
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "sleeper", Namespace: "hostnet"},
		Spec: corev1.PodSpec{
			HostNetwork: true,
			Tolerations: []corev1.Toleration{{Operator: corev1.TolerationOpExists}},
			Containers:  []corev1.Container{{Name: "pause", Image: kubenode.SandboxImage, ImagePullPolicy: corev1.PullNever}},
		},
	}
	if _, err := kube.CoreV1().Pods("hostnet").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	err = wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		pod, err = kube.CoreV1().Pods("hostnet").Get(ctx, "sleeper", metav1.GetOptions{})
		return err == nil && pod.Status.Phase == corev1.PodRunning, nil
	})
	if err != nil {
		t.Fatalf("pod not running: %+v", pod.Status)
	}
	if pod.Spec.NodeName != "worker-0" || pod.Status.PodIP != lab.NodeVPC.String() {
		t.Errorf("pod on %q with IP %q, want worker-0 and %s", pod.Spec.NodeName, pod.Status.PodIP, lab.NodeVPC)
	}

	// The pod's processes share the node's network namespace.
	nodeNS, err := os.Stat(filepath.Join("/run/netns", lab.Node))
	if err != nil {
		t.Fatal(err)
	}
	var pauses []int
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		cmdline, _ := os.ReadFile(p)
		if string(bytes.TrimRight(cmdline, "\x00")) != "/pause" {
			continue
		}
		pid, _ := strconv.Atoi(strings.Split(p, "/")[2])
		cgroup, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
		if strings.Contains(string(cgroup), cgroupRoot+"/") {
			pauses = append(pauses, pid)
		}
	}
	if len(pauses) < 2 { // the sandbox and the container
		t.Fatalf("found %d pause processes of the node, want 2", len(pauses))
	}
	for _, pid := range pauses {
		ns, err := os.Stat(fmt.Sprintf("/proc/%d/ns/net", pid))
		if err != nil {
			t.Fatal(err)
		}
		if !os.SameFile(ns, nodeNS) {
			t.Errorf("pause process %d is not in the node's network namespace", pid)
		}
	}

	pids := append(pauses, 0)
	stopped = true
	if err := node.Stop(); err != nil {
		t.Error(err)
	}
	for _, pid := range pids[:len(pids)-1] {
		if alive(pid) {
			t.Errorf("process %d survives Stop", pid)
		}
	}
	if _, err := os.Stat(nodeDir); !os.IsNotExist(err) {
		t.Errorf("%s survives Stop", nodeDir)
	}
	for _, hierarchy := range []string{"/sys/fs/cgroup", "/sys/fs/cgroup/pids", "/sys/fs/cgroup/memory"} {
		if _, err := os.Stat(filepath.Join(hierarchy, cgroupRoot)); !os.IsNotExist(err) {
			t.Errorf("cgroup %s survives Stop in %s", cgroupRoot, hierarchy)
		}
	}
}

// alive says whether pid runs: a killed process whose new parent (init,
// after its shim died) has not reaped it yet is a zombie, not alive.
func alive(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
	return len(fields) > 0 && fields[0] != "Z"
}
