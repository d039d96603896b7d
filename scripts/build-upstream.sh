#!/bin/bash
# Builds the upstream components Sanderling's lab and tests run, from their published Go modules,
# once per machine, into a cache outside the repository (SANDERLING_UPSTREAM_BIN, default
# /var/cache/sanderling/bin). A component already built at its pinned version is skipped.
#
#   multus  gopkg.in/k8snetworkplumbingwg/multus-cni.v4 (thin plugin): `lab up --multus`
#
# Each module is built as the main module (a copy of its source from the module cache), so its
# own go.mod, with its replace directives, decides its dependencies, as its release builds do.
set -euo pipefail

BIN=${SANDERLING_UPSTREAM_BIN:-/var/cache/sanderling/bin}
MULTUS_MODULE=gopkg.in/k8snetworkplumbingwg/multus-cni.v4
MULTUS_VERSION=v4.1.0

if ! command -v go >/dev/null; then
    echo "build-upstream: the go command is missing; install Go (1.21 or newer) to build upstream components" >&2
    exit 1
fi
export GOFLAGS="${GOFLAGS:--buildvcs=false}"
mkdir -p "$BIN"

build() {  # name module version package
    local name=$1 module=$2 version=$3 package=$4
    local stamp="$BIN/.$name-$version"
    if [ -x "$BIN/$name" ] && [ -f "$stamp" ]; then
        return
    fi
    echo "build-upstream: building $name from $module@$version (once per machine)"
    local work
    work=$(mktemp -d)
    trap 'rm -rf "$work"' RETURN
    (cd "$work" && go mod init sanderling-upstream >/dev/null 2>&1 && go mod download -json "$module@$version") \
        > "$work/download.json"
    local dir
    dir=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["Dir"])' "$work/download.json")
    cp -r "$dir" "$work/src"
    chmod -R u+w "$work/src"
    (cd "$work/src" && go build -mod=mod -o "$BIN/$name.tmp" "$package")
    mv "$BIN/$name.tmp" "$BIN/$name"
    touch "$stamp"
}

build multus "$MULTUS_MODULE" "$MULTUS_VERSION" ./cmd/multus
