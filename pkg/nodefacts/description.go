package nodefacts

import (
	"fmt"
	"net/netip"
	"os"

	"sigs.k8s.io/yaml"

	"github.com/routing-agent/routing-agent/pkg/planner"
)

// Description is a node written down by hand, for `routing-agent plan`
// without the node at hand:
//
//	name: worker-1           # for nodeSelector matchFields
//	labels: {doks.digitalocean.com/node-pool: worker-pool}
//	interfaces:
//	  - name: pub0
//	    addresses: [203.0.113.10/24]
//	  - name: vpc0
//	    addresses: [10.114.0.10/20]
//	routes:                  # the main table; connected routes are implied
//	  - {to: default, via: 203.0.113.1, dev: pub0}
//	dnsServers: [198.51.100.53]
//	controlPlane: [203.0.113.100]
type Description struct {
	Name         string            `json:"name,omitempty"`
	Labels       map[string]string `json:"labels,omitempty"`
	Interfaces   []Interface       `json:"interfaces"`
	Routes       []Route           `json:"routes,omitempty"`
	DNSServers   []string          `json:"dnsServers,omitempty"`
	ControlPlane []string          `json:"controlPlane,omitempty"`
}

// Interface is a link and its addresses (with prefix length).
type Interface struct {
	Name      string   `json:"name"`
	Down      bool     `json:"down,omitempty"`
	Addresses []string `json:"addresses,omitempty"`
}

// Route is a main-table route: to a prefix ("default" for 0.0.0.0/0, or
// "default6" for ::/0), optionally via a gateway, out of dev.
type Route struct {
	To     string `json:"to"`
	Via    string `json:"via,omitempty"`
	Dev    string `json:"dev"`
	Metric int    `json:"metric,omitempty"`
}

// ReadDescription reads a Description from a YAML file.
func ReadDescription(path string) (*Description, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var d Description
	if err := yaml.UnmarshalStrict(data, &d); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &d, nil
}

// Node converts the description into the planner's terms, adding the
// connected route of every address as the kernel would.
func (d *Description) Node() (planner.Node, error) {
	var node planner.Node
	index := map[string]int{}
	for i, iface := range d.Interfaces {
		if iface.Name == "" {
			return node, fmt.Errorf("interfaces[%d].name: required", i)
		}
		index[iface.Name] = i + 1
		node.Links = append(node.Links, planner.Link{Index: i + 1, Name: iface.Name})
		for j, a := range iface.Addresses {
			p, err := netip.ParsePrefix(a)
			if err != nil {
				return node, fmt.Errorf("interfaces[%d].addresses[%d]: %q is not an address with a prefix length (10.114.0.10/20): %v", i, j, a, err)
			}
			node.Addresses = append(node.Addresses, planner.Address{LinkIndex: i + 1, Prefix: p})
			if !iface.Down {
				node.MainRoutes = append(node.MainRoutes, planner.MainRoute{Dst: p.Masked(), LinkIndex: i + 1})
			}
		}
	}
	for i, r := range d.Routes {
		link, ok := index[r.Dev]
		if !ok {
			return node, fmt.Errorf("routes[%d].dev: no interface named %q", i, r.Dev)
		}
		m := planner.MainRoute{LinkIndex: link, Metric: r.Metric}
		switch r.To {
		case "default":
			m.Dst = netip.MustParsePrefix("0.0.0.0/0")
		case "default6":
			m.Dst = netip.MustParsePrefix("::/0")
		default:
			p, err := netip.ParsePrefix(r.To)
			if err != nil {
				return node, fmt.Errorf("routes[%d].to: %q is not a prefix, default or default6", i, r.To)
			}
			m.Dst = p.Masked()
		}
		if r.Via != "" {
			gw, err := netip.ParseAddr(r.Via)
			if err != nil {
				return node, fmt.Errorf("routes[%d].via: %q is not an address", i, r.Via)
			}
			m.Gateway = gw
		}
		node.MainRoutes = append(node.MainRoutes, m)
	}
	var err error
	if node.DNSServers, err = parseAddrs("dnsServers", d.DNSServers); err != nil {
		return node, err
	}
	node.ControlPlane, err = parseAddrs("controlPlane", d.ControlPlane)
	return node, err
}

// parseAddrs reads addresses of the description; their source in the plan
// is the field they came from.
func parseAddrs(field string, in []string) ([]planner.Endpoint, error) {
	var out []planner.Endpoint
	for i, s := range in {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("%s[%d]: %q is not an IP address", field, i, s)
		}
		out = append(out, planner.Endpoint{Addr: a, Source: field})
	}
	return out, nil
}
