package nlbatch

import (
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Limits of one sendmsg. The kernel handles the messages of one sendmsg
// in order before the call returns, queueing an answer only for a failed
// request and for the chunk's last one (the only one with NLM_F_ACK): the
// receive buffer must hold every error of a chunk, or they are lost (the
// socket reports ENOBUFS). An error takes well under 2 KiB of it.
const (
	maxChunkBytes = 64 << 10
	maxChunkMsgs  = 1024
	rcvBuf        = 4 << 20
	sndBuf        = 1 << 20
)

// ErrAckLost is the outcome of a request whose answer the kernel could not
// queue (the socket's receive buffer overflowed): it may or may not have
// been applied. Reading the kernel again tells.
var ErrAckLost = errors.New("netlink answer lost (receive buffer overflow); outcome unknown")

// ErrDumpInterrupted says a dump changed while it was read; read again.
var ErrDumpInterrupted = errors.New("netlink dump interrupted")

// Conn is a NETLINK_ROUTE socket in one network namespace. It is safe for
// use by one goroutine at a time (calls are serialized).
type Conn struct {
	mu sync.Mutex
	fd int
	// chunk is how many requests go in one sendmsg: maxChunkMsgs, fewer
	// if the receive buffer could not be raised.
	chunk int
	seq   uint32
	rbuf  []byte
	wbuf  []byte
}

// Open opens a socket in the network namespace ns (netns.None() for the
// current one).
func Open(ns netns.NsHandle) (*Conn, error) {
	s, err := nl.GetNetlinkSocketAt(ns, netns.None(), unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	// A plain blocking descriptor of the same socket: the calls below are
	// short and the kernel answers every request.
	fd, err := unix.FcntlInt(uintptr(s.GetFd()), unix.F_DUPFD_CLOEXEC, 0)
	s.Close()
	if err != nil {
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	c := &Conn{fd: fd, rbuf: make([]byte, 64<<10)}
	if err := c.setup(); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return c, nil
}

func (c *Conn) setup() error {
	if err := unix.SetNonblock(c.fd, false); err != nil {
		return err
	}
	if unix.SetsockoptInt(c.fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, rcvBuf) != nil {
		if err := unix.SetsockoptInt(c.fd, unix.SOL_SOCKET, unix.SO_RCVBUF, rcvBuf); err != nil {
			return fmt.Errorf("netlink receive buffer: %w", err)
		}
	}
	c.chunk = maxChunkMsgs
	if got, err := unix.GetsockoptInt(c.fd, unix.SOL_SOCKET, unix.SO_RCVBUF); err == nil && got/2048 < c.chunk {
		c.chunk = max(got/2048, 16)
	}
	if unix.SetsockoptInt(c.fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, sndBuf) != nil {
		_ = unix.SetsockoptInt(c.fd, unix.SOL_SOCKET, unix.SO_SNDBUF, sndBuf)
	}
	// Errors without the request echoed, with the kernel's reason text;
	// dumps filtered by the kernel where it can.
	_ = unix.SetsockoptInt(c.fd, unix.SOL_NETLINK, unix.NETLINK_CAP_ACK, 1)
	_ = unix.SetsockoptInt(c.fd, unix.SOL_NETLINK, unix.NETLINK_EXT_ACK, 1)
	_ = unix.SetsockoptInt(c.fd, unix.SOL_NETLINK, unix.NETLINK_GET_STRICT_CHK, 1)
	// Never hang on a kernel that does not answer.
	tv := unix.Timeval{Sec: 10}
	return unix.SetsockoptTimeval(c.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
}

// Close closes the socket.
func (c *Conn) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fd < 0 {
		return nil
	}
	err := unix.Close(c.fd)
	c.fd = -1
	return err
}

// Send sends msgs in order, many per sendmsg, and returns one error per
// message: nil where the kernel applied it. A failed message does not stop
// the ones after it.
func (c *Conn) Send(msgs []Msg) []error {
	c.mu.Lock()
	defer c.mu.Unlock()
	errs := make([]error, len(msgs))
	for start := 0; start < len(msgs); {
		end, size := start, 0
		for end < len(msgs) && end-start < c.chunk && (end == start || size+msgs[end].len() <= maxChunkBytes) {
			size += (msgs[end].len() + 3) &^ 3
			end++
		}
		c.sendChunk(msgs[start:end], errs[start:end])
		start = end
	}
	return errs
}

func (c *Conn) sendChunk(msgs []Msg, errs []error) {
	first := c.seq + 1
	buf := c.wbuf[:0]
	for i, m := range msgs {
		if i == len(msgs)-1 {
			m.Flags |= unix.NLM_F_ACK
		}
		off := len(buf)
		buf = append(buf, make([]byte, (m.len()+3)&^3)...)
		m.marshalInto(buf[off:], first+uint32(i))
	}
	c.wbuf = buf
	c.seq += uint32(len(msgs))
	last := c.seq
	if _, err := unix.Write(c.fd, buf); err != nil {
		for i := range errs {
			errs[i] = fmt.Errorf("sending netlink requests: %w", err)
		}
		return
	}
	lost := false
	for done := false; !done; {
		n, _, err := unix.Recvfrom(c.fd, c.rbuf, 0)
		if errors.Is(err, unix.ENOBUFS) {
			lost = true
			continue
		}
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			for i := range errs {
				if errs[i] == nil {
					errs[i] = fmt.Errorf("reading netlink answers: %w", err)
				}
			}
			return
		}
		for b := c.rbuf[:n]; len(b) > 0; {
			h, payload, rest, err := parseHeader(b)
			if err != nil {
				break
			}
			b = rest
			if h.Type != unix.NLMSG_ERROR || h.Seq < first || h.Seq > last {
				continue
			}
			if e := ackError(h, payload); e != nil {
				errs[h.Seq-first] = e
			}
			if h.Seq == last {
				done = true
			}
		}
	}
	if lost {
		for i := range errs {
			if errs[i] == nil && i != len(errs)-1 {
				errs[i] = ErrAckLost
			}
		}
	}
}

// ackError is the error an NLMSG_ERROR message carries, nil for an ack,
// with the kernel's extended-ack text when it gave one.
func ackError(h unix.NlMsghdr, payload []byte) error {
	if len(payload) < 4 {
		return fmt.Errorf("short netlink error message")
	}
	code := int32(native.Uint32(payload[0:4]))
	if code == 0 {
		return nil
	}
	err := error(unix.Errno(-code))
	if h.Flags&unix.NLM_F_ACK_TLVS == 0 {
		return err
	}
	off := 4 + unix.SizeofNlMsghdr
	if h.Flags&unix.NLM_F_CAPPED == 0 && len(payload) >= off {
		off = 4 + int(native.Uint32(payload[4:8]))
	}
	if off > len(payload) {
		return err
	}
	return withExtack(err, payload[rtaAlign(off):])
}

// doneError is the error an NLMSG_DONE message carries (its int, then
// the extended-ack attributes), nil when the dump succeeded.
func doneError(h unix.NlMsghdr, payload []byte) error {
	if len(payload) < 4 {
		return nil // an old kernel's empty NLMSG_DONE
	}
	code := int32(native.Uint32(payload[0:4]))
	if code == 0 {
		return nil
	}
	err := error(unix.Errno(-code))
	if h.Flags&unix.NLM_F_ACK_TLVS == 0 {
		return err
	}
	return withExtack(err, payload[4:])
}

// withExtack is err with the kernel's extended-ack message, when the
// attributes in tlvs hold one.
func withExtack(err error, tlvs []byte) error {
	attrs, perr := nl.ParseRouteAttr(tlvs)
	if perr != nil {
		return err
	}
	for _, a := range attrs {
		if a.Attr.Type == unix.NLMSGERR_ATTR_MSG {
			if text := strings.TrimRight(string(a.Value), "\x00"); text != "" {
				return fmt.Errorf("%w (%s)", err, text)
			}
		}
	}
	return err
}

// Dump sends the dump request req and calls fn with each answer's type and
// payload.
func (c *Conn) Dump(req Msg, fn func(typ uint16, payload []byte) error) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.seq++
	seq := c.seq
	req.Flags |= unix.NLM_F_DUMP
	if _, err := unix.Write(c.fd, req.Marshal(seq)); err != nil {
		return err
	}
	var ferr error
	interrupted := false
	for {
		n, _, err := unix.Recvfrom(c.fd, c.rbuf, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return err
		}
		for b := c.rbuf[:n]; len(b) > 0; {
			h, payload, rest, err := parseHeader(b)
			if err != nil {
				return err
			}
			b = rest
			if h.Seq != seq {
				continue
			}
			if h.Flags&unix.NLM_F_DUMP_INTR != 0 {
				interrupted = true
			}
			switch h.Type {
			case unix.NLMSG_DONE:
				if ferr != nil {
					return ferr
				}
				// A dump that failed says so here (netlink_dump_done).
				if e := doneError(h, payload); e != nil {
					return e
				}
				if interrupted {
					return ErrDumpInterrupted
				}
				return nil
			case unix.NLMSG_ERROR:
				if e := ackError(h, payload); e != nil {
					return e
				}
				return ferr
			default:
				if ferr == nil {
					ferr = fn(h.Type, payload)
				}
			}
		}
	}
}

// retry runs dump again while it is interrupted by a concurrent change.
func retry(dump func() error) error {
	var err error
	for range 10 {
		if err = dump(); !errors.Is(err, ErrDumpInterrupted) {
			return err
		}
	}
	return err
}

// Routes dumps the routes of family (AF_INET, AF_INET6) with protocol
// (0: any), every table.
func (c *Conn) Routes(family uint8, protocol uint8) ([]Route, error) {
	return c.RoutesIn(family, protocol, 0)
}

// RoutesIn dumps the routes of family with protocol (0: any) in table (0:
// every table). The socket checks strictly, so the kernel sends that
// table's routes alone; a table the family does not have has none.
func (c *Conn) RoutesIn(family uint8, protocol uint8, table uint32) ([]Route, error) {
	var out []Route
	err := retry(func() error {
		out = out[:0]
		m := nl.NewRtMsg()
		m.Family, m.Protocol, m.Table, m.Scope, m.Type = family, protocol, unix.RT_TABLE_UNSPEC, 0, 0
		b := m.Serialize()
		if table != 0 {
			b = appendU32(b, unix.RTA_TABLE, table)
		}
		return c.Dump(Msg{Type: unix.RTM_GETROUTE, Body: b}, func(typ uint16, b []byte) error {
			if typ != unix.RTM_NEWROUTE {
				return nil
			}
			r, err := ParseRoute(b)
			if err != nil {
				return err
			}
			if r.Family == family && (protocol == 0 || r.Protocol == protocol) && (table == 0 || r.Table == table) {
				out = append(out, r)
			}
			return nil
		})
	})
	// The kernel's answer to a dump of a table it does not have.
	if table != 0 && errors.Is(err, unix.ENOENT) {
		return nil, nil
	}
	return out, err
}

// Nexthops dumps every nexthop object. A kernel without them (before
// Linux 5.3) answers with an error for which Unsupported is true.
func (c *Conn) Nexthops() ([]NexthopObject, error) {
	var out []NexthopObject
	err := retry(func() error {
		out = out[:0]
		return c.Dump(Msg{Type: unix.RTM_GETNEXTHOP, Body: nhmsg{}.Serialize()}, func(typ uint16, b []byte) error {
			if typ != unix.RTM_NEWNEXTHOP {
				return nil
			}
			n, err := ParseNexthop(b)
			if err != nil {
				return err
			}
			out = append(out, n)
			return nil
		})
	})
	return out, err
}

// Unsupported says whether err is a kernel's refusal of nexthop objects
// as such: an unknown message type or attribute.
func Unsupported(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EAFNOSUPPORT) || errors.Is(err, unix.EPROTONOSUPPORT)
}
