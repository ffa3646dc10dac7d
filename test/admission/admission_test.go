// Package admission proves the Route API against a real etcd and
// kube-apiserver with real kubectl: the seed examples apply verbatim, the
// valid corpus is accepted, and every malformed Route of the corpus is
// refused at create time with a message that names the field, leaving
// nothing stored.
package admission

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
	applyv1alpha1 "github.com/routing-agent/routing-agent/generated/applyconfiguration/networking/v1alpha1"
	"github.com/routing-agent/routing-agent/generated/clientset/versioned"
	"github.com/routing-agent/routing-agent/pkg/lab/controlplane"
	"github.com/routing-agent/routing-agent/test/corpus"
)

var (
	cp     *controlplane.ControlPlane
	client versioned.Interface
)

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	var err error
	cp, err = controlplane.Start(context.Background(), controlplane.Options{CRDDir: filepath.Join(repoRoot(), "manifests", "crds")})
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: cannot start the lab control plane: %v\n", err)
		if cp != nil {
			fmt.Fprintln(os.Stderr, cp.Logs())
		}
		return 1
	}
	defer cp.Stop()
	fmt.Printf("kube-apiserver start-to-ready: %s\n", cp.Ready.Round(1e6))
	if client, err = versioned.NewForConfig(cp.Config); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return m.Run()
}

// kubectl runs kubectl against the lab as admin, feeding it stdin.
func kubectl(t *testing.T, stdin []byte, args ...string) (string, error) {
	t.Helper()
	cmd := cp.Kubectl(args...)
	cmd.Env = append(os.Environ(), "KUBECACHEDIR="+filepath.Join(cp.Dir, "kubectl-cache"))
	if stdin != nil {
		cmd.Stdin = strings.NewReader(string(stdin))
	}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func TestSeedExamplesApplyVerbatim(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(repoRoot(), "test", "testdata", "seed", "*.yaml"))
	if err != nil || len(files) != 6 {
		t.Fatalf("want the 6 seed examples, found %d (%v)", len(files), err)
	}
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			// All six are named "basic": each apply updates the same Route,
			// as it would for a user trying them one after another.
			if out, err := kubectl(t, nil, "apply", "-f", file); err != nil {
				t.Fatalf("kubectl apply -f %s: %v\n%s", file, err, out)
			}
			want := readRoute(t, file)
			got, err := client.NetworkingV1alpha1().Routes().Get(context.Background(), want.Name, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got.Spec, want.Spec) {
				t.Errorf("read back spec differs:\n got %+v\nwant %+v", got.Spec, want.Spec)
			}
		})
	}
	if out, err := kubectl(t, nil, "delete", "route", "basic"); err != nil {
		t.Fatalf("kubectl delete: %v\n%s", err, out)
	}
}

func TestValidCorpusAccepted(t *testing.T) {
	cases, err := corpus.Valid()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cases {
		t.Run(c.Name, func(t *testing.T) {
			begin := time.Now()
			if out, err := kubectl(t, c.YAML, "apply", "-f", "-"); err != nil {
				t.Fatalf("kubectl apply refused a valid Route: %v\n%s", err, out)
			}
			t.Logf("kubectl apply: %s", time.Since(begin).Round(time.Millisecond))
			t.Cleanup(func() {
				_ = client.NetworkingV1alpha1().Routes().Delete(context.Background(), routeName(t, c.YAML), metav1.DeleteOptions{})
			})
		})
	}
}

func TestInvalidCorpusRefused(t *testing.T) {
	cases, err := corpus.Invalid()
	if err != nil {
		t.Fatal(err)
	}
	if len(cases) < 25 {
		t.Fatalf("the corpus has %d malformed Routes; want at least 25", len(cases))
	}
	for _, c := range cases {
		t.Run(c.Name, func(t *testing.T) {
			t.Parallel()
			out, err := kubectl(t, c.YAML, "apply", "-f", "-")
			if err == nil {
				t.Fatalf("kubectl apply accepted a malformed Route:\n%s", out)
			}
			if !strings.Contains(out, c.Field) || !strings.Contains(out, c.APIError) {
				t.Errorf("error does not name %s with %q:\n%s", c.Field, c.APIError, out)
			}
			t.Logf("%s", strings.TrimSpace(out))
			_, err = client.NetworkingV1alpha1().Routes().Get(context.Background(), c.Name, metav1.GetOptions{})
			if !apierrors.IsNotFound(err) {
				t.Errorf("a refused Route was stored (get: %v)", err)
			}
		})
	}
}

// TestDestinationsLimit: a Route of exactly MaxDestinations destinations is
// stored, both as typical IPv4 prefixes applied server-side with kubectl and
// as the longest entries the schema allows (the worst case for the CEL
// rules' runtime cost and for the object's size in etcd); one more is
// refused with an error that names spec.destinations and stores nothing.
// Client-side kubectl apply cannot carry a Route that large (its
// last-applied annotation is limited to 256 KiB), as the README says.
func TestDestinationsLimit(t *testing.T) {
	ctx := context.Background()
	accept := func(t *testing.T, c corpus.Case, how func() error) {
		t.Helper()
		begin := time.Now()
		if err := how(); err != nil {
			t.Fatalf("a Route of %d destinations (%d bytes of YAML) was refused: %v", v1alpha1.MaxDestinations, len(c.YAML), err)
		}
		t.Logf("%d destinations, %d bytes of YAML: admitted and stored in %s", v1alpha1.MaxDestinations, len(c.YAML), time.Since(begin).Round(time.Millisecond))
		got, err := client.NetworkingV1alpha1().Routes().Get(ctx, c.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(got.Spec.Destinations) != v1alpha1.MaxDestinations {
			t.Errorf("stored %d destinations, want %d", len(got.Spec.Destinations), v1alpha1.MaxDestinations)
		}
		if err := client.NetworkingV1alpha1().Routes().Delete(ctx, c.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	t.Run("at-limit-server-side-apply", func(t *testing.T) {
		c := corpus.TooManyDestinations(v1alpha1.MaxDestinations)
		accept(t, c, func() error {
			if out, err := kubectl(t, c.YAML, "apply", "--server-side", "-f", "-"); err != nil {
				return fmt.Errorf("%v\n%s", err, out)
			}
			return nil
		})
	})
	t.Run("at-limit-longest-entries", func(t *testing.T) {
		c := corpus.LongestDestinations(v1alpha1.MaxDestinations)
		var route v1alpha1.Route
		if err := yaml.UnmarshalStrict(c.YAML, &route); err != nil {
			t.Fatal(err)
		}
		accept(t, c, func() error {
			_, err := client.NetworkingV1alpha1().Routes().Create(ctx, &route, metav1.CreateOptions{})
			return err
		})
	})
	t.Run("one-too-many", func(t *testing.T) {
		c := corpus.TooManyDestinations(v1alpha1.MaxDestinations + 1)
		out, err := kubectl(t, c.YAML, "apply", "--server-side", "-f", "-")
		if err == nil {
			t.Fatalf("kubectl apply accepted %d destinations:\n%s", v1alpha1.MaxDestinations+1, out)
		}
		want := fmt.Sprintf("spec.destinations: Too many: %d: must have at most %d items", v1alpha1.MaxDestinations+1, v1alpha1.MaxDestinations)
		if !strings.Contains(out, want) {
			t.Errorf("error does not say %q:\n%s", want, out)
		}
		t.Logf("%s", strings.TrimSpace(out))
		if _, err := client.NetworkingV1alpha1().Routes().Get(ctx, c.Name, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			t.Errorf("a refused Route was stored (get: %v)", err)
		}
	})
	t.Run("client-side-apply-annotation", func(t *testing.T) {
		c := corpus.TooManyDestinations(v1alpha1.MaxDestinations)
		out, err := kubectl(t, c.YAML, "apply", "-f", "-")
		if err == nil {
			_ = client.NetworkingV1alpha1().Routes().Delete(ctx, c.Name, metav1.DeleteOptions{})
			t.Skipf("client-side kubectl apply now carries %d destinations; the README's advice to apply large Routes server-side can go", v1alpha1.MaxDestinations)
		}
		if !strings.Contains(out, "metadata.annotations: Too long") {
			t.Errorf("client-side apply of %d destinations failed for another reason than the last-applied annotation:\n%s", v1alpha1.MaxDestinations, out)
		}
	})
}

// TestInvalidUpdateLeavesRouteAlone: a bad edit of a working Route is
// refused and the stored Route stays as it was.
func TestInvalidUpdateLeavesRouteAlone(t *testing.T) {
	good := []byte(`apiVersion: networking.doks.digitalocean.com/v1alpha1
kind: Route
metadata:
  name: edit-me
spec:
  destinations: ["198.51.100.0/24"]
  gateways: ["10.114.0.3"]
`)
	if out, err := kubectl(t, good, "apply", "-f", "-"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	t.Cleanup(func() {
		_ = client.NetworkingV1alpha1().Routes().Delete(context.Background(), "edit-me", metav1.DeleteOptions{})
	})
	before, err := client.NetworkingV1alpha1().Routes().Get(context.Background(), "edit-me", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	bad := []byte(strings.Replace(string(good), "10.114.0.3", "127.0.0.1", 1))
	out, err := kubectl(t, bad, "apply", "-f", "-")
	if err == nil || !strings.Contains(out, "spec.gateways[0]") {
		t.Fatalf("bad update: err=%v, want a refusal naming spec.gateways[0]:\n%s", err, out)
	}
	after, err := client.NetworkingV1alpha1().Routes().Get(context.Background(), "edit-me", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if after.ResourceVersion != before.ResourceVersion || !reflect.DeepEqual(after.Spec, before.Spec) {
		t.Errorf("refused update changed the Route: before %+v, after %+v", before.Spec, after.Spec)
	}
}

// TestRoutePrinterColumns: `kubectl get routes` shows destinations,
// gateways and age.
func TestRoutePrinterColumns(t *testing.T) {
	route := []byte(`apiVersion: networking.doks.digitalocean.com/v1alpha1
kind: Route
metadata:
  name: columns
spec:
  destinations: ["1.2.3.4/5", "192.0.2.7"]
  gateways: ["10.114.0.3", "10.114.0.4"]
`)
	if out, err := kubectl(t, route, "apply", "-f", "-"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	t.Cleanup(func() {
		_ = client.NetworkingV1alpha1().Routes().Delete(context.Background(), "columns", metav1.DeleteOptions{})
	})
	for _, resource := range []string{"routes", "rt", "route.networking.doks.digitalocean.com"} {
		out, err := kubectl(t, nil, "get", resource, "columns")
		if err != nil {
			t.Fatalf("kubectl get %s: %v\n%s", resource, err, out)
		}
		t.Logf("kubectl get %s columns:\n%s", resource, out)
		for _, want := range []string{"NAME", "DESTINATIONS", "GATEWAYS", "AGE", "1.2.3.4/5", "192.0.2.7", "10.114.0.4"} {
			if !strings.Contains(out, want) {
				t.Errorf("kubectl get %s: output lacks %q:\n%s", resource, want, out)
			}
		}
	}
}

// TestTypedClientRoundTrip: every field of the Go types survives the CRD
// schema (nothing is pruned), for Route and for NodeRouting through its
// status subresource with server-side apply, as the agent will write it.
func TestTypedClientRoundTrip(t *testing.T) {
	ctx := context.Background()
	route := &v1alpha1.Route{
		ObjectMeta: metav1.ObjectMeta{Name: "round-trip"},
		Spec: v1alpha1.RouteSpec{
			Destinations: []string{"1.2.3.4/5", "::/0"},
			Gateways:     []string{"10.114.0.3", "2001:db8::3"},
			NodeSelector: &corev1.NodeSelector{NodeSelectorTerms: []corev1.NodeSelectorTerm{{
				MatchExpressions: []corev1.NodeSelectorRequirement{{Key: "pool", Operator: corev1.NodeSelectorOpIn, Values: []string{"a"}}},
				MatchFields:      []corev1.NodeSelectorRequirement{{Key: "metadata.name", Operator: corev1.NodeSelectorOpNotIn, Values: []string{"n1"}}},
			}}},
		},
	}
	created, err := client.NetworkingV1alpha1().Routes().Create(ctx, route, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.NetworkingV1alpha1().Routes().Delete(ctx, "round-trip", metav1.DeleteOptions{}) })
	if !reflect.DeepEqual(created.Spec, route.Spec) {
		t.Errorf("Route spec did not round-trip:\n got %+v\nwant %+v", created.Spec, route.Spec)
	}

	now := metav1.Now().Rfc3339Copy()
	status := applyv1alpha1.NodeRoutingStatus().
		WithSummary(applyv1alpha1.NodeRoutingSummary().WithApplied(1).WithConflict(1).WithGatewaysUp(1).WithGatewaysDown(1)).
		WithRoutes(
			applyv1alpha1.RouteState().WithName("round-trip").WithPhase(v1alpha1.RouteApplied).WithTable(10001).WithObservedGeneration(1),
			applyv1alpha1.RouteState().WithName("other").WithPhase(v1alpha1.RouteConflict).WithReason("EqualPrefix").WithMessage("0.0.0.0/5 is owned by round-trip"),
		).
		WithGateways(
			applyv1alpha1.GatewayState().WithAddress("10.114.0.3").WithInterface("eth1").WithHealth(v1alpha1.GatewayUp).WithSince(now),
			applyv1alpha1.GatewayState().WithAddress("10.114.0.4").WithHealth(v1alpha1.GatewayDown).WithReason("ProbeTimeout").WithSince(now),
		).
		WithBypass(
			applyv1alpha1.BypassAddress().WithAddress("169.254.169.254").WithSources("metadata"),
			applyv1alpha1.BypassAddress().WithAddress("10.114.0.3").WithSources("gateway"),
		).
		WithForeignRules("32000: from all lookup 77").
		WithLastApplyTime(now)
	if _, err := client.NetworkingV1alpha1().NodeRoutings().Create(ctx, &v1alpha1.NodeRouting{ObjectMeta: metav1.ObjectMeta{Name: "worker-1"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.NetworkingV1alpha1().NodeRoutings().Delete(ctx, "worker-1", metav1.DeleteOptions{}) })
	applied, err := client.NetworkingV1alpha1().NodeRoutings().ApplyStatus(ctx,
		applyv1alpha1.NodeRouting("worker-1").WithStatus(status), metav1.ApplyOptions{FieldManager: "routing-agent", Force: true})
	if err != nil {
		t.Fatal(err)
	}
	want, _ := json.Marshal(status)
	got, _ := json.Marshal(applied.Status)
	var wantMap, gotMap map[string]any
	_ = json.Unmarshal(want, &wantMap)
	_ = json.Unmarshal(got, &gotMap)
	// The CRD defaults every count to 0, so `kubectl get` shows 0, not blank.
	wantMap["summary"].(map[string]any)["invalid"] = float64(0)
	if !reflect.DeepEqual(gotMap, wantMap) {
		t.Errorf("NodeRouting status did not round-trip:\n got %s\nwant %s", got, want)
	}

	out, err := kubectl(t, nil, "get", "noderoutings")
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	t.Logf("kubectl get noderoutings:\n%s", out)
	for _, want := range []string{"APPLIED", "INVALID", "CONFLICT", "GW-UP", "GW-DOWN", "LAST-APPLY", "worker-1"} {
		if !strings.Contains(out, want) {
			t.Errorf("kubectl get noderoutings lacks %q:\n%s", want, out)
		}
	}
}

func readRoute(t *testing.T, file string) *v1alpha1.Route {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var route v1alpha1.Route
	if err := yaml.UnmarshalStrict(data, &route); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	return &route
}

func routeName(t *testing.T, data []byte) string {
	var meta struct {
		Metadata metav1.ObjectMeta `json:"metadata"`
	}
	if err := yaml.Unmarshal(data, &meta); err != nil {
		t.Fatal(err)
	}
	return meta.Metadata.Name
}

func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}
