package bypass

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"
)

// Resolver looks names up through the node's own DNS servers, never the
// process's resolv.conf: a host-network pod with ClusterFirstWithHostNet
// would ask cluster DNS, which lives behind the very API server and pod
// network the lookup is meant to keep reachable.
type Resolver struct {
	// Servers returns the servers to ask, in order: resolv.conf's
	// nameservers as listed, a loopback stub included (the agent shares the
	// node's network namespace, so 127.0.0.53 answers it too).
	Servers func() []netip.Addr
	// Timeout bounds the question to each server; default 2 s.
	Timeout time.Duration
}

// ErrNoServers is returned when the node has no DNS server to ask.
var ErrNoServers = errors.New("the node has no DNS server to ask")

// Lookup returns the IPv4 and IPv6 addresses of name. An IP literal is its
// own answer. A server that says the name does not exist is believed; one
// that fails or times out is skipped for the next.
func (r *Resolver) Lookup(ctx context.Context, name string) ([]netip.Addr, error) {
	if addr, err := netip.ParseAddr(name); err == nil {
		return []netip.Addr{addr.WithZone("")}, nil
	}
	servers := r.Servers()
	if len(servers) == 0 {
		return nil, ErrNoServers
	}
	timeout := r.Timeout
	if timeout <= 0 {
		timeout = 2 * time.Second
	}
	// Absolute, so no search domain of the process's resolv.conf applies.
	fqdn := strings.TrimSuffix(name, ".") + "."
	lerr := &LookupError{Name: name}
	for _, server := range servers {
		target := netip.AddrPortFrom(server, 53).String()
		res := &net.Resolver{
			PreferGo:     true,
			StrictErrors: true,
			Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, network, target)
			},
		}
		qctx, cancel := context.WithTimeout(ctx, timeout)
		addrs, err := res.LookupNetIP(qctx, "ip", fqdn)
		cancel()
		if err == nil && len(addrs) > 0 {
			for i := range addrs {
				addrs[i] = addrs[i].Unmap().WithZone("")
			}
			return addrs, nil
		}
		lerr.Asked = append(lerr.Asked, server)
		var dnsErr *net.DNSError
		if errors.As(err, &dnsErr) && dnsErr.IsNotFound {
			lerr.NotFound = true
			return nil, lerr
		}
		if err == nil {
			err = errors.New("no addresses")
		}
		lerr.Causes = append(lerr.Causes, fmt.Errorf("%s: %w", server, err))
		if ctx.Err() != nil {
			break
		}
	}
	return nil, lerr
}

// LookupError says why a name did not resolve. Its message names only the
// name and the servers asked, so that it reads the same at every attempt;
// Causes hold the details (timeouts, refusals) for the log.
type LookupError struct {
	Name     string
	NotFound bool
	Asked    []netip.Addr
	Causes   []error
}

func (e *LookupError) Error() string {
	if e.NotFound {
		return e.Name + ": " + e.stable()
	}
	return fmt.Sprintf("%s: %s: %v", e.Name, e.stable(), errors.Join(e.Causes...))
}

func (e *LookupError) stable() string {
	asked := make([]string, len(e.Asked))
	for i, a := range e.Asked {
		asked[i] = a.String()
	}
	if e.NotFound {
		return "no such host (asked " + strings.Join(asked, ", ") + ")"
	}
	return "no DNS server answered (asked " + strings.Join(asked, ", ") + ")"
}

// Stable is err's message without the parts that change at every attempt
// (timeouts, ports), for a status that must not be rewritten at each one.
func Stable(err error) string {
	var lerr *LookupError
	if errors.As(err, &lerr) {
		return lerr.stable()
	}
	return err.Error()
}

// Dialer opens the agent's API connections. For a server given by name,
// the name is looked up through the node's resolvers, what it resolves to
// is learned, and for an address not known before the OnNew hook runs
// before the first dial (the agent puts its bypass rule in place), so an
// API server that moved is reached through main rather than through a
// Route that would drop or re-source the connection; when the lookup
// fails, the addresses the name gave before are dialled.
//
// When the server cannot be reached and SetFallbacks gave other ways to the
// same API server (the kubelet's server, --control-plane-endpoint host:port
// ones), those are dialled next: an in-cluster agent dials the kubernetes
// Service, which kube-proxy sends to an endpoint that may have moved while
// the agent was cut off and so not be bypassed yet. TLS still verifies the
// server's own name or address, so nothing but that API server is accepted.
type Dialer struct {
	Resolver *Resolver
	Learned  *Learned
	// FallbackAfter is how long the server itself is tried before the
	// fallbacks; default 5 s.
	FallbackAfter time.Duration

	mu        sync.Mutex
	onNew     func([]netip.Addr)
	fallbacks func() []string
}

// SetFallbacks sets the function listing host:port alternatives.
func (d *Dialer) SetFallbacks(fn func() []string) {
	d.mu.Lock()
	d.fallbacks = fn
	d.mu.Unlock()
}

// SetOnNew sets the hook run with newly learned addresses before they are
// dialled.
func (d *Dialer) SetOnNew(fn func([]netip.Addr)) {
	d.mu.Lock()
	d.onNew = fn
	d.mu.Unlock()
}

// DialContext is for rest.Config.Dial.
func (d *Dialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	var fallbacks []string
	d.mu.Lock()
	list := d.fallbacks
	d.mu.Unlock()
	if list != nil {
		for _, f := range list() {
			if f != address {
				fallbacks = append(fallbacks, f)
			}
		}
	}
	first := ctx
	if len(fallbacks) > 0 {
		after := d.FallbackAfter
		if after <= 0 {
			after = 5 * time.Second
		}
		var cancel context.CancelFunc
		first, cancel = context.WithTimeout(ctx, after)
		defer cancel()
	}
	conn, err := d.dial(first, network, address)
	if err == nil {
		return conn, nil
	}
	errs := []error{err}
	for _, f := range fallbacks {
		if ctx.Err() != nil {
			break
		}
		conn, err := d.dial(ctx, network, f)
		if err == nil {
			return conn, nil
		}
		errs = append(errs, fmt.Errorf("fallback %s: %w", f, err))
	}
	return nil, errors.Join(errs...)
}

// dial connects to host:port, a name resolved as DialContext says.
func (d *Dialer) dial(ctx context.Context, network, address string) (net.Conn, error) {
	host, port, err := net.SplitHostPort(address)
	if err != nil {
		return nil, err
	}
	var addrs []netip.Addr
	var lookupErr error
	if a, err := netip.ParseAddr(host); err == nil {
		addrs = []netip.Addr{a.WithZone("")}
		if !d.Learned.Has(a) {
			d.newAddrs(addrs) // a fallback's VIP, say: bypassed before it is dialled
		}
	} else {
		source := DNSSource(host)
		addrs, lookupErr = d.Resolver.Lookup(ctx, host)
		if lookupErr == nil {
			d.newAddrs(d.Learned.Observe(source, addrs, time.Now()))
		} else if addrs = d.Learned.From(source); len(addrs) == 0 {
			return nil, lookupErr
		}
	}
	var errs []error
	for _, a := range addrs {
		conn, err := (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext(ctx, network, net.JoinHostPort(a.String(), port))
		if err == nil {
			return conn, nil
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	if lookupErr != nil {
		errs = append(errs, lookupErr)
	}
	return nil, errors.Join(errs...)
}

func (d *Dialer) newAddrs(added []netip.Addr) {
	if len(added) == 0 {
		return
	}
	d.mu.Lock()
	onNew := d.onNew
	d.mu.Unlock()
	if onNew != nil {
		onNew(added)
	}
}
