package cluster

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/routing-agent/routing-agent/pkg/lab/daemon"
	"github.com/routing-agent/routing-agent/pkg/lab/netns"
)

// AgentHTTP is where an agent process serves /metrics, /healthz and
// /readyz, inside its node.
const AgentHTTP = "127.0.0.1:9464"

// AgentProcess is the routing-agent binary running in a node's namespace.
type AgentProcess struct {
	*daemon.Process
	log  *os.File
	path string
}

// StartAgent runs the agent on node i as its service account, with the
// node's resolv.conf, serving HTTP on AgentHTTP, and args after those. A
// node runs one agent at a time: an earlier one must have been stopped.
func (c *Cluster) StartAgent(i int, args ...string) error {
	n := c.Nodes[i]
	if n.Agent != nil && n.Agent.Running() {
		return fmt.Errorf("cluster: the agent of %s is already running", n.Name)
	}
	bin, err := c.AgentBinary()
	if err != nil {
		return err
	}
	kubeconfig, err := c.kubeconfigFor(c.opts.AgentServer, AgentIdentity, "system:serviceaccounts", "system:serviceaccounts:routing-agent", "system:authenticated")
	if err != nil {
		return err
	}
	resolv := filepath.Join(c.Dir, "resolv.conf")
	if err := os.WriteFile(resolv, []byte(c.opts.ResolvConf), 0o644); err != nil {
		return err
	}
	a := &AgentProcess{path: filepath.Join(c.Dir, n.Name+"-agent.log")}
	// Appended to across restarts, so a test sees the whole story.
	if a.log, err = os.OpenFile(a.path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644); err != nil {
		return err
	}
	// ip netns exec runs the agent in place: its PID is the agent's.
	cmd := exec.Command("ip", append([]string{"netns", "exec", n.NS, bin,
		"--kubeconfig", kubeconfig, "--node-name", n.Name,
		"--resolv-conf", resolv, "--http-address", AgentHTTP}, args...)...)
	cmd.Stdout, cmd.Stderr = a.log, a.log
	if a.Process, err = daemon.Start("routing-agent on "+n.Name, cmd, false); err != nil {
		a.log.Close()
		return err
	}
	n.Agent = a
	return nil
}

// Signal sends sig to the agent and waits up to 10 s for it to exit, then
// kills it.
func (a *AgentProcess) Signal(sig syscall.Signal) {
	a.Process.Signal(sig, 10*time.Second)
	a.log.Close()
}

// Stop ends the agent as SIGTERM does on a node: the kernel keeps what the
// agent installed.
func (a *AgentProcess) Stop() { a.Signal(syscall.SIGTERM) }

// Logs returns everything the agents of this node have logged.
func (a *AgentProcess) Logs() string {
	data, _ := os.ReadFile(a.path)
	return string(data)
}

// AgentGet fetches path (/metrics, /readyz, ...) from node i's agent,
// from inside the node: an agent process's AgentHTTP, an agent pod's host
// IP.
func (c *Cluster) AgentGet(i int, path string) (int, string, error) {
	n := c.Nodes[i]
	address := AgentHTTP
	if c.opts.Kubelets {
		address = n.VPC.String() + ":9464"
	}
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DialContext: netns.Dialer(n.NS)}}
	resp, err := client.Get("http://" + address + path)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), nil
}
