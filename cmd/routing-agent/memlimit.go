package main

import (
	"bufio"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"

	"github.com/go-logr/logr"
)

// cgroupMemoryLimit returns the memory limit of the cgroup this process
// runs in — the container's limits.memory under Kubernetes — as the
// smallest limit set on its cgroup or an ancestor visible in this mount
// namespace, with the file it came from; 0 when there is none. root is
// where /proc and /sys are found ("/" but in tests). cgroup v2
// (memory.max) and v1 (memory.limit_in_bytes) are both read.
func cgroupMemoryLimit(root string) (int64, string, error) {
	cgroups, err := os.ReadFile(filepath.Join(root, "proc/self/cgroup"))
	if err != nil {
		return 0, "", err
	}
	mounts, err := os.ReadFile(filepath.Join(root, "proc/self/mountinfo"))
	if err != nil {
		return 0, "", err
	}
	// v2 first: on a hybrid host the v1 memory controller, if mounted,
	// is the one that limits (its line names it), else v2 does.
	var v1Path, v2Path string
	var haveV1, haveV2 bool
	for _, line := range strings.Split(string(cgroups), "\n") {
		id, rest, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		controllers, path, ok := strings.Cut(rest, ":")
		if !ok {
			continue
		}
		switch {
		case id == "0" && controllers == "":
			v2Path, haveV2 = path, true
		case hasField(controllers, ",", "memory"):
			v1Path, haveV1 = path, true
		}
	}
	var mountPoint, mountRoot, path, file string
	switch {
	case haveV1:
		mountPoint, mountRoot = findCgroupMount(string(mounts), "cgroup", "memory")
		path, file = v1Path, "memory.limit_in_bytes"
	case haveV2:
		mountPoint, mountRoot = findCgroupMount(string(mounts), "cgroup2", "")
		path, file = v2Path, "memory.max"
	default:
		return 0, "", nil
	}
	if mountPoint == "" {
		return 0, "", nil // not mounted here: no limit to know of
	}
	// The mount shows the hierarchy from mountRoot (a container without a
	// cgroup namespace sees its own cgroup mounted as the root); outside
	// it, only the mount's own directory is visible.
	rel, err := filepath.Rel(mountRoot, path)
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		rel = "."
	}
	dir := filepath.Join(root, mountPoint, rel)
	top := filepath.Join(root, mountPoint)
	var limit int64
	var from string
	for {
		data, err := os.ReadFile(filepath.Join(dir, file))
		switch {
		case err == nil:
			if v, ok := parseLimit(strings.TrimSpace(string(data))); ok && (limit == 0 || v < limit) {
				limit, from = v, filepath.Join(dir, file)
			}
		case !errors.Is(err, os.ErrNotExist):
			return 0, "", err
		}
		if dir == top || len(dir) <= len(top) {
			break
		}
		dir = filepath.Dir(dir)
	}
	if from != "" {
		from = filepath.Join("/", strings.TrimPrefix(from, filepath.Clean(root)))
	}
	return limit, from, nil
}

// parseLimit reads a cgroup memory limit; "max" (v2) and v1's page-rounded
// 2^63 mean none.
func parseLimit(s string) (int64, bool) {
	if s == "max" {
		return 0, false
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil || v <= 0 || v >= math.MaxInt64/2 {
		return 0, false
	}
	return v, true
}

// findCgroupMount finds, in mountinfo, the mount of a cgroup hierarchy of
// fstype (with the controller among its options, for v1): its mount point
// and the root of the hierarchy it shows.
func findCgroupMount(mountinfo, fstype, controller string) (point, root string) {
	sc := bufio.NewScanner(strings.NewReader(mountinfo))
	for sc.Scan() {
		// id parent major:minor root point options [optional...] - fstype source superoptions
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		f, p := strings.Fields(pre), strings.Fields(post)
		if len(f) < 5 || len(p) < 3 || p[0] != fstype {
			continue
		}
		if controller != "" && !hasField(p[2], ",", controller) {
			continue
		}
		return unescapeMount(f[4]), unescapeMount(f[3])
	}
	return "", ""
}

func hasField(list, sep, want string) bool {
	for _, f := range strings.Split(list, sep) {
		if f == want {
			return true
		}
	}
	return false
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// memoryLimitFor is the soft limit the Go runtime gets: ratio of the
// cgroup's limit, or none (0) when there is no limit or ratio is 0.
func memoryLimitFor(cgroupLimit int64, ratio float64) int64 {
	if cgroupLimit <= 0 || ratio <= 0 {
		return 0
	}
	return int64(float64(cgroupLimit) * ratio)
}

func checkMemoryLimitRatio(r float64) error {
	if r < 0 || r > 1 || math.IsNaN(r) {
		return fmt.Errorf("--memory-limit-ratio %v: must be between 0 (off) and 1", r)
	}
	return nil
}

// setMemoryLimit gives the Go runtime ratio of the container's memory
// limit as its soft limit (debug.SetMemoryLimit), and says what it chose.
// GOMEMLIMIT, when set, is the operator's word and wins.
func setMemoryLimit(log logr.Logger, ratio float64) {
	if v := os.Getenv("GOMEMLIMIT"); v != "" {
		log.Info("Go memory limit from GOMEMLIMIT", "GOMEMLIMIT", v)
		return
	}
	limit, from, err := cgroupMemoryLimit("/")
	if err != nil {
		log.Info("cannot read the cgroup memory limit; the Go runtime has none", "error", err.Error())
		return
	}
	soft := memoryLimitFor(limit, ratio)
	if soft == 0 {
		log.Info("no Go memory limit", "cgroupLimit", limit, "memoryLimitRatio", ratio)
		return
	}
	debug.SetMemoryLimit(soft)
	log.Info("Go memory limit set", "bytes", soft, "cgroupLimit", limit, "from", from, "memoryLimitRatio", ratio)
}

// gcPercent is the agent's GOGC: the heap may grow to 1.5 times what is
// live before a collection, not Go's default 2 times. The agent's live
// heap is small and its work comes in bursts (a reconcile every resync
// period, or on a change), so the collections cost little CPU — measured:
// the same CPU at rest with 1,000 and 10,000 Routes — and the heap left
// over after each burst, which RSS shows, is a third smaller.
const gcPercent = 50

// setGCPercent sets gcPercent unless GOGC is set: the operator's word wins.
func setGCPercent(log logr.Logger) {
	if v := os.Getenv("GOGC"); v != "" {
		log.Info("Go GC target from GOGC", "GOGC", v)
		return
	}
	debug.SetGCPercent(gcPercent)
}
