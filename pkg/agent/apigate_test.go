package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

func TestUnreachable(t *testing.T) {
	refused := &url.Error{Op: "Get", URL: "https://203.0.113.100:6443/api", Err: &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}}
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{nil, false},
		{refused, true},
		{fmt.Errorf("listing: %w", refused), true},
		{&net.OpError{Op: "dial", Net: "tcp", Err: errors.New("i/o timeout")}, true},
		{io.EOF, true},
		{io.ErrUnexpectedEOF, true},
		{syscall.ECONNRESET, true},
		{apierrors.NewTooManyRequests("slow down", 1), false},
		{apierrors.NewServiceUnavailable("shutting down"), false},
		{apierrors.NewInternalError(errors.New("etcd")), false},
		{apierrors.NewForbidden(schema.GroupResource{Resource: "routes"}, "", errors.New("no")), false},
		{apierrors.NewResourceExpired("too old"), false},
		{errors.New("decoding: unexpected character"), false},
	} {
		if got := unreachable(tc.err); got != tc.want {
			t.Errorf("unreachable(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

func TestReadyz(t *testing.T) {
	var code atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/readyz" {
			http.NotFound(w, r)
			return
		}
		w.WriteHeader(int(code.Load()))
	}))
	kube, err := kubernetes.NewForConfig(&rest.Config{Host: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	probe := readyz(kube.Discovery().RESTClient())
	for _, tc := range []struct {
		code  int32
		ready bool
	}{
		{200, true},
		{403, true}, // readiness is not ours to see; the server answers
		{401, true},
		{500, false},
		{503, false},
		{429, false},
	} {
		code.Store(tc.code)
		if err := probe(context.Background()); (err == nil) != tc.ready {
			t.Errorf("/readyz %d: ready %v (%v), want %v", tc.code, err == nil, err, tc.ready)
		}
	}
	srv.Close()
	if err := probe(context.Background()); err == nil {
		t.Error("no server: ready")
	}
	if err := readyz(nil)(context.Background()); err != nil {
		t.Errorf("no REST client (a fake clientset): %v", err)
	}
}

var errRefused = &url.Error{Op: "Get", URL: "https://203.0.113.100:6443/api", Err: &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}}

// startGate runs a gate whose probe fails until ready says otherwise.
func startGate(t *testing.T, ready *atomic.Bool, probes *atomic.Int32) *apiGate {
	g := newAPIGate(logr.Discard(), func(context.Context) error {
		probes.Add(1)
		if ready.Load() {
			return nil
		}
		return errRefused
	}, 20*time.Millisecond)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go g.run(ctx)
	return g
}

func TestGateHoldsCallsUntilReady(t *testing.T) {
	var ready atomic.Bool
	var probes, calls, others atomic.Int32
	g := startGate(t, &ready, &probes)
	ctx := context.Background()

	// The API server is down: the first call fails and shuts the gate.
	done := make(chan error, 2)
	go func() {
		_, err := do(ctx, g, true, func(context.Context) (string, error) {
			if calls.Add(1) == 1 || !ready.Load() {
				return "", errRefused
			}
			return "listed", nil
		})
		done <- err
	}()
	deadline := time.Now().Add(5 * time.Second)
	for g.isOpen() || probes.Load() < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("the gate did not shut and probe: open %v, %d probes", g.isOpen(), probes.Load())
		}
		time.Sleep(5 * time.Millisecond)
	}
	// Another informer's call waits without trying.
	go func() {
		_, err := do(ctx, g, true, func(context.Context) (string, error) { others.Add(1); return "watching", nil })
		done <- err
	}()
	time.Sleep(100 * time.Millisecond)
	reopened := g.reopened()
	if reopened == nil {
		t.Fatal("reopened: nil while the gate is shut")
	}
	if n, o := calls.Load(), others.Load(); n != 1 || o != 0 {
		t.Fatalf("while the API server is unreachable, calls were tried: %d and %d times, want 1 and 0", n, o)
	}
	if p := probes.Load(); p > 10 {
		t.Errorf("%d probes in about 160 ms at a 20 ms interval (jittered down to half)", p)
	}

	ready.Store(true)
	for range 2 {
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("calls still held after the API server became ready")
		}
	}
	select {
	case <-reopened:
	default:
		t.Error("reopened not closed once the gate opened")
	}
	if g.reopened() != nil {
		t.Error("reopened: not nil while the gate is open")
	}
	if n, o := calls.Load(), others.Load(); n != 2 || o != 1 {
		t.Errorf("calls tried %d and %d times, want 2 and 1", n, o)
	}
	p := probes.Load()
	time.Sleep(100 * time.Millisecond)
	if probes.Load() != p {
		t.Error("still probing once the gate is open")
	}
}

func TestGatePassesAnswers(t *testing.T) {
	var ready atomic.Bool
	var probes atomic.Int32
	g := startGate(t, &ready, &probes)
	// A struggling server's answer goes to the reflector, whose backoff
	// is what such a server needs.
	_, err := do(context.Background(), g, true, func(context.Context) (string, error) {
		return "", apierrors.NewTooManyRequests("slow down", 1)
	})
	if !apierrors.IsTooManyRequests(err) {
		t.Errorf("got %v, want the 429", err)
	}
	time.Sleep(60 * time.Millisecond)
	if !g.isOpen() || probes.Load() != 0 {
		t.Errorf("an answer shut the gate: open %v, %d probes", g.isOpen(), probes.Load())
	}
}

func TestGateHoldsAtMostMaxHold(t *testing.T) {
	var ready atomic.Bool
	var probes, calls atomic.Int32
	g := startGate(t, &ready, &probes)
	g.maxHold = 100 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), 350*time.Millisecond)
	defer cancel()
	// /readyz never says ready, but the server serves: the call goes
	// through after maxHold anyway.
	v, err := do(ctx, g, true, func(context.Context) (string, error) {
		if calls.Add(1) == 1 {
			return "", errRefused
		}
		return "listed", nil
	})
	if err != nil || v != "listed" || calls.Load() != 2 {
		t.Errorf("got %q %v after %d calls, want listed on the second", v, err, calls.Load())
	}
	if !g.isOpen() {
		t.Error("a successful call left the gate shut")
	}
}

func TestGateEndsWithContext(t *testing.T) {
	var ready atomic.Bool
	var probes atomic.Int32
	g := startGate(t, &ready, &probes)
	ctx, cancel := context.WithCancel(context.Background())
	go func() { time.Sleep(50 * time.Millisecond); cancel() }()
	_, err := do(ctx, g, true, func(context.Context) (string, error) { return "", errRefused })
	if !errors.Is(err, context.Canceled) {
		t.Errorf("got %v, want the context's end", err)
	}
}

func TestGateNotOpenedByAWatch(t *testing.T) {
	var ready atomic.Bool
	var probes atomic.Int32
	g := startGate(t, &ready, &probes)
	g.maxHold = 50 * time.Millisecond
	g.shut(errRefused)
	// Let through after maxHold, a watch that "succeeds" (client-go's empty
	// watch for a timed-out connection) says nothing of the API server.
	if _, err := do(context.Background(), g, false, func(context.Context) (string, error) { return "empty watch", nil }); err != nil {
		t.Fatal(err)
	}
	if g.isOpen() {
		t.Error("a watch opened the gate")
	}
	// An answer does.
	_, err := do(context.Background(), g, false, func(context.Context) (string, error) { return "", apierrors.NewResourceExpired("too old") })
	if !apierrors.IsResourceExpired(err) || !g.isOpen() {
		t.Errorf("got %v, open %v; want the 410 and the gate open", err, g.isOpen())
	}
}
