// Package dnsserver is a tiny authoritative DNS server for the lab: it
// answers A and AAAA queries for the names a test sets, over UDP and TCP,
// from inside a network namespace, so that nodes whose resolv.conf names a
// lab address (topology.Lab.ExternalDNS) resolve names such as the API
// server's without any resolver of the machine being involved.
//
// It knows only the names it was given: every other name is NXDOMAIN, which
// makes it both the authority and the whole "recursive" resolver of the
// lab's closed world. SetFailing turns it into a resolver that fails.
package dnsserver

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/routing-agent/routing-agent/pkg/lab/netns"
)

// TTL is the lifetime of every answer: short, so that a test's Set or Delete
// reaches a client that caches answers within a second.
const TTL = 1 * time.Second

// maxUDP is the largest answer sent over UDP. The server does not speak
// EDNS(0), so RFC 1035's 512 bytes apply; a larger answer is sent truncated
// (TC set) and the client retries over TCP.
const maxUDP = 512

// idleTCP bounds how long a TCP connection may sit without a query, so a
// client that opens one and goes away does not hold a goroutine forever.
const idleTCP = 30 * time.Second

// Server is a running DNS server. Its methods may be called from any
// goroutine.
type Server struct {
	udp *net.UDPConn
	tcp *net.TCPListener

	mu      sync.Mutex
	names   map[string][]netip.Addr // by canonical name, see canonical
	conns   map[net.Conn]struct{}   // open TCP connections, closed by Close
	closed  bool
	failing atomic.Bool
	queries atomic.Int64

	wg sync.WaitGroup // the serving goroutines
}

// Start serves DNS on addr (UDP and TCP, port usually 53) inside the named
// network namespace (netns.Do: sockets opened there stay there).
func Start(netnsName string, addr netip.AddrPort) (*Server, error) {
	s := &Server{names: map[string][]netip.Addr{}, conns: map[net.Conn]struct{}{}}
	err := netns.Do(netnsName, func() error {
		var err error
		if s.udp, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(addr)); err != nil {
			return err
		}
		s.tcp, err = net.ListenTCP("tcp", net.TCPAddrFromAddrPort(addr))
		return err
	})
	if err != nil {
		if s.udp != nil {
			s.udp.Close()
		}
		return nil, fmt.Errorf("dnsserver: listening on %v in %s: %w", addr, netnsName, err)
	}
	s.wg.Add(2)
	go s.serveUDP()
	go s.serveTCP()
	return s, nil
}

// canonical is the key names are stored under: DNS names compare
// case-insensitively, and a test may write them with or without the root's
// trailing dot.
func canonical(name string) string {
	return strings.ToLower(strings.TrimSuffix(name, "."))
}

// Set replaces the answers for name (case-insensitive, with or without
// trailing dot); A for IPv4, AAAA for IPv6 addresses. With no addresses the
// name exists but has none: queries get NOERROR with an empty answer.
func (s *Server) Set(name string, addrs ...netip.Addr) {
	var as []netip.Addr
	for _, a := range addrs {
		as = append(as, a.Unmap()) // ::ffff:a.b.c.d is an IPv4 address: an A record
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.names[canonical(name)] = as
}

// Delete forgets name: it then gets NXDOMAIN.
func (s *Server) Delete(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.names, canonical(name))
}

// SetFailing makes every query get SERVFAIL while on, as from a resolver
// that cannot reach its upstreams; off restores normal answers.
func (s *Server) SetFailing(on bool) { s.failing.Store(on) }

// Queries returns the number of queries received so far, over UDP and TCP,
// including those answered with an error.
func (s *Server) Queries() int64 { return s.queries.Load() }

// Close stops serving, closes open TCP connections and waits until every
// goroutine of the server has returned. It may be called more than once.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	err := errors.Join(s.udp.Close(), s.tcp.Close())
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return err
}

func (s *Server) serveUDP() {
	defer s.wg.Done()
	buf := make([]byte, 65535)
	for {
		n, from, err := s.udp.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue // e.g. an ICMP error from an earlier reply's target
		}
		resp := s.answer(buf[:n])
		if resp == nil {
			continue
		}
		if len(resp) > maxUDP {
			if resp = truncated(resp); resp == nil {
				continue
			}
		}
		s.udp.WriteToUDPAddrPort(resp, from)
	}
}

func (s *Server) serveTCP() {
	defer s.wg.Done()
	for {
		c, err := s.tcp.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Close()
			return
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go s.serveConn(c)
	}
}

// serveConn answers the queries of one TCP connection, each a message
// preceded by its two-byte length (RFC 1035 4.2.2), until the client
// closes it or idles.
func (s *Server) serveConn(c net.Conn) {
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		c.Close()
	}()
	var size [2]byte
	for {
		c.SetDeadline(time.Now().Add(idleTCP))
		if _, err := io.ReadFull(c, size[:]); err != nil {
			return
		}
		msg := make([]byte, binary.BigEndian.Uint16(size[:]))
		if _, err := io.ReadFull(c, msg); err != nil {
			return
		}
		resp := s.answer(msg)
		if resp == nil {
			return // not DNS: nothing sensible to say on this stream
		}
		out := binary.BigEndian.AppendUint16(make([]byte, 0, 2+len(resp)), uint16(len(resp)))
		if _, err := c.Write(append(out, resp...)); err != nil {
			return
		}
	}
}

// answer returns the reply to one query message, or nil for a message too
// broken to reply to (no complete header, or itself a response).
func (s *Server) answer(query []byte) []byte {
	s.queries.Add(1)
	var p dnsmessage.Parser
	h, err := p.Start(query)
	if err != nil || h.Response {
		return nil
	}
	resp := dnsmessage.Header{
		ID:                 h.ID,
		Response:           true,
		OpCode:             h.OpCode,
		Authoritative:      true,
		RecursionDesired:   h.RecursionDesired,
		RecursionAvailable: true, // it is the nodes' configured resolver
	}
	q, err := p.Question()
	switch {
	case err != nil:
		resp.RCode = dnsmessage.RCodeFormatError
		return pack(resp, nil, nil)
	case h.OpCode != 0: // only QUERY
		resp.RCode = dnsmessage.RCodeNotImplemented
		return pack(resp, &q, nil)
	case s.failing.Load():
		resp.RCode = dnsmessage.RCodeServerFailure
		return pack(resp, &q, nil)
	}

	s.mu.Lock()
	addrs, known := s.names[canonical(q.Name.String())]
	s.mu.Unlock()
	if q.Class != dnsmessage.ClassINET {
		resp.RCode = dnsmessage.RCodeRefused // it serves the Internet class only
		return pack(resp, &q, nil)
	}
	if !known {
		resp.RCode = dnsmessage.RCodeNameError
		return pack(resp, &q, nil)
	}
	var answers []dnsmessage.Resource
	for _, a := range addrs {
		// The owner name is the question's as asked: resolvers that
		// randomise the case of a query's letters expect it back.
		rh := dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: uint32(TTL / time.Second)}
		switch {
		case a.Is4() && q.Type == dnsmessage.TypeA:
			answers = append(answers, dnsmessage.Resource{Header: rh, Body: &dnsmessage.AResource{A: a.As4()}})
		case a.Is6() && q.Type == dnsmessage.TypeAAAA:
			answers = append(answers, dnsmessage.Resource{Header: rh, Body: &dnsmessage.AAAAResource{AAAA: a.As16()}})
		}
	}
	return pack(resp, &q, answers)
}

// pack builds a reply with the question echoed, if there was one, and the
// answers. It cannot fail on what answer gives it but a name dnsmessage
// refuses; then the client gets SERVFAIL rather than silence.
func pack(h dnsmessage.Header, q *dnsmessage.Question, answers []dnsmessage.Resource) []byte {
	msg := dnsmessage.Message{Header: h, Answers: answers}
	if q != nil {
		msg.Questions = []dnsmessage.Question{*q}
	}
	out, err := msg.Pack()
	if err != nil {
		msg.Header.RCode, msg.Answers = dnsmessage.RCodeServerFailure, nil
		out, _ = msg.Pack()
	}
	return out
}

// truncated turns a reply too large for UDP into its header and question
// with TC set, telling the client to ask again over TCP (RFC 2181 9).
func truncated(resp []byte) []byte {
	var msg dnsmessage.Message
	if err := msg.Unpack(resp); err != nil {
		return nil
	}
	msg.Header.Truncated = true
	msg.Answers = nil
	out, _ := msg.Pack()
	return out
}
