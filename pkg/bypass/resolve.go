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
	asked := make([]string, len(e.Asked))
	for i, a := range e.Asked {
		asked[i] = a.String()
	}
	if e.NotFound {
		return fmt.Sprintf("%s: no such host (asked %s)", e.Name, strings.Join(asked, ", "))
	}
	return fmt.Sprintf("%s: no answer from %s: %v", e.Name, strings.Join(asked, ", "), errors.Join(e.Causes...))
}

// Stable is err's message without the parts that change at every attempt.
func Stable(err error) string {
	var lerr *LookupError
	if errors.As(err, &lerr) {
		asked := make([]string, len(lerr.Asked))
		for i, a := range lerr.Asked {
			asked[i] = a.String()
		}
		if lerr.NotFound {
			return "no such host (asked " + strings.Join(asked, ", ") + ")"
		}
		return "no DNS server answered (asked " + strings.Join(asked, ", ") + ")"
	}
	return err.Error()
}

// Dialer opens connections to a server given by name (the agent's API
// server): the name is looked up through the node's resolvers, what it
// resolves to is learned, and for an address not known before the OnNew
// hook runs before the first dial (the agent puts its bypass rule in
// place), so an API server that moved is reached through main rather than
// through a Route that would drop or re-source the connection. When the
// lookup fails, the addresses the name gave before are dialled.
type Dialer struct {
	Resolver *Resolver
	Learned  *Learned

	mu    sync.Mutex
	onNew func([]netip.Addr)
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
	host, port, err := net.SplitHostPort(address)
	if err != nil {
		return nil, err
	}
	source := DNSSource(host)
	addrs, lookupErr := d.Resolver.Lookup(ctx, host)
	if lookupErr == nil {
		if added := d.Learned.Observe(source, addrs, time.Now()); len(added) > 0 {
			d.mu.Lock()
			onNew := d.onNew
			d.mu.Unlock()
			if onNew != nil {
				onNew(added)
			}
		}
	} else if addrs = d.Learned.From(source); len(addrs) == 0 {
		return nil, lookupErr
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
