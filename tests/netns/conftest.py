"""Fixtures for tests with real network namespaces, veths and a userspace-datapath OVS (root)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sanderling.lab.node import LocalNode, teardown_prefix

from ..conftest import require_ovs


def wait_for(predicate, timeout: float = 60.0, what: str = ""):
    """The first truthy value of `predicate()`, polled until `timeout` (observable state, not a sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("network-namespace tests need root (they create netns, veths and OVS ports)")


def one_node(tmp_path, prefix: str, pod_cidr: str, ready: bool = True) -> Iterator[LocalNode]:
    """A node `n1` with its OVS and agent, torn down afterwards (also what a crashed run left)."""
    require_root()
    require_ovs()
    teardown_prefix(f"{prefix}-n1")
    n = LocalNode("n1", pod_cidr, tmp_path, prefix=prefix)
    try:
        n.start()
        if ready:
            n.wait_ready()
        yield n
    finally:  # also when it never became ready: no agent or OVS outlives the test
        n.teardown()


def lose_ipam_database(node: LocalNode) -> None:
    """Kill the agent, turn its IPAM database into garbage, start it again until it serves (it
    rebuilds the allocations of live pods from their OVS ports)."""
    node.kill_agent()
    db = node.dir / "state" / node.name / "ipam.db"
    for part in db.parent.glob("ipam.db*"):
        part.unlink()
    db.write_bytes(b"this is not a database" * 100)
    node.start_agent()
    node.wait_ready()


@pytest.fixture
def node(tmp_path) -> Iterator[LocalNode]:
    yield from one_node(tmp_path, "sltest", "10.244.5.0/24", ready=False)


@pytest.fixture
def cni_node(tmp_path) -> Iterator[LocalNode]:
    """A small pod subnet (/28), for CNI error paths."""
    yield from one_node(tmp_path, "slerr", "10.244.14.0/28")


class LabCli:
    """`sanderling lab --name NAME ...` as a user runs it, for the lab end-to-end tests."""

    def __init__(self, name: str) -> None:
        self.name = name

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "sanderling.cli.main", "lab", "--name", self.name, *args]

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout)

    def agent_objects(self, prefix: str) -> dict[str, dict[str, dict[str, object]]]:
        """node -> object key -> its state on that node's agent (`lab agents --objects`)."""
        out = self("agents", "--objects", prefix, "-o", "json")
        assert out.returncode == 0, out.stdout + out.stderr
        nodes: dict[str, dict[str, dict[str, object]]] = json.loads(out.stdout)
        return nodes

    def wait_agents(self, what: str, prefix: str, ok, timeout: float = 30.0) -> dict[str, dict[str, dict]]:
        """Until `ok(objects of one node)` holds on every node's agent: tests wait on what the
        agents report as installed, not on time."""
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.agent_objects(prefix)
            if nodes and all(ok(objects) for objects in nodes.values()):
                return nodes
            if time.monotonic() > deadline:
                raise AssertionError(f"agents did not report {what} within {timeout:.0f} s: {nodes}")
            time.sleep(0.1)

    def up_with(self, nodes: int, manifest: Path, pods: int, namespace: str | None = None,
                control_plane: str = "sanderling", monitoring: bool = False,
                agents: str = "process") -> dict[str, str]:
        """A fresh lab with the manifest applied; pod name -> IP once `pods` pods have an address
        (`agents="daemonset"`: installed by `helm install` of the chart, on the real control plane)."""
        require_root()
        require_ovs()
        self("down")
        up = self("up", "--nodes", str(nodes), "--control-plane", control_plane, "--agents", agents,
                  *(["--monitoring"] if monitoring else []))
        assert up.returncode == 0, up.stdout + up.stderr
        applied = self("apply", "-f", str(manifest))
        assert applied.returncode == 0, applied.stdout + applied.stderr
        deadline = time.monotonic() + 60
        ips: dict[str, str] = {}
        while time.monotonic() < deadline and len(ips) < pods:
            args = ("get", "pods", "-o", "json") + (("-n", namespace) if namespace else ())
            ips = {p["metadata"]["name"]: p["status"]["podIP"] for p in json.loads(self(*args).stdout)
                   if (p.get("status") or {}).get("podIP")}
            time.sleep(0.3)
        assert len(ips) == pods, ips
        return ips
