package agent

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Handler serves /metrics, /healthz (the process answers) and /readyz
// (caches synced and the first apply done).
func (a *Agent) Handler() http.Handler {
	mux := http.NewServeMux()
	// Uncompressed: the agent's metrics are a few KiB, and a gzip writer
	// (about 1 MiB of state, pooled between scrapes) would stay in the
	// heap of an agent scraped every few seconds.
	mux.Handle("/metrics", promhttp.HandlerFor(a.metrics.registry, promhttp.HandlerOpts{DisableCompression: true}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !a.Ready() {
			http.Error(w, "not ready: waiting for caches and the first apply", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ok\n"))
	})
	return mux
}
