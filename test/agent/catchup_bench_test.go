package agent_test

import (
	"testing"
	"time"
)

// BenchmarkCatchUp is the product's catch-up figure: a 45 s API server
// outage, then the time from the API server being ready again to a Route
// created then reaching the kernel. With -short (make test) the outage is
// 10 s.
//
//	LAB_BIN_DIR=$(hack/build-lab-tools.sh) go test -run '^$' -bench CatchUp -benchtime 1x ./test/agent
func BenchmarkCatchUp(b *testing.B) {
	e := newEnv(b, "catchupb", 1)
	outage := 45 * time.Second
	if testing.Short() {
		outage = 10 * time.Second
	}
	for range b.N {
		c := e.catchUp(outage, "198.51.100.128/26")
		b.Logf("%s outage: a Route created once the API server was ready reached the kernel %s later; %.0f API requests during the outage",
			outage, c.after.Round(time.Millisecond), c.requests)
		b.ReportMetric(c.after.Seconds(), "catchup-s")
		b.ReportMetric(c.requests, "outage-req")
		e.deleteRoute("after-outage")
	}
}
