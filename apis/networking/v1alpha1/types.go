package v1alpha1

import (
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Limits enforced at admission by the CRD schema (manifests/crds). They are
// part of the API: the CEL rules are linear in these sizes, and the API
// server refuses a CRD whose estimated validation cost exceeds its budget.
const (
	// MaxDestinations bounds spec.destinations: 16,384, as many as a peer's
	// policy map holds (users of the predecessor needed about 2,000, such
	// as a cloud provider's ranges). Measured against kube-apiserver 1.37:
	// the CEL rules allow 238,095 (the per-item IP/CIDR check is estimated
	// at 42 cost units per destination against the 10,000,000 per-rule
	// limit; at 16,384 it is 688,128) and a Route at the limit costs at most
	// 557,315 of the 10,000,000 runtime budget per request. What binds first
	// is etcd's 1.5 MiB object limit: a create stores 16,384 destinations of
	// the longest form (49 characters), not 32,768; a server-side apply,
	// which also lists each one in managedFields, stores 16,384 averaging
	// up to about 41 characters (any IPv4 prefix, compressed IPv6 ones).
	MaxDestinations = 16384
	// MaxGateways bounds spec.gateways: the ECMP width of one route.
	MaxGateways = 16
	// MaxReportedDestinations bounds RouteState.NotAppliedDestinations, so
	// one Route with thousands of refused prefixes cannot grow a NodeRouting
	// past what the API server stores; NotAppliedCount has the total.
	MaxReportedDestinations = 32
)

// +genclient
// +genclient:nonNamespaced
// +genclient:noStatus
// +k8s:deepcopy-gen:interfaces=k8s.io/apimachinery/pkg/runtime.Object

// Route asks every selected node to send traffic for Destinations through
// Gateways. Each node installs it into a routing table of its own, selected
// by an ip rule, so the node's main table is never changed. What a node did
// with a Route is reported in that node's NodeRouting, not here: a Route is
// written only by its author.
type Route struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec RouteSpec `json:"spec"`
}

// RouteSpec is what the user asks for.
type RouteSpec struct {
	// Destinations are the networks routed through the gateways: CIDRs
	// (non-canonical ones such as 1.2.3.4/5 are normalized to 0.0.0.0/5) or
	// bare IPs (host routes). 0.0.0.0/0 and ::/0 override the node's
	// default route without cutting it off its control plane, metadata
	// service or DNS. 1 to MaxDestinations (16,384) entries. Client-side
	// `kubectl apply` copies the Route into an annotation limited to
	// 256 KiB, which holds about 15,000 IPv4 prefixes: apply larger Routes
	// with `kubectl apply --server-side` or `kubectl create`.
	Destinations []string `json:"destinations"`

	// Gateways are the next hops, on a network directly connected to the
	// node. More than one means ECMP across the ones that answer probes.
	Gateways []string `json:"gateways"`

	// NodeSelector picks the nodes the Route applies to; absent means every
	// node.
	// +optional
	NodeSelector *corev1.NodeSelector `json:"nodeSelector,omitempty"`
}

// +k8s:deepcopy-gen:interfaces=k8s.io/apimachinery/pkg/runtime.Object

// RouteList is a list of Routes.
type RouteList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`

	Items []Route `json:"items"`
}

// +genclient
// +genclient:nonNamespaced
// +k8s:deepcopy-gen:interfaces=k8s.io/apimachinery/pkg/runtime.Object

// NodeRouting is one node's report of the Routes selected for it: which are
// applied and in which table, which are not and why, and how its gateways
// answer. It is named after the Node, owned by it (so it goes when the Node
// goes) and written only by that node's agent.
type NodeRouting struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +optional
	Status NodeRoutingStatus `json:"status,omitempty"`
}

// NodeRoutingStatus is what the node's agent observed and did.
type NodeRoutingStatus struct {
	// Summary counts what Routes and Gateways list, for `kubectl get`.
	// +optional
	Summary NodeRoutingSummary `json:"summary,omitempty"`

	// Routes has one entry per Route selected for this node.
	// +optional
	Routes []RouteState `json:"routes,omitempty"`

	// Gateways has one entry per distinct gateway of those Routes.
	// +optional
	Gateways []GatewayState `json:"gateways,omitempty"`

	// Bypass lists the addresses that keep going through the main table
	// whatever the Routes say (control plane, metadata service, DNS servers,
	// gateways and operator-given extras), each with where it came from.
	// Control-plane addresses learned from the EndpointSlices or DNS are
	// sticky, and read back from here when the agent restarts. (Named
	// bypassAddresses since the list of plain strings it replaces, "bypass",
	// so a status written by an older agent still decodes.)
	// +optional
	Bypass []BypassAddress `json:"bypassAddresses,omitempty"`

	// ConnectionMarking says whether replies to connections that came in
	// from outside are sent back through the main table by connection mark.
	// +optional
	ConnectionMarking *ConnectionMarking `json:"connectionMarking,omitempty"`

	// ForeignRules lists ip rules found inside the agent's priority band
	// that the agent did not create. They are reported, never removed.
	// +optional
	ForeignRules []string `json:"foreignRules,omitempty"`

	// Kernel is where in the kernel the agent wrote: if a later agent runs
	// with another band, protocol or table range, it finds and removes what
	// this one left there.
	// +optional
	Kernel *KernelLayout `json:"kernel,omitempty"`

	// LastApplyTime is when the kernel was last brought in line with the plan.
	// +optional
	LastApplyTime *metav1.Time `json:"lastApplyTime,omitempty"`

	// Conditions of the agent on this node.
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// BypassAddress is one address (or prefix) kept on the main table.
type BypassAddress struct {
	// Address is an IP address, or a CIDR given with --bypass.
	Address string `json:"address"`
	// Sources say why: "endpointslice default/kubernetes", "dns <name>"
	// (a control-plane name looked up through the node's resolvers),
	// "kubeconfig", "kubelet-kubeconfig", "control-plane-endpoint",
	// "resolv.conf", "systemd-resolved upstream", "dns-server",
	// "metadata", "gateway", "--bypass".
	Sources []string `json:"sources"`
	// UnlistedSince is, for a learned control-plane address that no source
	// lists any more, when one last did: it is dropped once its sources
	// have answered without it for the agent's --bypass-retention.
	// +optional
	UnlistedSince *metav1.Time `json:"unlistedSince,omitempty"`
}

// ConnectionMarking is the state of the agent's nftables table.
type ConnectionMarking struct {
	// Active: the table and its fwmark rule are in place.
	Active bool `json:"active"`
	// Mark is the conntrack and packet mark bit, in hex.
	// +optional
	Mark string `json:"mark,omitempty"`
	// Unmarked are the interfaces whose new connections are not marked:
	// loopback and those only Routes send through.
	// +optional
	Unmarked []string `json:"unmarked,omitempty"`
	// Collisions are rules of others on this node that use the mark bit
	// (ip rules matching it), as `ip rule` shows them.
	// +optional
	Collisions []string `json:"collisions,omitempty"`
	// Message says why marking is not active.
	// +optional
	Message string `json:"message,omitempty"`
}

// KernelLayout is the part of the agent's flags that says what it owns in
// the kernel.
type KernelLayout struct {
	// Protocol is the routing protocol number on its routes and rules.
	Protocol int32 `json:"protocol"`
	// PriorityBase is the first priority of its rule band.
	PriorityBase int32 `json:"priorityBase"`
	// TableMin and TableMax bound its table ids.
	TableMin int64 `json:"tableMin"`
	TableMax int64 `json:"tableMax"`
}

// NodeRoutingSummary holds the counts shown as printer columns.
type NodeRoutingSummary struct {
	Applied      int32 `json:"applied"`
	Invalid      int32 `json:"invalid"`
	Conflict     int32 `json:"conflict"`
	GatewaysUp   int32 `json:"gatewaysUp"`
	GatewaysDown int32 `json:"gatewaysDown"`
}

// RoutePhase says whether a Route is in the node's kernel.
type RoutePhase string

const (
	// RouteApplied: the Route's table and rule are installed.
	RouteApplied RoutePhase = "Applied"
	// RouteInvalid: the Route cannot be installed on this node (for
	// example, a gateway is not on a directly connected network here).
	RouteInvalid RoutePhase = "Invalid"
	// RouteConflict: another Route owns an equal prefix on this node and
	// wins (older creationTimestamp, then name).
	RouteConflict RoutePhase = "Conflict"
)

// RouteState is what one node did with one Route.
type RouteState struct {
	// Name of the Route.
	Name string `json:"name"`
	// Phase: Applied, Invalid or Conflict.
	Phase RoutePhase `json:"phase"`
	// Reason is a CamelCase word for machines; Message says it for people.
	// +optional
	Reason string `json:"reason,omitempty"`
	// +optional
	Message string `json:"message,omitempty"`
	// Table is the routing table holding the Route on this node
	// (`ip route show table N`); 0 when none is assigned.
	// +optional
	Table int32 `json:"table,omitempty"`
	// ObservedGeneration is the Route generation this state describes.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// NotAppliedDestinations lists (up to MaxReportedDestinations) the
	// destinations of an applied Route that are not in effect on this node,
	// each with its reason: EqualPrefix (an older Route owns it; left out),
	// DestinationShadowed (a main-table route wins; kept, inert) or
	// KernelRejected (fails closed behind its backstop).
	// +optional
	NotAppliedDestinations []DestinationState `json:"notAppliedDestinations,omitempty"`
	// NotAppliedCount is how many destinations are not in effect, listed or
	// not.
	// +optional
	NotAppliedCount int32 `json:"notAppliedCount,omitempty"`
}

// DestinationState says why one destination of a Route is not in effect.
type DestinationState struct {
	Destination string `json:"destination"`
	Reason      string `json:"reason"`
	// +optional
	Message string `json:"message,omitempty"`
}

// GatewayHealth is the result of probing a gateway.
type GatewayHealth string

const (
	GatewayUp      GatewayHealth = "Up"
	GatewayDown    GatewayHealth = "Down"
	GatewayUnknown GatewayHealth = "Unknown"
)

// GatewayState is the health of one gateway as seen from this node.
type GatewayState struct {
	// Address of the gateway.
	Address string `json:"address"`
	// Interface the node reaches it through.
	// +optional
	Interface string `json:"interface,omitempty"`
	// Health: Up, Down or Unknown (not probed yet).
	Health GatewayHealth `json:"health"`
	// Reason for the last transition (e.g. ProbeTimeout, LinkDown).
	// +optional
	Reason string `json:"reason,omitempty"`
	// Since is when Health last changed.
	// +optional
	Since *metav1.Time `json:"since,omitempty"`
}

// +k8s:deepcopy-gen:interfaces=k8s.io/apimachinery/pkg/runtime.Object

// NodeRoutingList is a list of NodeRoutings.
type NodeRoutingList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`

	Items []NodeRouting `json:"items"`
}
