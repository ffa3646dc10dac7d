package controlplane_test

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/routing-agent/routing-agent/pkg/lab/controlplane"
	"github.com/routing-agent/routing-agent/pkg/lab/dnsserver"
	"github.com/routing-agent/routing-agent/pkg/lab/netns"
	"github.com/routing-agent/routing-agent/pkg/lab/topology"
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
// one does, and is reachable through the client config and kubectl; its
// serving certificate carries the extra names a load balancer's VIP and a
// DNS name need, and kubeconfigs naming those verify against it.
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

	cp := start(t, controlplane.Options{
		NetNS:        ns,
		Address:      "203.0.113.10",
		ServingIPs:   []net.IP{net.ParseIP("198.51.100.100")},
		ServingNames: []string{"api.lab.test"},
	})
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

	t.Run("serving names", func(t *testing.T) {
		data, err := os.ReadFile(filepath.Join(cp.Dir, "pki", "apiserver.crt"))
		if err != nil {
			t.Fatal(err)
		}
		block, _ := pem.Decode(data)
		if block == nil {
			t.Fatalf("no PEM block in apiserver.crt: %q", data)
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		var ips []string
		for _, ip := range cert.IPAddresses {
			ips = append(ips, ip.String())
		}
		for _, want := range []string{"203.0.113.10", "127.0.0.1", "10.96.0.1", "198.51.100.100"} {
			if !slices.Contains(ips, want) {
				t.Errorf("serving certificate IP SANs %v lack %s", ips, want)
			}
		}
		for _, want := range []string{"localhost", "kubernetes.default.svc", "api.lab.test"} {
			if !slices.Contains(cert.DNSNames, want) {
				t.Errorf("serving certificate DNS SANs %v lack %s", cert.DNSNames, want)
			}
		}
	})

	// A client that reaches the API server by the VIP or the DNS name:
	// here its connections go to the API server's own address, as a load
	// balancer's or a resolver's would lead them, while TLS checks the
	// name in the URL.
	t.Run("kubeconfig at another server", func(t *testing.T) {
		for _, c := range []struct {
			server string
			ok     bool
		}{
			{"https://198.51.100.100:6443", true},
			{"https://api.lab.test:6443", true},
			{"https://other.lab.test:6443", false}, // not in the certificate
		} {
			path, err := cp.KubeconfigAt(c.server, "lab-vip-admin", "system:masters")
			if err != nil {
				t.Fatal(err)
			}
			raw, err := clientcmd.LoadFromFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if got := raw.Clusters[raw.Contexts[raw.CurrentContext].Cluster].Server; got != c.server {
				t.Errorf("KubeconfigAt(%s) wrote server %s", c.server, got)
			}
			cfg, err := clientcmd.BuildConfigFromFlags("", path)
			if err != nil {
				t.Fatal(err)
			}
			dial := netns.Dialer(ns)
			cfg.Dial = func(ctx context.Context, network, _ string) (net.Conn, error) {
				return dial(ctx, network, "203.0.113.10:6443")
			}
			cfg.Timeout = 10 * time.Second
			_, err = kubernetes.NewForConfigOrDie(cfg).CoreV1().Namespaces().Get(context.Background(), "default", metav1.GetOptions{})
			switch {
			case c.ok && err != nil:
				t.Errorf("as lab-vip-admin via %s: %v", c.server, err)
			case !c.ok && (err == nil || !strings.Contains(fmt.Sprint(err), "x509")):
				t.Errorf("via %s, a name the certificate lacks: %v, want an x509 error", c.server, err)
			case !c.ok:
				t.Logf("via %s: %v", c.server, err)
			}
		}
		if _, err := cp.KubeconfigAt("", "nobody"); err == nil {
			t.Error("KubeconfigAt with no server succeeded")
		}
	})
}

// TestBehindLoadBalancer puts the lab's pieces together: the control plane
// on a topology lab's control plane host, a load balancer VIP for it on the
// router and a DNS name for the VIP on the lab's DNS server; a client on a
// node resolves the name there and reaches the API server through the VIP,
// until the VIP goes.
func TestBehindLoadBalancer(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test creates network namespaces and must run as root (make test runs it as root)")
	}
	if err := netns.RemoveStale(); err != nil {
		t.Fatal(err)
	}
	l, err := topology.New(topology.Options{Purpose: "cplb", ControlPlane: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Error(err)
		}
	})
	vip := netip.MustParseAddr("198.51.100.100")
	dns, err := dnsserver.Start(l.External, netip.AddrPortFrom(l.ExternalDNS, 53))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dns.Close() })
	dns.Set("api.lab.test", vip)
	if err := l.AddAPIVIP(vip); err != nil {
		t.Fatal(err)
	}
	cp := start(t, controlplane.Options{
		NetNS:        l.ControlPlane,
		Address:      l.ControlPlaneAddr.String(),
		ServingIPs:   []net.IP{vip.AsSlice()},
		ServingNames: []string{"api.lab.test"},
	})

	// The node's view: names resolved by the lab's DNS server, connections
	// opened in the node's namespace.
	dial := netns.Dialer(l.Node)
	resolver := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		return dial(ctx, network, netip.AddrPortFrom(l.ExternalDNS, 53).String())
	}}
	nodeDial := func(ctx context.Context, network, address string) (net.Conn, error) {
		host, port, err := net.SplitHostPort(address)
		if err != nil {
			return nil, err
		}
		ips, err := resolver.LookupNetIP(ctx, "ip4", host)
		if err != nil {
			return nil, err
		}
		return dial(ctx, network, net.JoinHostPort(ips[0].String(), port))
	}
	get := func(server string) error {
		path, err := cp.KubeconfigAt(server, "lab-node-admin", "system:masters")
		if err != nil {
			t.Fatal(err)
		}
		cfg, err := clientcmd.BuildConfigFromFlags("", path)
		if err != nil {
			t.Fatal(err)
		}
		cfg.Dial, cfg.Timeout = nodeDial, 3*time.Second
		_, err = kubernetes.NewForConfigOrDie(cfg).CoreV1().Namespaces().Get(context.Background(), "default", metav1.GetOptions{})
		return err
	}
	for _, server := range []string{"https://api.lab.test:6443", "https://198.51.100.100:6443"} {
		if err := get(server); err != nil {
			t.Errorf("from the node via %s: %v", server, err)
		}
	}
	if dns.Queries() == 0 {
		t.Error("the DNS server received no query")
	}
	if err := l.RemoveAPIVIP(vip); err != nil {
		t.Fatal(err)
	}
	if err := get("https://api.lab.test:6443"); err == nil {
		t.Error("the API server answered through a removed VIP")
	} else {
		t.Logf("after RemoveAPIVIP: %v", err)
	}
}

func pidString(pid int) string { return strconv.Itoa(pid) }
