// Package kubenode runs a real Kubernetes worker for the lab: containerd and
// runc (Debian's packages) and a kubelet (built from Go modules by
// hack/build-lab-tools.sh), inside a lab node's network namespace so that
// host-network pods land there and never in the machine's own.
//
// Each node gets a mount namespace of its own as well, in which /run,
// /var/lib and /var/log are fresh tmpfs (what containerd, the CNI plugins
// and the kubelet keep at fixed paths stays with the node: shim sockets,
// pod network namespaces, IPAM leases, container log links) and
// /etc/resolv.conf is the node's. The kubelet's kernel tunables
// (kernel.panic, vm.overcommit_memory, ...) are machine-wide, not per
// namespace: the node's mount namespace shows it files that already hold
// the values it wants, so it never writes the machine's. Everything else
// lives under Options.Dir, and every process under one cgroup root: Stop
// kills them all, by cgroup membership rather than parentage (shims and
// containers are re-parented to init), then removes the cgroups and the
// directory.
package kubenode

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/routing-agent/routing-agent/pkg/lab/daemon"
)

// SandboxImage is the pod sandbox image the nodes' containerd is configured
// with; the lab builds it from the pinned kubernetes module's pause.c.
const SandboxImage = "registry.k8s.io/pause:3.10"

// KubeconfigPath is where, inside the node, the kubelet's kubeconfig is
// (on the node's own /var/lib: EKS and others keep it there).
const KubeconfigPath = "/var/lib/kubelet/kubeconfig"

// Options describe one node.
type Options struct {
	// BinDir holds kubelet (the lab tools directory).
	BinDir string
	// NetNS is the node's network namespace (an `ip netns` name).
	NetNS string
	// Name is the Node's name; NodeIP its InternalIP.
	Name   string
	NodeIP netip.Addr
	// Labels and Taints the kubelet registers the Node with.
	Labels map[string]string
	Taints []corev1.Taint
	// PodCIDR is the node's pod network, served by the CNI bridge plugin.
	PodCIDR netip.Prefix
	// Kubeconfig is the kubelet's client kubeconfig (system:node:<Name>).
	Kubeconfig string
	// ClientCAFile verifies clients of the kubelet's own API (the API
	// server's kubelet client certificate).
	ClientCAFile string
	// ResolvConf is the content of the node's /etc/resolv.conf.
	ResolvConf string
	// Dir holds the node's state; Stop removes it.
	Dir string
	// CgroupRoot is the cgroup (absolute) under which everything of the
	// node runs; it must not exist yet.
	CgroupRoot string
	// Output receives containerd's and the kubelet's logs.
	Output io.Writer
}

// Node is a running containerd + kubelet.
type Node struct {
	opts       Options
	holder     *daemon.Process
	mountNS    *os.File
	containerd *daemon.Process
	kubelet    *daemon.Process
	socket     string
	stopOnce   sync.Once
	stopErr    error
}

// kernelTunables are the values the kubelet insists on (its
// setupKernelTunables); see the package comment.
var kernelTunables = map[string]string{
	"vm/overcommit_memory":      "1",
	"vm/panic_on_oom":           "0",
	"kernel/panic":              "10",
	"kernel/panic_on_oops":      "1",
	"kernel/keys/root_maxkeys":  "1000000",
	"kernel/keys/root_maxbytes": "25000000",
}

// Start brings the node up: mount namespace, containerd, kubelet. It
// returns once containerd answers and the kubelet runs; the Node object
// appears shortly after. On error nothing is left running.
func Start(ctx context.Context, opts Options) (_ *Node, err error) {
	if opts.Dir == "" || opts.NetNS == "" || opts.Name == "" || opts.CgroupRoot == "" || opts.Kubeconfig == "" {
		return nil, errors.New("kubenode: Dir, NetNS, Name, CgroupRoot and Kubeconfig are required")
	}
	for _, bin := range []string{filepath.Join(opts.BinDir, "kubelet"), "containerd", "containerd-shim-runc-v2", "runc", "ctr", "nsenter", "unshare"} {
		if _, err := exec.LookPath(bin); err != nil {
			return nil, fmt.Errorf("kubenode: %s not found (make deps installs containerd, runc and the CNI plugins; make lab-tools builds the kubelet): %w", bin, err)
		}
	}
	if opts.Output == nil {
		opts.Output = io.Discard
	}
	// Several daemons write into it, each from a goroutine of os/exec.
	opts.Output = &lockedWriter{w: opts.Output}
	n := &Node{opts: opts, socket: filepath.Join(opts.Dir, "containerd.sock")}
	defer func() {
		if err != nil {
			n.Stop()
		}
	}()
	if err := os.MkdirAll(opts.Dir, 0o755); err != nil {
		return nil, err
	}
	if err := createCgroup(n.systemCgroup()); err != nil {
		return nil, fmt.Errorf("kubenode: %w", err)
	}
	if err := n.writeConfig(); err != nil {
		return nil, err
	}
	if err := n.startHolder(); err != nil {
		return nil, err
	}
	if n.containerd, err = n.spawn("containerd", "containerd", "--config", filepath.Join(opts.Dir, "containerd.toml")); err != nil {
		return nil, err
	}
	if err := n.waitContainerd(ctx, 30*time.Second); err != nil {
		return nil, err
	}
	if err := n.StartKubelet(); err != nil {
		return nil, err
	}
	return n, nil
}

// systemCgroup holds containerd, its shims and the kubelet; the kubelet
// puts pods in CgroupRoot/kubepods.
func (n *Node) systemCgroup() string { return n.opts.CgroupRoot + "/system" }

// Name is the Node's name.
func (n *Node) Name() string { return n.opts.Name }

// startHolder starts the process that owns the node's mount namespace: it
// enters the network namespace, unshares the mount namespace (slave, so the
// machine's mounts still show and the node's never leak out), mounts the
// node's private directories and files, says "ready" and sleeps. Every
// other process of the node joins its namespaces.
func (n *Node) startHolder() error {
	var script strings.Builder
	// Into the node's cgroup first, so Stop finds it; any failure stops
	// the script before "ready".
	fmt.Fprintf(&script, "set -e\necho $$ > %s\n", filepath.Join(trackingHierarchy(), n.systemCgroup(), "cgroup.procs"))
	// -n: no /run/mount/utab bookkeeping, which would write to the
	// machine's /run before the node's own is mounted.
	for _, dir := range []string{"/run", "/var/lib", "/var/log"} {
		fmt.Fprintf(&script, "mount -n -t tmpfs -o mode=0755 tmpfs %s\n", dir)
	}
	fmt.Fprintf(&script, "mount -n --bind %s /etc/resolv.conf\n", filepath.Join(n.opts.Dir, "resolv.conf"))
	// The kubelet's kubeconfig at a fixed path of the node, as a
	// distribution puts it, for an agent pod to mount and read its server.
	fmt.Fprintf(&script, "mkdir -p %s\ncp %s %s\n", filepath.Dir(KubeconfigPath), n.opts.Kubeconfig, KubeconfigPath)
	for _, name := range slices.Sorted(maps.Keys(kernelTunables)) {
		fmt.Fprintf(&script, "mount -n --bind %s /proc/sys/%s\n", filepath.Join(n.opts.Dir, "sysctl", strings.ReplaceAll(name, "/", ".")), name)
	}
	script.WriteString("echo ready\nexec sleep infinity\n")

	cmd := exec.Command("nsenter", "--net="+filepath.Join("/run/netns", n.opts.NetNS), "--",
		"unshare", "--mount", "--propagation", "slave", "--",
		"sh", "-c", script.String())
	cmd.Stderr = n.opts.Output
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	line := make(chan string, 1)
	go func() {
		s := bufio.NewScanner(stdout)
		s.Scan()
		line <- s.Text()
		io.Copy(io.Discard, stdout)
	}()
	if n.holder, err = daemon.Start("mount namespace holder", cmd, false); err != nil {
		return fmt.Errorf("kubenode: %w", err)
	}
	select {
	case got := <-line:
		if got != "ready" {
			return fmt.Errorf("kubenode: setting up the mount namespace of %s failed (see the node's output)", n.opts.Name)
		}
	case <-time.After(10 * time.Second):
		return fmt.Errorf("kubenode: the mount namespace of %s did not come up", n.opts.Name)
	}
	// Hold the mount namespace by a file rather than by the holder's pid,
	// which, were the holder to die, could be reused by a process in the
	// machine's own namespaces. The holder is a live child of ours here
	// (not yet reaped), so the pid is still its own while we open it.
	mnt, err := os.Open(fmt.Sprintf("/proc/%d/ns/mnt", n.holder.PID()))
	if err != nil {
		return fmt.Errorf("kubenode: %w", err)
	}
	if !n.holder.Running() {
		mnt.Close()
		return fmt.Errorf("kubenode: the mount namespace holder of %s exited", n.opts.Name)
	}
	n.mountNS = mnt
	return nil
}

// Command returns a command that runs inside the node: its network and
// mount namespaces (what `ssh node` would give). The namespaces are named
// by files (the mount namespace passed as the command's fd 3), never by a
// pid, so a command can only ever land in the node.
func (n *Node) Command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command("nsenter", append([]string{"--mount=/proc/self/fd/3", "--net=" + filepath.Join("/run/netns", n.opts.NetNS), "--", name}, args...)...)
	cmd.ExtraFiles = []*os.File{n.mountNS}
	return cmd
}

// spawn runs a daemon of the node inside its namespaces and its system
// cgroup, joined before the daemon's first instruction, so that whatever
// it starts is found by Stop.
func (n *Node) spawn(name string, args ...string) (*daemon.Process, error) {
	procs := filepath.Join(trackingHierarchy(), n.systemCgroup(), "cgroup.procs")
	cmd := n.Command("sh", append([]string{"-c", `echo $$ > "$0" && exec "$@"`, procs}, args...)...)
	cmd.Env = append(os.Environ(), "TMPDIR="+filepath.Join(n.opts.Dir, "tmp"))
	cmd.Stdout, cmd.Stderr = n.opts.Output, n.opts.Output
	return daemon.Start(name, cmd, false)
}

func (n *Node) waitContainerd(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if err := n.ctr("version").Run(); err == nil {
			return nil
		}
		if !n.containerd.Running() {
			return fmt.Errorf("kubenode: containerd of %s exited: %v", n.opts.Name, n.containerd.Err())
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("kubenode: containerd of %s did not answer within %s", n.opts.Name, timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (n *Node) ctr(args ...string) *exec.Cmd {
	return n.Command("ctr", append([]string{"--address", n.socket, "--namespace", "k8s.io"}, args...)...)
}

// ImportImage loads an image archive (OCI layout or docker save) into the
// node's containerd, where the kubelet finds it without a pull.
func (n *Node) ImportImage(archive string) error {
	if out, err := n.ctr("images", "import", archive).CombinedOutput(); err != nil {
		return fmt.Errorf("kubenode: importing %s on %s: %v: %s", archive, n.opts.Name, err, out)
	}
	return nil
}

// StartKubelet starts the kubelet (Start does; tests call it again after
// StopKubelet, as after a kubelet restart).
func (n *Node) StartKubelet() error {
	if n.kubelet != nil && n.kubelet.Running() {
		return errors.New("kubenode: the kubelet is already running")
	}
	args := []string{
		"--config=" + filepath.Join(n.opts.Dir, "kubelet.yaml"),
		"--kubeconfig=" + KubeconfigPath,
		"--root-dir=" + filepath.Join(n.opts.Dir, "kubelet"),
		"--cert-dir=" + filepath.Join(n.opts.Dir, "kubelet", "pki"),
		"--hostname-override=" + n.opts.Name,
		"--node-ip=" + n.opts.NodeIP.String(),
		"--v=1",
	}
	if len(n.opts.Labels) > 0 {
		var labels []string
		for _, k := range slices.Sorted(maps.Keys(n.opts.Labels)) {
			labels = append(labels, k+"="+n.opts.Labels[k])
		}
		args = append(args, "--node-labels="+strings.Join(labels, ","))
	}
	p, err := n.spawn("kubelet", append([]string{filepath.Join(n.opts.BinDir, "kubelet")}, args...)...)
	if err != nil {
		return err
	}
	n.kubelet = p
	return nil
}

// StopKubelet stops the kubelet; pods keep running, as on a real node.
func (n *Node) StopKubelet() {
	if n.kubelet != nil {
		n.kubelet.Stop(10 * time.Second)
	}
}

// PodLogs returns what the containers of the pods of namespace whose name
// starts with pod wrote (the kubelet's log files), for diagnostics.
func (n *Node) PodLogs(namespace, pod string) string {
	dirs, _ := filepath.Glob(filepath.Join(n.opts.Dir, "pods", namespace+"_"+pod+"*", "*"))
	var b strings.Builder
	for _, dir := range dirs {
		files, _ := filepath.Glob(filepath.Join(dir, "*.log"))
		sort.Strings(files)
		for _, f := range files {
			data, _ := os.ReadFile(f)
			fmt.Fprintf(&b, "==> %s <==\n%s", f, data)
		}
	}
	return b.String()
}

// Stop ends every process of the node, removes its cgroups and its
// directory. It is safe to call more than once and on a partly started
// node; the error says what could not be cleaned up.
func (n *Node) Stop() error {
	n.stopOnce.Do(func() {
		var errs []error
		// The kubelet first, so that it does not restart what goes next.
		n.StopKubelet()
		if err := killCgroup(n.opts.CgroupRoot, 10*time.Second); err != nil {
			errs = append(errs, err)
		}
		if n.holder != nil { // in the cgroup unless its setup failed
			n.holder.Signal(syscall.SIGKILL, time.Second)
		}
		if n.mountNS != nil {
			n.mountNS.Close() // the last hold on the node's mounts
		}
		for _, p := range []*daemon.Process{n.kubelet, n.containerd} {
			if p != nil {
				<-p.Done()
			}
		}
		if n.holder != nil {
			<-n.holder.Done()
		}
		if err := removeCgroup(n.opts.CgroupRoot, 10*time.Second); err != nil {
			errs = append(errs, err)
		}
		// The node's mounts (overlay roots, tmpfs volumes) died with its
		// mount namespace; what is left is plain files.
		if err := os.RemoveAll(n.opts.Dir); err != nil {
			errs = append(errs, err)
		}
		n.stopErr = errors.Join(errs...)
	})
	return n.stopErr
}

// writeConfig writes containerd's and the kubelet's configuration, the CNI
// network, the node's resolv.conf and the kernel tunable stand-ins.
func (n *Node) writeConfig() error {
	dir := n.opts.Dir
	for _, d := range []string{"tmp", "cni", "cni-ipam", "pods", "sysctl", "volume-plugins", "containerd"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return err
		}
	}
	files := map[string]string{
		"resolv.conf":     n.opts.ResolvConf,
		"containerd.toml": n.containerdConfig(),
	}
	for name, value := range kernelTunables {
		files[filepath.Join("sysctl", strings.ReplaceAll(name, "/", "."))] = value + "\n"
	}
	cni, err := n.cniConfig()
	if err != nil {
		return err
	}
	files[filepath.Join("cni", "10-lab.conflist")] = cni
	kubelet, err := n.kubeletConfig()
	if err != nil {
		return err
	}
	files["kubelet.yaml"] = kubelet
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// containerdConfig: everything under Dir but the shim sockets and the
// task state, which containerd 1.6 keeps under /run/containerd (the node's
// own tmpfs). Snapshotters the lab cannot use are off, so containerd does
// not probe for them.
func (n *Node) containerdConfig() string {
	dir := n.opts.Dir
	return fmt.Sprintf(`version = 2
root = %q
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = %q

[ttrpc]
  address = %q

[plugins."io.containerd.internal.v1.opt"]
  path = %q

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  enable_selinux = false
  # This machine withholds CAP_SYS_RESOURCE even from root, so no process
  # may lower its oom_score_adj: without this, runc fails every sandbox
  # (the kubelet asks for -998) with "failed to update oom_score_adj".
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = %q
`, filepath.Join(dir, "containerd"), n.socket, n.socket+".ttrpc", filepath.Join(dir, "containerd", "opt"), SandboxImage, filepath.Join(dir, "cni"))
}

// cniConfig: pods on a bridge with the node as their gateway and
// masquerade for what leaves the pod network, as a simple CNI does.
func (n *Node) cniConfig() (string, error) {
	if !n.opts.PodCIDR.IsValid() {
		return "", fmt.Errorf("kubenode: node %s has no PodCIDR", n.opts.Name)
	}
	conf := map[string]any{
		"cniVersion": "1.0.0",
		"name":       "lab",
		"plugins": []any{map[string]any{
			"type":        "bridge",
			"bridge":      "cni0",
			"isGateway":   true,
			"ipMasq":      true,
			"hairpinMode": true,
			"ipam": map[string]any{
				"type":    "host-local",
				"ranges":  [][]map[string]string{{{"subnet": n.opts.PodCIDR.String()}}},
				"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
				"dataDir": filepath.Join(n.opts.Dir, "cni-ipam"),
			},
		}},
	}
	data, err := json.MarshalIndent(conf, "", "  ")
	return string(data), err
}

// kubeletConfig: a stock kubelet, but for what this machine needs (cgroup
// v1, no systemd, a disk shared with other nodes) and what keeps it inside
// the node (paths, its own cgroup root, no image garbage collection of the
// images the lab imported).
func (n *Node) kubeletConfig() (string, error) {
	f := false
	cfg := map[string]any{
		"apiVersion":               "kubelet.config.k8s.io/v1beta1",
		"kind":                     "KubeletConfiguration",
		"containerRuntimeEndpoint": "unix://" + n.socket,
		"cgroupDriver":             "cgroupfs",
		"cgroupRoot":               n.opts.CgroupRoot,
		"failCgroupV1":             &f,
		"failSwapOn":               &f,
		"address":                  n.opts.NodeIP.String(),
		"healthzBindAddress":       "127.0.0.1",
		"readOnlyPort":             0,
		"resolvConf":               filepath.Join(n.opts.Dir, "resolv.conf"),
		"podLogsDir":               filepath.Join(n.opts.Dir, "pods"),
		"volumePluginDir":          filepath.Join(n.opts.Dir, "volume-plugins"),
		"registerWithTaints":       n.opts.Taints,
		"authentication": map[string]any{
			"anonymous": map[string]any{"enabled": false},
			"webhook":   map[string]any{"enabled": false},
			"x509":      map[string]any{"clientCAFile": n.opts.ClientCAFile},
		},
		"authorization": map[string]any{"mode": "AlwaysAllow"},
		// The lab's nodes share one disk with the machine: thresholds
		// meant for a dedicated disk would evict at random.
		"evictionHard":                map[string]string{"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
		"imageGCHighThresholdPercent": 100,
		"imageGCLowThresholdPercent":  99,
		"shutdownGracePeriod":         "0s",
	}
	data, err := yaml.Marshal(cfg)
	return string(data), err
}

type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
