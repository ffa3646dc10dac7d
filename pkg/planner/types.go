// Package planner computes, with no I/O, the exact kernel state a node needs
// for the Routes selected for it: one routing table per Route, throw routes
// that keep longest-prefix match across Routes, and the ip rules of the
// agent's priority band (bypass, symmetric replies, main's specific routes,
// one lookup per Route). The applier makes the kernel match a Plan; the plan
// command prints one.
package planner

import (
	"fmt"
	"net/netip"
)

// MainTable is the kernel's main routing table (RT_TABLE_MAIN).
const MainTable = 254

// Offsets of the rule kinds inside the priority band, first to last.
const (
	// OffsetGate is the dispatch's gate (dispatch.go), first in the band:
	// its entries (`to <region> goto OffsetGateLanding`) at OffsetGate, its
	// exit (`goto DispatchEnd`) at OffsetGate+1. Traffic no Route can
	// capture jumps from there past the whole band, bypass rules included:
	// for it they decide nothing.
	OffsetGate = 0
	// OffsetGateLanding is the `nop` the gate's entries land on (a goto
	// needs a rule to land on, and a band may have no bypass rule).
	OffsetGateLanding = 9
	OffsetBypass      = 10
	OffsetSymmetric   = 100
	OffsetSuppress    = 200
	OffsetRoutes      = 300
	// OffsetDispatch is where the per-Route rules start (dispatch.go). Not
	// at OffsetRoutes itself: there earlier versions kept one `lookup
	// <table>` per Route, and deleting such a rule, which names no
	// destination, would take a rule of the same priority and table with
	// it whatever its destination.
	OffsetDispatch = OffsetRoutes + 1
	// BandWidth is how many priorities the band spans from its base.
	BandWidth = 1000
)

// BackstopMetric is the metric of the backstop route the agent puts behind
// every destination of a Route: an `unreachable` route no link change can
// flush, at the worst metric there is, so it is used only when the live
// route is gone (its interface went down, the kernel refused it) and the
// destination then fails closed instead of falling through to main.
const BackstopMetric = 1<<32 - 1

// DefaultProtocol is the routing protocol number the agent stamps on its
// routes and rules (`proto 245` in ip route, `protocol 245` in ip rule).
const DefaultProtocol = 245

// Config is the node-independent part of the input: where in the kernel the
// agent may write and what it always keeps on the main table.
type Config struct {
	// TableMin and TableMax bound the routing table ids given to Routes.
	TableMin, TableMax uint32
	// PriorityBase is the first priority of the agent's rule band
	// [PriorityBase, PriorityBase+BandWidth).
	PriorityBase int
	// Metadata holds the cloud metadata service addresses to bypass.
	Metadata []netip.Addr
	// ExtraBypass are operator-given prefixes that always use main.
	ExtraBypass []netip.Prefix
	// Protocol marks every route and rule the agent creates, so it can find
	// and garbage-collect exactly what it owns.
	Protocol uint8
	// ConnMark is the conntrack and packet mark bit of connections that
	// came in from outside, whose replies go back through main; 0 turns
	// connection marking off.
	ConnMark uint32
}

// ConnMarkTable is the agent's nftables table (family inet).
const ConnMarkTable = "routing-agent"

// DefaultConnMark is the connection mark bit unless told otherwise: clear
// of kube-proxy's 0x4000 and 0x8000, Calico's 0xffff0000, Cilium's magic
// 0x0f00 and its WireGuard 0x1000 (Cilium's identities use 0xffff00ff: with
// it, choose after reading its configuration), Istio's 0x539 and the AWS
// VPC CNI's 0x80.
const DefaultConnMark = 0x2000

// ConnMark is the agent's nftables table: conntrack marks for connections
// that came in from outside, restored on their replies as the fwmark the
// symmetric-replies rule matches.
type ConnMark struct {
	Mark uint32
	// Exclude are the interfaces whose new connections are not marked:
	// loopback, and those only Routes send through.
	Exclude []string
}

// CheckLayout rejects a table range, band or protocol that would collide
// with the kernel's own: the default, main and local tables, the main
// table's rule, the kernel's protocol numbers. The agent also checks a
// layout read back from a NodeRouting with it before deleting anything in it.
func (c Config) CheckLayout() error {
	switch {
	case c.TableMin == 0 || c.TableMin > c.TableMax:
		return fmt.Errorf("table range %d-%d: need 0 < min <= max", c.TableMin, c.TableMax)
	case c.TableMin <= 255 && c.TableMax >= 253:
		return fmt.Errorf("table range %d-%d overlaps the kernel's default, main and local tables (253-255)", c.TableMin, c.TableMax)
	case c.PriorityBase < 1 || c.PriorityBase+BandWidth > 32766:
		return fmt.Errorf("priority band %d-%d must lie within 1-32765, before the main table's rule", c.PriorityBase, c.PriorityBase+BandWidth-1)
	case c.Protocol < 5:
		return fmt.Errorf("protocol %d: 0-4 are the kernel's own", c.Protocol)
	}
	return nil
}

// DefaultConfig is what the agent uses unless told otherwise.
func DefaultConfig() Config {
	return Config{
		TableMin:     10000,
		TableMax:     49999,
		PriorityBase: 30000,
		Protocol:     DefaultProtocol,
		ConnMark:     DefaultConnMark,
		Metadata:     DefaultMetadata(),
	}
}

// DefaultMetadata are the cloud metadata services bypassed unless told
// otherwise: 169.254.169.254 (every major cloud), and over IPv6 AWS's
// fd00:ec2::254 and Google Cloud's fd20:ce::254. A bypass rule for an
// address a cloud does not use costs nothing.
func DefaultMetadata() []netip.Addr {
	return []netip.Addr{netip.MustParseAddr("169.254.169.254"), netip.MustParseAddr("fd00:ec2::254"), netip.MustParseAddr("fd20:ce::254")}
}

// Node is what the planner needs to know about the node.
type Node struct {
	Links     []Link
	Addresses []Address
	// MainRoutes are the unicast routes of the main table.
	MainRoutes []MainRoute
	// ControlPlane holds the API server endpoints the node must keep reaching.
	ControlPlane []Endpoint
	// DNSServers are where the node's DNS traffic goes.
	DNSServers []Endpoint
}

// Endpoint is an address the node must keep reaching through the main
// table, and where it was learned ("endpointslice default/kubernetes",
// "dns api.example.com", "resolv.conf", ...), for the status.
type Endpoint struct {
	Addr   netip.Addr
	Source string
}

// Sources the planner itself gives bypass addresses.
const (
	SourceMetadata = "metadata"
	SourceGateway  = "gateway"
	SourceExtra    = "--bypass"
)

// Link is a network interface.
type Link struct {
	Index int
	Name  string
}

// Address is an address configured on a link, with its prefix length
// (10.114.0.10/20): the prefix is a directly connected network.
type Address struct {
	LinkIndex int
	Prefix    netip.Prefix
}

// MainRoute is a route of the node's main table.
type MainRoute struct {
	Dst       netip.Prefix
	Gateway   netip.Addr // invalid for connected routes
	LinkIndex int
	Metric    int
}

// Plan is the kernel state for one node, and what became of each Route.
type Plan struct {
	Rules  []Rule
	Routes []Route
	// Results has one entry per input Route, in input order.
	Results []Result
	// Gateways are the distinct gateways of the applied Routes.
	Gateways []Gateway
	// Bypass are the addresses that keep using the main table.
	Bypass []Bypass
	// ConnMark is the nftables part; nil when marking is off or no Route
	// is applied.
	ConnMark *ConnMark
}

// Bypass is one prefix kept on the main table and the sources that asked
// for it, sorted.
type Bypass struct {
	Prefix  netip.Prefix
	Sources []string
}

// Rule is one ip rule. Exactly one of Dst, Src, Mark or SuppressPrefixlen
// >= 0 is set, or none for a plain lookup.
type Rule struct {
	Priority int
	IPv6     bool
	Dst      netip.Prefix
	Src      netip.Prefix
	// Mark and Mask: `fwmark Mark/Mask`.
	Mark, Mask uint32
	Table      uint32
	// SuppressPrefixlen is -1 when unset.
	SuppressPrefixlen int
	// Goto, when set, makes the rule a jump (`goto Goto`) instead of a
	// lookup: the dispatch's skips, `not to <region> goto <priority>`,
	// with Invert set. Table is then 0.
	Goto   int
	Invert bool
	// Nop is the dispatch's last rule (`nop`), which does nothing but be
	// there for skips to land on. Table is then 0.
	Nop bool
}

// IsSkip says whether r is one of the dispatch's jumps.
func (r Rule) IsSkip() bool { return r.Goto > 0 }

// Narrows says whether r is a jump that takes packets past rules: a skip
// or the gate's exit (`not to <prefix> goto`; earlier versions' exit had
// no selector).
// The applier removes stale ones first and adds new ones last.
func (r Rule) Narrows() bool { return r.Goto > 0 && (r.Invert || !r.Dst.IsValid()) }

// Widens says whether r is one of the gate's entries (`to <prefix> goto`),
// which let packets into the rules its exit would take them past. The
// applier adds new ones first and removes stale ones last.
func (r Rule) Widens() bool { return r.Goto > 0 && !r.Invert && r.Dst.IsValid() }

// Route is one route in one of the agent's tables.
type Route struct {
	Table uint32
	Dst   netip.Prefix
	// Throw routes send the lookup on to the next rule: they hand a more
	// specific prefix owned by another Route over to that Route's table.
	Throw bool
	// Backstop routes are `unreachable` at BackstopMetric, behind the live
	// route of the same destination.
	Backstop bool
	Nexthops []Nexthop
}

// Nexthop is a gateway and the link it is reached through.
type Nexthop struct {
	Gateway   netip.Addr
	LinkIndex int
	LinkName  string
}

// Phase is what became of a Route on this node.
type Phase string

const (
	Applied  Phase = "Applied"
	Invalid  Phase = "Invalid"
	Conflict Phase = "Conflict"
)

// Reasons, CamelCase for machines.
const (
	ReasonApplied             = "Applied"
	ReasonAllGatewaysDown     = "AllGatewaysDown"
	ReasonInvalidSpec         = "InvalidSpec"
	ReasonGatewayNotConnected = "GatewayNotConnected"
	ReasonGatewayIsLocal      = "GatewayIsLocal"
	ReasonDestinationShadowed = "DestinationShadowed"
	ReasonEqualPrefix         = "EqualPrefix"
	ReasonNoTableFree         = "NoTableFree"
	// ReasonGatewayNotUsable: the gateway is the network or broadcast
	// address of its connected network, which the kernel refuses as a
	// next hop.
	ReasonGatewayNotUsable = "GatewayNotUsable"
	// ReasonDestinationsNotApplied: the Route is installed, but some of its
	// destinations are not in effect on this node (Result.NotApplied).
	ReasonDestinationsNotApplied = "DestinationsNotApplied"
	// ReasonKernelRejected: the kernel refused some of the Route's routes;
	// their destinations fail closed behind their backstops.
	ReasonKernelRejected = "KernelRejected"
)

// DestinationIssue says why one destination of a Route is not in effect on
// this node while the Route's others are.
type DestinationIssue struct {
	Destination netip.Prefix
	// Reason is ReasonEqualPrefix (left out: an older Route owns it) or
	// ReasonDestinationShadowed (installed, but a main-table route wins).
	Reason  string
	Message string
}

// Result is what became of one Route.
type Result struct {
	Name    string
	Phase   Phase
	Reason  string
	Message string
	Table   uint32
	// Generation is the Route generation this result describes.
	Generation int64
	// NotApplied lists the destinations not in effect, by prefix.
	NotApplied []DestinationIssue
}

// Gateway is a distinct gateway of the applied Routes, as probed.
type Gateway struct {
	Address   netip.Addr
	LinkIndex int
	LinkName  string
	Down      bool
	// Routes names the applied Routes that use it.
	Routes []string
}
