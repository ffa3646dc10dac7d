// Command routing-lab runs the product end to end on one machine: a cloud
// VPC in network namespaces (worker nodes with a public and a VPC interface,
// two NAT gateways, an internet router, an external host that reports the
// source address it sees, a control plane running a real kube-apiserver and
// etcd), the real routing-agent on every node, and real kubectl. `demo`
// applies the announcement's examples one by one and shows what a user would
// look at, then kills a gateway; everything is torn down on exit, on error
// and on Ctrl-C.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"
)

func main() {
	fs := flag.NewFlagSet("routing-lab", flag.ExitOnError)
	fs.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: routing-lab demo [flags]\n\nflags:\n")
		fs.PrintDefaults()
	}
	repo := fs.String("repo", ".", "the routing-agent repository (manifests, seed examples)")
	agent := fs.String("agent", "bin/routing-agent", "the routing-agent binary to run on the nodes")
	binDir := fs.String("lab-bin", os.Getenv("LAB_BIN_DIR"), "directory of etcd, kube-apiserver and kubectl (default $LAB_BIN_DIR)")
	if len(os.Args) < 2 || os.Args[1] != "demo" {
		fs.Usage()
		os.Exit(2)
	}
	fs.Parse(os.Args[2:])
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "routing-lab: run as root: the lab is made of network namespaces")
		os.Exit(1)
	}
	agentPath, _ := filepath.Abs(*agent)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	begin := time.Now()
	err := demo(ctx, *repo, agentPath, *binDir)
	if err != nil {
		fmt.Fprintf(os.Stderr, "\nrouting-lab: %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("\ndemo finished in %s; the lab is gone.\n", time.Since(begin).Round(time.Second))
}
