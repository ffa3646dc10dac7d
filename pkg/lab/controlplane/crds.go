package controlplane

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/wait"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
)

var crdResource = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

// InstallCRDs creates (or updates) every CustomResourceDefinition in the YAML
// files of dir and waits until each is Established and its resource is in
// discovery, so that clients can use it as soon as this returns.
func InstallCRDs(ctx context.Context, cfg *rest.Config, dir string) error {
	client, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return err
	}
	disco, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return err
	}
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil {
		return err
	}
	if len(files) == 0 {
		return fmt.Errorf("no CRD files in %s", dir)
	}
	for _, file := range files {
		crds, err := readObjects(file)
		if err != nil {
			return err
		}
		for _, crd := range crds {
			if err := applyCRD(ctx, client, crd); err != nil {
				return fmt.Errorf("installing %s from %s: %w", crd.GetName(), file, err)
			}
			if err := waitServed(ctx, client, disco, crd.GetName()); err != nil {
				return fmt.Errorf("CRD %s: %w", crd.GetName(), err)
			}
		}
	}
	return nil
}

func applyCRD(ctx context.Context, client dynamic.Interface, crd *unstructured.Unstructured) error {
	_, err := client.Resource(crdResource).Create(ctx, crd, metav1.CreateOptions{})
	if !apierrors.IsAlreadyExists(err) {
		return err
	}
	current, err := client.Resource(crdResource).Get(ctx, crd.GetName(), metav1.GetOptions{})
	if err != nil {
		return err
	}
	crd.SetResourceVersion(current.GetResourceVersion())
	_, err = client.Resource(crdResource).Update(ctx, crd, metav1.UpdateOptions{})
	return err
}

func waitServed(ctx context.Context, client dynamic.Interface, disco discovery.DiscoveryInterface, name string) error {
	return wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		crd, err := client.Resource(crdResource).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		conditions, _, _ := unstructured.NestedSlice(crd.Object, "status", "conditions")
		established := false
		for _, c := range conditions {
			cond, _ := c.(map[string]any)
			if cond["type"] == "Established" && cond["status"] == "True" {
				established = true
			}
			if cond["type"] == "NamesAccepted" && cond["status"] == "False" {
				return false, fmt.Errorf("names not accepted: %v", cond["message"])
			}
		}
		if !established {
			return false, nil
		}
		group, _, _ := unstructured.NestedString(crd.Object, "spec", "group")
		plural, _, _ := unstructured.NestedString(crd.Object, "spec", "names", "plural")
		versions, _, _ := unstructured.NestedSlice(crd.Object, "spec", "versions")
		for _, v := range versions {
			version, _ := v.(map[string]any)["name"].(string)
			resources, err := disco.ServerResourcesForGroupVersion(group + "/" + version)
			if err != nil {
				return false, nil
			}
			found := false
			for _, r := range resources.APIResources {
				found = found || r.Name == plural
			}
			if !found {
				return false, nil
			}
		}
		return true, nil
	})
}

// readObjects decodes every YAML document in file.
func readObjects(file string) ([]*unstructured.Unstructured, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	decoder := utilyaml.NewYAMLOrJSONDecoder(f, 4096)
	var objects []*unstructured.Unstructured
	for {
		obj := &unstructured.Unstructured{}
		if err := decoder.Decode(&obj.Object); err != nil {
			if errors.Is(err, io.EOF) {
				return objects, nil
			}
			return nil, fmt.Errorf("%s: %w", file, err)
		}
		if len(obj.Object) > 0 {
			objects = append(objects, obj)
		}
	}
}
