package kubenode

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/routing-agent/routing-agent/pkg/lab/netns"
)

// cgroupMount is where the machine's cgroup hierarchies are mounted.
const cgroupMount = "/sys/fs/cgroup"

// trackingHierarchy is the cgroup v1 hierarchy (or, on a pure cgroup v2
// machine, the unified one) whose membership tells which processes belong to
// a node: containerd, its shims, the containers and the kubelet all live
// under the node's cgroup root there.
func trackingHierarchy() string {
	if _, err := os.Stat(filepath.Join(cgroupMount, "pids", "cgroup.procs")); err == nil {
		return filepath.Join(cgroupMount, "pids")
	}
	return cgroupMount
}

// hierarchies lists the mounted cgroup hierarchies: on a cgroup v1 or
// hybrid machine every directory of /sys/fs/cgroup holding a cgroup.procs,
// on a v2 machine /sys/fs/cgroup itself.
func hierarchies() ([]string, error) {
	if _, err := os.Stat(filepath.Join(cgroupMount, "cgroup.procs")); err == nil {
		return []string{cgroupMount}, nil
	}
	entries, err := os.ReadDir(cgroupMount)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		dir := filepath.Join(cgroupMount, e.Name())
		if _, err := os.Stat(filepath.Join(dir, "cgroup.procs")); err == nil {
			out = append(out, dir)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no cgroup hierarchy under %s", cgroupMount)
	}
	return out, nil
}

// createCgroup makes path (absolute, like "/ra-lab-1/worker-0/system") in
// every hierarchy. In a v1 cpuset hierarchy a new cgroup has no CPUs or
// memory nodes until given its parent's, and could hold no process.
func createCgroup(path string) error {
	hs, err := hierarchies()
	if err != nil {
		return err
	}
	for _, h := range hs {
		parts := strings.Split(strings.Trim(path, "/"), "/")
		dir := h
		for _, part := range parts {
			parent := dir
			dir = filepath.Join(dir, part)
			if err := os.Mkdir(dir, 0o755); err != nil && !os.IsExist(err) {
				return fmt.Errorf("creating cgroup %s: %w", dir, err)
			}
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				value, err := os.ReadFile(filepath.Join(parent, f))
				if err != nil {
					continue // not a v1 cpuset hierarchy
				}
				if current, _ := os.ReadFile(filepath.Join(dir, f)); strings.TrimSpace(string(current)) == "" {
					if err := os.WriteFile(filepath.Join(dir, f), value, 0o644); err != nil {
						return fmt.Errorf("cgroup %s: %w", filepath.Join(dir, f), err)
					}
				}
			}
		}
	}
	return nil
}

// cgroupPIDs returns every process in path's subtree of the tracking
// hierarchy.
func cgroupPIDs(path string) []int {
	var pids []int
	root := filepath.Join(trackingHierarchy(), path)
	_ = filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.Name() != "cgroup.procs" {
			return nil
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return nil
		}
		for _, field := range strings.Fields(string(data)) {
			if pid, err := strconv.Atoi(field); err == nil {
				pids = append(pids, pid)
			}
		}
		return nil
	})
	slices.Sort(pids)
	return slices.Compact(pids)
}

// killCgroup SIGKILLs every process of path's subtree until none is left:
// containers, shims and daemons the lab started, whoever their parent is now.
func killCgroup(path string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		pids := cgroupPIDs(path)
		if len(pids) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("processes %v of cgroup %s survive SIGKILL", pids, path)
		}
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// removeCgroup removes path's subtree, deepest first, from every hierarchy.
// A cgroup whose last process just died can refuse removal for a moment.
func removeCgroup(path string, timeout time.Duration) error {
	hs, err := hierarchies()
	if err != nil {
		return err
	}
	deadline := time.Now().Add(timeout)
	var errs []error
	for _, h := range hs {
		root := filepath.Join(h, path)
		var dirs []string
		_ = filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		slices.Reverse(dirs) // children before parents
		for _, dir := range dirs {
			for {
				err := syscall.Rmdir(dir)
				if err == nil || errors.Is(err, syscall.ENOENT) {
					break
				}
				if time.Now().After(deadline) {
					errs = append(errs, fmt.Errorf("removing cgroup %s: %w", dir, err))
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
	}
	return errors.Join(errs...)
}

// RemoveStale kills and removes what killed runs left: cgroup roots named
// like netns.Name ("ra-<purpose>-<pid>") whose creating process is gone.
// Their shims and containers outlive a killed test, being children of init.
func RemoveStale() error {
	entries, err := os.ReadDir(trackingHierarchy())
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		name := e.Name()
		if !e.IsDir() || !netns.Stale(name) {
			continue
		}
		if err := killCgroup("/"+name, 10*time.Second); err != nil {
			errs = append(errs, err)
			continue
		}
		errs = append(errs, removeCgroup("/"+name, 10*time.Second))
	}
	return errors.Join(errs...)
}

// RemoveCgroupTree kills every process under path (absolute, like
// "/ra-lab-123") and removes its cgroups: what a lab that placed several
// nodes under one root calls when it is done with them.
func RemoveCgroupTree(path string) error {
	if err := killCgroup(path, 10*time.Second); err != nil {
		return err
	}
	return removeCgroup(path, 10*time.Second)
}
