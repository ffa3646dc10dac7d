// Package cluster builds the lab cluster that `make demo`, the end-to-end
// tests and the real-node tests share: a simulated cloud VPC in network
// namespaces (pkg/lab/topology), a real control plane on its public network
// (pkg/lab/controlplane) with the product's CRDs and RBAC installed from
// manifests/, and worker nodes of one of two kinds:
//
//   - Agent processes (the default): the lab registers the Node objects
//     and runs the routing-agent binary in each node's namespace as the
//     agent's service account. Fast to start and to restart, for tests of
//     the agent's behaviour.
//   - Kubelets: every node runs a real kubelet with containerd and runc
//     (pkg/lab/kubenode) that registers its own Node; the control plane
//     adds the controller manager and the scheduler, and the agent is
//     installed as users install it, `kubectl apply -k` of manifests/ with
//     an image override (Install).
//
// Everything is torn down by Close, also after a failed New; what a killed
// run leaves behind (namespaces, cgroups) is removed by the next New.
package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/routing-agent/routing-agent/generated/clientset/versioned"
	"github.com/routing-agent/routing-agent/pkg/lab/controlplane"
	"github.com/routing-agent/routing-agent/pkg/lab/dnsserver"
	"github.com/routing-agent/routing-agent/pkg/lab/kubenode"
	"github.com/routing-agent/routing-agent/pkg/lab/netns"
	"github.com/routing-agent/routing-agent/pkg/lab/topology"
)

// AgentIdentity is the agent's service account as the API server sees it;
// agent processes run with a client certificate for it, so the RBAC of
// manifests/ is what they get.
const AgentIdentity = "system:serviceaccount:routing-agent:routing-agent"

// The lab's API load balancer: APIName resolves, on the lab's DNS server,
// to the first of APIVIPs, and the router forwards TCP to that VIP's port
// 6443 to the API server; tests move the name and the VIPs. The API
// server's certificate holds the name and every VIP.
const APIName = "api.lab.test"

var APIVIPs = []netip.Addr{
	netip.MustParseAddr("198.51.100.100"), netip.MustParseAddr("198.51.100.101"),
	netip.MustParseAddr("198.51.100.102"), netip.MustParseAddr("198.51.100.103"),
}

// NodeSpec names a worker and gives its labels.
type NodeSpec struct {
	Name   string
	Labels map[string]string
}

// Options choose the cluster.
type Options struct {
	// Topology lays out the VPC; a control plane host is always added.
	Topology topology.Options
	// Nodes names the workers, one per topology node; default
	// worker-<i> labelled pool=egress.
	Nodes []NodeSpec
	// Kubelets makes the workers real kubelets (see the package comment).
	Kubelets bool
	// StartupTaints are taints the kubelets register their Nodes with,
	// such as the agent's startup taint (agent.DefaultStartupTaint).
	StartupTaints []corev1.Taint
	// Repo is the routing-agent repository (manifests/, the agent's
	// source); default: the one this package was built from.
	Repo string
	// BinDir holds the lab tools (hack/build-lab-tools.sh); default
	// $LAB_BIN_DIR.
	BinDir string
	// ResolvConf is every node's /etc/resolv.conf; default the lab's DNS
	// server, 198.51.100.53 (DNS).
	ResolvConf string
	// KubeletServer and AgentServer are the API server URLs in the
	// kubelets' and the agent processes' kubeconfigs; default the control
	// plane's own address (on the nodes' network), or e.g.
	// "https://"+APIName+":6443", or a VIP of APIVIPs: through the lab's
	// load balancer, beyond the nodes' default route.
	KubeletServer, AgentServer string
	// Log receives the lab daemons' output (control plane, containerd,
	// kubelets); default files in the cluster's directory.
	Log io.Writer
}

// Cluster is a running lab cluster.
type Cluster struct {
	Net    *topology.Lab
	CP     *controlplane.ControlPlane
	Client versioned.Interface
	Kube   kubernetes.Interface
	// DNS is the lab's DNS server, on the external host at
	// Net.ExternalDNS; it knows APIName.
	DNS *dnsserver.Server
	// Nodes are the workers, in topology order.
	Nodes []*Node
	// Dir holds the cluster's files: binaries, images, kubeconfigs, logs.
	Dir string

	opts       Options
	cgroupRoot string
	log        io.Writer
	logFile    *os.File
	closeOnce  sync.Once
	closeErr   error
	agentBin   string
	images     []string
}

// Node is one worker.
type Node struct {
	Index  int
	Name   string
	Labels map[string]string
	// NS is the node's network namespace.
	NS string
	// Public and VPC are the node's addresses; VPC is its InternalIP.
	Public, VPC netip.Addr
	// Kubelet is the node's kubelet and containerd, with Options.Kubelets.
	Kubelet *kubenode.Node
	// Agent is the agent process, without Options.Kubelets, once started.
	Agent *AgentProcess
}

// New builds the cluster; on error everything built so far is torn down.
func New(ctx context.Context, opts Options) (_ *Cluster, err error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("cluster: the lab is made of network namespaces, cgroups and mounts: run as root")
	}
	if opts.Repo == "" {
		opts.Repo = sourceRepo()
	}
	if opts.BinDir == "" {
		opts.BinDir = os.Getenv(controlplane.BinDirEnv)
	}
	if opts.ResolvConf == "" {
		opts.ResolvConf = "nameserver 198.51.100.53\n"
	}
	opts.Topology.ControlPlane = true
	if opts.Topology.Purpose == "" {
		opts.Topology.Purpose = "lab"
	}
	if err := RemoveStale(); err != nil {
		return nil, err
	}
	c := &Cluster{opts: opts, cgroupRoot: "/" + netns.Name(opts.Topology.Purpose)}
	defer func() {
		if err != nil {
			if cerr := c.Close(); cerr != nil {
				err = fmt.Errorf("%w (and tearing down: %v)", err, cerr)
			}
		}
	}()
	// The directory is named like the namespaces, so that what a killed
	// run leaves behind can be told apart and removed.
	c.Dir = filepath.Join(os.TempDir(), netns.Name(opts.Topology.Purpose))
	if err := os.MkdirAll(c.Dir, 0o755); err != nil {
		return nil, err
	}
	c.log = opts.Log
	if c.log == nil {
		if c.logFile, err = os.Create(filepath.Join(c.Dir, "lab.log")); err != nil {
			return nil, err
		}
		c.log = c.logFile
	}

	if c.Net, err = topology.New(opts.Topology); err != nil {
		return nil, err
	}
	for i, ns := range c.Net.Nodes {
		spec := NodeSpec{Name: fmt.Sprintf("worker-%d", i), Labels: map[string]string{"pool": "egress"}}
		if i < len(opts.Nodes) {
			spec = opts.Nodes[i]
		}
		c.Nodes = append(c.Nodes, &Node{Index: i, Name: spec.Name, Labels: spec.Labels, NS: ns, Public: c.Net.NodePublics[i], VPC: c.Net.NodeVPCs[i]})
	}

	// With kubelets, the CRDs come with the install, as for a user.
	crdDir := filepath.Join(opts.Repo, "manifests", "crds")
	if opts.Kubelets {
		crdDir = ""
	}
	if c.DNS, err = dnsserver.Start(c.Net.External, netip.AddrPortFrom(c.Net.ExternalDNS, 53)); err != nil {
		return nil, err
	}
	c.DNS.Set(APIName, APIVIPs[0])
	if err := c.Net.AddAPIVIP(APIVIPs[0]); err != nil {
		return nil, err
	}
	var vips []net.IP
	for _, v := range APIVIPs {
		vips = append(vips, v.AsSlice())
	}
	c.CP, err = controlplane.Start(ctx, controlplane.Options{
		BinDir: opts.BinDir, NetNS: c.Net.ControlPlane, Address: c.Net.ControlPlaneAddr.String(),
		ServingIPs: vips, ServingNames: []string{APIName},
		CRDDir: crdDir, Controllers: opts.Kubelets, Output: c.log,
		// Inside the cluster's directory: what a killed run leaves goes with it.
		ParentDir: c.Dir,
	})
	if err != nil {
		return nil, err
	}
	// The lab's own clients must not be what is measured: no client-side
	// throttling.
	admin := rest.CopyConfig(c.CP.Config)
	admin.QPS, admin.Burst = -1, 0
	c.Client = versioned.NewForConfigOrDie(admin)
	c.Kube = kubernetes.NewForConfigOrDie(admin)

	if opts.Kubelets {
		err = c.startKubelets(ctx)
	} else {
		err = c.registerNodes(ctx)
	}
	if err != nil {
		return nil, err
	}
	return c, nil
}

// registerNodes creates the Node objects a kubelet would, for agent
// processes, and the agent's RBAC from manifests/.
func (c *Cluster) registerNodes(ctx context.Context) error {
	if out, err := c.Kubectl("apply", "-f", filepath.Join(c.opts.Repo, "manifests", "rbac.yaml")).CombinedOutput(); err != nil {
		return fmt.Errorf("cluster: kubectl apply rbac.yaml: %v: %s", err, out)
	}
	for _, n := range c.Nodes {
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n.Name, Labels: n.Labels}}
		if _, err := c.Kube.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("cluster: creating Node %s: %w", n.Name, err)
		}
	}
	return nil
}

// kubeconfigFor mints a kubeconfig for user naming server, or the control
// plane's own URL when server is empty.
func (c *Cluster) kubeconfigFor(server, user string, groups ...string) (string, error) {
	if server == "" {
		path, _, err := c.CP.KubeconfigFor(user, groups...)
		return path, err
	}
	return c.CP.KubeconfigAt(server, user, groups...)
}

// Close stops agents, kubelets and the control plane, deletes the
// namespaces, cgroups and the cluster's directory. It may be called more
// than once.
func (c *Cluster) Close() error {
	c.closeOnce.Do(func() {
		var errs []error
		for _, n := range c.Nodes {
			if n.Agent != nil {
				n.Agent.Stop()
			}
			if n.Kubelet != nil {
				errs = append(errs, n.Kubelet.Stop())
			}
		}
		if c.opts.Kubelets {
			errs = append(errs, kubenode.RemoveCgroupTree(c.cgroupRoot))
		}
		if c.CP != nil {
			c.CP.Stop()
		}
		if c.DNS != nil {
			errs = append(errs, c.DNS.Close())
		}
		if c.Net != nil {
			errs = append(errs, c.Net.Close())
		}
		if c.logFile != nil {
			c.logFile.Close()
		}
		if c.Dir != "" {
			errs = append(errs, os.RemoveAll(c.Dir))
		}
		c.closeErr = errors.Join(errs...)
	})
	return c.closeErr
}

// Logs returns what the lab's daemons wrote, when Options.Log was not set.
func (c *Cluster) Logs() string {
	data, _ := os.ReadFile(filepath.Join(c.Dir, "lab.log"))
	return string(data)
}

// Kubectl returns a kubectl command acting as the cluster's admin.
func (c *Cluster) Kubectl(args ...string) *exec.Cmd {
	return c.CP.Kubectl(args...)
}

// Exec runs a command in node i's network namespace (and, with kubelets,
// its mount namespace) and returns its combined output.
func (c *Cluster) Exec(i int, args ...string) (string, error) {
	n := c.Nodes[i]
	if n.Kubelet == nil {
		return c.Net.Exec(n.NS, args...)
	}
	out, err := n.Kubelet.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("on %s: %s: %w: %s", n.Name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// RemoveStale removes what killed runs of any lab left behind: network
// namespaces, cgroups (and the containers in them) and directories named
// after a process that is gone.
func RemoveStale() error {
	if err := netns.RemoveStale(); err != nil {
		return err
	}
	if err := kubenode.RemoveStale(); err != nil {
		return err
	}
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), netns.Prefix+"*"))
	for _, dir := range dirs {
		if netns.Stale(filepath.Base(dir)) {
			if err := os.RemoveAll(dir); err != nil {
				return err
			}
		}
	}
	return nil
}

// sourceRepo is the repository this package was compiled from.
func sourceRepo() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "..")
}
