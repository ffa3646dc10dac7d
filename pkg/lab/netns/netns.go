// Package netns runs code inside named network namespaces (those of
// `ip netns`), so that tests and the lab can reach hosts that live only in
// namespaces they created without touching the machine's own network.
package netns

import (
	"context"
	"fmt"
	"net"
	"runtime"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Do runs fn on an OS thread switched into the named namespace and switches
// back afterwards. Sockets fn opens stay in that namespace for their life.
func Do(name string, fn func() error) error {
	runtime.LockOSThread()
	origin, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("netns: reading the current namespace: %w", err)
	}
	defer origin.Close()
	target, err := netns.GetFromName(name)
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("netns: opening namespace %q: %w", name, err)
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("netns: entering namespace %q: %w", name, err)
	}
	defer func() {
		if err := netns.Set(origin); err != nil {
			// Leave the thread locked: the runtime ends it with the
			// goroutine instead of reusing a thread in the wrong namespace.
			return
		}
		runtime.UnlockOSThread()
	}()
	return fn()
}

// Dialer returns a dial function, for rest.Config.Dial or http.Transport,
// whose connections are opened inside the named namespace.
func Dialer(name string) func(ctx context.Context, network, address string) (net.Conn, error) {
	return func(ctx context.Context, network, address string) (net.Conn, error) {
		var conn net.Conn
		err := Do(name, func() error {
			var err error
			conn, err = (&net.Dialer{}).DialContext(ctx, network, address)
			return err
		})
		return conn, err
	}
}

// NetlinkHandle returns a netlink handle whose sockets live in the named
// namespace, and a function that closes it.
func NetlinkHandle(name string) (*netlink.Handle, func(), error) {
	ns, err := netns.GetFromName(name)
	if err != nil {
		return nil, nil, fmt.Errorf("netns: opening namespace %q: %w", name, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, nil, fmt.Errorf("netns: netlink handle in %q: %w", name, err)
	}
	return h, h.Close, nil
}
