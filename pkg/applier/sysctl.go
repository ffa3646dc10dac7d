package applier

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// ECMPSysctls make multipath routes hash on the L4 five-tuple, so flows, not
// just host pairs, spread over a Route's gateways; and make IPv4 multipath
// skip a nexthop whose neighbour entry has failed, which takes a dead
// gateway out of use even before its probes time out.
var ECMPSysctls = map[string]string{
	"net/ipv4/fib_multipath_hash_policy": "1",
	"net/ipv6/fib_multipath_hash_policy": "1",
	"net/ipv4/fib_multipath_use_neigh":   "1",
}

// EnsureSysctls writes each value under root (normally /proc/sys) whose
// current content differs, and returns the names it changed. The network
// namespace is the calling thread's, as for any /proc/sys/net access. A
// kernel booted with ipv6.disable=1 has no net/ipv6 at all: its IPv6
// settings are skipped, not an error.
func EnsureSysctls(root string, values map[string]string) (changed []string, err error) {
	_, v6err := os.Stat(filepath.Join(root, "net", "ipv6"))
	noIPv6 := errors.Is(v6err, fs.ErrNotExist)
	for _, name := range sortedKeys(values) {
		if noIPv6 && strings.HasPrefix(name, "net/ipv6/") {
			continue
		}
		path := filepath.Join(root, name)
		current, err := os.ReadFile(path)
		if err != nil {
			return changed, fmt.Errorf("sysctl %s: %w", strings.ReplaceAll(name, "/", "."), err)
		}
		if strings.TrimSpace(string(current)) == values[name] {
			continue
		}
		if err := os.WriteFile(path, []byte(values[name]), 0o644); err != nil {
			return changed, fmt.Errorf("sysctl %s=%s: %w", strings.ReplaceAll(name, "/", "."), values[name], err)
		}
		changed = append(changed, name)
	}
	return changed, nil
}
