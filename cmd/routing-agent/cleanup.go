package main

import (
	"flag"
	"fmt"
	"github.com/vishvananda/netns"
	"io"

	"github.com/go-logr/logr"
	"github.com/vishvananda/netlink"

	"github.com/routing-agent/routing-agent/pkg/applier"
	"github.com/routing-agent/routing-agent/pkg/connmark"
	"github.com/routing-agent/routing-agent/pkg/planner"
)

const cleanupUsage = `usage: routing-agent cleanup [flags]

Removes every rule and route the agent owns in this network namespace (its
protocol number, in its table range and rule band), its nftables table
(inet routing-agent), and nothing else. Use it after uninstalling; the
running agent never removes routes on shutdown.

flags:
`

func cleanup(args []string, stdout, stderr io.Writer, log logr.Logger) int {
	fs := flag.NewFlagSet("cleanup", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, cleanupUsage); fs.PrintDefaults() }
	cfg := plannerFlags(fs)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if err := checkPlannerConfig(cfg); err != nil {
		fmt.Fprintln(stderr, "routing-agent cleanup:", err)
		return 2
	}
	ap := applier.New(&netlink.Handle{}, *cfg, log)
	// The zero Handle works in the current namespace: so does the socket
	// that also finds the agent's nexthop objects.
	if err := ap.SetNamespace(netns.None()); err != nil {
		fmt.Fprintln(stderr, "routing-agent cleanup:", err)
		return 1
	}
	defer ap.Close()
	marks, err := connmark.New(-1)
	if err != nil {
		fmt.Fprintln(stderr, "routing-agent cleanup:", err)
		return 1
	}
	ap.SetMarker(connmark.Planned{Table: marks})
	rep, err := ap.Cleanup()
	fmt.Fprintf(stdout, "removed %d rules and %d routes", ap.Writes.RuleDelete.Load(), ap.Writes.RouteDelete.Load())
	if ap.Writes.Nftables.Load() > 0 {
		fmt.Fprintf(stdout, " and the nftables table inet %s", planner.ConnMarkTable)
	}
	if n := ap.Writes.NexthopDelete.Load(); n > 0 {
		fmt.Fprintf(stdout, ", and %d nexthop objects", n)
	}
	fmt.Fprintln(stdout)
	if rep.MarkingErr != nil {
		fmt.Fprintln(stderr, "routing-agent cleanup: removing the nftables table:", rep.MarkingErr)
		return 1
	}
	for _, f := range rep.Foreign {
		fmt.Fprintf(stdout, "left alone (not the agent's): %s\n", f)
	}
	if err != nil {
		fmt.Fprintln(stderr, "routing-agent cleanup:", err)
		return 1
	}
	return 0
}
