package main

import (
	"flag"
	"fmt"
	"io"

	"github.com/go-logr/logr"
	"github.com/vishvananda/netlink"

	"github.com/routing-agent/routing-agent/pkg/applier"
)

const cleanupUsage = `usage: routing-agent cleanup [flags]

Removes every rule and route the agent owns in this network namespace (its
protocol number, in its table range and rule band) and nothing else. Use it
after uninstalling; the running agent never removes routes on shutdown.

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
	rep, err := ap.Cleanup()
	fmt.Fprintf(stdout, "removed %d rules and %d routes\n", ap.Writes.RuleDelete.Load(), ap.Writes.RouteDelete.Load())
	for _, f := range rep.Foreign {
		fmt.Fprintf(stdout, "left alone (not the agent's): %s\n", f)
	}
	if err != nil {
		fmt.Fprintln(stderr, "routing-agent cleanup:", err)
		return 1
	}
	return 0
}
