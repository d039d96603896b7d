#!/bin/bash
# Builds the agent image (image/Containerfile) with podman, offline from container registries:
#   1. a Debian 12 base made with debootstrap from the Debian mirror apt uses, once per machine,
#      kept in SANDERLING_IMAGE_CACHE (default /var/cache/sanderling/image) and imported into
#      podman as localhost/sanderling-base:bookworm;
#   2. the wheels of this repository and of its dependencies (pip, from PyPI and the pins of
#      constraints.txt) in a build context;
#   3. podman build --network=none, tagged sanderling/agent:VERSION.
# Usage: scripts/build-image.sh [TAG]
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${SANDERLING_IMAGE_CACHE:-/var/cache/sanderling/image}
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
TAG=${1:-sanderling/agent:$VERSION}
MIRROR=${SANDERLING_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=python3,python3-venv,iproute2,openvswitch-common,openvswitch-switch,ca-certificates
PIP=${PIP:-.venv/bin/pip}

for tool in podman debootstrap; do
    command -v "$tool" >/dev/null || { echo "build-image: $tool is missing: run scripts/setup.sh" >&2; exit 1; }
done
mkdir -p "$CACHE"
base="$CACHE/bookworm-minbase.tar"
if [ ! -f "$base" ]; then
    echo "build-image: making the Debian 12 base with debootstrap (once per machine; a few minutes)"
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase --include="$PACKAGES" bookworm "$root" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 \
        || { echo "build-image: debootstrap failed, see $CACHE/debootstrap.log" >&2; exit 1; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -cf "$base.tmp" .
    mv "$base.tmp" "$base"
    rm -rf "$root"
    trap - EXIT
fi
if ! podman image exists localhost/sanderling-base:bookworm; then
    podman import "$base" localhost/sanderling-base:bookworm >/dev/null
fi
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp image/Containerfile "$context/"
"$PIP" wheel --quiet --wheel-dir "$context/wheels" --constraint constraints.txt . >/dev/null
# runc, cgroupfs and rlimits below the host's hard ones: what a sandboxed machine allows
podman --runtime runc --cgroup-manager=cgroupfs build --network=none --quiet \
    --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 -f "$context/Containerfile" -t "$TAG" "$context" >/dev/null
echo "build-image: $TAG built"
