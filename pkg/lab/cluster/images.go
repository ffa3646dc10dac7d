package cluster

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/routing-agent/routing-agent/pkg/lab/kubenode"
	"github.com/routing-agent/routing-agent/pkg/ociimage"
)

// ImageName is the image the DaemonSet of manifests/ names; installs
// replace it with kustomize's images: (see Install and the README).
const ImageName = "ghcr.io/routing-agent/routing-agent"

// BuildAgentBinary builds the routing-agent of repo into out as the image
// carries it: static (no libc in the image), without local paths, for
// $GOARCH (default the machine's).
func BuildAgentBinary(repo, out string) error {
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, "./cmd/routing-agent")
	cmd.Dir = repo
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build ./cmd/routing-agent: %v\n%s", err, out)
	}
	return nil
}

// AgentImage is the agent's container image: the static binary alone on
// an empty base. The agent needs no shell, CA bundle (the service account
// brings the cluster's), user database or writable path.
func AgentImage(binary string) (v1.Image, error) {
	return ociimage.Build(ociimage.Spec{
		Files:        []ociimage.File{{Path: "/routing-agent", Source: binary}},
		Entrypoint:   []string{"/routing-agent"},
		Architecture: os.Getenv("GOARCH"), // what BuildAgentBinary built for
		Labels: map[string]string{
			"org.opencontainers.image.title":  "routing-agent",
			"org.opencontainers.image.source": "https://github.com/routing-agent/routing-agent",
		},
	})
}

// AgentBinary builds the agent for this cluster once and returns its path.
func (c *Cluster) AgentBinary() (string, error) {
	if c.agentBin == "" {
		bin := filepath.Join(c.Dir, "routing-agent")
		if err := BuildAgentBinary(c.opts.Repo, bin); err != nil {
			return "", err
		}
		c.agentBin = bin
	}
	return c.agentBin, nil
}

// BuildAgentImage writes the agent's image, named ref, as an OCI archive
// in the cluster's directory and returns its path. The same source gives
// the same image whatever the ref.
func (c *Cluster) BuildAgentImage(ref string) (string, error) {
	bin, err := c.AgentBinary()
	if err != nil {
		return "", err
	}
	img, err := AgentImage(bin)
	if err != nil {
		return "", err
	}
	archive := filepath.Join(c.Dir, fmt.Sprintf("agent-%d.oci.tar", len(c.images)))
	if err := ociimage.WriteArchive(archive, ref, img); err != nil {
		return "", err
	}
	c.images = append(c.images, archive)
	return archive, nil
}

// LoadImage imports an image archive into every node's containerd, as a
// registry pull would leave it.
func (c *Cluster) LoadImage(archive string) error {
	for _, n := range c.Nodes {
		if n.Kubelet == nil {
			return fmt.Errorf("cluster: node %s has no container runtime (Options.Kubelets)", n.Name)
		}
		if err := n.Kubelet.ImportImage(archive); err != nil {
			return err
		}
	}
	return nil
}

// pauseArchive builds the pod sandbox image from the lab tools' pause.
func (c *Cluster) pauseArchive() (string, error) {
	img, err := ociimage.Build(ociimage.Spec{
		Files:      []ociimage.File{{Path: "/pause", Source: filepath.Join(c.opts.BinDir, "pause")}},
		Entrypoint: []string{"/pause"},
	})
	if err != nil {
		return "", err
	}
	archive := filepath.Join(c.Dir, "pause.oci.tar")
	return archive, ociimage.WriteArchive(archive, kubenode.SandboxImage, img)
}
