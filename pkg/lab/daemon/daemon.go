// Package daemon runs the lab's long-lived child processes (etcd, API
// server, containerd, kubelets, agents): started so that a killed test
// leaves none behind (Pdeathsig), watched, and stopped with a signal and,
// after a grace period, SIGKILL.
package daemon

import (
	"fmt"
	"os/exec"
	"syscall"
	"time"
)

// Process is a started child.
type Process struct {
	Name  string
	cmd   *exec.Cmd
	group bool
	done  chan struct{}
	err   error
}

// Start starts cmd, which dies with this process. With group, it leads a
// process group of its own and signals go to the whole group (for
// `ip netns exec` and other wrappers that fork rather than exec).
func Start(name string, cmd *exec.Cmd, group bool) (*Process, error) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: group, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	p := &Process{Name: name, cmd: cmd, group: group, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// Running says whether the process has not exited.
func (p *Process) Running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// Done is closed when the process has exited; Err then says how.
func (p *Process) Done() <-chan struct{} { return p.done }

// Err is the process's exit error, once Done.
func (p *Process) Err() error { return p.err }

// PID is the process id.
func (p *Process) PID() int { return p.cmd.Process.Pid }

// Signal sends sig to the process (or its group), waits up to grace for it
// to exit and kills it after that.
func (p *Process) Signal(sig syscall.Signal, grace time.Duration) {
	if !p.Running() {
		return
	}
	p.kill(sig)
	select {
	case <-p.done:
	case <-time.After(grace):
		p.kill(syscall.SIGKILL)
		<-p.done
	}
}

// Stop is Signal with SIGTERM.
func (p *Process) Stop(grace time.Duration) { p.Signal(syscall.SIGTERM, grace) }

func (p *Process) kill(sig syscall.Signal) {
	pid := p.cmd.Process.Pid
	if p.group {
		pid = -pid
	}
	_ = syscall.Kill(pid, sig)
}
