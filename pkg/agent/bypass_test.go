package agent

import "testing"

func TestParseControlPlaneHost(t *testing.T) {
	for in, want := range map[string]string{
		"api.example.com":                   "api.example.com",
		"api.example.com.":                  "api.example.com.",
		"api.example.com:6443":              "api.example.com",
		"https://api.example.com:6443":      "api.example.com",
		"https://api.example.com":           "api.example.com",
		"198.51.100.100":                    "198.51.100.100",
		"198.51.100.100:6443":               "198.51.100.100",
		"https://198.51.100.100:6443/":      "198.51.100.100",
		"2001:db8::100":                     "2001:db8::100",
		"[2001:db8::100]:6443":              "2001:db8::100",
		"https://[2001:db8::100]:6443":      "2001:db8::100",
		" api.example.com ":                 "api.example.com",
		"my_cluster-api.internal:443":       "my_cluster-api.internal",
		"https://api.example.com:6443/path": "api.example.com",
	} {
		got, err := ParseControlPlaneHost(in, SourceFlag)
		if err != nil || got.Host != want || got.Source != SourceFlag {
			t.Errorf("%q: got %+v, %v; want host %q", in, got, err, want)
		}
	}
	for _, in := range []string{"", ":6443", "https://:6443", "api..example.com", "-api.example.com", "api example.com", "https://[::1"} {
		if got, err := ParseControlPlaneHost(in, SourceFlag); err == nil {
			t.Errorf("%q: accepted as %+v", in, got)
		}
	}
}
