package cluster

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/routing-agent/routing-agent/pkg/lab/netns"
	"github.com/routing-agent/routing-agent/pkg/lab/topology"
)

// WhoamiPort is where the external host answers with the source address it
// sees, as a service that allow-lists egress IPs would see it.
const WhoamiPort = 80

// StartWhoami serves WhoamiPort on the external host until the returned
// function is called.
func (c *Cluster) StartWhoami() (stop func(), err error) {
	var ln net.Listener
	if err := netns.Do(c.Net.External, func() (err error) {
		ln, err = net.Listen("tcp", net.JoinHostPort(c.Net.ExternalAddr.String(), fmt.Sprint(WhoamiPort)))
		return err
	}); err != nil {
		return nil, err
	}
	server := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		io.WriteString(w, host)
	}), ReadHeaderTimeout: 2 * time.Second}
	go server.Serve(ln)
	return func() { server.Close() }, nil
}

// Egress asks the external host, over a new connection from node i, which
// address the request came from.
func (c *Cluster) Egress(i int) (string, error) {
	client := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{DialContext: netns.Dialer(c.Nodes[i].NS), DisableKeepAlives: true}}
	resp, err := client.Get(fmt.Sprintf("http://%s:%d/", c.Net.ExternalAddr, WhoamiPort))
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return string(body), err
}

// Traffic is steady UDP from a node to the external host: flows with fixed
// source ports, each sending one datagram per tick, counted at both ends.
type Traffic struct {
	// Ports are the flows' source ports, in order.
	Ports     []int
	flows     []*net.UDPConn
	sentCount []atomic.Int64
	received  map[int]*atomic.Int64
	rx        *net.UDPConn
	stop      chan struct{}
	wg        sync.WaitGroup

	finish     sync.Once
	sent, lost map[int]int64
}

// StartTraffic sends from namespace ns to the external host's dstPort over
// flows source ports (20000, 20001, ...), one datagram per flow every
// interval. Concurrent Traffic needs a dstPort each.
func StartTraffic(lab *topology.Lab, ns string, dstPort uint16, flows int, every time.Duration) (*Traffic, error) {
	dst := netip.AddrPortFrom(lab.ExternalAddr, dstPort)
	tr := &Traffic{sentCount: make([]atomic.Int64, flows), received: map[int]*atomic.Int64{}, stop: make(chan struct{})}
	rx, err := topology.ListenUDP(lab.External, dst)
	if err != nil {
		return nil, err
	}
	tr.rx = rx
	for i := range flows {
		port := 20000 + i
		var conn *net.UDPConn
		if err := netns.Do(ns, func() (err error) {
			conn, err = net.DialUDP("udp", &net.UDPAddr{Port: port}, net.UDPAddrFromAddrPort(dst))
			return err
		}); err != nil {
			tr.close()
			return nil, err
		}
		tr.Ports = append(tr.Ports, port)
		tr.received[port] = &atomic.Int64{}
		tr.flows = append(tr.flows, conn)
	}
	tr.wg.Add(2)
	go func() {
		defer tr.wg.Done()
		buf := make([]byte, 64)
		for {
			_, from, err := rx.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			if c, ok := tr.received[int(from.Port())]; ok {
				c.Add(1)
			}
		}
	}()
	go func() {
		defer tr.wg.Done()
		tick := time.NewTicker(every)
		defer tick.Stop()
		for {
			select {
			case <-tr.stop:
				return
			case <-tick.C:
				for i, c := range tr.flows {
					if _, err := c.Write([]byte("x")); err == nil {
						tr.sentCount[i].Add(1)
					}
				}
			}
		}
	}()
	return tr, nil
}

func (tr *Traffic) close() {
	tr.rx.Close()
	for _, c := range tr.flows {
		c.Close()
	}
}

// Finish stops sending, lets the last datagrams land and returns, by
// source port, how many each flow sent and lost. Later calls return the
// same counts, so a test can also call it from a cleanup.
func (tr *Traffic) Finish() (sent, lost map[int]int64) {
	tr.finish.Do(func() {
		close(tr.stop)
		time.Sleep(300 * time.Millisecond)
		tr.close()
		tr.wg.Wait()
		tr.sent, tr.lost = map[int]int64{}, map[int]int64{}
		for i, port := range tr.Ports {
			tr.sent[port] = tr.sentCount[i].Load()
			tr.lost[port] = tr.sent[port] - tr.received[port].Load()
		}
	})
	return tr.sent, tr.lost
}

// Nexthops lists, comma-separated and in the lab's gateway order, the
// gateways of the agent's routes to dst on node i (dst as ip route shows
// it: "default", "198.51.100.0/24").
func (c *Cluster) Nexthops(i int, dst string) (string, error) {
	out, err := c.Net.Exec(c.Nodes[i].NS, "ip", "route", "show", "table", "all", dst, "proto", "245")
	if err != nil {
		return "", err
	}
	var gws []string
	for _, gw := range c.Net.GatewayVPC {
		if strings.Contains(out, "via "+gw.String()+" ") {
			gws = append(gws, gw.String())
		}
	}
	return strings.Join(gws, ","), nil
}

// FlowGateway says which gateway node i's kernel hashes a UDP flow from
// the node's VPC address and sport to the external host's dport to.
func (c *Cluster) FlowGateway(i, sport, dport int) (string, error) {
	// The source address is part of the L4 hash: give the one the socket gets.
	out, err := c.Net.Exec(c.Nodes[i].NS, "ip", "route", "get", c.Net.ExternalAddr.String(), "from", c.Nodes[i].VPC.String(),
		"ipproto", "udp", "sport", fmt.Sprint(sport), "dport", fmt.Sprint(dport))
	if err != nil {
		return "", err
	}
	for _, gw := range c.Net.GatewayVPC {
		if strings.Contains(out, "via "+gw.String()+" ") {
			return gw.String(), nil
		}
	}
	return "", fmt.Errorf("cluster: flow %d of %s does not go through a gateway: %s", sport, c.Nodes[i].Name, out)
}
