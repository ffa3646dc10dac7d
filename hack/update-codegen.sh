#!/usr/bin/env bash
# Regenerates deepcopy functions (next to the API types) and the typed
# clientset, fake clientset, listers, informers and apply configurations
# (under generated/) with k8s.io/code-generator's kube_codegen.sh, at the
# version pinned as a tool dependency in go.mod.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${root}"

module="$(go list -m)"
codegen_dir="$(go list -m -f '{{.Dir}}' k8s.io/code-generator)"
if [[ -z "${codegen_dir}" || ! -f "${codegen_dir}/kube_codegen.sh" ]]; then
    go mod download k8s.io/code-generator
    codegen_dir="$(go list -m -f '{{.Dir}}' k8s.io/code-generator)"
fi
# shellcheck source=/dev/null
source "${codegen_dir}/kube_codegen.sh"

boilerplate="${root}/hack/boilerplate.go.txt"

kube::codegen::gen_helpers \
    --boilerplate "${boilerplate}" \
    "${root}/apis"

kube::codegen::gen_client \
    --with-watch \
    --with-applyconfig \
    --output-dir "${root}/generated" \
    --output-pkg "${module}/generated" \
    --boilerplate "${boilerplate}" \
    "${root}/apis"
