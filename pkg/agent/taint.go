package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// DefaultStartupTaint is the taint key the manifests' startup-taint
// component has kubelets register with, NoSchedule: workloads wait for the
// node's Routes, as Cilium's agent-not-ready taint makes them wait for
// pod networking.
const DefaultStartupTaint = "networking.doks.digitalocean.com/agent-not-ready"

// taintRemover takes the startup taint off this agent's Node once the
// kernel holds the node's Routes. It works on a goroutine of its own, so
// the kernel never waits for the API server.
type taintRemover struct {
	a      *Agent
	notify chan *corev1.Node
}

func newTaintRemover(a *Agent) *taintRemover {
	return &taintRemover{a: a, notify: make(chan *corev1.Node, 1)}
}

// applied is called after every successful apply with the Node it was
// planned for; a Node still carrying the startup taint is handed over.
func (t *taintRemover) applied(node *corev1.Node) {
	key := t.a.opts.StartupTaint
	if key == "" || !hasTaint(node, key) {
		return
	}
	select {
	case t.notify <- node:
	default: // one is pending already; it re-reads the Node
	}
}

func (t *taintRemover) run(ctx context.Context) {
	backoff := time.Second
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.notify:
		}
		err := t.remove(ctx)
		if err == nil {
			backoff = time.Second
			continue
		}
		t.a.log.Error(err, "removing the startup taint; retrying", "taint", t.a.opts.StartupTaint, "in", backoff)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 30*time.Second)
		node, getErr := t.a.nodes.Get(t.a.opts.NodeName)
		if getErr == nil {
			t.applied(node)
		}
	}
}

// remove patches the taint out of the Node's current taints. The patch
// tests that the taints are still those it read, so a concurrent change by
// someone else is never overwritten; it then tries again on fresh data.
func (t *taintRemover) remove(ctx context.Context) error {
	key := t.a.opts.StartupTaint
	node, err := t.a.kube.CoreV1().Nodes().Get(ctx, t.a.opts.NodeName, metav1.GetOptions{})
	if err != nil {
		return err
	}
	if !hasTaint(node, key) {
		return nil
	}
	kept := []corev1.Taint{}
	for _, taint := range node.Spec.Taints {
		if taint.Key != key {
			kept = append(kept, taint)
		}
	}
	patch, err := json.Marshal([]map[string]any{
		{"op": "test", "path": "/spec/taints", "value": node.Spec.Taints},
		{"op": "replace", "path": "/spec/taints", "value": kept},
	})
	if err != nil {
		return err
	}
	_, err = t.a.kube.CoreV1().Nodes().Patch(ctx, node.Name, types.JSONPatchType, patch, metav1.PatchOptions{FieldManager: fieldManager})
	if apierrors.IsInvalid(err) || apierrors.IsConflict(err) {
		return fmt.Errorf("the Node's taints changed meanwhile: %w", err)
	}
	if err != nil {
		return err
	}
	t.a.log.Info("removed the startup taint: the node's Routes are in place", "taint", key, "node", node.Name)
	return nil
}

func hasTaint(node *corev1.Node, key string) bool {
	for _, taint := range node.Spec.Taints {
		if taint.Key == key {
			return true
		}
	}
	return false
}
