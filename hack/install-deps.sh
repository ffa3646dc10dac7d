#!/usr/bin/env bash
# Installs the Debian packages the tests and the demo use, when they are
# missing: iproute2 (ip, for network namespaces), iputils-ping, nftables (NAT
# on the lab's gateways), procps, and the lab nodes' container runtime:
# containerd, runc and the CNI plugins (the kubelet itself is built from Go
# modules by hack/build-lab-tools.sh), plus gcc for the pod sandbox (pause).
# Runs as root on a fresh Debian machine.
#
# No service is started: packages that ship one (containerd) are installed
# with invoke-rc.d told to start nothing, and the lab runs containerd itself,
# inside each lab node's namespaces, never in the machine's own.
set -euo pipefail

declare -A want=(
    [ip]=iproute2 [ping]=iputils-ping [nft]=nftables [pgrep]=procps [git]=git [make]=make
    [nsenter]=util-linux [gcc]=gcc
    [containerd]=containerd [ctr]=containerd [runc]=runc [/usr/lib/cni/bridge]=containernetworking-plugins
)
missing=()
for cmd in "${!want[@]}"; do
    if [[ ${cmd} == /* ]]; then
        [[ -x ${cmd} ]] || missing+=("${want[${cmd}]}")
    else
        command -v "${cmd}" >/dev/null 2>&1 || missing+=("${want[${cmd}]}")
    fi
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "missing packages ${missing[*]}; run as root to install them" >&2
        exit 1
    fi
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    echo "installing ${missing[*]} ..." >&2
    policy=/usr/sbin/policy-rc.d
    if [[ ! -e ${policy} ]]; then
        printf '#!/bin/sh\n# routing-agent hack/install-deps.sh: start no service\nexit 101\n' >"${policy}"
        chmod +x "${policy}"
        trap 'rm -f "${policy}"' EXIT
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v go >/dev/null 2>&1; then
    echo "go is not on PATH (expected /usr/local/go/bin/go)" >&2
    exit 1
fi
