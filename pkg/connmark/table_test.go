package connmark

import (
	"strings"
	"testing"
)

// others are tables that must survive everything the agent does to its own:
// one of another family and one inet table whose chain names equal ours.
const others = `table ip other {
	set s {
		type ipv4_addr
		elements = { 192.0.2.1 }
	}

	chain c {
		type filter hook input priority filter; policy accept;
		counter packets 0 bytes 0
	}
}
table inet neighbour {
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		meta mark 0x00004000 counter packets 0 bytes 0
	}
}
`

func TestApply(t *testing.T) {
	ns := newNS(t, "cmtable")
	nft(t, ns, others)
	tbl, err := New(nsFd(t, ns))
	if err != nil {
		t.Fatal(err)
	}
	list := func() string {
		t.Helper()
		return run(t, ns, "nft", "list", "table", "inet", DefaultTable)
	}
	apply := func(s Spec, wantChanged bool) {
		t.Helper()
		changed, err := tbl.Apply(s)
		if err != nil {
			t.Fatalf("Apply(%+v): %v", s, err)
		}
		if changed != wantChanged {
			t.Fatalf("Apply(%+v): changed=%v, want %v", s, changed, wantChanged)
		}
		// The kernel holds exactly what Render says, as nft decodes it.
		if got := list(); got != s.Render() {
			t.Fatalf("after Apply(%+v) nft lists:\n%s\nwant:\n%s", s, got, s.Render())
		}
	}

	if ok, err := tbl.Present(""); err != nil || ok {
		t.Fatalf("Present before Apply: %v %v", ok, err)
	}
	a := Spec{Mark: 0x1000, Exclude: []string{"lo"}}
	apply(a, true)
	apply(a, false)
	if ok, err := tbl.Present(""); err != nil || !ok {
		t.Fatalf("Present after Apply: %v %v", ok, err)
	}
	b := Spec{Mark: 0x1000, Exclude: []string{"lo", "eth1"}}
	apply(b, true)
	apply(b, false)

	// Hand edits of any kind are repaired by the next Apply, and only once.
	for _, edit := range []struct {
		name string
		do   func()
	}{
		{"rule deleted by handle", func() {
			hs := ruleHandles(t, ns, DefaultTable, "output")
			if len(hs) != 1 {
				t.Fatalf("output chain rule handles %v, want one", hs)
			}
			run(t, ns, "nft", "delete", "rule", "inet", DefaultTable, "output", "handle", hs[0])
		}},
		{"rule added", func() { run(t, ns, "nft", "add", "rule", "inet", DefaultTable, "prerouting", "counter") }},
		{"rule replaced", func() {
			hs := ruleHandles(t, ns, DefaultTable, "prerouting")
			run(t, ns, "nft", "replace", "rule", "inet", DefaultTable, "prerouting", "handle", hs[0], "iifname", "eth1", "accept")
		}},
		{"policy changed", func() {
			run(t, ns, "nft", "add chain inet "+DefaultTable+" output { type route hook output priority mangle; policy drop; }")
		}},
		{"chain added", func() { run(t, ns, "nft", "add", "chain", "inet", DefaultTable, "extra") }},
		{"set added", func() { run(t, ns, "nft", "add set inet "+DefaultTable+" s { type ipv4_addr; }") }},
		{"table made dormant", func() { run(t, ns, "nft", "add table inet "+DefaultTable+" { flags dormant; }") }},
		{"chain flushed", func() { run(t, ns, "nft", "flush", "chain", "inet", DefaultTable, "prerouting") }},
	} {
		edit.do()
		if list() == b.Render() {
			t.Fatalf("%s: the edit did not change the table", edit.name)
		}
		apply(b, true)
		apply(b, false)
		t.Logf("%s: repaired", edit.name)
	}

	// The zero Spec means no table.
	if changed, err := tbl.Apply(Spec{}); err != nil || !changed {
		t.Fatalf("Apply(Spec{}): changed=%v err=%v, want the table removed", changed, err)
	}
	apply(a, true)
	if removed, err := tbl.Remove(""); err != nil || !removed {
		t.Fatalf("Remove: removed=%v err=%v", removed, err)
	}
	if ok, err := tbl.Present(""); err != nil || ok {
		t.Fatalf("Present after Remove: %v %v", ok, err)
	}
	if out, err := inNS(ns, "", "nft", "list", "table", "inet", DefaultTable); err == nil {
		t.Fatalf("table still listed after Remove:\n%s", out)
	}
	if removed, err := tbl.Remove(""); err != nil || removed {
		t.Fatalf("second Remove: removed=%v err=%v, want nothing removed", removed, err)
	}
	if changed, err := tbl.Apply(Spec{}); err != nil || changed {
		t.Fatalf("Apply(Spec{}) without a table: changed=%v err=%v", changed, err)
	}

	// A table of another name is another table.
	c := Spec{Table: "ra2", Mark: 0x20, Exclude: []string{"lo"}}
	if changed, err := tbl.Apply(c); err != nil || !changed {
		t.Fatalf("Apply(%+v): %v %v", c, changed, err)
	}
	if ok, err := tbl.Present(""); err != nil || ok {
		t.Fatalf("default table present after applying table ra2: %v %v", ok, err)
	}
	if removed, err := tbl.Remove("ra2"); err != nil || !removed {
		t.Fatalf("Remove(ra2): %v %v", removed, err)
	}

	if got := run(t, ns, "nft", "list", "ruleset"); got != others {
		t.Fatalf("other tables changed:\n%s\nwant:\n%s", got, others)
	}
	if _, err := tbl.Apply(Spec{Mark: 0x1000, Exclude: []string{"bad*"}}); err == nil || !strings.Contains(err.Error(), "excluded interface") {
		t.Fatalf("Apply with a bad interface name: %v", err)
	}
}

func TestNewRefusesFdZero(t *testing.T) {
	if _, err := New(0); err == nil {
		t.Fatal("New(0) succeeded; fd 0 would silently mean the current namespace")
	}
}
