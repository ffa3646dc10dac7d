package main

import (
	"os"
	"path/filepath"
	"testing"
)

func TestCgroupMemoryLimit(t *testing.T) {
	const (
		v2Mount = "31 23 0:28 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
		// A hybrid host: v1 controllers, and v2 for none of them.
		v1Mounts = "35 31 0:32 /kubepods/pod1/c1 /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n" +
			"41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
	)
	for _, tc := range []struct {
		name, cgroup, mountinfo string
		files                   map[string]string
		want                    int64
		wantFrom                string
	}{
		{"v2 with a cgroup namespace", "0::/\n", v2Mount,
			map[string]string{"sys/fs/cgroup/memory.max": "268435456\n"}, 256 << 20, "/sys/fs/cgroup/memory.max"},
		{"v2 unlimited", "0::/\n", v2Mount,
			map[string]string{"sys/fs/cgroup/memory.max": "max\n"}, 0, ""},
		{"v2, the pod's limit above the container's", "0::/kubepods/pod1/c1\n", v2Mount,
			map[string]string{"sys/fs/cgroup/kubepods/pod1/c1/memory.max": "max\n", "sys/fs/cgroup/kubepods/pod1/memory.max": "134217728\n", "sys/fs/cgroup/kubepods/memory.max": "1073741824\n"},
			128 << 20, "/sys/fs/cgroup/kubepods/pod1/memory.max"},
		{"v1 without a cgroup namespace", "4:memory:/kubepods/pod1/c1\n0::/\n", v1Mounts,
			map[string]string{"sys/fs/cgroup/memory/memory.limit_in_bytes": "268435456\n"}, 256 << 20, "/sys/fs/cgroup/memory/memory.limit_in_bytes"},
		{"v1 unlimited", "4:memory:/\n0::/\n", v1Mounts,
			map[string]string{"sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n"}, 0, ""},
		{"no cgroup filesystem", "0::/\n", "22 1 0:21 / /proc rw - proc proc rw\n", nil, 0, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			files := map[string]string{"proc/self/cgroup": tc.cgroup, "proc/self/mountinfo": tc.mountinfo}
			for k, v := range tc.files {
				files[k] = v
			}
			for name, data := range files {
				path := filepath.Join(root, name)
				if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			got, from, err := cgroupMemoryLimit(root)
			if err != nil || got != tc.want || from != tc.wantFrom {
				t.Errorf("got %d from %q, %v; want %d from %q", got, from, err, tc.want, tc.wantFrom)
			}
		})
	}
}

func TestMemoryLimitFor(t *testing.T) {
	if got := memoryLimitFor(256<<20, 0.9); got != 241591910 {
		t.Errorf("0.9 of 256Mi: %d", got)
	}
	if got := memoryLimitFor(256<<20, 0); got != 0 {
		t.Errorf("ratio 0: %d", got)
	}
	if got := memoryLimitFor(0, 0.9); got != 0 {
		t.Errorf("no limit: %d", got)
	}
	for _, bad := range []float64{-0.1, 1.5} {
		if checkMemoryLimitRatio(bad) == nil {
			t.Errorf("ratio %v accepted", bad)
		}
	}
}
