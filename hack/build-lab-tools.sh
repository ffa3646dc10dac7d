#!/usr/bin/env bash
# Builds the lab cluster's parts from Go modules, at the versions pinned in
# hack/labtools/go.mod, into a cache outside the repository, and prints the
# directory holding them:
#   control plane  etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl
#   nodes          kubelet, and pause (the pod sandbox, compiled from the C
#                  source that ships in the pinned k8s.io/kubernetes module)
# containerd, runc and the CNI plugins come from Debian (hack/install-deps.sh).
#
# The cache key is the hash of hack/labtools/go.mod and go.sum, so a version
# bump rebuilds and an unchanged pin reuses the binaries (a cold build takes
# about fifteen minutes on two cores; a warm one, nothing).
#
#   ROUTING_AGENT_CACHE  cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/routing-agent)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
labtools="${root}/hack/labtools"
cache="${ROUTING_AGENT_CACHE:-${XDG_CACHE_HOME:-${HOME}/.cache}/routing-agent}"
key="$(cat "${labtools}/go.mod" "${labtools}/go.sum" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
bin="${cache}/lab-${key}/bin"
tools=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet pause)

complete=1
for tool in "${tools[@]}"; do
    [[ -x "${bin}/${tool}" ]] || complete=0
done
if ((complete)); then
    echo "${bin}"
    exit 0
fi

rm -rf "${bin}.tmp"
mkdir -p "${bin}.tmp"
start=$(date +%s)
echo "building the lab cluster (${tools[*]}) into ${bin} ..." >&2
(
    cd "${labtools}"
    go build -o "${bin}.tmp/etcd" go.etcd.io/etcd/server/v3
    # Stamp the version, as the release build does, so that nodes and
    # `kubectl version` report v1.x.y rather than v0.0.0-master.
    version="$(go list -m -f '{{.Version}}' k8s.io/kubernetes)"
    minor="${version#v1.}"
    minor="${minor%%.*}"
    pkg=k8s.io/component-base/version
    ldflags="-X ${pkg}.gitVersion=${version} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${minor} -X ${pkg}.gitTreeState=clean"
    # One go build for the Kubernetes parts: their shared packages compile once.
    go build -ldflags "${ldflags}" -o "${bin}.tmp/" \
        k8s.io/kubernetes/cmd/kube-apiserver \
        k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kube-scheduler \
        k8s.io/kubernetes/cmd/kubectl \
        k8s.io/kubernetes/cmd/kubelet
    # The pod sandbox: kubernetes' own pause.c, static, as in registry.k8s.io/pause.
    k8s="$(go list -m -f '{{.Dir}}' k8s.io/kubernetes)"
    gcc -Os -Wall -Werror -static -DVERSION="${version}" \
        -o "${bin}.tmp/pause" "${k8s}/build/pause/linux/pause.c"
) >&2
rm -rf "${bin}"
mv "${bin}.tmp" "${bin}"
echo "built the lab cluster in $(($(date +%s) - start))s" >&2
echo "${bin}"
