package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"

	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	v1alpha1 "github.com/routing-agent/routing-agent/apis/networking/v1alpha1"
	"github.com/routing-agent/routing-agent/pkg/routespec"
)

// validate checks every Route in the given files and reports each problem
// as "file: Route "name": field: message".
func validate(files []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(files) == 0 {
		fmt.Fprintln(stderr, "routing-agent validate: no files given (use - for stdin)")
		return 2
	}
	failed, routes := false, 0
	for _, file := range files {
		docs, err := readDocuments(file, stdin)
		if err != nil {
			fmt.Fprintf(stderr, "%s: %v\n", file, err)
			failed = true
			continue
		}
		for _, doc := range docs {
			var meta struct {
				APIVersion string `json:"apiVersion"`
				Kind       string `json:"kind"`
			}
			if err := yaml.Unmarshal(doc, &meta); err != nil {
				fmt.Fprintf(stderr, "%s: %v\n", file, err)
				failed = true
				continue
			}
			if meta.Kind != "Route" || meta.APIVersion != v1alpha1.SchemeGroupVersion.String() {
				continue
			}
			routes++
			var route v1alpha1.Route
			if err := yaml.UnmarshalStrict(doc, &route); err != nil {
				fmt.Fprintf(stderr, "%s: Route: %v\n", file, err)
				failed = true
				continue
			}
			for _, e := range routespec.Validate(&route) {
				fmt.Fprintf(stderr, "%s: Route %q: %s\n", file, route.Name, e.Error())
				failed = true
			}
		}
	}
	if failed {
		return 1
	}
	fmt.Fprintf(stdout, "%d Route(s) valid\n", routes)
	return 0
}

func readDocuments(file string, stdin io.Reader) ([][]byte, error) {
	var r io.Reader = stdin
	if file != "-" {
		f, err := os.Open(file)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		r = f
	}
	reader := utilyaml.NewYAMLReader(bufio.NewReader(r))
	var docs [][]byte
	for {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			return docs, nil
		}
		if err != nil {
			return nil, err
		}
		if len(bytes.TrimSpace(doc)) > 0 {
			docs = append(docs, doc)
		}
	}
}
