package agent

import (
	"context"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	clientmetrics "k8s.io/client-go/tools/metrics"
)

// metrics are the agent's Prometheus series, on a registry of its own so
// that tests can run several agents in one process.
type metrics struct {
	registry          *prometheus.Registry
	reconcileDuration prometheus.Histogram
	reconcileErrors   prometheus.Counter
	netlinkWrites     *prometheus.CounterVec
	routes            *prometheus.GaugeVec
	gatewayUp         *prometheus.GaugeVec
	applyLatency      prometheus.Histogram
	statusWrites      prometheus.Counter
	apiRequests       *prometheus.CounterVec
	probeRTT          *prometheus.HistogramVec
	connMarking       prometheus.Gauge
}

func newMetrics() *metrics {
	m := &metrics{
		registry: prometheus.NewRegistry(),
		reconcileDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "routing_agent_reconcile_duration_seconds",
			Help:    "Time to plan and apply the node's Routes, from reading the kernel to the last netlink write.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
		}),
		reconcileErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "routing_agent_reconcile_errors_total",
			Help: "Reconciles that failed to read or write some of the kernel state.",
		}),
		netlinkWrites: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "routing_agent_netlink_writes_total",
			Help: "Netlink writes made, by operation.",
		}, []string{"op"}),
		routes: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "routing_agent_routes",
			Help: "Routes selected for this node, by phase (Applied, Invalid, Conflict).",
		}, []string{"phase"}),
		gatewayUp: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "routing_agent_gateway_up",
			Help: "1 when a gateway of this node's Routes is up (or not yet probed), 0 when it is down.",
		}, []string{"gateway"}),
		applyLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "routing_agent_route_apply_latency_seconds",
			Help:    "Time from the agent seeing a Route change to the kernel holding it.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
		}),
		statusWrites: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "routing_agent_status_writes_total",
			Help: "Server-side applies of this node's NodeRouting.",
		}),
		connMarking: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "routing_agent_connection_marking_active",
			Help: "1 when replies to connections that came in from outside go back through main by connection mark (the nftables table and its fwmark rule are in place), else 0.",
		}),
	}
	m.apiRequests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "routing_agent_api_requests_total",
		Help: "Requests this agent made to the API server, by method and status code (watches count once, when opened).",
	}, []string{"method", "code"})
	// client-go reports every request through one process-wide hook.
	clientmetrics.Register(clientmetrics.RegisterOpts{RequestResult: requestCounter{m.apiRequests}})
	m.probeRTT = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "routing_agent_probe_rtt_seconds",
		Help:    "Round-trip time of answered ICMP probes, by gateway.",
		Buckets: prometheus.ExponentialBuckets(0.0001, 2, 14),
	}, []string{"gateway"})
	m.registry.MustRegister(m.apiRequests, m.probeRTT)
	m.registry.MustRegister(m.reconcileDuration, m.reconcileErrors, m.netlinkWrites, m.routes, m.gatewayUp, m.applyLatency, m.statusWrites, m.connMarking,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

type requestCounter struct{ c *prometheus.CounterVec }

func (r requestCounter) Increment(_ context.Context, code, method, _ string) {
	r.c.WithLabelValues(method, code).Inc()
}
