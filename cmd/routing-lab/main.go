// Command routing-lab is the project's lab tool.
//
//	routing-lab image   builds the agent's container image without Docker:
//	                    the static binary on an empty base, written as an OCI
//	                    archive (and pushed to a registry with --push)
//	routing-lab demo    runs the product end to end on one machine: a cloud
//	                    VPC in network namespaces (worker nodes running real
//	                    kubelets, containerd and runc; two NAT gateways; an
//	                    internet router; an external host that reports the
//	                    source address it sees; a control plane of real etcd,
//	                    kube-apiserver, controller manager and scheduler),
//	                    the agent installed from manifests/ with an image
//	                    built by `routing-lab image`, and real kubectl. It
//	                    applies the announcement's examples one by one and
//	                    shows what a user would look at, then kills a
//	                    gateway; everything is torn down on exit, on error
//	                    and on Ctrl-C.
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

	"github.com/routing-agent/routing-agent/pkg/lab/cluster"
	"github.com/routing-agent/routing-agent/pkg/lab/controlplane"
	"github.com/routing-agent/routing-agent/pkg/ociimage"
)

const usage = `usage: routing-lab image [flags]   build the agent image (an OCI archive)
       routing-lab demo [flags]    the product end to end in a namespace lab (root)

"routing-lab <command> -h" lists a command's flags.
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	switch os.Args[1] {
	case "image":
		os.Exit(image(os.Args[2:]))
	case "demo":
		os.Exit(runDemo(os.Args[2:]))
	default:
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
}

func image(args []string) int {
	fs := flag.NewFlagSet("routing-lab image", flag.ExitOnError)
	repo := fs.String("repo", ".", "the routing-agent repository to build")
	ref := fs.String("image", "localhost/routing-agent:dev", "the image reference, REGISTRY/NAME:TAG")
	out := fs.String("out", "_out/routing-agent.oci.tar", "the OCI archive to write")
	push := fs.Bool("push", false, "also push the image to its registry, with the credentials of ~/.docker/config.json")
	fs.Parse(args)
	fail := func(err error) int {
		fmt.Fprintf(os.Stderr, "routing-lab image: %v\n", err)
		return 1
	}
	if err := os.MkdirAll(filepath.Dir(*out), 0o755); err != nil {
		return fail(err)
	}
	binary := filepath.Join(filepath.Dir(*out), "routing-agent")
	if err := cluster.BuildAgentBinary(*repo, binary); err != nil {
		return fail(err)
	}
	img, err := cluster.AgentImage(binary)
	if err != nil {
		return fail(err)
	}
	if err := ociimage.WriteArchive(*out, *ref, img); err != nil {
		return fail(err)
	}
	digest, _ := img.Digest()
	fmt.Printf("%s: %s (%s)\n", *out, *ref, digest)
	if *push {
		pushed, err := ociimage.Push(*out, *ref)
		if err != nil {
			return fail(err)
		}
		fmt.Printf("pushed %s\n", pushed)
	}
	return 0
}

func runDemo(args []string) int {
	fs := flag.NewFlagSet("routing-lab demo", flag.ExitOnError)
	repo := fs.String("repo", ".", "the routing-agent repository (manifests, seed examples)")
	archive := fs.String("image-archive", "_out/routing-agent.oci.tar", "the agent image, as `routing-lab image` writes it")
	ref := fs.String("image", "localhost/routing-agent:dev", "the reference the image archive holds")
	binDir := fs.String("lab-bin", os.Getenv(controlplane.BinDirEnv), "directory of the lab tools built by hack/build-lab-tools.sh (default $LAB_BIN_DIR)")
	fs.Parse(args)
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "routing-lab demo: run as root: the lab is made of network namespaces")
		return 1
	}
	repoPath, _ := filepath.Abs(*repo)
	archivePath, _ := filepath.Abs(*archive)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	begin := time.Now()
	if err := demo(ctx, repoPath, *binDir, archivePath, *ref); err != nil {
		fmt.Fprintf(os.Stderr, "\nrouting-lab demo: %v\n", err)
		return 1
	}
	fmt.Printf("\ndemo finished in %s; the lab is gone.\n", time.Since(begin).Round(time.Second))
	return 0
}
