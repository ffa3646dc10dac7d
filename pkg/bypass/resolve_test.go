package bypass

import (
	"context"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"
)

// TestDialerFallsBack: the server refusing, the Dialer goes to the
// fallbacks in order, telling the hook about an address before dialling
// it; a server that answers is used alone. Loopback only.
func TestDialerFallsBack(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refused := closed.Addr().String()
	closed.Close()

	d := &Dialer{Resolver: &Resolver{Servers: func() []netip.Addr { return nil }}, Learned: NewLearned(time.Hour), FallbackAfter: time.Second}
	var told []netip.Addr
	d.SetOnNew(func(a []netip.Addr) { told = append(told, a...) })
	d.SetFallbacks(func() []string { return []string{refused, ln.Addr().String()} })

	conn, err := d.DialContext(context.Background(), "tcp", refused)
	if err != nil {
		t.Fatalf("with a fallback listening: %v", err)
	}
	if conn.RemoteAddr().String() != ln.Addr().String() {
		t.Errorf("connected to %s, want the fallback %s", conn.RemoteAddr(), ln.Addr())
	}
	conn.Close()
	if !slices.Contains(told, netip.MustParseAddr("127.0.0.1")) {
		t.Errorf("the hook was not told of the fallback's address before the dial: %v", told)
	}

	d.SetFallbacks(func() []string { return []string{refused} })
	if _, err := d.DialContext(context.Background(), "tcp", refused); err == nil {
		t.Error("dialled with nothing listening")
	}

	// A name that does not resolve and was never learned fails; once
	// learned, its last addresses are dialled.
	d.SetFallbacks(nil)
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	if _, err := d.DialContext(context.Background(), "tcp", net.JoinHostPort("api.example.com", port)); err == nil {
		t.Error("a name never resolved was dialled")
	}
	d.Learned.Observe(DNSSource("api.example.com"), []netip.Addr{netip.MustParseAddr("127.0.0.1")}, time.Now())
	conn, err = d.DialContext(context.Background(), "tcp", net.JoinHostPort("api.example.com", port))
	if err != nil {
		t.Fatalf("the name's last known address: %v", err)
	}
	conn.Close()
}
