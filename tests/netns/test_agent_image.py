"""The agent image builds offline and runs: scripts/build-image.sh makes a Debian 12 base with
debootstrap (once per machine), builds image/Containerfile with podman and no network (nothing
pulled from a registry: the base is local, the wheels come in the build context), and the
agent inside answers --version and knows the node commands the DaemonSet's init container runs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from sanderling import VERSION

from .conftest import require_root

ROOT = Path(__file__).resolve().parents[2]
TAG = "localhost/sanderling/agent:test"
RUN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs", "run", "--rm", "--network=none",
       "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", TAG]


def test_agent_image_builds_offline_and_answers_version():
    require_root()
    for tool in ("podman", "debootstrap"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} missing: run scripts/setup.sh")
    built = subprocess.run(["bash", str(ROOT / "scripts" / "build-image.sh"), TAG], cwd=ROOT, capture_output=True,
                           text=True, timeout=1200)
    assert built.returncode == 0, built.stdout + built.stderr
    try:
        history = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", "localhost/sanderling-base:"
                                  "bookworm"], capture_output=True, text=True, timeout=60)
        assert history.returncode == 0, "the base is the local debootstrap import"
        version = subprocess.run([*RUN, "sanderling-agent", "--version"], capture_output=True, text=True, timeout=120)
        assert version.returncode == 0 and version.stdout.strip() == f"sanderling-agent {VERSION}", \
            version.stdout + version.stderr
        install = subprocess.run([*RUN, "sanderling", "node", "install-cni", "--help"], capture_output=True,
                                 text=True, timeout=120)
        assert install.returncode == 0 and "--config" in install.stdout, install.stderr
        which = "for t in ip ovs-vsctl ovs-appctl python3; do command -v $t; done"
        tools = subprocess.run([*RUN, "sh", "-c", which], capture_output=True, text=True, timeout=120)
        assert tools.returncode == 0 and len(tools.stdout.split()) == 4, tools.stdout + tools.stderr
    finally:
        subprocess.run(["podman", "rmi", "-f", TAG], capture_output=True, timeout=120)
