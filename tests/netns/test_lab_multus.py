"""Multus (built from its Go module) in front of Sanderling on a 2-node lab: Sanderling as the
default network and as the plugin of a `"type": "sanderling"` VLAN network, next to a macvlan
network; Multus writes network-status, DEL through Multus leaves nothing of the pods behind."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from ..conftest import require_ovs
from .conftest import LabCli, require_root

NAME = "slmu"
lab = LabCli(NAME)
STATE = Path("/run/sanderling-lab") / NAME


def obj(kind: str, name: str, body: dict) -> dict:
    api = "k8s.cni.cncf.io/v1" if kind == "NetworkAttachmentDefinition" else "v1"
    return {"apiVersion": api, "kind": kind, "metadata": {"name": name, "namespace": "default", **body.pop("meta", {})},
            **body}


def nad(name: str, config: dict) -> dict:
    return obj("NetworkAttachmentDefinition", name, {"spec": {"config": json.dumps({"cniVersion": "1.0.0",
                                                                                      "name": name, **config})}})


def pod(name: str, node: str, networks: list[dict]) -> dict:
    return obj("Pod", name, {"meta": {"annotations": {"k8s.v1.cni.cncf.io/networks": json.dumps(networks)}},
                             "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]}})


OBJECTS = [
    nad("vlan100", {"type": "sanderling", "topology": "vlan", "vlanID": 100, "subnet": "10.100.0.0/24",
                    "capabilities": {"ips": True, "mac": True}}),
    nad("mv", {"type": "macvlan", "master": "data0", "mode": "bridge", "ipam": {"type": "static"},
               "capabilities": {"ips": True}}),
    pod("m1", "node1", [{"name": "vlan100", "ips": ["10.100.0.21/24"]}, {"name": "mv", "ips": ["10.30.0.21/24"]}]),
    pod("m2", "node2", [{"name": "vlan100"}, {"name": "mv", "ips": ["10.30.0.22/24"]}]),
]


@pytest.fixture(scope="module")
def multus_lab(tmp_path_factory):
    require_root()
    require_ovs()
    lab("down")
    up = lab("up", "--nodes", "2", "--multus")
    assert up.returncode == 0, up.stdout + up.stderr
    manifest = tmp_path_factory.mktemp("multus") / "all.json"
    manifest.write_text("\n---\n".join(json.dumps(o) for o in OBJECTS))
    assert lab("apply", "-f", str(manifest)).returncode == 0
    yield manifest
    lab("down")


def running() -> dict[str, dict]:
    return {p["metadata"]["name"]: p for p in json.loads(lab("get", "pods", "-o", "json").stdout)
            if (p.get("status") or {}).get("podIP")}


def test_multus_attaches_sanderling_and_a_delegate_and_deletes_cleanly(multus_lab):
    deadline = time.monotonic() + 60
    while len(pods := running()) < 2 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert set(pods) == {"m1", "m2"}, pods
    for name, p in pods.items():
        status = json.loads(p["metadata"]["annotations"]["k8s.v1.cni.cncf.io/network-status"])
        addrs = json.loads(lab("exec", f"default/{name}", "--", "ip", "-j", "addr").stdout)
        have = {a["ifname"]: [i["local"] for i in a.get("addr_info", []) if i["family"] == "inet"]
                for a in addrs if a["ifname"] != "lo"}
        assert {e["interface"]: e["ips"] for e in status} == have, (name, status, have)
        assert [e["name"] for e in status][1:] == ["default/vlan100", "default/mv"]
    m2_vlan = json.loads(pods["m2"]["metadata"]["annotations"]["k8s.v1.cni.cncf.io/network-status"])[1]["ips"][0]
    for src, dst in (("m1", m2_vlan), ("m2", "10.100.0.21"), ("m1", "10.30.0.22")):
        ping = lab("exec", f"default/{src}", "--", "ping", "-c", "1", "-W", "2", dst)
        assert ping.returncode == 0, (src, dst, ping.stdout)
    db = f"--db=unix:{STATE / 'node1' / 'ovs' / 'db.sock'}"
    ports = subprocess.run(["ovs-vsctl", db, "list-ports", "br-physnet1"], capture_output=True, text=True).stdout
    assert len(ports.split()) == 2, ports  # the uplink and m1's net1
    assert lab("delete", "-f", str(multus_lab)).returncode == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and json.loads(lab("get", "pods", "-o", "json").stdout):
        time.sleep(0.3)
    for node in ("node1", "node2"):
        db = f"--db=unix:{STATE / node / 'ovs' / 'db.sock'}"
        ports = subprocess.run(["ovs-vsctl", db, "list-ports", "br-physnet1"], capture_output=True, text=True).stdout
        assert ports.split() == ["phys0"], (node, ports)
        assert list((STATE / node / "state" / node / "attachments").glob("*.json")) == []
    pools = json.loads(lab("get", "ippools", "-o", "json").stdout)
    assert [p for p in pools if (p.get("status") or {}).get("allocations")] == []
