package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"maps"
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

// Sources of control-plane addresses given as IP literals, and of DNS
// servers given by the operator, as the NodeRouting status shows them.
const (
	SourceKubeconfig        = "kubeconfig"
	SourceKubeletKubeconfig = "kubelet-kubeconfig"
	SourceFlag              = "control-plane-endpoint"
	SourceDNSServerFlag     = "dns-server"
)

// ControlPlaneHost is an API server the node must keep reaching: an IP
// literal, kept on the main table as it is, or a name, looked up through
// the node's resolvers and its addresses learned (sticky).
type ControlPlaneHost struct {
	Host   string
	Source string // for an IP literal: where it was given
}

// ParseControlPlaneHost takes a name, an IP, host:port or a URL.
func ParseControlPlaneHost(s, source string) (ControlPlaneHost, error) {
	host := strings.TrimSpace(s)
	if strings.Contains(host, "://") {
		u, err := url.Parse(host)
		if err != nil {
			return ControlPlaneHost{}, err
		}
		host = u.Hostname()
	} else if h, _, err := splitHostPort(host); err == nil {
		host = h
	}
	host = strings.Trim(host, "[]")
	if host == "" {
		return ControlPlaneHost{}, fmt.Errorf("%q names no host", s)
	}
	if _, err := netip.ParseAddr(host); err != nil && !validName(host) {
		return ControlPlaneHost{}, fmt.Errorf("%q is neither an IP address nor a DNS name", s)
	}
	return ControlPlaneHost{Host: host, Source: source}, nil
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

// bypassProblems are what keeps the bypass set from being complete, by
// source, for the BypassComplete condition: a name that does not resolve,
// a resolver whose upstream servers are hidden, a file that cannot be read.
// Messages are stable (no ports, no timings), so they do not rewrite the
// status at every lookup.
type bypassProblems struct {
	names      map[string]string // name -> what failed
	kubeconfig string
	resolvers  string
}

// controlPlaneHosts are the hosts of this round: the operator's and the
// agent's kubeconfig (fixed), and the kubelet kubeconfig's servers, read
// anew each time (the kubelet's file is rewritten on rotation).
func (a *Agent) controlPlaneHosts() ([]ControlPlaneHost, string) {
	hosts := slices.Clone(a.opts.ControlPlane)
	if a.opts.KubeletKubeconfig == "" {
		return hosts, ""
	}
	var visited []string
	path, err := nodefacts.HostPath(a.opts.HostRoot, a.opts.KubeletKubeconfig, &visited)
	if errors.Is(err, fs.ErrNotExist) {
		return hosts, "" // not this distribution's path: no source, not a problem
	}
	if err != nil {
		return hosts, fmt.Sprintf("kubelet kubeconfig %s: %v", a.opts.KubeletKubeconfig, err)
	}
	cfg, err := clientcmd.LoadFromFile(path)
	if err != nil {
		return hosts, fmt.Sprintf("kubelet kubeconfig %s: cannot be read as a kubeconfig", a.opts.KubeletKubeconfig)
	}
	for _, name := range slices.Sorted(maps.Keys(cfg.Clusters)) {
		if h, err := ParseControlPlaneHost(cfg.Clusters[name].Server, SourceKubeletKubeconfig); err == nil {
			hosts = append(hosts, h)
		}
	}
	return hosts, ""
}

// resolveNames looks every control-plane name up through the node's
// resolvers, learns the answers and, for an address not known before,
// puts its bypass rule in at once (before any reconcile, also before the
// caches have synced: the agent may need it to reach the API server at
// all). It runs at start and every ResolveInterval.
func (a *Agent) resolveNames(ctx context.Context) {
	hosts, kubeconfigProblem := a.controlPlaneHosts()
	problems := map[string]string{}
	var added []netip.Addr
	for _, h := range hosts {
		if _, err := netip.ParseAddr(h.Host); err == nil {
			continue
		}
		addrs, err := a.opts.Resolver.Lookup(ctx, h.Host)
		if err != nil {
			problems[h.Host] = bypass.Stable(err)
			a.log.Info("control-plane name did not resolve; its last known addresses stay bypassed", "name", h.Host, "error", err.Error(), "kept", fmt.Sprint(a.opts.Learned.From(bypass.DNSSource(h.Host))))
			continue
		}
		added = append(added, a.opts.Learned.Observe(bypass.DNSSource(h.Host), addrs, time.Now())...)
	}
	if len(added) > 0 {
		a.log.Info("control-plane addresses learned", "addresses", fmt.Sprint(added))
		a.ensureBypass(added)
	}
	// A host given as an IP literal (the kubelet's kubeconfig rewritten
	// with another server) needs no lookup, but a reconcile.
	fingerprint := fmt.Sprint(hosts)
	a.bypassMu.Lock()
	changed := !maps.Equal(a.problems.names, problems) || a.problems.kubeconfig != kubeconfigProblem || a.hosts != fingerprint
	a.problems.names, a.problems.kubeconfig, a.hosts = problems, kubeconfigProblem, fingerprint
	a.bypassMu.Unlock()
	if changed || len(added) > 0 {
		a.queue.Add(key)
	}
}

// ensureBypass adds the bypass rules of newly learned addresses now, and
// has the next reconcile take them into the plan.
func (a *Agent) ensureBypass(addrs []netip.Addr) {
	a.kernelMu.Lock()
	n, err := a.applier.EnsureBypass(addrs)
	if n > 0 {
		a.countWrites()
	}
	a.kernelMu.Unlock()
	if err != nil {
		a.log.Error(err, "adding the bypass rules of learned control-plane addresses; the next reconcile tries again")
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

// controlPlane lists this round's control-plane endpoints: IP literals as
// given, the EndpointSlices' addresses and every learned one. The
// EndpointSlices are learned (sticky) too: one emptied during a control
// plane's replacement, or an API server gone, drops nothing.
func (a *Agent) controlPlane(now time.Time) []planner.Endpoint {
	hosts, _ := a.controlPlaneHosts()
	var out []planner.Endpoint
	names := map[string]bool{bypass.SourceEndpointSlice: true}
	for _, h := range hosts {
		if addr, err := netip.ParseAddr(h.Host); err == nil {
			out = append(out, planner.Endpoint{Addr: addr, Source: h.Source})
		} else {
			names[bypass.DNSSource(h.Host)] = true
		}
	}
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
	if dropped := a.opts.Learned.Expire(now, func(source string) bool { return names[source] }); len(dropped) > 0 {
		a.log.Info("control-plane addresses no source has listed for the retention period; no longer bypassed", "addresses", fmt.Sprint(dropped), "retention", a.opts.Learned.Retention.String())
	}
	for _, e := range a.opts.Learned.Entries() {
		for _, s := range e.Sources {
			out = append(out, planner.Endpoint{Addr: e.Addr, Source: s})
		}
	}
	return out
}

// dnsServers reads the node's resolvers. When they cannot be read the last
// known servers stay bypassed rather than none.
func (a *Agent) dnsServers() []planner.Endpoint {
	r, err := nodefacts.ReadResolvers(a.opts.ResolvConf, a.opts.ResolvedUpstream, a.opts.HostRoot)
	a.dnsWatch.follow(r.Files)
	var extra []planner.Endpoint
	for _, s := range a.opts.DNSServers {
		extra = append(extra, planner.Endpoint{Addr: s, Source: SourceDNSServerFlag})
	}
	problem := ""
	switch {
	case err != nil:
		problem = fmt.Sprintf("reading the node's resolvers: %v; the last known servers stay bypassed", err)
		a.log.Error(err, "reading DNS servers; keeping the last known ones", "resolvConf", a.opts.ResolvConf)
		r.Servers = a.status.dns
	case len(r.Hidden) > 0 && len(a.opts.DNSServers) == 0:
		problem = fmt.Sprintf("loopback resolver %s does not say which servers it forwards to; name them with --dns-server", joinAddrs(r.Hidden))
	}
	a.bypassMu.Lock()
	a.problems.resolvers = problem
	a.bypassMu.Unlock()
	if err == nil {
		a.status.dns = r.Servers
	}
	return append(slices.Clone(r.Servers), extra...)
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
	reason = ""
	for _, name := range slices.Sorted(maps.Keys(a.problems.names)) {
		msgs = append(msgs, fmt.Sprintf("control-plane name %s: %s (its last known addresses stay bypassed)", name, a.problems.names[name]))
		reason = "NameUnresolved"
	}
	if a.problems.kubeconfig != "" {
		msgs = append(msgs, a.problems.kubeconfig)
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
