package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"net"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/routing-agent/routing-agent/pkg/bypass"
	"github.com/routing-agent/routing-agent/pkg/nodefacts"
	"github.com/routing-agent/routing-agent/pkg/planner"
)

// SourceDNSServerFlag is the source of DNS servers given with --dns-server.
const SourceDNSServerFlag = "dns-server"

// ControlPlaneHost is an API server the node must keep reaching: an IP
// literal or a name, looked up through the node's resolvers; either way
// what it gives is learned (sticky). With a port it is also a way for the
// agent's own connection to reach the API server when its usual one fails.
type ControlPlaneHost struct {
	Host   string
	Port   string // "" when not given
	Source string // where an IP literal was given; a name's is "dns <name>"
}

// source is where the host's addresses are learned from.
func (h ControlPlaneHost) source() string {
	if _, err := netip.ParseAddr(h.Host); err == nil {
		return h.Source
	}
	return bypass.DNSSource(h.Host)
}

// ParseControlPlaneHost takes a name, an IP, host:port or a URL (an https
// URL without a port means 443).
func ParseControlPlaneHost(s, source string) (ControlPlaneHost, error) {
	host, port := strings.TrimSpace(s), ""
	if strings.Contains(host, "://") {
		u, err := url.Parse(host)
		if err != nil {
			return ControlPlaneHost{}, err
		}
		host, port = u.Hostname(), u.Port()
		if port == "" && u.Scheme == "https" {
			port = "443"
		}
	} else if h, p, err := splitHostPort(host); err == nil {
		host, port = h, p
	}
	host = strings.Trim(host, "[]")
	if host == "" {
		return ControlPlaneHost{}, fmt.Errorf("%q names no host", s)
	}
	if _, err := netip.ParseAddr(host); err != nil && !validName(host) {
		return ControlPlaneHost{}, fmt.Errorf("%q is neither an IP address nor a DNS name", s)
	}
	return ControlPlaneHost{Host: host, Port: port, Source: source}, nil
}

// splitHostPort splits "host:port" and "[v6]:port" but leaves a bare IPv6
// address alone.
func splitHostPort(s string) (string, string, error) {
	if _, err := netip.ParseAddr(s); err == nil {
		return "", "", errors.New("an address")
	}
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		return "", "", errors.New("no port")
	}
	return s[:i], s[i+1:], nil
}

func validName(s string) bool {
	s = strings.TrimSuffix(s, ".")
	if s == "" || len(s) > 253 {
		return false
	}
	for _, label := range strings.Split(s, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, c := range label {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}

// bypassProblems are what keeps the bypass set from being complete, for
// the BypassComplete condition: a name that does not resolve, a resolver
// whose upstream servers are hidden, a file that cannot be read. Messages
// are stable (no ports, no timings), so they do not rewrite the status at
// every lookup.
type bypassProblems struct {
	names      map[string]string // name -> what failed
	kubeconfig string
	resolvers  string
}

// readHosts lists the control-plane hosts of this round: the operator's
// and the agent's kubeconfig (fixed), and the kubelet kubeconfig's
// servers, read anew (the kubelet's file is rewritten on rotation). A
// kubelet kubeconfig that cannot be read or parsed (caught mid-rewrite)
// counts with the hosts it had; a missing one is no source.
func (a *Agent) readHosts(last []ControlPlaneHost) (hosts []ControlPlaneHost, kubeletRead bool, problem string) {
	hosts = slices.Clone(a.opts.ControlPlane)
	if a.opts.KubeletKubeconfig == "" {
		return hosts, true, ""
	}
	previous := func() []ControlPlaneHost {
		var out []ControlPlaneHost
		for _, h := range last {
			if h.Source == bypass.SourceKubeletKubeconfig {
				out = append(out, h)
			}
		}
		return out
	}
	var visited []string
	path, err := nodefacts.HostPath(a.opts.HostRoot, a.opts.KubeletKubeconfig, &visited)
	if errors.Is(err, fs.ErrNotExist) {
		return hosts, true, "" // not this distribution's path: no source, not a problem
	}
	if err != nil {
		return append(hosts, previous()...), false, fmt.Sprintf("kubelet kubeconfig %s: %v", a.opts.KubeletKubeconfig, err)
	}
	cfg, err := clientcmd.LoadFromFile(path)
	if err != nil {
		return append(hosts, previous()...), false, fmt.Sprintf("kubelet kubeconfig %s: cannot be read as a kubeconfig", a.opts.KubeletKubeconfig)
	}
	for _, name := range slices.Sorted(maps.Keys(cfg.Clusters)) {
		if h, err := ParseControlPlaneHost(cfg.Clusters[name].Server, bypass.SourceKubeletKubeconfig); err == nil {
			hosts = append(hosts, h)
		}
	}
	return hosts, true, ""
}

// resolveNames learns this round's control-plane addresses: IP literals
// as given, names looked up through the node's resolvers. An address not
// known before gets its bypass rule at once (before any reconcile, also
// before the caches have synced: the agent may need it to reach the API
// server at all). It runs at start and every ResolveInterval.
func (a *Agent) resolveNames(ctx context.Context) {
	a.bypassMu.Lock()
	last := a.hosts
	a.bypassMu.Unlock()
	hosts, kubeletRead, kubeconfigProblem := a.readHosts(last)
	now := time.Now()
	problems := map[string]string{}
	literals := map[string][]netip.Addr{}
	var added []netip.Addr
	for _, h := range hosts {
		if addr, err := netip.ParseAddr(h.Host); err == nil {
			if h.Source != bypass.SourceKubeletKubeconfig || kubeletRead {
				literals[h.Source] = append(literals[h.Source], addr)
			}
			continue
		}
		addrs, err := a.opts.Resolver.Lookup(ctx, h.Host)
		if err != nil {
			problems[h.Host] = bypass.Stable(err)
			a.log.Info("control-plane name did not resolve; its last known addresses stay bypassed", "name", h.Host, "error", err.Error(), "kept", fmt.Sprint(a.opts.Learned.From(h.source())))
			continue
		}
		added = append(added, a.opts.Learned.Observe(h.source(), addrs, now)...)
	}
	// One answer per source, with all its addresses: a source's answer
	// ages what it no longer lists.
	for _, source := range slices.Sorted(maps.Keys(literals)) {
		added = append(added, a.opts.Learned.Observe(source, literals[source], now)...)
	}
	if len(added) > 0 {
		a.log.Info("control-plane addresses learned", "addresses", fmt.Sprint(added))
	}
	if !a.ready.Load() {
		// Until the first apply, nothing else puts bypass rules in: every
		// learned address is checked each round, so one whose rule could
		// not be added is tried again.
		var all []netip.Addr
		for _, e := range a.opts.Learned.Entries() {
			all = append(all, e.Addr)
		}
		a.ensureBypass(all)
	} else if len(added) > 0 {
		a.ensureBypass(added)
	}
	// The status shows the learned set, unlisted times included: a change
	// there is one to write, even with no address added.
	learned := fmt.Sprint(a.opts.Learned.Entries())
	a.bypassMu.Lock()
	changed := !maps.Equal(a.problems.names, problems) || a.problems.kubeconfig != kubeconfigProblem || !slices.Equal(a.hosts, hosts) || a.learned != learned
	a.problems.names, a.problems.kubeconfig, a.hosts, a.learned = problems, kubeconfigProblem, hosts, learned
	a.bypassMu.Unlock()
	if changed || len(added) > 0 {
		a.queue.Add(key)
	}
}

// ensureBypass adds the bypass rules of learned addresses now, and has the
// next reconcile take them into the plan.
func (a *Agent) ensureBypass(addrs []netip.Addr) {
	if len(addrs) == 0 {
		return
	}
	a.kernelMu.Lock()
	n, err := a.applier.EnsureBypass(addrs)
	if n > 0 {
		a.countWrites()
	}
	a.kernelMu.Unlock()
	if err != nil {
		a.log.Error(err, "adding the bypass rules of learned control-plane addresses; trying again")
	}
	a.queue.Add(key)
}

// runResolver resolves the control-plane names at start and then every
// ResolveInterval until ctx ends.
func (a *Agent) runResolver(ctx context.Context) {
	ticker := time.NewTicker(a.opts.ResolveInterval)
	defer ticker.Stop()
	for {
		a.resolveNames(ctx)
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
	}
}

// Fallbacks are the other ways to the API server (host:port of the
// kubelet's kubeconfig and of --control-plane-endpoint), for the Dialer of
// the agent's own connection.
func (a *Agent) Fallbacks() []string {
	a.bypassMu.Lock()
	defer a.bypassMu.Unlock()
	var out []string
	for _, h := range a.hosts {
		if h.Port != "" && h.Source != bypass.SourceKubeconfig {
			out = append(out, net.JoinHostPort(h.Host, h.Port))
		}
	}
	return out
}

// controlPlane lists this round's control-plane endpoints: the learned
// set, with the EndpointSlices' addresses learned now. An EndpointSlice
// emptied during a control plane's replacement, or an API server gone,
// drops nothing.
func (a *Agent) controlPlane(now time.Time) []planner.Endpoint {
	configured := map[string]bool{bypass.SourceEndpointSlice: true}
	a.bypassMu.Lock()
	for _, h := range a.hosts {
		configured[h.source()] = true
	}
	a.bypassMu.Unlock()
	if slices, err := a.slices.List(labels.Everything()); err == nil {
		var addrs []netip.Addr
		for _, s := range slices {
			for _, e := range s.Endpoints {
				for _, addr := range e.Addresses {
					if ip, err := netip.ParseAddr(addr); err == nil {
						addrs = append(addrs, ip)
					}
				}
			}
		}
		a.opts.Learned.Observe(bypass.SourceEndpointSlice, addrs, now)
	}
	if dropped := a.opts.Learned.Expire(now, func(source string) bool { return configured[source] }); len(dropped) > 0 {
		a.log.Info("control-plane addresses no source has listed for the retention period; no longer bypassed", "addresses", fmt.Sprint(dropped), "retention", a.opts.Learned.Retention.String())
	}
	var out []planner.Endpoint
	for _, e := range a.opts.Learned.Entries() {
		for _, s := range e.Sources {
			out = append(out, planner.Endpoint{Addr: e.Addr, Source: s})
		}
	}
	return out
}

// dnsServers reads the node's resolvers. When they cannot be read the last
// known servers stay bypassed, with any read before the error.
func (a *Agent) dnsServers() []planner.Endpoint {
	r, err := nodefacts.ReadResolvers(a.opts.ResolvConf, a.opts.ResolvedUpstream, a.opts.HostRoot)
	a.dnsWatch.follow(r.Files)
	problem := ""
	servers := r.Servers
	switch {
	case err != nil:
		problem = fmt.Sprintf("reading the node's resolvers: %v; the last known servers stay bypassed", err)
		a.log.Error(err, "reading DNS servers; keeping the last known ones", "resolvConf", a.opts.ResolvConf)
		for _, e := range a.status.dns {
			if !slices.Contains(servers, e) {
				servers = append(servers, e)
			}
		}
	case len(r.Hidden) > 0 && len(a.opts.DNSServers) == 0:
		problem = fmt.Sprintf("loopback resolver %s does not say which servers it forwards to; name them with --dns-server", joinAddrs(r.Hidden))
	}
	a.bypassMu.Lock()
	a.problems.resolvers = problem
	a.bypassMu.Unlock()
	a.status.dns = slices.Clone(servers)
	for _, s := range a.opts.DNSServers {
		servers = append(servers, planner.Endpoint{Addr: s, Source: SourceDNSServerFlag})
	}
	return servers
}

func joinAddrs(addrs []netip.Addr) string {
	s := make([]string, len(addrs))
	for i, a := range addrs {
		s[i] = a.String()
	}
	return strings.Join(s, ", ")
}

// bypassCondition says whether every bypass source could be read.
func (a *Agent) bypassCondition() (ok bool, reason, message string) {
	a.bypassMu.Lock()
	defer a.bypassMu.Unlock()
	var msgs []string
	for _, name := range slices.Sorted(maps.Keys(a.problems.names)) {
		msgs = append(msgs, fmt.Sprintf("control-plane name %s: %s (its last known addresses stay bypassed)", name, a.problems.names[name]))
		reason = "NameUnresolved"
	}
	if a.problems.kubeconfig != "" {
		msgs = append(msgs, a.problems.kubeconfig+" (the servers it named before stay bypassed)")
		if reason == "" {
			reason = "SourceUnreadable"
		}
	}
	if a.problems.resolvers != "" {
		msgs = append(msgs, a.problems.resolvers)
		if reason == "" {
			reason = "ResolversUnknown"
		}
	}
	if len(msgs) == 0 {
		return true, "AllSourcesRead", "every bypass source was read"
	}
	return false, reason, strings.Join(msgs, "; ")
}
