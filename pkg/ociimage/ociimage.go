// Package ociimage builds container images without Docker: static files in
// one layer on an empty base (scratch), written as an OCI image-layout
// archive that `ctr images import` loads and that Push sends to a registry.
// go-containerregistry does the OCI formats; this package only decides what
// goes in the image and makes it reproducible: the same files give the same
// digest on every machine.
package ociimage

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Annotations naming the image inside an OCI archive: containerd names an
// imported image after the first, the OCI spec's tools after the second
// (the tag alone, as buildkit writes it).
const (
	AnnotationContainerdName = "io.containerd.image.name"
	AnnotationRefName        = "org.opencontainers.image.ref.name"
)

// File is one regular file of the image.
type File struct {
	// Path inside the image, absolute ("/routing-agent").
	Path string
	// Source is the file on disk to copy.
	Source string
	// Mode is its permission bits; 0 means 0755.
	Mode fs.FileMode
}

// Spec describes an image.
type Spec struct {
	Files      []File
	Entrypoint []string
	// Labels go into the image config (org.opencontainers.image.*).
	Labels map[string]string
	// Created is the config's creation time; zero means the Unix epoch, so
	// that the digest depends on the files alone.
	Created time.Time
	// Architecture the files are built for, as GOARCH names it; default
	// the machine's.
	Architecture string
}

// Build returns a linux image of spec's files in one layer, with
// root-owned entries and fixed times.
func Build(spec Spec) (v1.Image, error) {
	if len(spec.Files) == 0 {
		return nil, errors.New("ociimage: an image needs at least one file")
	}
	layerTar, err := layerTarball(spec.Files)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, fmt.Errorf("ociimage: layer: %w", err)
	}
	created := spec.Created
	if created.IsZero() {
		created = time.Unix(0, 0)
	}
	img, err := mutate.Append(mutate.MediaType(empty.Image, types.OCIManifestSchema1), mutate.Addendum{
		Layer:     layer,
		MediaType: types.OCILayer,
		History:   v1.History{Created: v1.Time{Time: created}, CreatedBy: "routing-agent ociimage", Comment: "static files"},
	})
	if err != nil {
		return nil, err
	}
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", spec.Architecture
	if cfg.Architecture == "" {
		cfg.Architecture = runtime.GOARCH
	}
	cfg.Created = v1.Time{Time: created}
	cfg.Config.Entrypoint = spec.Entrypoint
	cfg.Config.Labels = spec.Labels
	cfg.Config.Env = []string{"PATH=/"}
	return mutate.ConfigFile(img, cfg)
}

// layerTarball writes the files, and the directories above them, as a tar
// stream in path order.
func layerTarball(files []File) ([]byte, error) {
	epoch := time.Unix(0, 0)
	dirs := map[string]bool{}
	entries := map[string]File{}
	for _, f := range files {
		clean := path.Clean(f.Path)
		if !path.IsAbs(clean) || clean == "/" {
			return nil, fmt.Errorf("ociimage: image path %q must be an absolute file path", f.Path)
		}
		if _, dup := entries[clean]; dup {
			return nil, fmt.Errorf("ociimage: %s given twice", clean)
		}
		entries[clean] = f
		for d := path.Dir(clean); d != "/"; d = path.Dir(d) {
			dirs[d] = true
		}
	}
	names := make([]string, 0, len(entries)+len(dirs))
	for n := range entries {
		names = append(names, n)
	}
	for d := range dirs {
		names = append(names, d)
	}
	slices.Sort(names)

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, n := range names {
		hdr := &tar.Header{Name: strings.TrimPrefix(n, "/"), ModTime: epoch, Format: tar.FormatPAX}
		if dirs[n] {
			hdr.Typeflag, hdr.Name, hdr.Mode = tar.TypeDir, hdr.Name+"/", 0o755
			if err := tw.WriteHeader(hdr); err != nil {
				return nil, err
			}
			continue
		}
		f := entries[n]
		data, err := os.ReadFile(f.Source)
		if err != nil {
			return nil, fmt.Errorf("ociimage: %w", err)
		}
		mode := f.Mode
		if mode == 0 {
			mode = 0o755
		}
		hdr.Typeflag, hdr.Mode, hdr.Size = tar.TypeReg, int64(mode.Perm()), int64(len(data))
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// WriteArchive writes img, named ref, as an OCI image-layout tar archive
// at file.
func WriteArchive(file, ref string, img v1.Image) error {
	tag, err := name.NewTag(ref)
	if err != nil {
		return fmt.Errorf("ociimage: image reference %q: %w", ref, err)
	}
	dir, err := os.MkdirTemp("", "ociimage-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	lp, err := layout.Write(dir, empty.Index)
	if err != nil {
		return err
	}
	if err := lp.AppendImage(img, layout.WithAnnotations(map[string]string{
		AnnotationContainerdName: ContainerdName(tag),
		AnnotationRefName:        tag.TagStr(),
	})); err != nil {
		return fmt.Errorf("ociimage: writing the layout: %w", err)
	}
	return tarDir(dir, file)
}

// ContainerdName is the name containerd and its CRI plugin give the image
// of tag: Docker Hub's are docker.io/library/NAME:TAG, others as written.
func ContainerdName(tag name.Tag) string {
	registry := tag.Context().RegistryStr()
	if registry == name.DefaultRegistry {
		registry = "docker.io"
	}
	return registry + "/" + tag.Context().RepositoryStr() + ":" + tag.TagStr()
}

// tarDir archives dir's regular files and directories into file, written
// to a temporary name first so a reader never sees half an archive.
func tarDir(dir, file string) error {
	tmp := file + ".tmp"
	out, err := os.Create(tmp)
	if err != nil {
		return err
	}
	defer os.Remove(tmp)
	tw := tar.NewWriter(out)
	walkErr := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		info, err := d.Info()
		if err != nil {
			return err
		}
		hdr, err := tar.FileInfoHeader(info, "")
		if err != nil {
			return err
		}
		hdr.Name, hdr.ModTime, hdr.Uid, hdr.Gid, hdr.Uname, hdr.Gname = filepath.ToSlash(rel), time.Unix(0, 0), 0, 0, "", ""
		if d.IsDir() {
			hdr.Name += "/"
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if d.Type().IsRegular() {
			in, err := os.Open(p)
			if err != nil {
				return err
			}
			defer in.Close()
			if _, err := io.Copy(tw, in); err != nil {
				return err
			}
		}
		return nil
	})
	if err := errors.Join(walkErr, tw.Close(), out.Close()); err != nil {
		return fmt.Errorf("ociimage: writing %s: %w", file, err)
	}
	return os.Rename(tmp, file)
}

// ReadArchive returns the image an archive of WriteArchive holds and the
// reference it was written under. The image reads from dir, which the
// caller removes when done with it.
func ReadArchive(file, dir string) (v1.Image, string, error) {
	if err := untar(file, dir); err != nil {
		return nil, "", err
	}
	index, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		return nil, "", fmt.Errorf("ociimage: %s is no OCI layout: %w", file, err)
	}
	manifest, err := index.IndexManifest()
	if err != nil {
		return nil, "", err
	}
	if len(manifest.Manifests) != 1 {
		return nil, "", fmt.Errorf("ociimage: %s holds %d images, want 1", file, len(manifest.Manifests))
	}
	desc := manifest.Manifests[0]
	img, err := index.Image(desc.Digest)
	if err != nil {
		return nil, "", err
	}
	return img, desc.Annotations[AnnotationContainerdName], nil
}

func untar(file, dir string) error {
	in, err := os.Open(file)
	if err != nil {
		return err
	}
	defer in.Close()
	tr := tar.NewReader(in)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("ociimage: reading %s: %w", file, err)
		}
		target := filepath.Join(dir, filepath.FromSlash(hdr.Name))
		if !strings.HasPrefix(target, filepath.Clean(dir)+string(filepath.Separator)) {
			return fmt.Errorf("ociimage: %s: entry %q leaves the archive", file, hdr.Name)
		}
		switch hdr.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(target, 0o755); err != nil {
				return err
			}
		case tar.TypeReg:
			if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
				return err
			}
			out, err := os.Create(target)
			if err != nil {
				return err
			}
			_, err = io.Copy(out, tr)
			if err := errors.Join(err, out.Close()); err != nil {
				return err
			}
		}
	}
}

// Push sends the image of an archive to ref (by default the reference it
// was built under), with the credentials of the Docker config
// (~/.docker/config.json, as `crane auth login` or `docker login` leave
// them). It returns the pushed digest reference.
func Push(file, ref string, options ...remote.Option) (string, error) {
	dir, err := os.MkdirTemp("", "ociimage-push-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(dir)
	img, built, err := ReadArchive(file, dir)
	if err != nil {
		return "", err
	}
	if ref == "" {
		ref = built
	}
	tag, err := name.NewTag(ref)
	if err != nil {
		return "", fmt.Errorf("ociimage: image reference %q: %w", ref, err)
	}
	options = append([]remote.Option{remote.WithAuthFromKeychain(authn.DefaultKeychain)}, options...)
	if err := remote.Write(tag, img, options...); err != nil {
		return "", fmt.Errorf("ociimage: pushing %s: %w", tag, err)
	}
	digest, err := img.Digest()
	if err != nil {
		return "", err
	}
	return tag.Context().Digest(digest.String()).String(), nil
}
