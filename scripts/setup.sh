#!/bin/bash
# Installs what Sanderling needs on a fresh Debian 12 machine (run as root) and a virtualenv
# with the project in .venv. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(openvswitch-switch openvswitch-common iproute2 ethtool iperf3 iputils-ping tcpdump procps
      podman runc busybox-static containernetworking-plugins openssl prometheus debootstrap
      python3 python3-venv python3-dev python3-openvswitch)
missing=()
for pkg in "${DEBS[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# kubectl for talking to the lab (Debian ships it as kubernetes-client)
if ! command -v kubectl >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null
fi

# The system OVS service is not used: every node runs a private ovsdb-server/ovs-vswitchd.
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
stamp=.venv/.sanderling-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    echo "setup: installing sanderling and its test tools into .venv (versions pinned by constraints.txt)"
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -c constraints.txt -e '.[test]'
    touch "$stamp"
fi

# ovs's C JSON parser for the agent's OVSDB replica (pure Python lexes every update a character at a
# time): PyPI's ovs sdist builds it only against libopenvswitch's headers, which Debian does not ship;
# Debian's python3-openvswitch has it, self-contained, for this same interpreter (same ABI suffix)
ext=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
venv_ovs=$(.venv/bin/python -c 'import os, ovs; print(os.path.dirname(ovs.__file__))' 2>/dev/null)
if [ -f "/usr/lib/python3/dist-packages/ovs/_json$ext" ] && [ ! -e "$venv_ovs/_json$ext" ]; then
    echo "setup: linking Debian's ovs C JSON parser into .venv"
    ln -s "/usr/lib/python3/dist-packages/ovs/_json$ext" "$venv_ovs/_json$ext"
fi

# the example external controller's os-ken (3.1.1: the last release with osken-manager) in a venv
# of its own, outside the repository, keyed by its pinned requirements (eventlet stays out of .venv)
OSKEN_REQ=examples/osken/requirements.txt
OSKEN_VENV=/var/cache/sanderling/osken-$(sha256sum "$OSKEN_REQ" | cut -c1-12)
if [ ! -x "$OSKEN_VENV/bin/osken-manager" ]; then
    echo "setup: installing os-ken for examples/osken into $OSKEN_VENV"
    rm -rf "$OSKEN_VENV"
    mkdir -p /var/cache/sanderling
    "$PY" -m venv "$OSKEN_VENV"
    "$OSKEN_VENV/bin/pip" install -q -r "$OSKEN_REQ"
fi
ln -sfn "$OSKEN_VENV" /var/cache/sanderling/osken

# upstream components built from their Go modules, once per machine, outside the repository
bash scripts/build-upstream.sh

# the compiled front of the CNI plugin (cni-shim/: Go's standard library only, so no download),
# keyed by its source; the agent installs it with the Python shim beside it (agent key cni-shim)
SHIM_BIN=${SANDERLING_UPSTREAM_BIN:-/var/cache/sanderling/bin}
SHIM_STAMP="$SHIM_BIN/.sanderling-cni-$(cat cni-shim/go.mod cni-shim/main.go | sha256sum | cut -c1-12)"
if [ ! -x "$SHIM_BIN/sanderling-cni" ] || [ ! -f "$SHIM_STAMP" ]; then
    echo "setup: building the compiled CNI front (cni-shim/) into $SHIM_BIN"
    mkdir -p "$SHIM_BIN"
    (cd cni-shim && CGO_ENABLED=0 GOFLAGS=-buildvcs=false go build -trimpath -ldflags "-s -w" \
        -o "$SHIM_BIN/sanderling-cni.tmp" .)
    mv "$SHIM_BIN/sanderling-cni.tmp" "$SHIM_BIN/sanderling-cni"
    rm -f "$SHIM_BIN"/.sanderling-cni-*
    touch "$SHIM_STAMP"
fi
