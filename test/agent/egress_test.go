package agent_test

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/routing-agent/routing-agent/pkg/lab/netns"
	"github.com/routing-agent/routing-agent/pkg/lab/topology"
)

// TestDefaultOverrideThroughNAT: with the default route overridden through
// NAT gateways, the external host sees the gateways' addresses (static
// egress IP), while the gateways refuse control-plane traffic, so the
// agent's own API connection proves it still leaves by the node's default
// route; inbound connections to the node's public address are answered.
func TestDefaultOverrideThroughNAT(t *testing.T) {
	e := newEnvOpts(t, topology.Options{Purpose: "nat", NAT: true}, "5s")
	// Gateways drop anything for the control plane: a wrong path breaks
	// the agent's API connection and this test with it.
	for _, gw := range e.lab.Gateways {
		for _, rule := range []string{
			"add table ip guard",
			"add chain ip guard forwarded { type filter hook forward priority 0 ; }",
			"add rule ip guard forwarded ip daddr " + e.lab.ControlPlaneAddr.String() + " drop",
		} {
			if out, err := e.lab.Exec(gw, append([]string{"nft"}, strings.Fields(rule)...)...); err != nil {
				t.Fatalf("nft %s: %v %s", rule, err, out)
			}
		}
	}
	stopWhoami, err := e.c.StartWhoami()
	if err != nil {
		t.Fatal(err)
	}
	defer stopWhoami()

	if got := e.egress(0); got != e.lab.NodePublic.String() {
		t.Fatalf("before the override the external host saw %s, want the node's %s", got, e.lab.NodePublic)
	}
	e.applyRoute(newRoute("default", []string{"0.0.0.0/0"}, []string{"10.114.0.3", "10.114.0.4"}))
	e.waitNexthops("default", "10.114.0.3,10.114.0.4", 10*time.Second)

	seen := map[string]int{}
	for range 20 {
		seen[e.egress(0)]++
	}
	t.Logf("egress over 20 connections: %v", seen)
	for who := range seen {
		if who != e.lab.GatewayUplink[0].String() && who != e.lab.GatewayUplink[1].String() {
			t.Errorf("the external host saw %s: not a NAT gateway", who)
		}
	}
	if len(seen) != 2 {
		t.Errorf("connections used %d gateways, want both", len(seen))
	}

	// The agent keeps talking to the API server: a new Route is reported.
	e.applyRoute(newRoute("after-override", []string{"192.0.2.0/28"}, []string{"10.114.0.3"}))
	e.eventually(10*time.Second, "the agent reports a Route created after the override", func() (bool, string) {
		s := routeState(e.nodeRouting(0), "after-override")
		return s != nil, fmt.Sprintf("%+v\n%s", s, tail(e.logs(0), 10))
	})

	// Inbound: the external host connects to the node's public address and
	// gets answers (they leave through pub0, not the gateways).
	var ln net.Listener
	if err := netns.Do(e.lab.Node, func() (err error) {
		ln, err = net.Listen("tcp", net.JoinHostPort(e.lab.NodePublic.String(), "8080"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	server := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "node") })}
	go server.Serve(ln)
	defer server.Close()
	client := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{DialContext: netns.Dialer(e.lab.External)}}
	resp, err := client.Get("http://" + net.JoinHostPort(e.lab.NodePublic.String(), "8080") + "/")
	if err != nil {
		t.Fatalf("inbound connection to the node's public address: %v", err)
	}
	resp.Body.Close()
	for _, dst := range []string{"169.254.169.254", "198.51.100.53", e.lab.ControlPlaneAddr.String()} {
		if out, _ := e.lab.Exec(e.ns(0), "ip", "route", "get", dst); !strings.Contains(out, "dev pub0") {
			t.Errorf("ip route get %s: %s, want the node's own path (pub0)", dst, out)
		}
	}
}

// egress asks the external host which address node i's request came from.
func (e *env) egress(i int) string {
	e.t.Helper()
	who, err := e.c.Egress(i)
	if err != nil {
		e.t.Fatalf("request to the external host: %v", err)
	}
	return who
}
