package controlplane_test

import (
	"context"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"

	"github.com/routing-agent/routing-agent/pkg/lab/controlplane"
	"github.com/routing-agent/routing-agent/pkg/lab/netns"
)

func start(t *testing.T, opts controlplane.Options) *controlplane.ControlPlane {
	t.Helper()
	cp, err := controlplane.Start(context.Background(), opts)
	if err != nil {
		if cp != nil {
			t.Log(cp.Logs())
		}
		t.Fatalf("starting the control plane: %v", err)
	}
	t.Cleanup(cp.Stop)
	t.Logf("kube-apiserver start-to-ready: %s", cp.Ready)
	return cp
}

// TestLoopbackLifecycle: the control plane serves, enforces RBAC for
// minted identities, survives an API server restart with its data (etcd
// keeps running), and Stop leaves no process behind.
func TestLoopbackLifecycle(t *testing.T) {
	ctx := context.Background()
	cp := start(t, controlplane.Options{})
	admin := kubernetes.NewForConfigOrDie(cp.Config)

	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "survives", Namespace: "default"}}
	if _, err := admin.CoreV1().ConfigMaps("default").Create(ctx, cm, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	_, cfg, err := cp.KubeconfigFor("system:serviceaccount:routing-agent:nobody")
	if err != nil {
		t.Fatal(err)
	}
	_, err = kubernetes.NewForConfigOrDie(cfg).CoreV1().ConfigMaps("default").List(ctx, metav1.ListOptions{})
	if !apierrors.IsForbidden(err) {
		t.Errorf("an identity without RBAC bindings listed configmaps (err=%v); RBAC is not enforced", err)
	}

	out, err := cp.Kubectl("get", "configmap", "survives", "-n", "default", "-o", "name").CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "configmap/survives" {
		t.Errorf("kubectl get: %v: %s", err, out)
	}

	cp.StopAPIServer()
	if _, err := admin.CoreV1().ConfigMaps("default").Get(ctx, "survives", metav1.GetOptions{}); err == nil {
		t.Fatal("the API server still answers after StopAPIServer")
	}
	if err := cp.StartAPIServer(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CoreV1().ConfigMaps("default").Get(ctx, "survives", metav1.GetOptions{}); err != nil {
		t.Errorf("after the restart: %v", err)
	}

	pids := cp.PIDs()
	if len(pids) != 2 {
		t.Fatalf("want 2 processes (etcd, kube-apiserver), have %v", pids)
	}
	cp.Stop()
	for _, pid := range pids {
		if err := exec.Command("kill", "-0", pidString(pid)).Run(); err == nil {
			t.Errorf("process %d still runs after Stop", pid)
		}
	}
	if _, err := os.Stat(cp.Dir); !os.IsNotExist(err) {
		t.Errorf("work dir %s remains after Stop", cp.Dir)
	}
}

// TestInNetworkNamespace: the control plane runs inside a namespace on a
// documentation-range address, publishes it in default/kubernetes as a real
// one does, and is reachable through the client config and kubectl.
func TestInNetworkNamespace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test creates network namespaces and must run as root (make test runs it as root)")
	}
	if err := netns.RemoveStale(); err != nil {
		t.Fatal(err)
	}
	ns := netns.Name("cp")
	if err := netns.Add(ns); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := netns.Delete(ns); err != nil {
			t.Error(err)
		}
	})
	for _, args := range [][]string{
		{"-n", ns, "link", "add", "pub0", "type", "veth", "peer", "name", "pub1"}, // no dummy driver on every kernel
		{"-n", ns, "addr", "add", "203.0.113.10/24", "dev", "pub0"},
		{"-n", ns, "link", "set", "pub0", "up"},
		{"-n", ns, "link", "set", "pub1", "up"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v: %s", args, err, out)
		}
	}

	cp := start(t, controlplane.Options{NetNS: ns, Address: "203.0.113.10"})
	if cp.Server != "https://203.0.113.10:6443" {
		t.Errorf("Server = %s", cp.Server)
	}
	client := kubernetes.NewForConfigOrDie(cp.Config)
	// The API server's endpoint reconciler publishes itself shortly after
	// it is ready.
	var addresses []string
	err := wait.PollUntilContextTimeout(context.Background(), 200*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		slices, err := client.DiscoveryV1().EndpointSlices("default").List(ctx, metav1.ListOptions{LabelSelector: "kubernetes.io/service-name=kubernetes"})
		if err != nil {
			return false, err
		}
		addresses = nil
		for _, s := range slices.Items {
			for _, e := range s.Endpoints {
				addresses = append(addresses, e.Addresses...)
			}
		}
		return len(addresses) > 0, nil
	})
	if err != nil || len(addresses) != 1 || addresses[0] != "203.0.113.10" {
		t.Errorf("default/kubernetes EndpointSlice addresses = %v (%v), want [203.0.113.10]", addresses, err)
	}
	out, err := cp.Kubectl("get", "--raw", "/readyz").CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "ok" {
		t.Errorf("kubectl in the namespace: %v: %s", err, out)
	}
}

func pidString(pid int) string { return strconv.Itoa(pid) }
