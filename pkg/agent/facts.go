package agent

import (
	"sync/atomic"

	"github.com/routing-agent/routing-agent/pkg/planner"
)

// factsCache keeps the node's links, addresses and main-table routes from
// one reconcile to the next while the kernel watch vouches for them:
// reading them is three netlink dumps, a tenth of a reconcile after one
// Route changed. Any link, address or main-table route notification, a
// notification stream lost or subscribed again, and the periodic resync
// make the next reconcile read them again (stale). Without a watch they
// are read every time.
type factsCache struct {
	stale atomic.Bool // set by the kernel watch and the resync
	// node is the last read, DNS servers and control plane aside (each
	// reconcile sets its own); only the reconcile goroutine touches it.
	node *planner.Node
}

// invalidate makes the next get read the node again.
func (c *factsCache) invalidate() { c.stale.Store(true) }

// get returns the kept facts when watched (the kernel watch is up) and
// nothing made them stale since they were read, else those read now.
func (c *factsCache) get(watched bool, read func() (planner.Node, error)) (planner.Node, error) {
	if watched && c.node != nil && !c.stale.Load() {
		return *c.node, nil
	}
	// Before the read: a change it misses is notified after it began.
	c.stale.Store(false)
	c.node = nil
	n, err := read()
	if err == nil && watched {
		c.node = &n
	}
	return n, err
}
