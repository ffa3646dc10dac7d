package agent

import (
	"runtime/debug"
	"sync/atomic"
	"time"
)

// releaseEvery bounds how often a reconcile hands its memory back.
const releaseEvery = 5 * time.Second

// lastRelease is when memory was last handed back, in Unix nanoseconds:
// per process, as the memory is.
var lastRelease atomic.Int64

// releaseMemory, after a reconcile, collects and returns the freed memory
// to the kernel at once (debug.FreeOSMemory), at most every releaseEvery.
// A reconcile reads the kernel's routes and rules and builds the plan and
// the status: megabytes that are garbage once it is done, and that the
// runtime would otherwise hand back over minutes, keeping the RSS between
// resyncs at its peak. At rest an agent reconciles about 3 times a minute
// (measured, at the default 30 s resync), each then a collection of a heap
// of a few MiB; in a burst of changes, one every 5 s at most.
func releaseMemory() {
	now := time.Now().UnixNano()
	last := lastRelease.Load()
	if now-last < int64(releaseEvery) || !lastRelease.CompareAndSwap(last, now) {
		return
	}
	debug.FreeOSMemory()
}
