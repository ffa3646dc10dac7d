// Package connmark owns the agent's nftables table that marks connections
// which came into the node from outside, so that their replies can be sent
// back through the main routing table (DESIGN.md, "Kernel layout" rule 2,
// symmetric replies) by an ip rule `fwmark <Mark>/<Mark> lookup main`.
//
// A packet of a connection in its original direction arriving on any
// interface but the excluded ones (loopback, those only Routes send through)
// sets Mark on the conntrack entry — any packet, not only the first, so a
// connection older than the table is marked at its next packet; every packet
// in the reply direction of such a connection gets Mark ORed into its fwmark
// before it is routed:
//   - in prerouting (mangle priority), for replies the node forwards, e.g. from
//     a pod behind a NodePort/hostPort DNAT: routing happens after prerouting;
//   - in a `type route` output chain, for replies the node sends itself
//     (host-network servers): the kernel re-routes a locally generated packet
//     whose mark such a chain changed.
//
// Only the Mark bits are ever ORed in; other bits of the conntrack mark and of
// the packet mark (kube-proxy 0x4000/0x8000, Calico 0xffff0000, Cilium
// 0x0f00, ...) are left as they are.
package connmark

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"

	"github.com/routing-agent/routing-agent/pkg/planner"
)

// DefaultTable is the table name used when Spec.Table is empty.
const DefaultTable = "routing-agent"

// commentPrefix starts the comment on every rule the agent writes; the rest
// is the spec's fingerprint, which is how Apply recognizes a table that
// already holds what it wants without decoding expressions.
const commentPrefix = "routing-agent:"

// Spec is the table the agent wants; the zero Spec (Mark 0) means no table.
type Spec struct {
	Table string // nftables table name, family inet; default "routing-agent"
	Mark  uint32 // the bit(s) set on the conntrack entry and on reply packets, e.g. 0x1000
	// Exclude are the interfaces whose connections are not marked: a
	// connection's original-direction packet arriving on any other marks it.
	Exclude []string
}

// ForPlan is the Spec of a plan's nftables part; nil gives the zero Spec.
func ForPlan(m *planner.ConnMark) Spec {
	if m == nil {
		return Spec{}
	}
	return Spec{Table: planner.ConnMarkTable, Mark: m.Mark, Exclude: m.Exclude}
}

// normalized fills in the default table name and sorts and deduplicates
// Exclude, so that equal intents render, and fingerprint, identically.
func (s Spec) normalized() Spec {
	if s.Table == "" {
		s.Table = DefaultTable
	}
	in := slices.Clone(s.Exclude)
	slices.Sort(in)
	s.Exclude = slices.Compact(in)
	return s
}

// Validate reports the first field of s that cannot be programmed.
func (s Spec) Validate() error {
	s = s.normalized()
	if err := validTable(s.Table); err != nil {
		return fmt.Errorf("connmark: table %q: %w", s.Table, err)
	}
	for _, name := range s.Exclude {
		if err := validInterface(name); err != nil {
			return fmt.Errorf("connmark: excluded interface %q: %w", name, err)
		}
	}
	return nil
}

// validTable accepts what nft prints as a bare identifier, so that Render's
// output parses: a letter, then letters, digits, '_', '.' or '-'.
func validTable(name string) error {
	if name == "" || len(name) > 255 {
		return fmt.Errorf("must be 1 to 255 bytes")
	}
	for i, c := range []byte(name) {
		letter := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
		if !letter && (i == 0 || !(c >= '0' && c <= '9' || c == '_' || c == '.' || c == '-')) {
			return fmt.Errorf("must be a letter followed by letters, digits, '_', '.' or '-'")
		}
	}
	return nil
}

// validInterface rejects what the kernel refuses as an interface name and
// what would not survive quoting in Render's nft syntax ('"', '\', and '*',
// a wildcard there): printable ASCII only.
func validInterface(name string) error {
	// IFNAMSIZ is 16 including the terminating NUL.
	if name == "" || len(name) > 15 {
		return fmt.Errorf("must be 1 to 15 bytes")
	}
	for _, c := range []byte(name) {
		if c <= ' ' || c > '~' || strings.IndexByte("\"\\/*:", c) >= 0 {
			return fmt.Errorf("must be printable ASCII without '\"', '\\', '/', '*' or ':'")
		}
	}
	return nil
}

// Render returns the table in `nft -f` syntax, exactly as `nft list table`
// prints it once applied (so the two can be diffed). The zero Spec renders as
// the empty string. Render is deterministic: Exclude order and duplicates do
// not matter.
func (s Spec) Render() string {
	s = s.normalized()
	if s.Mark == 0 {
		return ""
	}
	return s.render(s.comment())
}

// fingerprint identifies the rules s renders to: a hash of the rendering
// without comments (the comments carry the fingerprint itself).
func (s Spec) fingerprint() string {
	sum := sha256.Sum256([]byte(s.render("")))
	return hex.EncodeToString(sum[:8])
}

// comment is what every rule of s carries as its nftables comment.
func (s Spec) comment() string { return commentPrefix + s.fingerprint() }

// render formats the normalized, non-empty s; comment, when not empty, is
// attached to every rule.
func (s Spec) render(comment string) string {
	suffix := ""
	if comment != "" {
		suffix = fmt.Sprintf(" comment %q", comment)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "table inet %s {\n", s.Table)
	b.WriteString("\tchain prerouting {\n")
	b.WriteString("\t\ttype filter hook prerouting priority mangle; policy accept;\n")
	b.WriteString("\t\t")
	for _, name := range s.Exclude {
		fmt.Fprintf(&b, "iifname != %q ", name)
	}
	fmt.Fprintf(&b, "ct direction original ct mark set ct mark | 0x%08x%s\n", s.Mark, suffix)
	fmt.Fprintf(&b, "\t\t%s%s\n", s.restoreRule(), suffix)
	b.WriteString("\t}\n\n")
	b.WriteString("\tchain output {\n")
	b.WriteString("\t\ttype route hook output priority mangle; policy accept;\n")
	fmt.Fprintf(&b, "\t\t%s%s\n", s.restoreRule(), suffix)
	b.WriteString("\t}\n}\n")
	return b.String()
}

func (s Spec) restoreRule() string {
	return fmt.Sprintf("ct direction reply ct mark & 0x%08x == 0x%08x meta mark set meta mark | 0x%08x", s.Mark, s.Mark, s.Mark)
}

// Planned applies a plan's nftables part through Table: the applier's
// Marker.
type Planned struct{ Table *Table }

// Apply makes the kernel hold m's table, or none for nil.
func (p Planned) Apply(m *planner.ConnMark) (bool, error) { return p.Table.Apply(ForPlan(m)) }
