package agent

import (
	"testing"

	"github.com/routing-agent/routing-agent/pkg/bypass"
)

func TestParseControlPlaneHost(t *testing.T) {
	for in, want := range map[string]string{
		"api.example.com":                   "api.example.com",
		"api.example.com.":                  "api.example.com.",
		"api.example.com:6443":              "api.example.com:6443",
		"https://api.example.com:6443":      "api.example.com:6443",
		"https://api.example.com":           "api.example.com:443",
		"198.51.100.100":                    "198.51.100.100",
		"198.51.100.100:6443":               "198.51.100.100:6443",
		"https://198.51.100.100:6443/":      "198.51.100.100:6443",
		"2001:db8::100":                     "2001:db8::100",
		"[2001:db8::100]:6443":              "2001:db8::100:6443",
		"https://[2001:db8::100]:6443":      "2001:db8::100:6443",
		" api.example.com ":                 "api.example.com",
		"my_cluster-api.internal:443":       "my_cluster-api.internal:443",
		"https://api.example.com:6443/path": "api.example.com:6443",
	} {
		got, err := ParseControlPlaneHost(in, bypass.SourceFlag)
		hostPort := got.Host
		if got.Port != "" {
			hostPort += ":" + got.Port
		}
		if err != nil || hostPort != want || got.Source != bypass.SourceFlag {
			t.Errorf("%q: got %+v, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"", ":6443", "https://:6443", "api..example.com", "-api.example.com", "api example.com", "https://[::1"} {
		if got, err := ParseControlPlaneHost(in, bypass.SourceFlag); err == nil {
			t.Errorf("%q: accepted as %+v", in, got)
		}
	}
}
