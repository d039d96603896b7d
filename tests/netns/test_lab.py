"""The lab end to end: 3 nodes (routed), the demo workload, the full probe matrix, kubectl, down."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from ..conftest import require_ovs
from .conftest import require_root

NAME = "sltestlab"


def lab(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sanderling.cli.main", "lab", "--name", NAME, *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def running_lab():
    require_root()
    require_ovs()
    lab("down")
    started = time.monotonic()
    up = lab("up", "--nodes", "3", "--demo")
    elapsed = time.monotonic() - started
    yield up, elapsed
    down = lab("down")
    assert down.returncode == 0, down.stderr
    leftovers = subprocess.run(["ip", "netns"], capture_output=True, text=True).stdout
    assert NAME not in leftovers, leftovers
    assert lab("down").returncode == 0  # idempotent


def test_lab_up_demo_matrix_kubectl_and_down(running_lab):
    up, elapsed = running_lab
    print(f"\nlab up --nodes 3 --demo took {elapsed:.1f}s")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "90 of 90 probes succeeded" in up.stdout, up.stdout
    status = lab("status")
    assert status.stdout.count("running") >= 4, status.stdout  # 3 agents + control plane
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl missing: run scripts/setup.sh (apt-get install kubernetes-client)"
    kubeconfig = lab("kubeconfig").stdout.strip()
    manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "from-kubectl", "namespace": "demo"},
                "spec": {"containers": [{"name": "c", "image": "none", "ports": [{"containerPort": 9090}]}]}}
    created = subprocess.run([kubectl, "--kubeconfig", kubeconfig, "create", "-f", "-"], input=json.dumps(manifest),
                             capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    deadline = time.monotonic() + 30
    ip = ""
    while time.monotonic() < deadline and not ip:
        got = subprocess.run([kubectl, "--kubeconfig", kubeconfig, "get", "pod", "-n", "demo", "from-kubectl",
                              "-o", "json"], capture_output=True, text=True, timeout=60)
        ip = (json.loads(got.stdout).get("status") or {}).get("podIP", "") if got.returncode == 0 else ""
        time.sleep(0.3)
    assert ip.startswith("10.244."), ip
    ping = lab("exec", "demo/web-0", "--", "ping", "-c", "1", "-W", "2", ip)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    check = lab("check")
    assert check.returncode == 0 and "succeeded" in check.stdout, check.stdout
