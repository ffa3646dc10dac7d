package connmark

import (
	"errors"
	"fmt"
	"sync"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

const family = nftables.TableFamilyINet

// Table programs the connection-marking table over nftables netlink (no nft
// binary needed). Its methods are safe for concurrent use.
type Table struct {
	mu   sync.Mutex // serializes batches: nftables.Conn buffers messages per Conn
	conn *nftables.Conn
}

// New returns a Table working in the network namespace netnsFd refers to, or
// in the caller's current namespace when netnsFd < 0; the caller keeps the fd
// open while it uses the Table (every operation opens a netlink socket in that
// namespace). (Fd 0 is refused: the
// netlink library reads 0 as "current namespace", which would silently
// program the wrong one.)
func New(netnsFd int) (*Table, error) {
	var opts []nftables.ConnOption
	switch {
	case netnsFd == 0:
		return nil, errors.New("connmark: namespace fd 0 is not a network namespace")
	case netnsFd > 0:
		opts = append(opts, nftables.WithNetNSFd(netnsFd))
	}
	// Not AsLasting: each operation opens its own netlink socket, so a
	// socket error never poisons later operations and nothing needs closing.
	conn, err := nftables.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("connmark: nftables netlink: %w", err)
	}
	return &Table{conn: conn}, nil
}

// Apply makes the kernel hold exactly s. Nothing is written when the table
// already matches; otherwise the table is deleted and recreated in one
// netlink batch, which the kernel commits as one transaction: no packet sees
// a half-built table, or none while it is replaced. The zero Spec removes the
// table. changed says whether anything was written.
func (t *Table) Apply(s Spec) (changed bool, err error) {
	if err := s.Validate(); err != nil {
		return false, err
	}
	s = s.normalized()
	if s.Mark == 0 {
		return t.Remove(s.Table)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	ok, err := t.matches(s)
	if err != nil {
		return false, err
	}
	if ok {
		return false, nil
	}
	if err := t.write(s); err != nil {
		return false, fmt.Errorf("connmark: writing table inet %s: %w", s.Table, err)
	}
	return true, nil
}

// Remove deletes the named table (DefaultTable when empty) with everything in
// it; removed says whether there was one.
func (t *Table) Remove(table string) (removed bool, err error) {
	if table == "" {
		table = DefaultTable
	}
	if err := validTable(table); err != nil {
		return false, fmt.Errorf("connmark: table %q: %w", table, err)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	tbl, err := t.find(table)
	if err != nil || tbl == nil {
		return false, err
	}
	t.conn.DelTable(tbl)
	if err := t.conn.Flush(); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return false, nil // someone else removed it meanwhile
		}
		return false, fmt.Errorf("connmark: deleting table inet %s: %w", table, err)
	}
	return true, nil
}

// Present says whether the named table (DefaultTable when empty) exists,
// whatever it holds.
func (t *Table) Present(table string) (bool, error) {
	if table == "" {
		table = DefaultTable
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	tbl, err := t.find(table)
	return tbl != nil, err
}

// find returns the inet table of that name, nil if there is none.
func (t *Table) find(name string) (*nftables.Table, error) {
	// Listing the family and picking by name avoids telling "no such
	// table" apart from other errors of a targeted GETTABLE.
	tables, err := t.conn.ListTablesOfFamily(family)
	if errors.Is(err, unix.EPROTONOSUPPORT) || errors.Is(err, unix.EOPNOTSUPP) {
		return nil, nil // a kernel without nf_tables holds no table
	}
	if err != nil {
		return nil, fmt.Errorf("connmark: listing inet tables: %w", err)
	}
	for _, tbl := range tables {
		if tbl.Name == name {
			return tbl, nil
		}
	}
	return nil, nil
}

// matches says whether the kernel holds the table s describes, judged by its
// shape (flags, chains and their hooks, rule counts) and by the fingerprint
// every rule carries in its comment, instead of decoding expressions (which
// v0.3.0 cannot round-trip: it drops the source register of `ct ... set`).
func (t *Table) matches(s Spec) (bool, error) {
	tbl, err := t.find(s.Table)
	if err != nil || tbl == nil {
		return false, err
	}
	want := s.layout()
	// A dormant table has its hooks off; a set, map or object added by hand
	// counts in Use besides the chains.
	if tbl.Flags != 0 || netOrder(tbl.Use) != uint32(len(want)) {
		return false, nil
	}
	all, err := t.conn.ListChainsOfTableFamily(family)
	if err != nil {
		return false, fmt.Errorf("connmark: listing inet chains: %w", err)
	}
	got := map[string]*nftables.Chain{}
	for _, c := range all {
		if c.Table != nil && c.Table.Name == s.Table {
			got[c.Name] = c
		}
	}
	if len(got) != len(want) {
		return false, nil
	}
	comment := s.comment()
	for _, w := range want {
		c := got[w.name]
		if c == nil || c.Type != w.typ || c.Hooknum == nil || *c.Hooknum != *w.hook ||
			c.Priority == nil || *c.Priority != *nftables.ChainPriorityMangle ||
			c.Policy == nil || *c.Policy != nftables.ChainPolicyAccept {
			return false, nil
		}
		rules, err := t.conn.GetRules(tbl, c)
		if err != nil {
			return false, fmt.Errorf("connmark: listing rules of inet %s %s: %w", s.Table, w.name, err)
		}
		if len(rules) != len(w.rules) {
			return false, nil
		}
		for _, r := range rules {
			if readComment(r.UserData) != comment {
				return false, nil
			}
		}
	}
	return true, nil
}

// write queues the whole table after a delete of the old one and sends it as
// one batch.
func (t *Table) write(s Spec) error {
	tbl := &nftables.Table{Name: s.Table, Family: family}
	// Adding before deleting makes the delete valid whether or not the table
	// exists (an add of an existing table is a no-op), so the batch is right
	// even if the table appeared or vanished since matches looked.
	t.conn.AddTable(tbl)
	t.conn.DelTable(tbl)
	t.conn.AddTable(tbl)
	ud := commentUserData(s.comment())
	policy := nftables.ChainPolicyAccept
	for _, l := range s.layout() {
		c := t.conn.AddChain(&nftables.Chain{
			Name:     l.name,
			Table:    tbl,
			Type:     l.typ,
			Hooknum:  l.hook,
			Priority: nftables.ChainPriorityMangle,
			Policy:   &policy,
		})
		for _, exprs := range l.rules {
			t.conn.AddRule(&nftables.Rule{Table: tbl, Chain: c, Exprs: exprs, UserData: ud})
		}
	}
	return t.conn.Flush()
}

// chainLayout is one base chain of the table and its rules, in order.
type chainLayout struct {
	name  string
	typ   nftables.ChainType
	hook  *nftables.ChainHook
	rules [][]expr.Any
}

// layout is the netlink form of what render prints; the two must agree,
// which the tests check by comparing `nft list table` with Render.
func (s Spec) layout() []chainLayout {
	pre := chainLayout{name: "prerouting", typ: nftables.ChainTypeFilter, hook: nftables.ChainHookPrerouting}
	pre.rules = append(pre.rules, markIncoming(s.Exclude, s.Mark), restore(s.Mark))
	// A route chain: the kernel re-routes a locally generated packet whose
	// mark the chain changed, which is what sends the node's own replies
	// back through main.
	out := chainLayout{name: "output", typ: nftables.ChainTypeRoute, hook: nftables.ChainHookOutput,
		rules: [][]expr.Any{restore(s.Mark)}}
	return []chainLayout{pre, out}
}

// ctDirOriginal and ctDirReply are IP_CT_DIR_*; `ct direction` loads one
// byte.
const (
	ctDirOriginal = 0
	ctDirReply    = 1
)

// All expressions use register 1 (NFT_REG_1); marks and ct state are host
// byte order in the kernel.
const reg = 1

// markIncoming: iifname != "<each excluded>" ct direction original
// ct mark set ct mark | mark. Any original-direction packet, not only the
// first: a connection the node was already serving when the table appeared
// is marked at its next packet.
func markIncoming(exclude []string, mark uint32) []expr.Any {
	var exprs []expr.Any
	for _, ifname := range exclude {
		name := make([]byte, unix.IFNAMSIZ) // exact match: the name NUL-padded
		copy(name, ifname)
		exprs = append(exprs,
			&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: reg},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: reg, Data: name})
	}
	exprs = append(exprs,
		&expr.Ct{Key: expr.CtKeyDIRECTION, Register: reg},
		&expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: []byte{ctDirOriginal}},
		&expr.Ct{Key: expr.CtKeyMARK, Register: reg},
	)
	exprs = append(exprs, or(mark)...)
	return append(exprs, &expr.Ct{Key: expr.CtKeyMARK, Register: reg, SourceRegister: true})
}

// restore: ct direction reply ct mark & mark == mark meta mark set meta mark | mark
func restore(mark uint32) []expr.Any {
	exprs := []expr.Any{
		&expr.Ct{Key: expr.CtKeyDIRECTION, Register: reg},
		&expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: []byte{ctDirReply}},
		&expr.Ct{Key: expr.CtKeyMARK, Register: reg},
		&expr.Bitwise{SourceRegister: reg, DestRegister: reg, Len: 4, Mask: u32(mark), Xor: u32(0)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: u32(mark)},
		&expr.Meta{Key: expr.MetaKeyMARK, Register: reg},
	}
	exprs = append(exprs, or(mark)...)
	return append(exprs, &expr.Meta{Key: expr.MetaKeyMARK, Register: reg, SourceRegister: true})
}

// or sets the mark bits in the register and keeps every other bit: nftables
// has no OR for registers, only (reg & mask) ^ xor, so clear them, then flip
// them on.
func or(mark uint32) []expr.Any {
	return []expr.Any{&expr.Bitwise{SourceRegister: reg, DestRegister: reg, Len: 4, Mask: u32(^mark), Xor: u32(mark)}}
}

// netOrder undoes a v0.3.0 bug: it decodes the table's Use and Flags
// attributes, which the kernel sends big-endian, in host byte order.
func netOrder(v uint32) uint32 {
	return binaryutil.BigEndian.Uint32(binaryutil.NativeEndian.PutUint32(v))
}

func u32(v uint32) []byte { return binaryutil.NativeEndian.PutUint32(v) }

// commentUserData encodes a rule comment the way nft does (a TLV of type
// NFTNL_UDATA_RULE_COMMENT holding a NUL-terminated string), so that
// `nft list` shows it.
func commentUserData(comment string) []byte {
	return append([]byte{0, byte(len(comment) + 1)}, append([]byte(comment), 0)...)
}

// readComment returns the comment of a rule's user data, "" if it has none.
// It checks bounds itself: userdata.Get of v0.3.0 panics on a truncated TLV.
func readComment(ud []byte) string {
	for len(ud) >= 2 {
		typ, n := ud[0], int(ud[1])
		if len(ud) < 2+n {
			return ""
		}
		if typ == 0 && n > 0 && ud[1+n] == 0 {
			return string(ud[2 : 1+n])
		}
		ud = ud[2+n:]
	}
	return ""
}
