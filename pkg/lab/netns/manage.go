package netns

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
)

// Prefix starts the name of every namespace this project's tests and lab
// create, followed by a purpose and the creating process's pid, so that
// namespaces left by a killed run can be told apart and removed.
const Prefix = "ra-"

// Name returns a namespace name unique to this process: ra-<purpose>-<pid>.
func Name(purpose string) string {
	return fmt.Sprintf("%s%s-%d", Prefix, purpose, os.Getpid())
}

// Add creates the named namespace with its loopback up.
func Add(name string) error {
	if err := ip("netns", "add", name); err != nil {
		return err
	}
	if err := ip("-n", name, "link", "set", "lo", "up"); err != nil {
		_ = Delete(name)
		return err
	}
	return nil
}

// Delete removes the named namespace; processes still in it keep it alive
// until they exit, so callers stop those first.
func Delete(name string) error {
	return ip("netns", "delete", name)
}

// RemoveStale deletes namespaces named by Name whose creating process is
// gone: what an earlier run left behind when it was killed.
func RemoveStale() error {
	entries, err := os.ReadDir("/run/netns")
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		if !Stale(e.Name()) {
			continue
		}
		if err := Delete(e.Name()); err != nil {
			return err
		}
	}
	return nil
}

// Stale says whether name is one Name gave out (ra-<purpose>-<pid>, or
// anything of the lab named the same way) to a process that is gone.
func Stale(name string) bool {
	if !strings.HasPrefix(name, Prefix) {
		return false
	}
	pid, err := strconv.Atoi(name[strings.LastIndex(name, "-")+1:])
	return err == nil && pid != os.Getpid() && syscall.Kill(pid, 0) != nil
}

func ip(args ...string) error {
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
