// Command routing-agent turns Route custom resources into policy routes on
// Kubernetes nodes. Subcommands:
//
//	routing-agent validate FILE...   check Route manifests offline, with the
//	                                 API server's own admission rules
package main

import (
	"fmt"
	"io"
	"os"
)

const usage = `usage: routing-agent <command> [arguments]

commands:
  validate FILE...   check Route manifests (YAML, several documents per file,
                     "-" for stdin) offline against the same rules the API
                     server applies at admission; exit status 1 if any fails
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "validate":
		return validate(args[1:], stdin, stdout, stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "routing-agent: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
}
