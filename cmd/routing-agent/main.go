// Command routing-agent turns Route custom resources into policy routes on
// Kubernetes nodes. See `routing-agent help`.
package main

import (
	"fmt"
	"io"
	"os"
	"strings"
)

const usage = `usage: routing-agent [flags]              run the node agent (see routing-agent -h)
       routing-agent <command> [arguments]

commands:
  plan [flags] FILE...   print the ip rules and routes the agent would install
                         for the Routes in FILE, on a described node or this
                         network namespace; no cluster, no root
  cleanup [flags]        remove every rule and route the agent owns in this
                         network namespace, and nothing else
  validate FILE...       check Route manifests offline against the API
                         server's own admission rules

"routing-agent <command> -h" lists a command's flags.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 0 || strings.HasPrefix(args[0], "-") && args[0] != "--help" {
		return runAgent(args, stderr)
	}
	switch args[0] {
	case "plan":
		return plan(args[1:], stdin, stdout, stderr)
	case "cleanup":
		return cleanup(args[1:], stdout, stderr, newLogger(stderr))
	case "validate":
		return validate(args[1:], stdin, stdout, stderr)
	case "help", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "routing-agent: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
}
