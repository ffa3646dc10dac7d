// Package corpus loads the Route corpus in test/testdata/routes: valid Routes
// that must be accepted, and invalid ones that must be refused, each with the
// field the refusal names. The admission test runs it against the real API
// server and the routespec test against the Go validator, so the two cannot
// drift apart.
package corpus

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
)

// Case is one Route manifest of the corpus.
type Case struct {
	// Name is the file name without .yaml (and the Route's name).
	Name string
	// YAML is the manifest as a user would write it.
	YAML []byte
	// Field is the field path the refusal must name (invalid cases only).
	Field string
	// APIError is text the API server's message must contain (invalid
	// cases only).
	APIError string
}

// Dir is test/testdata/routes in this checkout.
func Dir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "testdata", "routes")
}

// Valid returns the cases that must be accepted.
func Valid() ([]Case, error) { return load("valid") }

// Invalid returns the cases that must be refused.
func Invalid() ([]Case, error) {
	cases, err := load("invalid")
	if err != nil {
		return nil, err
	}
	for _, c := range cases {
		if c.Field == "" || c.APIError == "" {
			return nil, fmt.Errorf("invalid/%s.yaml: needs '# field:' and '# api:' header lines", c.Name)
		}
	}
	return cases, nil
}

// TooManyDestinations returns a Route with n destinations, too large a case
// to keep as a file.
func TooManyDestinations(n int) Case {
	var b strings.Builder
	b.WriteString("apiVersion: networking.doks.digitalocean.com/v1alpha1\nkind: Route\nmetadata:\n  name: destinations-too-many\nspec:\n  gateways: [\"10.114.0.3\"]\n  destinations:\n")
	for i := 0; i < n; i++ {
		fmt.Fprintf(&b, "    - \"10.%d.%d.0/24\"\n", 128+i/256, i%256)
	}
	return Case{Name: "destinations-too-many", YAML: []byte(b.String())}
}

// LongestDestinations returns a valid Route with n destinations of the
// longest form the schema allows (49 characters, an IPv6 CIDR with an
// embedded IPv4 tail), all IPv6 but the last: the worst case for the size
// of the object and for the runtime cost of the CEL rules, two of which
// walk the whole list looking for an IPv4 destination.
func LongestDestinations(n int) Case {
	var b strings.Builder
	b.WriteString("apiVersion: networking.doks.digitalocean.com/v1alpha1\nkind: Route\nmetadata:\n  name: destinations-longest\nspec:\n  gateways: [\"10.114.0.3\", \"2001:db8::3\"]\n  destinations:\n")
	for i := 0; i < n-1; i++ {
		fmt.Fprintf(&b, "    - \"2001:0db8:ffff:ffff:%04x:%04x:255.255.255.255/128\"\n", 0x1000+i/65536, i%65536)
	}
	b.WriteString("    - \"198.51.100.255/32\"\n")
	return Case{Name: "destinations-longest", YAML: []byte(b.String())}
}

func load(kind string) ([]Case, error) {
	files, err := filepath.Glob(filepath.Join(Dir(), kind, "*.yaml"))
	if err != nil {
		return nil, err
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("no %s cases in %s", kind, Dir())
	}
	sort.Strings(files)
	var cases []Case
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			return nil, err
		}
		c := Case{Name: strings.TrimSuffix(filepath.Base(file), ".yaml"), YAML: data}
		scanner := bufio.NewScanner(bytes.NewReader(data))
		for scanner.Scan() {
			line := scanner.Text()
			if v, ok := strings.CutPrefix(line, "# field: "); ok {
				c.Field = v
			}
			if v, ok := strings.CutPrefix(line, "# api: "); ok {
				c.APIError = v
			}
		}
		cases = append(cases, c)
	}
	return cases, nil
}
