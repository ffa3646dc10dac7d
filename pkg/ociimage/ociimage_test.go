package ociimage

import (
	"archive/tar"
	"io"
	"log"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

func writeFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestBuildIsReproducibleAndHoldsTheFiles(t *testing.T) {
	dir := t.TempDir()
	bin := writeFile(t, dir, "agent", "#!binary")
	spec := Spec{
		Files:      []File{{Path: "/usr/bin/routing-agent", Source: bin}, {Path: "/etc/motd", Source: writeFile(t, dir, "motd", "hi"), Mode: 0o644}},
		Entrypoint: []string{"/usr/bin/routing-agent"},
		Labels:     map[string]string{"org.opencontainers.image.title": "routing-agent"},
	}
	first, err := Build(spec)
	if err != nil {
		t.Fatal(err)
	}
	second, err := Build(spec)
	if err != nil {
		t.Fatal(err)
	}
	d1, _ := first.Digest()
	d2, _ := second.Digest()
	if d1 != d2 {
		t.Errorf("two builds of the same files differ: %s vs %s", d1, d2)
	}

	cfg, err := first.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.OS != "linux" || cfg.Architecture != "amd64" || strings.Join(cfg.Config.Entrypoint, " ") != "/usr/bin/routing-agent" ||
		cfg.Config.Labels["org.opencontainers.image.title"] != "routing-agent" {
		t.Errorf("config: %+v", cfg)
	}

	got := map[string]string{}
	layers, err := first.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("%d layers, %v; want 1", len(layers), err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(tr)
		if hdr.Uid != 0 || hdr.Gid != 0 || hdr.ModTime.Unix() != 0 {
			t.Errorf("%s: uid %d gid %d mtime %s, want root and the epoch", hdr.Name, hdr.Uid, hdr.Gid, hdr.ModTime)
		}
		got[hdr.Name] = string(data) + "|" + os.FileMode(hdr.Mode).String()
	}
	want := map[string]string{
		"etc/":                  "|-rwxr-xr-x",
		"etc/motd":              "hi|-rw-r--r--",
		"usr/":                  "|-rwxr-xr-x",
		"usr/bin/":              "|-rwxr-xr-x",
		"usr/bin/routing-agent": "#!binary|-rwxr-xr-x",
	}
	if len(got) != len(want) {
		t.Errorf("layer holds %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("layer entry %s = %q, want %q", k, got[k], v)
		}
	}
}

func TestBuildRefusesBadPaths(t *testing.T) {
	src := writeFile(t, t.TempDir(), "f", "x")
	for _, files := range [][]File{
		nil,
		{{Path: "relative", Source: src}},
		{{Path: "/", Source: src}},
		{{Path: "/a", Source: src}, {Path: "/a/../a", Source: src}},
		{{Path: "/missing", Source: "/nonexistent/file"}},
	} {
		if _, err := Build(Spec{Files: files}); err == nil {
			t.Errorf("Build(%v) succeeded", files)
		}
	}
}

func TestContainerdName(t *testing.T) {
	for ref, want := range map[string]string{
		"routing-agent:dev":                  "docker.io/library/routing-agent:dev",
		"example/routing-agent:v1":           "docker.io/example/routing-agent:v1",
		"localhost/routing-agent:dev":        "localhost/routing-agent:dev",
		"ghcr.io/acme/routing-agent:v0.1.0":  "ghcr.io/acme/routing-agent:v0.1.0",
		"registry.k8s.io/pause:3.10":         "registry.k8s.io/pause:3.10",
		"localhost:5000/routing-agent:devel": "localhost:5000/routing-agent:devel",
	} {
		tag, err := name.NewTag(ref)
		if err != nil {
			t.Fatal(err)
		}
		if got := ContainerdName(tag); got != want {
			t.Errorf("ContainerdName(%s) = %s, want %s", ref, got, want)
		}
	}
}

// The archive round-trips, and a registry (go-containerregistry's own, on
// loopback) accepts the push and serves back the same digest.
func TestArchiveRoundTripAndPush(t *testing.T) {
	dir := t.TempDir()
	img, err := Build(Spec{Files: []File{{Path: "/pause", Source: writeFile(t, dir, "pause", "pause")}}, Entrypoint: []string{"/pause"}})
	if err != nil {
		t.Fatal(err)
	}
	want, _ := img.Digest()
	archive := filepath.Join(dir, "image.tar")
	if err := WriteArchive(archive, "localhost/pause:test", img); err != nil {
		t.Fatal(err)
	}
	read, ref, err := ReadArchive(archive, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := read.Digest(); got != want || ref != "localhost/pause:test" {
		t.Errorf("read back %s as %q, want %s as localhost/pause:test", got, ref, want)
	}
	if err := WriteArchive(archive, "not a reference", img); err == nil {
		t.Error("WriteArchive took an invalid reference")
	}

	server := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer server.Close()
	host := strings.TrimPrefix(server.URL, "http://")
	pushed, err := Push(archive, host+"/routing-agent/pause:test")
	if err != nil {
		t.Fatal(err)
	}
	if pushed != host+"/routing-agent/pause@"+want.String() {
		t.Errorf("Push returned %s", pushed)
	}
	ref2, _ := name.ParseReference(host + "/routing-agent/pause:test")
	remoteImg, err := remote.Image(ref2)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := remoteImg.Digest(); got != want {
		t.Errorf("the registry serves %s, want %s", got, want)
	}
}
