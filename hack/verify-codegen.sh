#!/usr/bin/env bash
# Fails when the generated code in apis/ and generated/ is not what
# hack/update-codegen.sh produces from the current API types.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "${scratch}"' EXIT

# Regenerate in a copy of the tree so a stale checkout is reported, not fixed.
(cd "${root}" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "${scratch}" 2>/dev/null) ||
    cp -a "${root}/." "${scratch}/"
"${scratch}/hack/update-codegen.sh"

if ! diff -ruN "${root}/apis" "${scratch}/apis" >/dev/null || ! diff -ruN "${root}/generated" "${scratch}/generated" >/dev/null; then
    echo "Generated code is out of date. Run hack/update-codegen.sh and commit the result:" >&2
    diff -ruN "${root}/apis" "${scratch}/apis" >&2 || true
    diff -ruN "${root}/generated" "${scratch}/generated" >&2 || true
    exit 1
fi
echo "Generated code is up to date."
