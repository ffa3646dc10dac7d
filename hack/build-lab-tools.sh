#!/usr/bin/env bash
# Builds the lab control plane -- etcd, kube-apiserver and kubectl, at the
# versions pinned in hack/labtools/go.mod -- from Go modules into a cache
# outside the repository, and prints the directory holding them.
#
# The cache key is the hash of hack/labtools/go.mod and go.sum, so a version
# bump rebuilds and an unchanged pin reuses the binaries (a cold build takes
# about ten minutes on two cores; a warm one, nothing).
#
#   ROUTING_AGENT_CACHE  cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/routing-agent)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
labtools="${root}/hack/labtools"
cache="${ROUTING_AGENT_CACHE:-${XDG_CACHE_HOME:-${HOME}/.cache}/routing-agent}"
key="$(cat "${labtools}/go.mod" "${labtools}/go.sum" | sha256sum | cut -c1-16)"
bin="${cache}/lab-${key}/bin"

if [[ -x "${bin}/etcd" && -x "${bin}/kube-apiserver" && -x "${bin}/kubectl" ]]; then
    echo "${bin}"
    exit 0
fi

mkdir -p "${bin}.tmp"
start=$(date +%s)
echo "building the lab control plane (etcd, kube-apiserver, kubectl) into ${bin} ..." >&2
(
    cd "${labtools}"
    go build -o "${bin}.tmp/etcd" go.etcd.io/etcd/server/v3
    go build -o "${bin}.tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
    go build -o "${bin}.tmp/kubectl" k8s.io/kubernetes/cmd/kubectl
) >&2
rm -rf "${bin}"
mv "${bin}.tmp" "${bin}"
echo "built the lab control plane in $(($(date +%s) - start))s" >&2
echo "${bin}"
