package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"github.com/vishvananda/netns"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/routing-agent/routing-agent/generated/clientset/versioned"
	"github.com/routing-agent/routing-agent/pkg/agent"
	"github.com/routing-agent/routing-agent/pkg/bypass"
	"github.com/routing-agent/routing-agent/pkg/connmark"
	"github.com/routing-agent/routing-agent/pkg/nodefacts"
	"github.com/routing-agent/routing-agent/pkg/prober"
)

const agentUsage = `usage: routing-agent [flags]

Runs the node agent: installs the Routes selected for this node into its
kernel and keeps them there. Runs until SIGTERM or SIGINT, and then leaves the
kernel as it is; remove Routes by deleting them, or with 'routing-agent cleanup'.

flags:
`

func runAgent(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("routing-agent", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, agentUsage); fs.PrintDefaults() }
	cfg := plannerFlags(fs)
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig file; default: the in-cluster service account")
	nodeName := fs.String("node-name", os.Getenv("NODE_NAME"), "the Node this agent serves (default $NODE_NAME)")
	resync := fs.Duration("resync-period", 30*time.Second, "how often the kernel is re-checked against the plan, repairing drift (1s-10m)")
	hostRoot := fs.String("host-root", "", "where the node's root directory is mounted (the DaemonSet mounts /etc at /host/etc and passes /host); the paths below are the node's, and symbolic links among them are followed inside it")
	resolvConf := fs.String("resolv-conf", "/etc/resolv.conf", "the node's resolv.conf, for the DNS servers to bypass and to look control-plane names up with; its directory is watched")
	resolvedUpstream := fs.String("resolved-upstream", nodefacts.ResolvedUpstream, "systemd-resolved's upstream list, read when resolv.conf names its 127.0.0.53 stub or 127.0.0.54 proxy")
	var dnsServers []netip.Addr
	fs.Func("dns-server", "upstream DNS server to bypass, for a loopback resolver (dnsmasq on 127.0.0.1) whose upstreams cannot be read; repeatable, or comma-separated", func(s string) error {
		addrs, err := parseList(s, netip.ParseAddr)
		dnsServers = append(dnsServers, addrs...)
		return err
	})
	var controlPlane []agent.ControlPlaneHost
	fs.Func("control-plane-endpoint", "an API server endpoint the node uses (a load balancer's VIP, a DNS name, host:port or URL), kept on the main table; names are looked up through the node's resolvers every --resolve-interval and what they gave stays bypassed; with a port, also the agent's way to the API server when its own fails; repeatable", func(s string) error {
		h, err := agent.ParseControlPlaneHost(s, bypass.SourceFlag)
		controlPlane = append(controlPlane, h)
		return err
	})
	kubeletKubeconfig := fs.String("kubelet-kubeconfig", "", "the kubelet's kubeconfig on the node (kubeadm: /etc/kubernetes/kubelet.conf); its server is a control-plane endpoint; a missing file is no source")
	resolveInterval := fs.Duration("resolve-interval", 30*time.Second, "how often control-plane names are looked up (1s-1h)")
	retention := fs.Duration("bypass-retention", bypass.DefaultRetention, "how long a learned control-plane address stays bypassed after its source (EndpointSlices, a name) stopped listing it while still answering; a source that fails never ages it (1m or more)")
	manageSysctls := fs.Bool("manage-sysctls", true, "set net.ipv{4,6}.fib_multipath_hash_policy=1 (ECMP spreads flows, not host pairs) and net.ipv4.fib_multipath_use_neigh=1 (skip nexthops whose neighbour failed)")
	sysctlRoot := fs.String("sysctl-root", "/proc/sys", "where the node's sysctls are written: a container sees /proc/sys read-only, so the DaemonSet mounts the host's /proc/sys/net at /host/proc/sys/net and passes /host/proc/sys")
	httpAddr := fs.String("http-address", "127.0.0.1:9464", "address serving /metrics, /healthz and /readyz, e.g. [$(HOST_IP)]:9464; empty to disable")
	startupTaint := fs.String("startup-taint", "", fmt.Sprintf("key of a taint the kubelet registers the node with (e.g. %s:NoSchedule) that the agent removes from its Node after its first successful apply; empty: none", agent.DefaultStartupTaint))
	apiProbe := fs.Duration("api-probe-interval", agent.DefaultAPIProbeInterval, "while the API server cannot be reached, how often at most its /readyz is asked whether it is back (jittered down to half); the informers resume as soon as it answers (500ms-1m)")
	probe := prober.DefaultConfig()
	fs.DurationVar(&probe.Interval, "probe-interval", probe.Interval, "time between ICMP probes of each gateway")
	fs.DurationVar(&probe.Timeout, "probe-timeout", probe.Timeout, "how long a probe waits for its answer (at most the interval)")
	fs.IntVar(&probe.Fall, "probe-fall", probe.Fall, "consecutive unanswered probes that take a gateway down")
	fs.IntVar(&probe.Rise, "probe-rise", probe.Rise, "consecutive answers that bring a down gateway back")
	fs.DurationVar(&probe.FlapWindow, "probe-flap-window", probe.FlapWindow, "a gateway falling again within this window needs twice the answers to come back, per repeat (0 disables)")
	memoryRatio := fs.Float64("memory-limit-ratio", 0.9, "fraction of the container's memory limit (its cgroup's memory.max) the Go runtime takes as its soft limit, collecting harder as it nears it rather than being OOM-killed; 0 disables; GOMEMLIMIT, when set, wins")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	usageErr := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "routing-agent: "+format+"\n", a...)
		return 2
	}
	if err := checkPlannerConfig(cfg); err != nil {
		return usageErr("%v", err)
	}
	if *nodeName == "" {
		return usageErr("--node-name (or NODE_NAME) is required")
	}
	if err := probe.Validate(); err != nil {
		return usageErr("--probe-*: %v", err)
	}
	if *resync < time.Second || *resync > 10*time.Minute {
		return usageErr("--resync-period %s: must be between 1s and 10m", *resync)
	}
	if *resolveInterval < time.Second || *resolveInterval > time.Hour {
		return usageErr("--resolve-interval %s: must be between 1s and 1h", *resolveInterval)
	}
	if *apiProbe < 500*time.Millisecond || *apiProbe > time.Minute {
		return usageErr("--api-probe-interval %s: must be between 500ms and 1m", *apiProbe)
	}
	if *retention < time.Minute {
		return usageErr("--bypass-retention %s: must be 1m or more", *retention)
	}
	if err := checkMemoryLimitRatio(*memoryRatio); err != nil {
		return usageErr("%v", err)
	}
	log := newLogger(stderr)
	setGCPercent(log)
	setMemoryLimit(log, *memoryRatio)

	restConfig, err := loadConfig(*kubeconfig)
	if err != nil {
		return usageErr("%v", err)
	}
	restConfig.UserAgent = "routing-agent/" + *nodeName
	learned := bypass.NewLearned(*retention)
	resolver := &bypass.Resolver{Servers: func() []netip.Addr {
		r, _ := nodefacts.ReadResolvers(*resolvConf, *resolvedUpstream, *hostRoot)
		return append(r.Listed, dnsServers...)
	}}
	self, err := agent.ParseControlPlaneHost(restConfig.Host, bypass.SourceKubeconfig)
	if err != nil {
		return usageErr("kubeconfig server %q: %v", restConfig.Host, err)
	}
	controlPlane = append(controlPlane, self)
	// A name is looked up through the node's resolvers and a new address
	// bypassed before it is dialled; the kubelet's server and the
	// operator's endpoints are the way in when the usual one fails (an
	// in-cluster agent's Service, DNATed to an endpoint not bypassed yet).
	dialer := &bypass.Dialer{Resolver: resolver, Learned: learned}
	restConfig.Dial = dialer.DialContext
	client, err := versioned.NewForConfig(restConfig)
	if err != nil {
		return usageErr("%v", err)
	}
	kube, err := kubernetes.NewForConfig(restConfig)
	if err != nil {
		return usageErr("%v", err)
	}

	// The connection-marking table, in the agent's own network namespace
	// (the node's: the pod runs with hostNetwork).
	marks, err := connmark.New(-1)
	if err != nil {
		return usageErr("%v", err)
	}
	// The kernel view's own socket, for dumps of one table (and of the main
	// table alone); without it every reconcile reads everything.
	dumps, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		log.Error(err, "no netlink socket for the kernel view; every reconcile reads every owned route and rule")
		dumps = nil
	}
	a := agent.New(agent.Options{
		DumpHandle:        dumps,
		Marker:            connmark.Planned{Table: marks},
		NodeName:          *nodeName,
		Planner:           *cfg,
		ResyncPeriod:      *resync,
		ResolvConf:        *resolvConf,
		ResolvedUpstream:  *resolvedUpstream,
		HostRoot:          *hostRoot,
		DNSServers:        dnsServers,
		ControlPlane:      controlPlane,
		KubeletKubeconfig: *kubeletKubeconfig,
		ResolveInterval:   *resolveInterval,
		Learned:           learned,
		Resolver:          resolver,
		Dialer:            dialer,
		ManageSysctls:     *manageSysctls,
		SysctlRoot:        *sysctlRoot,
		Probe:             probe,
		StartupTaint:      *startupTaint,
		APIProbeInterval:  *apiProbe,
	}, client, kube, &netlink.Handle{}, log)
	// The zero Handle works in the current namespace: so do the batches.
	if err := a.SetNamespace(netns.None()); err != nil {
		return usageErr("netlink: %v", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if *httpAddr != "" {
		ln, err := net.Listen("tcp", *httpAddr)
		if err != nil {
			return usageErr("--http-address: %v", err)
		}
		server := &http.Server{Handler: a.Handler(), ReadHeaderTimeout: 5 * time.Second}
		go server.Serve(ln)
		defer server.Close()
		log.Info("serving metrics and health", "address", ln.Addr().String())
	}
	if err := a.Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
		log.Error(err, "agent stopped")
		return 1
	}
	return 0
}

func loadConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig != "" {
		return clientcmd.BuildConfigFromFlags("", kubeconfig)
	}
	cfg, err := rest.InClusterConfig()
	if err != nil {
		return nil, fmt.Errorf("no --kubeconfig and not in a cluster: %w", err)
	}
	return cfg, nil
}
