package routespec

import (
	"net/netip"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
	"github.com/routing-agent/routing-agent/test/corpus"
)

func TestParseDestination(t *testing.T) {
	tests := []struct {
		in, want string
	}{
		{"1.2.3.4/5", "0.0.0.0/5"}, // the seed's non-canonical example
		{"192.0.2.7", "192.0.2.7/32"},
		{"192.0.2.0/24", "192.0.2.0/24"},
		{"0.0.0.0/0", "0.0.0.0/0"},
		{"::/0", "::/0"},
		{"2001:db8::7", "2001:db8::7/128"},
		{"2001:db8:200::1/40", "2001:db8:200::/40"},
		{"2001:DB8::/32", "2001:db8::/32"},
	}
	for _, tt := range tests {
		got, err := ParseDestination(tt.in)
		if err != nil {
			t.Errorf("ParseDestination(%q): %v", tt.in, err)
			continue
		}
		if got != netip.MustParsePrefix(tt.want) {
			t.Errorf("ParseDestination(%q) = %s, want %s", tt.in, got, tt.want)
		}
	}
	for _, bad := range []string{"", "10.0.0.0/33", "300.1.2.3", "fe80::1%eth0", "::ffff:192.0.2.1", "::ffff:192.0.2.0/120", "10.0.0.0/", "/8", "10.0.0.0/8/8"} {
		if got, err := ParseDestination(bad); err == nil {
			t.Errorf("ParseDestination(%q) = %s, want an error", bad, got)
		}
	}
}

func TestParseGateway(t *testing.T) {
	for _, good := range []string{"10.114.0.3", "203.0.113.1", "2001:db8::1", "fd00::1"} {
		if _, err := ParseGateway(good); err != nil {
			t.Errorf("ParseGateway(%q): %v", good, err)
		}
	}
	tests := []struct{ in, wantErr string }{
		{"10.114.0.3/32", "not an IP address"},
		{"0.0.0.0", "unspecified"},
		{"::", "unspecified"},
		{"127.0.0.1", "loopback"},
		{"::1", "loopback"},
		{"169.254.1.1", "link-local"},
		{"fe80::1", "link-local"},
		{"224.0.0.5", "multicast or broadcast"},
		{"ff02::1", "multicast or broadcast"},
		{"255.255.255.255", "multicast or broadcast"},
	}
	for _, tt := range tests {
		_, err := ParseGateway(tt.in)
		if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
			t.Errorf("ParseGateway(%q) = %v, want an error containing %q", tt.in, err, tt.wantErr)
		}
	}
}

// TestCorpusValid: every Route the API server must accept passes Validate.
func TestCorpusValid(t *testing.T) {
	cases, err := corpus.Valid()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cases {
		t.Run(c.Name, func(t *testing.T) {
			route := decode(t, c.YAML)
			if errs := Validate(route); len(errs) > 0 {
				t.Errorf("Validate: %v", errs.ToAggregate())
			}
		})
	}
}

// TestCorpusInvalid: every Route the API server must refuse is refused here
// too, naming the same field (or fails to decode, for wrong types and
// unknown fields, which the Go types cannot even hold).
func TestCorpusInvalid(t *testing.T) {
	cases, err := corpus.Invalid()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cases {
		t.Run(c.Name, func(t *testing.T) {
			var route v1alpha1.Route
			if err := yaml.UnmarshalStrict(c.YAML, &route); err != nil {
				leaf := c.Field[strings.LastIndex(c.Field, ".")+1:]
				leaf, _, _ = strings.Cut(leaf, "[")
				if !strings.Contains(err.Error(), leaf) {
					t.Errorf("decode error %q does not name %q", err, leaf)
				}
				return
			}
			errs := Validate(&route)
			if len(errs) == 0 {
				t.Fatalf("Validate accepted a Route the API server refuses (want an error on %s)", c.Field)
			}
			for _, e := range errs {
				if strings.HasPrefix(e.Field, c.Field) {
					return
				}
			}
			t.Errorf("no error on %s; got %v", c.Field, errs.ToAggregate())
		})
	}
}

func TestTooManyDestinations(t *testing.T) {
	ok := decode(t, corpus.TooManyDestinations(v1alpha1.MaxDestinations).YAML)
	if errs := Validate(ok); len(errs) > 0 {
		t.Fatalf("%d destinations: %v", v1alpha1.MaxDestinations, errs.ToAggregate())
	}
	longest := decode(t, corpus.LongestDestinations(v1alpha1.MaxDestinations).YAML)
	if errs := Validate(longest); len(errs) > 0 {
		t.Fatalf("%d of the longest destinations: %v", v1alpha1.MaxDestinations, errs.ToAggregate())
	}
	tooMany := decode(t, corpus.TooManyDestinations(v1alpha1.MaxDestinations+1).YAML)
	errs := Validate(tooMany)
	if len(errs) != 1 || errs[0].Field != "spec.destinations" {
		t.Fatalf("%d destinations: got %v, want one error on spec.destinations", v1alpha1.MaxDestinations+1, errs.ToAggregate())
	}
}

func decode(t *testing.T, data []byte) *v1alpha1.Route {
	t.Helper()
	var route v1alpha1.Route
	if err := yaml.UnmarshalStrict(data, &route); err != nil {
		t.Fatal(err)
	}
	return &route
}
