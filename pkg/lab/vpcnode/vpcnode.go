// Package vpcnode builds the bare node namespace the applier's and the
// agent's benchmarks write into: one VPC interface, vpc0 with
// 10.114.0.10/20, on which gateways 10.114.0.3 and .4 are directly
// connected (nothing answers there: the kernel takes routes through them,
// no packet is sent).
package vpcnode

import (
	"fmt"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
	"github.com/routing-agent/routing-agent/pkg/lab/netns"
)

// New creates the namespace ra-<purpose>-<pid> and returns its name and a
// netlink handle in it; both go when the test ends, also when it fails.
func New(tb testing.TB, purpose string) (string, *netlink.Handle) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Fatal("this builds a network namespace and must run as root")
	}
	if err := netns.RemoveStale(); err != nil {
		tb.Fatal(err)
	}
	name := netns.Name(purpose)
	if err := netns.Add(name); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { netns.Delete(name) })
	for _, args := range [][]string{
		{"-n", name, "link", "add", "vpc0", "type", "veth", "peer", "name", "vpc1"},
		{"-n", name, "addr", "add", "10.114.0.10/20", "dev", "vpc0"},
		{"-n", name, "link", "set", "vpc0", "up"},
		{"-n", name, "link", "set", "vpc1", "up"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			tb.Fatalf("ip %v: %v: %s", args, err, out)
		}
	}
	h, closeHandle, err := netns.NetlinkHandle(name)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(closeHandle)
	return name, h
}

// Routes makes n Routes of per destinations each, consecutive /24s of
// 172.16.0.0/12 (4,096 of them), through both of the node's gateways: the
// shape the applier's and the agent's benchmarks measure.
func Routes(n, per int) []*v1alpha1.Route {
	var routes []*v1alpha1.Route
	i := 0
	for r := range n {
		route := &v1alpha1.Route{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("r%04d", r), Generation: 1, CreationTimestamp: metav1.NewTime(time.Unix(int64(r), 0))},
			Spec:       v1alpha1.RouteSpec{Gateways: []string{"10.114.0.3", "10.114.0.4"}},
		}
		for range per {
			route.Spec.Destinations = append(route.Spec.Destinations, fmt.Sprintf("172.%d.%d.0/24", 16+i/256, i%256))
			i++
		}
		routes = append(routes, route)
	}
	return routes
}
