#!/usr/bin/env bash
# Installs the Debian packages the tests and the demo use, when they are
# missing: iproute2 (ip, for network namespaces), iputils-ping, nftables (NAT
# on the lab's gateways) and procps. Runs as root on a fresh Debian machine.
set -euo pipefail

declare -A want=([ip]=iproute2 [ping]=iputils-ping [nft]=nftables [pgrep]=procps [git]=git [make]=make)
missing=()
for cmd in "${!want[@]}"; do
    command -v "${cmd}" >/dev/null 2>&1 || missing+=("${want[${cmd}]}")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "missing packages ${missing[*]}; run as root to install them" >&2
        exit 1
    fi
    echo "installing ${missing[*]} ..." >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v go >/dev/null 2>&1; then
    echo "go is not on PATH (expected /usr/local/go/bin/go)" >&2
    exit 1
fi
