#!/bin/bash
# Builds the upstream components Sanderling's lab and tests run, from their published Go modules,
# once per machine, into a cache outside the repository (SANDERLING_UPSTREAM_BIN, default
# /var/cache/sanderling/bin). A component already built at its pinned version is skipped.
#
#   multus      gopkg.in/k8snetworkplumbingwg/multus-cni.v4 (thin plugin): `lab up --multus`
#   kubernetes  kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kube-proxy from
#               k8s.io/kubernetes: `lab up --control-plane kubernetes`, `bench proxy-peer`
#   etcd        go.etcd.io/etcd/server/v3's etcdmain behind a three-line main package
#   helm        helm.sh/helm/v3's cmd/helm: the chart's tests (`helm lint`, `helm template`)
#
# Multus is built as the main module (a copy of its source from the module cache), so its own
# go.mod, with its replace directives, decides its dependencies, as its release builds do.
# k8s.io/kubernetes cannot be: its go.mod points the k8s.io/* staging modules at ./staging, which
# its module zip leaves out. It is built as a dependency of a small module of ours whose replace
# lines pin each staging module to the release's matching k8s.io/* version (v1.X.Y -> v0.X.Y).
#
# SANDERLING_UPSTREAM_ONLY=download fetches the modules without compiling (for a warm cache).
set -euo pipefail

BIN=${SANDERLING_UPSTREAM_BIN:-/var/cache/sanderling/bin}
MULTUS_MODULE=gopkg.in/k8snetworkplumbingwg/multus-cni.v4
MULTUS_VERSION=v4.1.0
KUBERNETES_VERSION=v1.34.4
ETCD_VERSION=v3.6.16
HELM_VERSION=v3.22.0
KUBERNETES_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubectl kube-proxy)
ONLY=${SANDERLING_UPSTREAM_ONLY:-}

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

have() {  # stamp binary...: every binary built at this version
    local stamp=$1
    shift
    [ -f "$BIN/$stamp" ] || return 1
    for b in "$@"; do [ -x "$BIN/$b" ] || return 1; done
}

# A module of ours at $1 requiring k8s.io/kubernetes, staging modules pinned.
kubernetes_module() {
    local work=$1 gomod
    (cd "$work" && go mod init sanderling-upstream/kubernetes >/dev/null 2>&1)
    gomod=$(cd "$work" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
    local staging="v0.${KUBERNETES_VERSION#v1.}"
    {
        echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
        echo "replace ("
        sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/src/k8s.io/.*#\t\1 => \1 '"$staging"'#p' "$gomod"
        echo ")"
    } >> "$work/go.mod"
}

build_kubernetes() {
    local stamp=".kubernetes-$KUBERNETES_VERSION"
    if have "$stamp" "${KUBERNETES_BINARIES[@]}"; then
        return
    fi
    echo "build-upstream: building ${KUBERNETES_BINARIES[*]} from k8s.io/kubernetes@$KUBERNETES_VERSION (once per machine; about 9 min on 2 cores)"
    local work started=$SECONDS
    work=$(mktemp -d)
    trap 'rm -rf "$work"' RETURN
    kubernetes_module "$work"
    local pkgs=() b
    for b in "${KUBERNETES_BINARIES[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
    (cd "$work" && go mod download -x 2>/dev/null; go list -mod=mod -deps "${pkgs[@]}" >/dev/null)
    [ "$ONLY" = download ] && return
    local v=${KUBERNETES_VERSION#v} ldflags="-s -w"
    ldflags+=" -X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION"
    ldflags+=" -X k8s.io/component-base/version.gitMajor=${v%%.*}"
    ldflags+=" -X k8s.io/component-base/version.gitMinor=$(echo "$v" | cut -d. -f2)"
    ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
    ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=$KUBERNETES_VERSION"
    mkdir -p "$work/out"
    (cd "$work" && CGO_ENABLED=0 go build -mod=mod -trimpath -ldflags "$ldflags" -o "$work/out/" "${pkgs[@]}")
    for b in "${KUBERNETES_BINARIES[@]}"; do mv "$work/out/$b" "$BIN/$b"; done
    touch "$BIN/$stamp"
    echo "build-upstream: kubernetes $KUBERNETES_VERSION built in $((SECONDS - started)) s"
}

build_etcd() {
    local stamp=".etcd-$ETCD_VERSION"
    if have "$stamp" etcd; then
        return
    fi
    echo "build-upstream: building etcd from go.etcd.io/etcd/server/v3@$ETCD_VERSION (once per machine)"
    local work started=$SECONDS
    work=$(mktemp -d)
    trap 'rm -rf "$work"' RETURN
    (cd "$work" && go mod init sanderling-upstream/etcd >/dev/null 2>&1)
    cat > "$work/main.go" <<'GO'
// etcd's own server entry point; the etcd command of go.etcd.io/etcd/v3 is this call.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
    (cd "$work" && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null 2>&1 && go mod tidy >/dev/null 2>&1)
    [ "$ONLY" = download ] && return
    (cd "$work" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$BIN/etcd.tmp" .)
    mv "$BIN/etcd.tmp" "$BIN/etcd"
    touch "$BIN/$stamp"
    echo "build-upstream: etcd $ETCD_VERSION built in $((SECONDS - started)) s"
}

[ "$ONLY" = download ] || build multus "$MULTUS_MODULE" "$MULTUS_VERSION" ./cmd/multus
[ "$ONLY" = download ] || build helm helm.sh/helm/v3 "$HELM_VERSION" ./cmd/helm
build_etcd
build_kubernetes
