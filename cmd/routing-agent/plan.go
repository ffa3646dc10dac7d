package main

import (
	"flag"
	"fmt"
	"io"
	"net/netip"
	"strings"

	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
	"github.com/routing-agent/routing-agent/pkg/connmark"
	"github.com/routing-agent/routing-agent/pkg/nodefacts"
	"github.com/routing-agent/routing-agent/pkg/planner"
	"github.com/routing-agent/routing-agent/pkg/selection"
)

const planUsage = `usage: routing-agent plan [flags] ROUTE_FILE...

Prints the nexthop objects, ip rules and routes the agent would install on
a node for the Routes in ROUTE_FILE ("-" for stdin), with what became of
each Route. Needs
no cluster and no root: the node is a description file (--node) or the
current network namespace, read over netlink.

flags:
`

func plan(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("plan", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, planUsage); fs.PrintDefaults() }
	cfg := plannerFlags(fs)
	nodeFile := fs.String("node", "", "node description YAML (interfaces, main routes, DNS, control plane, name, labels); default: this network namespace")
	resolvConf := fs.String("resolv-conf", "/etc/resolv.conf", "resolv.conf to read DNS servers from, without --node")
	controlPlane := fs.String("control-plane", "", "control-plane addresses, comma-separated, without --node")
	nodeName := fs.String("node-name", "", "node name for nodeSelector matchFields, without --node")
	nodeLabels := fs.String("node-labels", "", "node labels k=v,... for nodeSelector, without --node")
	down := fs.String("down", "", "gateways to plan as down, comma-separated (preview of a failover)")
	perRoute := fs.Bool("per-route", false, "print routes that name their gateways, as the agent writes them on a kernel without nexthop objects (before Linux 5.3), instead of nexthop objects and groups")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if err := checkPlannerConfig(cfg); err != nil {
		fmt.Fprintln(stderr, "routing-agent plan:", err)
		return 2
	}
	if fs.NArg() == 0 {
		fmt.Fprintln(stderr, "routing-agent plan: no Route files given (use - for stdin)")
		return 2
	}
	fail := func(err error) int {
		fmt.Fprintln(stderr, "routing-agent plan:", err)
		return 1
	}

	routes, err := loadRoutes(fs.Args(), stdin)
	if err != nil {
		return fail(err)
	}
	var node planner.Node
	kubeNode := &corev1.Node{}
	if *nodeFile != "" {
		desc, err := nodefacts.ReadDescription(*nodeFile)
		if err != nil {
			return fail(err)
		}
		if node, err = desc.Node(); err != nil {
			return fail(fmt.Errorf("%s: %w", *nodeFile, err))
		}
		kubeNode.Name, kubeNode.Labels = desc.Name, desc.Labels
	} else {
		if node, err = nodefacts.Read(&netlink.Handle{}); err != nil {
			return fail(err)
		}
		resolvers, err := nodefacts.ReadResolvers(*resolvConf, nodefacts.ResolvedUpstream, "")
		if err != nil {
			return fail(fmt.Errorf("--resolv-conf: %w", err))
		}
		node.DNSServers = resolvers.Servers
		addrs, err := parseList(*controlPlane, netip.ParseAddr)
		if err != nil {
			return fail(fmt.Errorf("--control-plane: %w", err))
		}
		for _, a := range addrs {
			node.ControlPlane = append(node.ControlPlane, planner.Endpoint{Addr: a, Source: "--control-plane"})
		}
		kubeNode.Name = *nodeName
		if kubeNode.Labels, err = parseLabels(*nodeLabels); err != nil {
			return fail(fmt.Errorf("--node-labels: %w", err))
		}
	}
	downList, err := parseList(*down, netip.ParseAddr)
	if err != nil {
		return fail(fmt.Errorf("--down: %w", err))
	}
	downSet := map[netip.Addr]bool{}
	for _, a := range downList {
		downSet[a] = true
	}

	selected, selectorErrs := selection.Filter(routes, kubeNode)
	result := planner.Compute(planner.Input{Config: *cfg, Node: node, Routes: selected, Down: downSet})

	fmt.Fprintf(stdout, "# %d of %d Route(s) selected for this node\n", len(selected), len(routes))
	chosen := map[string]bool{}
	for _, r := range result.Results {
		chosen[r.Name] = true
		switch {
		case r.Phase == planner.Applied && r.Reason != planner.ReasonApplied:
			fmt.Fprintf(stdout, "# Route %s: Applied, table %d (%s: %s)\n", r.Name, r.Table, r.Reason, r.Message)
		case r.Phase == planner.Applied:
			fmt.Fprintf(stdout, "# Route %s: Applied, table %d\n", r.Name, r.Table)
		default:
			fmt.Fprintf(stdout, "# Route %s: %s (%s): %s\n", r.Name, r.Phase, r.Reason, r.Message)
		}
		for _, d := range r.NotApplied {
			fmt.Fprintf(stdout, "#   destination %s not in effect (%s): %s\n", d.Destination, d.Reason, d.Message)
		}
	}
	for _, r := range routes {
		if err, bad := selectorErrs[r.Name]; bad {
			fmt.Fprintf(stdout, "# Route %s: not selected: its nodeSelector cannot be evaluated: %v\n", r.Name, err)
		} else if !chosen[r.Name] {
			fmt.Fprintf(stdout, "# Route %s: not selected by its nodeSelector\n", r.Name)
		}
	}
	// Why each bypass rule is there, as the NodeRouting's bypassAddresses
	// will say.
	ruled := map[netip.Prefix]bool{}
	for _, r := range result.Rules {
		if r.Priority == cfg.PriorityBase+planner.OffsetBypass {
			ruled[r.Dst] = true
		}
	}
	for _, b := range result.Bypass {
		if ruled[b.Prefix] {
			fmt.Fprintf(stdout, "# bypass %s: %s\n", b.Prefix, strings.Join(b.Sources, ", "))
		}
	}
	commands := result.CommandsWithNexthops(cfg.Protocol)
	if *perRoute {
		commands = result.Commands(cfg.Protocol)
	}
	for _, line := range commands {
		fmt.Fprintln(stdout, line)
	}
	if table := connmark.ForPlan(result.ConnMark).Render(); table != "" {
		// The connection marks the symmetric-replies fwmark rule matches.
		fmt.Fprintf(stdout, "nft -f - <<'EOF'\n%sEOF\n", table)
	}
	return 0
}

// loadRoutes decodes every Route in the files. Routes that break admission
// rules are kept: the planner reports them as Invalid, as the agent would.
func loadRoutes(files []string, stdin io.Reader) ([]*v1alpha1.Route, error) {
	var routes []*v1alpha1.Route
	for _, file := range files {
		docs, err := readDocuments(file, stdin)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", file, err)
		}
		for i, doc := range docs {
			var meta metav1.TypeMeta
			if err := yaml.Unmarshal(doc, &meta); err != nil {
				return nil, fmt.Errorf("%s: document %d: %w", file, i+1, err)
			}
			if meta.Kind != "Route" || meta.APIVersion != v1alpha1.SchemeGroupVersion.String() {
				continue
			}
			var r v1alpha1.Route
			if err := yaml.UnmarshalStrict(doc, &r); err != nil {
				return nil, fmt.Errorf("%s: document %d: %w", file, i+1, err)
			}
			routes = append(routes, &r)
		}
	}
	return routes, nil
}

func parseLabels(s string) (map[string]string, error) {
	labels := map[string]string{}
	for _, kv := range strings.Split(s, ",") {
		if kv = strings.TrimSpace(kv); kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, fmt.Errorf("%q is not key=value", kv)
		}
		labels[k] = v
	}
	return labels, nil
}
