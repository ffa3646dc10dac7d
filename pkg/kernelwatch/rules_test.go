package kernelwatch

import (
	"encoding/binary"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
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

func TestParseRule(t *testing.T) {
	// family AF_INET6, table byte 252 (RT_TABLE_COMPAT: the id is in FRA_TABLE), action FR_ACT_TO_TBL
	hdr := [fibRuleHdrLen]byte{unix.AF_INET6, 0, 0, 0, unix.RT_TABLE_COMPAT, 0, 0, unix.FR_ACT_TO_TBL}
	m := ruleMessage(unix.RTM_DELRULE, hdr,
		u32Attr(unix.FRA_TABLE, 10061),
		u32Attr(unix.FRA_PRIORITY, 30300),
		u8Attr(unix.FRA_PROTOCOL, 245),
		u32Attr(unix.FRA_FWMARK, 0x4000),
		u32Attr(unix.FRA_FWMASK, 0x6000),
		u32Attr(unix.FRA_SUPPRESS_PREFIXLEN, 0)) // attributes not asked for are skipped
	got, err := parseRule(m)
	if err != nil {
		t.Fatal(err)
	}
	want := RuleUpdate{Type: unix.RTM_DELRULE, Family: unix.AF_INET6, Priority: 30300, Table: 10061, Protocol: 245, Mark: 0x4000, Mask: 0x6000}
	if got != want {
		t.Errorf("got %+v, want %+v", got, want)
	}

	// Without attributes the header says the table, and the priority is 0.
	hdr = [fibRuleHdrLen]byte{unix.AF_INET, 0, 0, 0, unix.RT_TABLE_MAIN, 0, 0, unix.FR_ACT_TO_TBL}
	got, err = parseRule(ruleMessage(unix.RTM_NEWRULE, hdr))
	if err != nil {
		t.Fatal(err)
	}
	if want := (RuleUpdate{Type: unix.RTM_NEWRULE, Family: unix.AF_INET, Table: unix.RT_TABLE_MAIN}); got != want {
		t.Errorf("got %+v, want %+v", got, want)
	}
}

func TestParseRuleRefuses(t *testing.T) {
	hdr := [fibRuleHdrLen]byte{unix.AF_INET}
	for name, m := range map[string]syscall.NetlinkMessage{
		"another type":      ruleMessage(unix.RTM_NEWROUTE, hdr),
		"short header":      {Header: syscall.NlMsghdr{Type: unix.RTM_NEWRULE}, Data: make([]byte, fibRuleHdrLen-1)},
		"attribute overrun": ruleMessage(unix.RTM_NEWRULE, hdr, u32Attr(unix.FRA_PRIORITY, 1)[:6]),
	} {
		if u, err := parseRule(m); err == nil {
			t.Errorf("%s: parsed as %+v, want an error", name, u)
		}
	}
}
