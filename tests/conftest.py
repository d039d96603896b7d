"""Shared fixtures: real ovs-vswitchd instances (dummy datapath) in private run directories."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from sanderling.ovs.ovsdb import Ovsdb
from sanderling.ovs.runtime import OvsRuntime

_bridge_ids = itertools.count(1)


def require_ovs() -> None:
    """OVS is a hard requirement of these tests: fail loudly, never skip."""
    missing = [b for b in ("ovsdb-server", "ovs-vswitchd", "ovs-vsctl", "ovs-ofctl", "ovs-appctl")
               if not (shutil.which(b) or os.path.exists(f"/usr/sbin/{b}"))]
    if missing:
        pytest.fail(f"Open vSwitch binaries missing: {missing}; run `make setup` (apt-get install openvswitch-switch)")


@pytest.fixture(scope="session")
def dummy_ovs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OvsRuntime]:
    require_ovs()
    run_dir = Path(tmp_path_factory.mktemp("ovs-dummy"))
    runtime = OvsRuntime(run_dir, datapath="dummy")
    runtime.start()
    yield runtime
    runtime.stop()


@pytest.fixture(scope="session")
def dummy_db(dummy_ovs: OvsRuntime) -> Iterator[Ovsdb]:
    db = Ovsdb(dummy_ovs.db_endpoint)
    yield db
    db.close()


class Bridge:
    """A fresh dummy-datapath bridge with dummy ports p1..pN at ofports 1..N."""

    def __init__(self, runtime: OvsRuntime, db: Ovsdb, name: str, nports: int) -> None:
        self.runtime = runtime
        self.db = db
        self.name = name
        db.ensure_bridge(name, "dummy")
        for i in range(1, nports + 1):
            db.add_port(name, f"{name}p{i}", ofport_request=i, iface_type="dummy")
        self.target = runtime.mgmt_target(name)

    def trace(self, flow: str) -> str:
        return self.runtime.appctl("ofproto/trace", self.name, flow)

    def datapath_actions(self, flow: str) -> str:
        out = self.trace(flow)
        for line in out.splitlines():
            if line.startswith("Datapath actions:"):
                return line.split(":", 1)[1].strip()
        raise AssertionError(f"no datapath actions in trace:\n{out}")

    def allows_new(self, flow: str) -> bool:
        """Whether a new connection's first packet leaves the bridge (conntrack answers trk,new
        at every ct())."""
        trace = self.runtime.appctl("ofproto/trace", *(["--ct-next", "trk,new"] * 4), self.name, flow)
        actions = [line for line in trace.splitlines() if line.startswith("Datapath actions:")][-1]
        return actions.split(":", 1)[1].strip() != "drop"

    def dp_port(self, ofport: int) -> str:
        """The datapath port number of an OpenFlow port (what trace's datapath actions name)."""
        out = self.runtime.appctl("dpif/show")
        in_bridge = False
        for line in out.splitlines():
            stripped = line.strip()
            if not line.startswith("\t\t") and stripped.endswith(":"):
                in_bridge = stripped[:-1] == self.name
                continue
            if in_bridge and " " in stripped:
                _, nums = stripped.split(" ", 1)
                of, _, dp = nums.split(":")[0].partition("/")
                if of == str(ofport):
                    return dp
        raise AssertionError(f"port {ofport} not on {self.name}:\n{out}")

    def output_port(self, flow: str) -> str:
        """The last datapath output of a trace, as an OpenFlow port number (or 'drop')."""
        actions = self.datapath_actions(flow)
        if actions == "drop":
            return "drop"
        last = actions.split(",")[-1]
        for ofport in range(1, 10):
            if self.dp_port(ofport) == last:
                return str(ofport)
        return f"dp:{last}"

    def dump_flows(self) -> list[str]:
        out = self.runtime.ofctl(self.name, "dump-flows", "--no-stats")
        return sorted(line.strip() for line in out.splitlines() if line.strip() and "reply" not in line)

    def delete(self) -> None:
        self.db.delete_bridge(self.name)


@pytest.fixture
def bridge(dummy_ovs: OvsRuntime, dummy_db: Ovsdb) -> Iterator[Bridge]:
    br = Bridge(dummy_ovs, dummy_db, f"t{next(_bridge_ids)}", 4)
    yield br
    br.delete()


@pytest.fixture
def run() -> object:
    return asyncio.run
