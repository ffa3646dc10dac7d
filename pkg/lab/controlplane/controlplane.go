// Package controlplane runs a real etcd and kube-apiserver for tests and the
// lab, built from Go modules by hack/build-lab-tools.sh. It starts them on
// loopback or inside a given network namespace, installs the product's CRDs,
// and hands back an admin client config and kubeconfig; Stop ends every
// process it started.
package controlplane

import (
	"context"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/routing-agent/routing-agent/pkg/lab/daemon"
	"github.com/routing-agent/routing-agent/pkg/lab/netns"
)

// BinDirEnv names the environment variable that points at the directory
// holding etcd, kube-apiserver and kubectl (the Makefile sets it).
const BinDirEnv = "LAB_BIN_DIR"

// Options say where and how to run the control plane. The zero value runs it
// on loopback in the current network namespace, with binaries from
// $LAB_BIN_DIR and no CRDs installed.
type Options struct {
	// BinDir holds etcd, kube-apiserver and kubectl; default $LAB_BIN_DIR.
	BinDir string
	// NetNS is the named network namespace (ip netns) to run in; empty
	// means the current one, where only loopback addresses are used.
	NetNS string
	// Address is the IP the API server serves and advertises on. Default
	// 127.0.0.1. When it is not a loopback address the API server publishes
	// it in the default/kubernetes EndpointSlice, as a real one does.
	Address string
	// Port is the API server's secure port; default a free port on
	// loopback, 6443 inside a namespace.
	Port int
	// ServingIPs and ServingNames are extra subject alternative names of
	// the API server's serving certificate, besides Address, loopback, the
	// kubernetes Service's and its DNS names: the addresses and names
	// clients reach it by otherwise, such as a load balancer's VIP and a
	// DNS name for it ("api.lab.test"). KubeconfigAt writes kubeconfigs
	// that use them.
	ServingIPs   []net.IP
	ServingNames []string
	// CRDDir, when set, holds CustomResourceDefinition YAML files that are
	// installed and waited for (Established and served) before Start returns.
	CRDDir string
	// Controllers also runs kube-controller-manager and kube-scheduler, for
	// a cluster with real nodes (DaemonSets, scheduling, service account
	// token publishing, garbage collection).
	Controllers bool
	// Output receives the processes' logs; default a file in the work dir.
	Output io.Writer
	// ParentDir is where the work directory is made; default the system's
	// temporary directory.
	ParentDir string
}

// ControlPlane is a running etcd and kube-apiserver.
type ControlPlane struct {
	// Config is an admin (system:masters) client config.
	Config *rest.Config
	// Kubeconfig is the path of an admin kubeconfig file for kubectl.
	Kubeconfig string
	// Server is the API server's URL.
	Server string
	// Ready is how long the API server took from exec to a ready /readyz.
	Ready time.Duration
	// Dir is the work directory: data, certificates, kubeconfigs, logs.
	Dir string
	// CAFile is the cluster CA: it signs the API server's serving
	// certificate and every client certificate KubeconfigFor mints.
	CAFile string

	opts      Options
	pki       *pki
	apiArgs   []string
	etcd      *daemon.Process
	apiserver *daemon.Process
	// controllers are kube-controller-manager and kube-scheduler, with
	// Options.Controllers.
	controllers []*daemon.Process
	output      io.Writer
	logFile     *os.File
	stopOnce    sync.Once
}

// Start runs etcd and kube-apiserver and waits until the API server is ready
// and the CRDs, if any, are served. On error nothing is left running.
func Start(ctx context.Context, opts Options) (cp *ControlPlane, err error) {
	if opts.BinDir == "" {
		opts.BinDir = os.Getenv(BinDirEnv)
	}
	if opts.BinDir == "" {
		return nil, fmt.Errorf("%s is not set: build the lab's etcd, kube-apiserver and kubectl with `make lab-tools` and point %s at them", BinDirEnv, BinDirEnv)
	}
	bins := []string{"etcd", "kube-apiserver", "kubectl"}
	if opts.Controllers {
		bins = append(bins, "kube-controller-manager", "kube-scheduler")
	}
	for _, bin := range bins {
		if _, err := os.Stat(filepath.Join(opts.BinDir, bin)); err != nil {
			return nil, fmt.Errorf("lab binary missing (run `make lab-tools`): %w", err)
		}
	}
	if opts.Address == "" {
		opts.Address = "127.0.0.1"
	}
	addr := net.ParseIP(opts.Address)
	if addr == nil {
		return nil, fmt.Errorf("controlplane: Address %q is not an IP address", opts.Address)
	}

	dir, err := os.MkdirTemp(opts.ParentDir, "routing-agent-controlplane-")
	if err != nil {
		return nil, err
	}
	cp = &ControlPlane{Dir: dir, opts: opts, output: opts.Output}
	defer func() {
		if err != nil {
			cp.Stop()
		}
	}()
	if cp.output == nil {
		if cp.logFile, err = os.Create(filepath.Join(dir, "controlplane.log")); err != nil {
			return nil, err
		}
		cp.output = cp.logFile
	}

	etcdClient, etcdPeer, apiPort := 2379, 2380, 6443
	if opts.NetNS == "" {
		if etcdClient, err = freePort(); err != nil {
			return nil, err
		}
		if etcdPeer, err = freePort(); err != nil {
			return nil, err
		}
		if apiPort, err = freePort(); err != nil {
			return nil, err
		}
	} else if err := run("ip", "-n", opts.NetNS, "link", "set", "lo", "up"); err != nil {
		return nil, err
	}
	if opts.Port != 0 {
		apiPort = opts.Port
	}
	cp.Server = "https://" + net.JoinHostPort(opts.Address, strconv.Itoa(apiPort))

	if err := cp.writeCredentials(addr); err != nil {
		return nil, err
	}

	etcdURL := func(port int) string { return "http://127.0.0.1:" + strconv.Itoa(port) }
	cp.etcd, err = cp.spawn("etcd",
		"--name=lab",
		"--data-dir="+filepath.Join(dir, "etcd"),
		"--listen-client-urls="+etcdURL(etcdClient),
		"--advertise-client-urls="+etcdURL(etcdClient),
		"--listen-peer-urls="+etcdURL(etcdPeer),
		"--initial-advertise-peer-urls="+etcdURL(etcdPeer),
		"--initial-cluster=lab="+etcdURL(etcdPeer),
		"--unsafe-no-fsync", // a lab's data dies with it; fsync only costs time
		"--log-level=warn",
	)
	if err != nil {
		return nil, err
	}

	pki := filepath.Join(dir, "pki")
	reconciler := "lease"
	if addr.IsLoopback() {
		// Endpoints may not hold loopback addresses; a loopback API server
		// has no default/kubernetes endpoints to publish.
		reconciler = "none"
	}
	cp.apiArgs = []string{
		"--etcd-servers=" + etcdURL(etcdClient),
		"--bind-address=" + opts.Address,
		"--advertise-address=" + opts.Address,
		"--secure-port=" + strconv.Itoa(apiPort),
		"--tls-cert-file=" + filepath.Join(pki, "apiserver.crt"),
		"--tls-private-key-file=" + filepath.Join(pki, "apiserver.key"),
		"--client-ca-file=" + filepath.Join(pki, "ca.crt"),
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + filepath.Join(pki, "sa.pub"),
		"--service-account-signing-key-file=" + filepath.Join(pki, "sa.key"),
		// Virtual service addresses: allocated in etcd, never routed to.
		"--service-cluster-ip-range=10.96.0.0/16",
		// As a production cluster: kubelets are limited to their own Node
		// and its pods (Node authorizer + NodeRestriction), everyone else
		// by RBAC.
		"--authorization-mode=Node,RBAC",
		"--enable-admission-plugins=NodeRestriction",
		// Namespaces that declare no Pod Security level get "baseline",
		// as on hardened clusters: a DaemonSet with host networking and
		// NET_ADMIN runs only where its namespace says "privileged".
		"--admission-control-config-file=" + filepath.Join(pki, "admission.yaml"),
		"--kubelet-client-certificate=" + filepath.Join(pki, "kubelet-client.crt"),
		"--kubelet-client-key=" + filepath.Join(pki, "kubelet-client.key"),
		"--kubelet-preferred-address-types=InternalIP",
		"--endpoint-reconciler-type=" + reconciler,
		"--cert-dir=" + filepath.Join(dir, "apiserver-certs"),
		"--profiling=false",
	}
	if err := cp.StartAPIServer(ctx); err != nil {
		return nil, err
	}
	if opts.Controllers {
		if err := cp.startControllers(); err != nil {
			return nil, err
		}
	}
	if opts.CRDDir != "" {
		if err := InstallCRDs(ctx, cp.Config, opts.CRDDir); err != nil {
			return nil, err
		}
	}
	return cp, nil
}

// startControllers runs kube-controller-manager and kube-scheduler with the
// identities and bootstrap RBAC roles a kubeadm cluster gives them; the
// controller manager runs each controller as its own service account.
func (cp *ControlPlane) startControllers() error {
	pki := filepath.Join(cp.Dir, "pki")
	kcm, _, err := cp.KubeconfigFor("system:kube-controller-manager")
	if err != nil {
		return err
	}
	scheduler, _, err := cp.KubeconfigFor("system:kube-scheduler")
	if err != nil {
		return err
	}
	p, err := cp.spawn("kube-controller-manager",
		"--kubeconfig="+kcm,
		"--authentication-kubeconfig="+kcm,
		"--authorization-kubeconfig="+kcm,
		"--bind-address=127.0.0.1",
		"--leader-elect=false",
		"--use-service-account-credentials=true",
		"--service-account-private-key-file="+filepath.Join(pki, "sa.key"),
		"--root-ca-file="+cp.CAFile,
		"--cert-dir="+filepath.Join(cp.Dir, "kcm-certs"),
		"--profiling=false",
	)
	if err != nil {
		return err
	}
	cp.controllers = append(cp.controllers, p)
	p, err = cp.spawn("kube-scheduler",
		"--kubeconfig="+scheduler,
		"--authentication-kubeconfig="+scheduler,
		"--authorization-kubeconfig="+scheduler,
		"--bind-address=127.0.0.1",
		"--leader-elect=false",
		"--cert-dir="+filepath.Join(cp.Dir, "scheduler-certs"),
		"--profiling=false",
	)
	if err != nil {
		return err
	}
	cp.controllers = append(cp.controllers, p)
	return nil
}

// StartAPIServer (re)starts kube-apiserver against the running etcd and
// waits until it is ready. Start calls it; tests call it again after
// StopAPIServer to end a simulated outage.
func (cp *ControlPlane) StartAPIServer(ctx context.Context) error {
	if cp.apiserver != nil && cp.apiserver.Running() {
		return errors.New("controlplane: kube-apiserver is already running")
	}
	begin := time.Now()
	p, err := cp.spawn("kube-apiserver", cp.apiArgs...)
	if err != nil {
		return err
	}
	cp.apiserver = p
	if err := waitReady(ctx, cp.Config, p, 3*time.Minute); err != nil {
		return err
	}
	cp.Ready = time.Since(begin)
	return nil
}

// StopAPIServer stops kube-apiserver and leaves etcd running, as in an API
// server outage.
func (cp *ControlPlane) StopAPIServer() {
	if cp.apiserver != nil {
		cp.apiserver.Stop(10 * time.Second)
	}
}

// Stop ends kube-apiserver and etcd and removes the work directory. It is
// safe to call more than once and on a partly started control plane.
func (cp *ControlPlane) Stop() {
	cp.stopOnce.Do(func() {
		for _, p := range cp.controllers {
			p.Stop(10 * time.Second)
		}
		cp.StopAPIServer()
		if cp.etcd != nil {
			cp.etcd.Stop(10 * time.Second)
		}
		if cp.logFile != nil {
			cp.logFile.Close()
		}
		os.RemoveAll(cp.Dir)
	})
}

// Logs returns what the processes wrote, when Options.Output was not set.
func (cp *ControlPlane) Logs() string {
	data, _ := os.ReadFile(filepath.Join(cp.Dir, "controlplane.log"))
	return string(data)
}

// Kubectl returns a kubectl command that talks to this control plane as
// admin, run inside the control plane's namespace when it has one.
func (cp *ControlPlane) Kubectl(args ...string) *exec.Cmd {
	args = append([]string{filepath.Join(cp.opts.BinDir, "kubectl"), "--kubeconfig=" + cp.Kubeconfig}, args...)
	if cp.opts.NetNS != "" {
		args = append([]string{"ip", "netns", "exec", cp.opts.NetNS}, args...)
	}
	return exec.Command(args[0], args[1:]...)
}

// KubeconfigFor mints a client certificate for user in groups and writes a
// kubeconfig that uses it, so tests can act as a least-privileged identity
// (for a service account: "system:serviceaccount:<ns>:<name>"). The
// kubeconfig names cp.Server; cfg is the same as a client config, whose
// connections are opened inside the control plane's namespace if it has one.
func (cp *ControlPlane) KubeconfigFor(user string, groups ...string) (path string, cfg *rest.Config, err error) {
	if path, err = cp.KubeconfigAt(cp.Server, user, groups...); err != nil {
		return "", nil, err
	}
	if cfg, err = clientcmd.BuildConfigFromFlags("", path); err != nil {
		return "", nil, err
	}
	if cp.opts.NetNS != "" {
		// The API server lives in the namespace: so must the client's sockets.
		cfg.Dial = netns.Dialer(cp.opts.NetNS)
	}
	return path, cfg, nil
}

// KubeconfigAt is KubeconfigFor for clients that reach the API server at
// server rather than cp.Server: through a load balancer's VIP
// (https://198.51.100.100:6443) or by a DNS name (https://api.lab.test:6443),
// which must then be among Options.ServingIPs or ServingNames for TLS to
// verify. It returns only the path: such a client lives elsewhere (a node),
// and dials from there.
func (cp *ControlPlane) KubeconfigAt(server, user string, groups ...string) (path string, err error) {
	if server == "" {
		return "", errors.New("controlplane: KubeconfigAt needs a server URL")
	}
	certPEM, keyPEM, err := cp.pki.issue(pkix.Name{CommonName: user, Organization: groups}, nil, nil, x509.ExtKeyUsageClientAuth)
	if err != nil {
		return "", err
	}
	path = filepath.Join(cp.Dir, "kubeconfig-"+strconv.FormatInt(time.Now().UnixNano(), 36))
	if err := writeKubeconfig(path, server, cp.pki.caPEM, certPEM, keyPEM); err != nil {
		return "", err
	}
	return path, nil
}

func (cp *ControlPlane) writeCredentials(addr net.IP) error {
	dir := filepath.Join(cp.Dir, "pki")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	var err error
	if cp.pki, err = newPKI(); err != nil {
		return err
	}
	serving, servingKey, err := cp.pki.issue(pkix.Name{CommonName: "kube-apiserver"},
		append([]net.IP{addr, net.IPv4(127, 0, 0, 1), net.IPv4(10, 96, 0, 1)}, cp.opts.ServingIPs...),
		append([]string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}, cp.opts.ServingNames...),
		x509.ExtKeyUsageServerAuth)
	if err != nil {
		return err
	}
	kubeletClient, kubeletClientKey, err := cp.pki.issue(pkix.Name{CommonName: "kube-apiserver-kubelet-client"}, nil, nil, x509.ExtKeyUsageClientAuth)
	if err != nil {
		return err
	}
	cp.CAFile = filepath.Join(dir, "ca.crt")
	if err := writeFiles(map[string][]byte{
		cp.CAFile:                                cp.pki.caPEM,
		filepath.Join(dir, "apiserver.crt"):      serving,
		filepath.Join(dir, "apiserver.key"):      servingKey,
		filepath.Join(dir, "kubelet-client.crt"): kubeletClient,
		filepath.Join(dir, "kubelet-client.key"): kubeletClientKey,
		filepath.Join(dir, "admission.yaml"):     []byte(admissionConfig),
	}); err != nil {
		return err
	}
	if _, _, err := writeServiceAccountKey(dir); err != nil {
		return err
	}
	path, cfg, err := cp.KubeconfigFor("lab-admin", "system:masters")
	if err != nil {
		return err
	}
	admin := filepath.Join(cp.Dir, "kubeconfig")
	if err := os.Rename(path, admin); err != nil {
		return err
	}
	cp.Kubeconfig, cp.Config = admin, cfg
	return nil
}

// admissionConfig makes "baseline" the Pod Security level of namespaces
// that declare none.
const admissionConfig = `apiVersion: apiserver.config.k8s.io/v1
kind: AdmissionConfiguration
plugins:
  - name: PodSecurity
    configuration:
      apiVersion: pod-security.admission.config.k8s.io/v1
      kind: PodSecurityConfiguration
      defaults:
        enforce: baseline
        enforce-version: latest
`

func writeKubeconfig(path, server string, caPEM, certPEM, keyPEM []byte) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["lab"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: caPEM}
	cfg.AuthInfos["user"] = &clientcmdapi.AuthInfo{ClientCertificateData: certPEM, ClientKeyData: keyPEM}
	cfg.Contexts["lab"] = &clientcmdapi.Context{Cluster: "lab", AuthInfo: "user"}
	cfg.CurrentContext = "lab"
	return clientcmd.WriteToFile(*cfg, path)
}

// spawn starts a control plane binary, inside the control plane's
// namespace when it has one (ip netns exec forks: signals go to the group).
func (cp *ControlPlane) spawn(name string, args ...string) (*daemon.Process, error) {
	bin := filepath.Join(cp.opts.BinDir, name)
	if cp.opts.NetNS != "" {
		args = append([]string{"netns", "exec", cp.opts.NetNS, bin}, args...)
		bin = "ip"
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = cp.output, cp.output
	return daemon.Start(name, cmd, true)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func run(name string, args ...string) error {
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		return fmt.Errorf("%s %v: %v: %s", name, args, err, out)
	}
	return nil
}

// PIDs returns the process ids of the running etcd, kube-apiserver and,
// with Options.Controllers, kube-controller-manager and kube-scheduler.
func (cp *ControlPlane) PIDs() []int {
	var pids []int
	for _, p := range append([]*daemon.Process{cp.etcd, cp.apiserver}, cp.controllers...) {
		if p != nil && p.Running() {
			pids = append(pids, p.PID())
		}
	}
	return pids
}
