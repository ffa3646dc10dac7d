// Package v1alpha1 holds the networking.doks.digitalocean.com/v1alpha1 API:
// the cluster-scoped Route that users write, and the per-node NodeRouting
// report that each node's agent writes about what it did with them.
//
// +k8s:deepcopy-gen=package
// +groupName=networking.doks.digitalocean.com
package v1alpha1
