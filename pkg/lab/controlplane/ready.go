package controlplane

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/routing-agent/routing-agent/pkg/lab/daemon"
)

// waitReady polls /readyz until the API server says ok, the process dies, or
// the timeout passes.
func waitReady(ctx context.Context, cfg *rest.Config, p *daemon.Process, timeout time.Duration) error {
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		var status int
		last = client.Discovery().RESTClient().Get().AbsPath("/readyz").Do(ctx).StatusCode(&status).Error()
		if last == nil && status == http.StatusOK {
			return nil
		}
		select {
		case <-p.Done():
			return fmt.Errorf("%s exited before it was ready: %v", p.Name, p.Err())
		case <-ctx.Done():
			return fmt.Errorf("%s not ready after %s: %v", p.Name, timeout, last)
		case <-tick.C:
		}
	}
}
