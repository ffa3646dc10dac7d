package prober

import (
	"context"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/routing-agent/routing-agent/pkg/kernelwatch"
	"github.com/routing-agent/routing-agent/pkg/nlutil"
)

// watch marks gateways down the moment their interface loses its link or
// the kernel's neighbour entry for them fails, without waiting for probes
// to time out. Coming back always takes Rise answers. A subscription the
// kernel drops is resubscribed; the probes cover what it missed meanwhile.
func (p *Prober) watch(ctx context.Context) {
	ev := kernelwatch.Watch(ctx, p.log.WithName("kernelwatch"), kernelwatch.Options{Kinds: kernelwatch.Links | kernelwatch.Neighs})
	for {
		select {
		case <-ctx.Done():
			return
		case u := <-ev.Links:
			attrs := u.Attrs()
			if attrs.Flags&unix.IFF_UP == 0 || attrs.OperState == netlink.OperDown || attrs.OperState == netlink.OperLowerLayerDown {
				index := attrs.Index
				p.markDown(func(g *gateway) bool {
					// By index: a link re-created under the same name is
					// another link. A deleted one is down too (the kernel
					// closes a link before it sends RTM_DELLINK).
					return g.target.LinkIndex == index
				}, ReasonLinkDown)
			}
		case u := <-ev.Neighs:
			if u.Type == unix.RTM_NEWNEIGH && u.State&netlink.NUD_FAILED != 0 && u.IP != nil {
				addr := nlutil.Addr(u.IP)
				p.markDown(func(g *gateway) bool { return g.target.Addr == addr && g.target.LinkIndex == u.LinkIndex }, ReasonNeighborFailed)
			}
		}
	}
}
