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

func TestReadResolvers(t *testing.T) {
	const upstream = "/run/systemd/resolve/resolv.conf"
	type want struct {
		listed, servers, hidden string // comma-separated; servers as addr=source
		err                     bool
	}
	for _, tc := range []struct {
		name  string
		files map[string]string // node path -> content; "->target" makes a symbolic link
		want  want
	}{{
		name:  "plain servers",
		files: map[string]string{"/etc/resolv.conf": "nameserver 198.51.100.53\nnameserver 2001:db8::53\n"},
		want:  want{listed: "198.51.100.53,2001:db8::53", servers: "198.51.100.53=resolv.conf,2001:db8::53=resolv.conf"},
	}, {
		name: "systemd-resolved stub: its upstreams",
		files: map[string]string{
			"/etc/resolv.conf": "nameserver 127.0.0.53\noptions edns0 trust-ad\n",
			upstream:           "nameserver 203.0.113.53\nnameserver 203.0.113.54\n",
		},
		want: want{listed: "127.0.0.53", servers: "203.0.113.53=systemd-resolved upstream,203.0.113.54=systemd-resolved upstream"},
	}, {
		name: "stub listed with other servers keeps them all",
		files: map[string]string{
			"/etc/resolv.conf": "nameserver 127.0.0.53\nnameserver 198.51.100.53\n",
			upstream:           "nameserver 203.0.113.53\n",
		},
		want: want{listed: "127.0.0.53,198.51.100.53", servers: "203.0.113.53=systemd-resolved upstream,198.51.100.53=resolv.conf"},
	}, {
		name: "resolved's proxy listener 127.0.0.54 too",
		files: map[string]string{
			"/etc/resolv.conf": "nameserver 127.0.0.54\n",
			upstream:           "nameserver 203.0.113.53\n",
		},
		want: want{listed: "127.0.0.54", servers: "203.0.113.53=systemd-resolved upstream"},
	}, {
		name:  "dnsmasq on 127.0.0.1 hides its upstreams",
		files: map[string]string{"/etc/resolv.conf": "nameserver 127.0.0.1\nnameserver 198.51.100.53\n"},
		want:  want{listed: "127.0.0.1,198.51.100.53", servers: "198.51.100.53=resolv.conf", hidden: "127.0.0.1"},
	}, {
		name: "symbolic link with an absolute target, followed inside the host root",
		files: map[string]string{
			"/etc/resolv.conf":                      "->/run/systemd/resolve/stub-resolv.conf",
			"/run/systemd/resolve/stub-resolv.conf": "nameserver 127.0.0.53\n",
			upstream:                                "nameserver 203.0.113.53\n",
		},
		want: want{listed: "127.0.0.53", servers: "203.0.113.53=systemd-resolved upstream"},
	}, {
		name: "symbolic link with a relative target",
		files: map[string]string{
			"/etc/resolv.conf":            "->../run/resolvconf/resolv.conf",
			"/run/resolvconf/resolv.conf": "nameserver 198.51.100.53\n",
		},
		want: want{listed: "198.51.100.53", servers: "198.51.100.53=resolv.conf"},
	}, {
		name:  "stub without a readable upstream list is an error",
		files: map[string]string{"/etc/resolv.conf": "nameserver 127.0.0.53\n"},
		want:  want{err: true},
	}, {
		name:  "missing resolv.conf is an error",
		files: map[string]string{},
		want:  want{err: true},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			for path, content := range tc.files {
				full := filepath.Join(root, path)
				if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
					t.Fatal(err)
				}
				var err error
				if target, ok := strings.CutPrefix(content, "->"); ok {
					err = os.Symlink(target, full)
				} else {
					err = os.WriteFile(full, []byte(content), 0o644)
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			r, err := ReadResolvers("/etc/resolv.conf", upstream, root)
			if (err != nil) != tc.want.err {
				t.Fatalf("error %v, want error: %v", err, tc.want.err)
			}
			if err != nil {
				return
			}
			var servers []string
			for _, e := range r.Servers {
				servers = append(servers, e.Addr.String()+"="+e.Source)
			}
			join := func(addrs []netip.Addr) string {
				var s []string
				for _, a := range addrs {
					s = append(s, a.String())
				}
				return strings.Join(s, ",")
			}
			if got := join(r.Listed); got != tc.want.listed {
				t.Errorf("listed %s, want %s", got, tc.want.listed)
			}
			if got := strings.Join(servers, ","); got != tc.want.servers {
				t.Errorf("servers %s, want %s", got, tc.want.servers)
			}
			if got := join(r.Hidden); got != tc.want.hidden {
				t.Errorf("hidden %s, want %s", got, tc.want.hidden)
			}
			for _, f := range r.Files {
				if !strings.HasPrefix(f, root) {
					t.Errorf("read %s, outside the host root %s", f, root)
				}
			}
		})
	}
}
