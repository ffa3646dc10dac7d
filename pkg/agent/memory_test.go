package agent

import (
	"testing"
	"time"
)

func TestReleaseMemoryAtMostEvery(t *testing.T) {
	lastRelease.Store(0)
	releaseMemory()
	first := lastRelease.Load()
	if first == 0 {
		t.Fatal("the first release did not happen")
	}
	releaseMemory() // within releaseEvery: skipped
	if got := lastRelease.Load(); got != first {
		t.Errorf("released again after %s", time.Duration(got-first))
	}
	lastRelease.Store(first - int64(releaseEvery))
	releaseMemory()
	if lastRelease.Load() == first-int64(releaseEvery) {
		t.Error("not released once releaseEvery had passed")
	}
}
