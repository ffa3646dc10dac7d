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

	"github.com/routing-agent/routing-agent/pkg/lab/netns"
)

// AgentHTTP is where an agent process serves /metrics, /healthz and
// /readyz, inside its node.
const AgentHTTP = "127.0.0.1:9464"

// AgentProcess is the routing-agent binary running in a node's namespace.
type AgentProcess struct {
	cmd  *exec.Cmd
	log  *os.File
	path string
	done chan struct{}
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
	kubeconfig, _, err := c.CP.KubeconfigFor(AgentIdentity, "system:serviceaccounts", "system:serviceaccounts:routing-agent", "system:authenticated")
	if err != nil {
		return err
	}
	resolv := filepath.Join(c.Dir, "resolv.conf")
	if err := os.WriteFile(resolv, []byte(c.opts.ResolvConf), 0o644); err != nil {
		return err
	}
	a := &AgentProcess{path: filepath.Join(c.Dir, n.Name+"-agent.log"), done: make(chan struct{})}
	// Appended to across restarts, so a test sees the whole story.
	if a.log, err = os.OpenFile(a.path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644); err != nil {
		return err
	}
	a.cmd = exec.Command("ip", append([]string{"netns", "exec", n.NS, bin,
		"--kubeconfig", kubeconfig, "--node-name", n.Name,
		"--resolv-conf", resolv, "--http-address", AgentHTTP}, args...)...)
	a.cmd.Stdout, a.cmd.Stderr = a.log, a.log
	a.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := a.cmd.Start(); err != nil {
		a.log.Close()
		return fmt.Errorf("cluster: starting the agent on %s: %w", n.Name, err)
	}
	go func() { a.cmd.Wait(); close(a.done) }()
	n.Agent = a
	return nil
}

// Running says whether the process has not exited.
func (a *AgentProcess) Running() bool {
	select {
	case <-a.done:
		return false
	default:
		return true
	}
}

// Signal sends sig to the agent and waits up to 10 s for it to exit, then
// kills it.
func (a *AgentProcess) Signal(sig syscall.Signal) {
	if a.Running() {
		a.cmd.Process.Signal(sig)
		select {
		case <-a.done:
		case <-time.After(10 * time.Second):
			a.cmd.Process.Kill()
			<-a.done
		}
	}
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

// PID is the agent's process id (ip netns exec runs it in place).
func (a *AgentProcess) PID() int { return a.cmd.Process.Pid }
