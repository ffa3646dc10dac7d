package prober

import (
	"context"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/routing-agent/routing-agent/pkg/nlutil"
)

// watch marks gateways down the moment their interface loses its link or
// the kernel's neighbour entry for them fails, without waiting for probes
// to time out. Coming back always takes Rise answers.
func (p *Prober) watch(ctx context.Context) {
	links := make(chan netlink.LinkUpdate, 64)
	neighs := make(chan netlink.NeighUpdate, 256)
	onErr := func(err error) {
		if ctx.Err() == nil {
			p.log.Error(err, "netlink subscription; probes still run")
		}
	}
	if err := netlink.LinkSubscribeWithOptions(links, ctx.Done(), netlink.LinkSubscribeOptions{ErrorCallback: onErr}); err != nil {
		p.log.Error(err, "cannot watch links; relying on probes")
	}
	if err := netlink.NeighSubscribeWithOptions(neighs, ctx.Done(), netlink.NeighSubscribeOptions{ErrorCallback: onErr}); err != nil {
		p.log.Error(err, "cannot watch neighbours; relying on probes")
	}
	for {
		select {
		case <-ctx.Done():
			return
		case u, ok := <-links:
			if !ok {
				links = nil
				continue
			}
			attrs := u.Attrs()
			if attrs.Flags&unix.IFF_UP == 0 || attrs.OperState == netlink.OperDown || attrs.OperState == netlink.OperLowerLayerDown {
				name := attrs.Name
				p.markDown(func(g *gateway) bool { return g.target.Link == name }, ReasonLinkDown)
			}
		case u, ok := <-neighs:
			if !ok {
				neighs = nil
				continue
			}
			if u.Type == unix.RTM_NEWNEIGH && u.State&netlink.NUD_FAILED != 0 && u.IP != nil {
				addr := nlutil.Addr(u.IP)
				p.markDown(func(g *gateway) bool { return g.target.Addr == addr }, ReasonNeighborFailed)
			}
		}
	}
}
