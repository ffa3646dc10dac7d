package dnsserver_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/routing-agent/routing-agent/pkg/lab/dnsserver"
	"github.com/routing-agent/routing-agent/pkg/lab/netns"
	"github.com/routing-agent/routing-agent/pkg/lab/topology"
)

// TestMain removes namespaces a killed earlier run left behind. Tests do not
// skip without root: a lab that cannot be built is a failure.
func TestMain(m *testing.M) {
	if os.Geteuid() == 0 {
		if err := netns.RemoveStale(); err != nil {
			fmt.Fprintln(os.Stderr, "removing stale namespaces:", err)
		}
	}
	os.Exit(m.Run())
}

// lab builds a topology lab and serves DNS where the lab's nodes expect it,
// on the external host's ExternalDNS, as a cluster test would; both go
// away when the test ends.
func lab(t *testing.T) (*topology.Lab, *dnsserver.Server, netip.AddrPort) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("these tests build network namespaces and must run as root")
	}
	l, err := topology.New(topology.Options{Purpose: "dnstest"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("closing the lab: %v", err)
		}
	})
	addr := netip.AddrPortFrom(l.ExternalDNS, 53)
	s, err := dnsserver.Start(l.External, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("closing the server: %v", err)
		}
	})
	return l, s, addr
}

// resolver is Go's own resolver as a node would use it: every query goes,
// from inside ns, to server. network forces "udp" or "tcp"; empty lets the
// resolver choose (UDP, then TCP for a truncated answer).
func resolver(ns string, server netip.AddrPort, network string) *net.Resolver {
	dial := netns.Dialer(ns)
	return &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, asked, _ string) (net.Conn, error) {
			if network != "" {
				asked = network
			}
			return dial(ctx, asked, server.String())
		},
	}
}

func lookup(t *testing.T, r *net.Resolver, family, name string) ([]netip.Addr, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	addrs, err := r.LookupNetIP(ctx, family, name)
	slices.SortFunc(addrs, netip.Addr.Compare)
	return addrs, err
}

// wantAddrs checks that name resolves, for family, to exactly want.
func wantAddrs(t *testing.T, r *net.Resolver, family, name string, want ...netip.Addr) {
	t.Helper()
	got, err := lookup(t, r, family, name)
	if err != nil || !slices.Equal(got, want) {
		t.Errorf("LookupNetIP(%s, %s) = %v, %v; want %v", family, name, got, err, want)
	}
}

// wantNotFound checks that the Go resolver finds no address of family for
// name (it reports NXDOMAIN and an empty NOERROR alike).
func wantNotFound(t *testing.T, r *net.Resolver, family, name string) {
	t.Helper()
	got, err := lookup(t, r, family, name)
	var dnsErr *net.DNSError
	if !errors.As(err, &dnsErr) || !dnsErr.IsNotFound {
		t.Errorf("LookupNetIP(%s, %s) = %v, %v; want not found", family, name, got, err)
	}
}

// exchange sends one query from ns to server over network ("udp" or "tcp")
// and returns the parsed reply, to check what the Go resolver does not
// show: rcode, flags, TTLs, the echoed question.
func exchange(t *testing.T, ns string, server netip.AddrPort, network, name string, qtype dnsmessage.Type) dnsmessage.Message {
	t.Helper()
	q := dnsmessage.Message{
		Header:    dnsmessage.Header{ID: 0x1234, RecursionDesired: true},
		Questions: []dnsmessage.Question{{Name: dnsmessage.MustNewName(name), Type: qtype, Class: dnsmessage.ClassINET}},
	}
	msg, err := q.Pack()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	c, err := netns.Dialer(ns)(ctx, network, server.String())
	if err != nil {
		t.Fatalf("dialing %s %v from %s: %v", network, server, ns, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	reply := make([]byte, 65535)
	var n int
	if network == "tcp" {
		if _, err = c.Write(binary.BigEndian.AppendUint16(nil, uint16(len(msg)))); err == nil {
			_, err = c.Write(msg)
		}
		var size [2]byte
		if err == nil {
			_, err = io.ReadFull(c, size[:])
		}
		if err == nil {
			n, err = io.ReadFull(c, reply[:binary.BigEndian.Uint16(size[:])])
		}
	} else if _, err = c.Write(msg); err == nil {
		n, err = c.Read(reply)
	}
	if err != nil {
		t.Fatalf("querying %s over %s: %v", name, network, err)
	}
	var resp dnsmessage.Message
	if err := resp.Unpack(reply[:n]); err != nil {
		t.Fatalf("parsing the reply to %s: %v", name, err)
	}
	if resp.Header.ID != q.Header.ID || !resp.Header.Response || !resp.Header.Authoritative || !resp.Header.RecursionDesired ||
		len(resp.Questions) != 1 || resp.Questions[0] != q.Questions[0] {
		t.Errorf("reply to %s %v: header %+v, question %v; want ID echoed, QR AA RD set, question echoed", name, qtype, resp.Header, resp.Questions)
	}
	for _, a := range resp.Answers {
		if a.Header.TTL != 1 || a.Header.Name != q.Questions[0].Name {
			t.Errorf("answer %v to %s: want TTL 1 and the question's name", a.Header, name)
		}
	}
	return resp
}

// TestAnswers: A and AAAA answers, NXDOMAIN, NOERROR without data, case
// and trailing dots, replacement and deletion, over UDP and TCP, from a
// node through the lab's router to the external host.
func TestAnswers(t *testing.T) {
	l, s, server := lab(t)
	v4 := netip.MustParseAddr("198.51.100.100")
	v4b := netip.MustParseAddr("198.51.100.101")
	v6 := netip.MustParseAddr("2001:db8::100")
	s.Set("API.Lab.Test", v4, v6)
	s.Set("v4only.lab.test.", v4)
	s.Set("empty.lab.test")
	s.Set("mapped.lab.test", netip.AddrFrom16(v4b.As16())) // ::ffff:198.51.100.101, an IPv4 address

	for _, network := range []string{"udp", "tcp"} {
		t.Run(network, func(t *testing.T) {
			r := resolver(l.Node, server, network)
			before := s.Queries()
			wantAddrs(t, r, "ip4", "api.lab.test.", v4)
			wantAddrs(t, r, "ip6", "api.LAB.test.", v6)
			wantAddrs(t, r, "ip", "api.lab.test.", v4, v6)
			wantNotFound(t, r, "ip", "unknown.lab.test.")
			wantNotFound(t, r, "ip6", "v4only.lab.test.")
			wantAddrs(t, r, "ip", "mapped.lab.test.", v4b)
			if n := s.Queries() - before; n < 7 {
				t.Errorf("the server counted %d queries, want at least 7", n)
			}

			if m := exchange(t, l.Node, server, network, "Api.Lab.Test.", dnsmessage.TypeA); m.RCode != dnsmessage.RCodeSuccess || len(m.Answers) != 1 ||
				m.Answers[0].Body.(*dnsmessage.AResource).A != v4.As4() {
				t.Errorf("A Api.Lab.Test: %v %v", m.RCode, m.Answers)
			}
			if m := exchange(t, l.Node, server, network, "api.lab.test.", dnsmessage.TypeAAAA); m.RCode != dnsmessage.RCodeSuccess || len(m.Answers) != 1 ||
				m.Answers[0].Body.(*dnsmessage.AAAAResource).AAAA != v6.As16() {
				t.Errorf("AAAA api.lab.test: %v %v", m.RCode, m.Answers)
			}
			if m := exchange(t, l.Node, server, network, "unknown.lab.test.", dnsmessage.TypeA); m.RCode != dnsmessage.RCodeNameError || len(m.Answers) != 0 {
				t.Errorf("A unknown.lab.test: %v %v, want NXDOMAIN", m.RCode, m.Answers)
			}
			for _, c := range []struct {
				name  string
				qtype dnsmessage.Type
			}{{"v4only.lab.test.", dnsmessage.TypeAAAA}, {"empty.lab.test.", dnsmessage.TypeA}, {"api.lab.test.", dnsmessage.TypeMX}} {
				if m := exchange(t, l.Node, server, network, c.name, c.qtype); m.RCode != dnsmessage.RCodeSuccess || len(m.Answers) != 0 {
					t.Errorf("%v %s: %v %v, want NOERROR without answers", c.qtype, c.name, m.RCode, m.Answers)
				}
			}
		})
	}

	r := resolver(l.Node, server, "")
	s.Set("api.lab.test", v4b)
	wantAddrs(t, r, "ip", "api.lab.test.", v4b)
	s.Delete("API.lab.test.")
	wantNotFound(t, r, "ip", "api.lab.test.")
	if m := exchange(t, l.Node, server, "udp", "api.lab.test.", dnsmessage.TypeA); m.RCode != dnsmessage.RCodeNameError {
		t.Errorf("after Delete: %v, want NXDOMAIN", m.RCode)
	}
}

// TestTruncatedOverUDP: an answer too large for a UDP datagram comes
// truncated, and the Go resolver gets it whole over TCP.
func TestTruncatedOverUDP(t *testing.T) {
	l, s, server := lab(t)
	var many []netip.Addr
	for i := range 40 {
		many = append(many, netip.AddrFrom4([4]byte{203, 0, 113, byte(100 + i)}))
	}
	s.Set("many.lab.test", many...)
	if m := exchange(t, l.Node, server, "udp", "many.lab.test.", dnsmessage.TypeA); !m.Truncated || len(m.Answers) != 0 {
		t.Errorf("over UDP: truncated %v with %d answers, want TC and none", m.Truncated, len(m.Answers))
	}
	if m := exchange(t, l.Node, server, "tcp", "many.lab.test.", dnsmessage.TypeA); m.Truncated || len(m.Answers) != len(many) {
		t.Errorf("over TCP: truncated %v with %d answers, want %d", m.Truncated, len(m.Answers), len(many))
	}
	wantAddrs(t, resolver(l.Node, server, ""), "ip4", "many.lab.test.", many...)
}

// TestFailing: while failing every query gets SERVFAIL, which the Go
// resolver reports as a temporary error, not as a missing name; then
// answers come back.
func TestFailing(t *testing.T) {
	l, s, server := lab(t)
	v4 := netip.MustParseAddr("198.51.100.100")
	s.Set("api.lab.test", v4)
	s.SetFailing(true)
	for _, network := range []string{"udp", "tcp"} {
		got, err := lookup(t, resolver(l.Node, server, network), "ip4", "api.lab.test.")
		var dnsErr *net.DNSError
		if !errors.As(err, &dnsErr) || dnsErr.IsNotFound || !dnsErr.IsTemporary {
			t.Errorf("over %s while failing: %v, %v; want a temporary error", network, got, err)
		}
		for _, name := range []string{"api.lab.test.", "unknown.lab.test."} {
			if m := exchange(t, l.Node, server, network, name, dnsmessage.TypeA); m.RCode != dnsmessage.RCodeServerFailure || len(m.Answers) != 0 {
				t.Errorf("%s over %s while failing: %v %v, want SERVFAIL", name, network, m.RCode, m.Answers)
			}
		}
	}
	s.SetFailing(false)
	wantAddrs(t, resolver(l.Node, server, ""), "ip4", "api.lab.test.", v4)
}

// TestStartAndClose: Start fails on an address its namespace lacks; after
// Close nothing answers and Close may be called again.
func TestStartAndClose(t *testing.T) {
	l, s, server := lab(t)
	if bad, err := dnsserver.Start(l.External, netip.MustParseAddrPort("192.0.2.53:53")); err == nil {
		bad.Close()
		t.Error("Start on an address the namespace does not have succeeded")
	} else {
		t.Logf("Start on a foreign address: %v", err)
	}
	if _, err := dnsserver.Start("ra-no-such-namespace", server); err == nil {
		t.Error("Start in a missing namespace succeeded")
	}

	s.Set("api.lab.test", netip.MustParseAddr("198.51.100.100"))
	// An open TCP connection must not keep Close waiting.
	c, err := netns.Dialer(l.Node)(context.Background(), "tcp", server.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	closed := make(chan error, 1)
	go func() { closed <- s.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Errorf("Close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not return with a TCP connection open")
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	got, err := lookup(t, resolver(l.Node, server, "tcp"), "ip4", "api.lab.test.")
	if err == nil {
		t.Errorf("after Close: %v, want an error", got)
	}
}
