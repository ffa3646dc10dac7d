package nodefacts

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestParseNameservers(t *testing.T) {
	got, err := ParseNameservers(strings.NewReader("# comment\nsearch example.internal\nnameserver 198.51.100.53\nnameserver fe80::1%eth0\nnameserver bogus\noptions ndots:5\nnameserver 2001:db8::53\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := []netip.Addr{netip.MustParseAddr("198.51.100.53"), netip.MustParseAddr("fe80::1"), netip.MustParseAddr("2001:db8::53")}
	if !slices.Equal(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
}

func TestDNSServersFollowsResolvedStub(t *testing.T) {
	dir := t.TempDir()
	stub, upstream, plain := filepath.Join(dir, "stub"), filepath.Join(dir, "upstream"), filepath.Join(dir, "plain")
	for path, content := range map[string]string{
		stub:     "nameserver 127.0.0.53\noptions edns0 trust-ad\n",
		upstream: "nameserver 203.0.113.53\nnameserver 203.0.113.54\n",
		plain:    "nameserver 198.51.100.53\n",
	} {
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := DNSServers(stub, upstream)
	if err != nil || len(got) != 2 || got[0] != netip.MustParseAddr("203.0.113.53") {
		t.Errorf("stub: got %v, %v; want the upstream servers", got, err)
	}
	got, err = DNSServers(plain, upstream)
	if err != nil || len(got) != 1 || got[0] != netip.MustParseAddr("198.51.100.53") {
		t.Errorf("plain: got %v, %v", got, err)
	}
	if _, err := DNSServers(filepath.Join(dir, "missing"), upstream); err == nil {
		t.Error("a missing resolv.conf gave no error")
	}
}
