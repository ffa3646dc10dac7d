package connmark

import (
	"strings"
	"testing"
)

// golden is Render of goldenSpec, checked by eye against the nft syntax and,
// in TestRenderIsValidNft, by the nft parser and the kernel.
var (
	goldenSpec = Spec{Mark: 0x1000, Exclude: []string{"vpc0", "lo", "lo"}}
	golden     = `table inet routing-agent {
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		iifname != "lo" iifname != "vpc0" ct direction original ct mark set ct mark | 0x00001000 comment "routing-agent:c7cced1ea763d93f"
		ct direction reply ct mark & 0x00001000 == 0x00001000 meta mark set meta mark | 0x00001000 comment "routing-agent:c7cced1ea763d93f"
	}

	chain output {
		type route hook output priority mangle; policy accept;
		ct direction reply ct mark & 0x00001000 == 0x00001000 meta mark set meta mark | 0x00001000 comment "routing-agent:c7cced1ea763d93f"
	}
}
`
)

func TestRenderGolden(t *testing.T) {
	if got := goldenSpec.Render(); got != golden {
		t.Fatalf("Render:\n%s\nwant:\n%s", got, golden)
	}
	// Order and duplicates of Exclude do not matter; the default table name
	// is the same as spelling it out.
	same := Spec{Table: DefaultTable, Mark: 0x1000, Exclude: []string{"lo", "vpc0"}}
	if same.Render() != golden {
		t.Errorf("an equal spec renders differently:\n%s", same.Render())
	}
	// Anything that changes the rules changes the fingerprint.
	for _, other := range []Spec{
		{Mark: 0x2000, Exclude: []string{"lo", "vpc0"}},
		{Mark: 0x1000, Exclude: []string{"lo"}},
		{Table: "ra", Mark: 0x1000, Exclude: []string{"lo", "vpc0"}},
	} {
		if other.fingerprint() == goldenSpec.fingerprint() {
			t.Errorf("%+v has the golden spec's fingerprint", other)
		}
	}
	if got := (Spec{}).Render(); got != "" {
		t.Errorf("zero Spec renders %q, want nothing", got)
	}
	if got := (Spec{Exclude: []string{"lo"}}).Render(); got != "" {
		t.Errorf("Spec without a mark renders %q, want nothing", got)
	}
}

func TestValidate(t *testing.T) {
	for _, s := range []Spec{{}, {Mark: 0x1000, Exclude: []string{"eth0", "ens3.100", "wg-0"}}, {Table: "ra_2", Mark: 1, Exclude: []string{"x"}}, {Mark: 1}} {
		if err := s.Validate(); err != nil {
			t.Errorf("%+v: %v", s, err)
		}
	}
	for _, c := range []struct {
		s    Spec
		want string
	}{
		{Spec{Mark: 1, Exclude: []string{""}}, "excluded interface"},
		{Spec{Mark: 1, Exclude: []string{"a-very-long-name0"}}, "1 to 15 bytes"},
		{Spec{Mark: 1, Exclude: []string{`e"th0`}}, "printable ASCII"},
		{Spec{Mark: 1, Exclude: []string{"eth*"}}, "printable ASCII"},
		{Spec{Mark: 1, Exclude: []string{"eth 0"}}, "printable ASCII"},
		{Spec{Table: "1abc", Mark: 1, Exclude: []string{"eth0"}}, "table"},
		{Spec{Table: "a b", Mark: 1, Exclude: []string{"eth0"}}, "table"},
		{Spec{Table: strings.Repeat("a", 256)}, "table"},
	} {
		err := c.s.Validate()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: error %v, want one mentioning %q", c.s, err, c.want)
		}
	}
}

// TestRenderIsValidNft: what `routing-agent plan` prints is accepted by
// `nft -f`, lists back unchanged, and is recognized by Apply as the table it
// would write.
func TestRenderIsValidNft(t *testing.T) {
	ns := newNS(t, "cmrender")
	nft(t, ns, golden)
	if got := run(t, ns, "nft", "list", "table", "inet", DefaultTable); got != golden {
		t.Fatalf("nft lists what it read from Render as:\n%s\nwant:\n%s", got, golden)
	}
	tbl, err := New(nsFd(t, ns))
	if err != nil {
		t.Fatal(err)
	}
	changed, err := tbl.Apply(goldenSpec)
	if err != nil || changed {
		t.Fatalf("Apply over the table nft made from Render: changed=%v err=%v, want no change", changed, err)
	}
}
