package kernelwatch

import (
	"encoding/binary"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/routing-agent/routing-agent/pkg/nlbatch"
)

// ruleMessage builds a rule notification the way the kernel lays it out:
// struct fib_rule_hdr, then attributes, each padded to four bytes.
func ruleMessage(typ uint16, hdr [fibRuleHdrLen]byte, attrs ...[]byte) syscall.NetlinkMessage {
	data := hdr[:]
	for _, a := range attrs {
		data = append(data, a...)
	}
	return syscall.NetlinkMessage{Header: syscall.NlMsghdr{Type: typ, Len: uint32(unix.NLMSG_HDRLEN + len(data))}, Data: data}
}

func u32Attr(typ uint16, v uint32) []byte {
	b := binary.NativeEndian.AppendUint16(nil, 8)
	b = binary.NativeEndian.AppendUint16(b, typ)
	return binary.NativeEndian.AppendUint32(b, v)
}

func u8Attr(typ uint16, v uint8) []byte {
	b := binary.NativeEndian.AppendUint16(nil, 5)
	b = binary.NativeEndian.AppendUint16(b, typ)
	return append(b, v, 0, 0, 0)
}

// fibRuleHdrLen is the size of struct fib_rule_hdr
// (include/uapi/linux/fib_rules.h), which leads every rule message: family,
// dst_len, src_len, tos, table, res1, res2, action (one byte each), flags
// (four).
const fibRuleHdrLen = 12

func TestParseRule(t *testing.T) {
	// family AF_INET6, table byte 252 (RT_TABLE_COMPAT: the id is in FRA_TABLE), action FR_ACT_TO_TBL
	hdr := [fibRuleHdrLen]byte{unix.AF_INET6, 0, 0, 0, unix.RT_TABLE_COMPAT, 0, 0, unix.FR_ACT_TO_TBL}
	m := ruleMessage(unix.RTM_DELRULE, hdr,
		u32Attr(unix.FRA_TABLE, 10061),
		u32Attr(unix.FRA_PRIORITY, 30300),
		u8Attr(unix.FRA_PROTOCOL, 245),
		u32Attr(unix.FRA_FWMARK, 0x4000),
		u32Attr(unix.FRA_FWMASK, 0x6000),
		u32Attr(unix.FRA_SUPPRESS_PREFIXLEN, 0))
	got, err := parseRule(m)
	if err != nil {
		t.Fatal(err)
	}
	want := RuleUpdate{Type: unix.RTM_DELRULE, Rule: nlbatch.Rule{Family: unix.AF_INET6, Priority: 30300, Table: 10061, Protocol: 245, Mark: 0x4000, Mask: 0x6000}}
	if got != want {
		t.Errorf("got %+v, want %+v", got, want)
	}

	// Without attributes the header says the table, and the priority is 0.
	hdr = [fibRuleHdrLen]byte{unix.AF_INET, 0, 0, 0, unix.RT_TABLE_MAIN, 0, 0, unix.FR_ACT_TO_TBL}
	got, err = parseRule(ruleMessage(unix.RTM_NEWRULE, hdr))
	if err != nil {
		t.Fatal(err)
	}
	if want := (RuleUpdate{Type: unix.RTM_NEWRULE, Rule: nlbatch.Rule{Family: unix.AF_INET, Table: unix.RT_TABLE_MAIN, SuppressPrefixlen: -1}}); got != want {
		t.Errorf("got %+v, want %+v", got, want)
	}

	// What nlbatch.Rule cannot hold makes the rule Other: never one the
	// agent wrote, whatever its protocol says.
	iif := append(binary.NativeEndian.AppendUint16(nil, 7), 0, 0) // FRA_IIFNAME "lo"
	binary.NativeEndian.PutUint16(iif[2:], unix.FRA_IIFNAME)
	iif = append(iif, 'l', 'o', 0, 0)
	for name, m := range map[string]syscall.NetlinkMessage{
		"an iif":             ruleMessage(unix.RTM_NEWRULE, [fibRuleHdrLen]byte{unix.AF_INET, 0, 0, 0, 0, 0, 0, unix.FR_ACT_TO_TBL}, iif, u8Attr(unix.FRA_PROTOCOL, 245)),
		"a tos":              ruleMessage(unix.RTM_NEWRULE, [fibRuleHdrLen]byte{unix.AF_INET, 0, 0, 0x10, 0, 0, 0, unix.FR_ACT_TO_TBL}, u8Attr(unix.FRA_PROTOCOL, 245)),
		"a blackhole action": ruleMessage(unix.RTM_NEWRULE, [fibRuleHdrLen]byte{unix.AF_INET, 0, 0, 0, 0, 0, 0, unix.FR_ACT_BLACKHOLE}, u8Attr(unix.FRA_PROTOCOL, 245)),
		"a suppress_ifgroup": ruleMessage(unix.RTM_NEWRULE, hdr, u32Attr(unix.FRA_SUPPRESS_IFGROUP, 3)),
	} {
		got, err := parseRule(m)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !got.Other {
			t.Errorf("%s: parsed as %+v, want Other", name, got)
		}
	}
}

func TestParseRuleRefuses(t *testing.T) {
	hdr := [fibRuleHdrLen]byte{unix.AF_INET}
	for name, m := range map[string]syscall.NetlinkMessage{
		"another type":       ruleMessage(unix.RTM_NEWROUTE, hdr),
		"short header":       {Header: syscall.NlMsghdr{Type: unix.RTM_NEWRULE}, Data: make([]byte, fibRuleHdrLen-1)},
		"attribute overrun":  ruleMessage(unix.RTM_NEWRULE, hdr, u32Attr(unix.FRA_PRIORITY, 1)[:6]),
		"a short priority":   ruleMessage(unix.RTM_NEWRULE, hdr, u8Attr(unix.FRA_PRIORITY, 1)),
		"a two-byte address": ruleMessage(unix.RTM_NEWRULE, hdr, append(binary.NativeEndian.AppendUint16(binary.NativeEndian.AppendUint16(nil, 6), unix.FRA_DST), 10, 1, 0, 0)),
	} {
		if u, err := parseRule(m); err == nil {
			t.Errorf("%s: parsed as %+v, want an error", name, u)
		}
	}
}
