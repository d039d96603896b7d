"""Pods with three secondary networks (VLAN, layer2, macvlan delegate) created and deleted in
rounds on a lab node while its agent is killed -9 at random (the lab kubelet retries an ADD the
agent could not take, as a kubelet does): every pod ends up with all its networks, no address is
ever held twice on any network, and once the pods are gone and the runtime's GC ran, nothing is left: no interface,
OVS port, flow, allocation (local or IPPool) or attachment record.

`SANDERLING_MULTINET_CYCLES` sets the number of pod lifecycles (CI runs the default)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from sanderling.ipam.store import AllocationStore
from sanderling.model.attachments import ANNOTATION_STATUS

from .conftest import LabCli

NAME = "slmc"
lab = LabCli(NAME)
STATE = Path("/run/sanderling-lab") / NAME
CYCLES = int(os.environ.get("SANDERLING_MULTINET_CYCLES", "40"))
PER_ROUND = 10

NADS = [
    {"name": "vlan100", "config": {"type": "sanderling", "topology": "vlan", "vlanID": 100,
                                   "subnet": "10.100.0.0/24"}},
    {"name": "l2a", "config": {"type": "sanderling", "topology": "layer2", "subnet": "10.50.0.0/24"}},
    {"name": "mv", "config": {"type": "macvlan", "master": "data0", "mode": "bridge", "ipam": {"type": "static"},
                              "capabilities": {"ips": True}}},
]


def manifest(objects: list[dict], path: Path) -> Path:
    path.write_text("\n---\n".join(json.dumps(o) for o in objects))
    return path


def pod_object(name: str, slot: int) -> dict:
    networks = [{"name": "vlan100"}, {"name": "l2a"}, {"name": "mv", "ips": [f"10.30.0.{10 + slot}/24"]}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": name, "namespace": "default", "annotations": {"k8s.v1.cni.cncf.io/networks": json.dumps(networks)}},
        "spec": {"nodeName": "node1", "containers": [{"name": "c", "image": "x"}]}}


def pods() -> list[dict]:
    return json.loads(lab("get", "pods", "-o", "json").stdout)


def settled(p: dict) -> bool:
    """Running with an address: an ADD refused while the agent was down is retried by the kubelet."""
    return bool((p.get("status") or {}).get("podIP"))


def agent_pid() -> int:
    state = json.loads((STATE / "state.json").read_text())
    return int(next(n for n in state["nodes"] if n["name"] == "node1")["agent_pid"])


def node_sh(*argv: str) -> str:
    return subprocess.run(["ip", "netns", "exec", f"{NAME}-node1", *argv], capture_output=True, text=True).stdout


@pytest.fixture
def churn_lab(tmp_path):
    nads = [{"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
             "metadata": {"name": n["name"], "namespace": "default"},
             "spec": {"config": json.dumps({"cniVersion": "1.0.0", **n["config"]})}} for n in NADS]
    lab.up_with(1, manifest(nads, tmp_path / "nads.json"), 0)
    yield tmp_path
    lab("down")


def test_multinet_churn_with_agent_kill_9_leaks_and_duplicates_nothing(churn_lab):
    tmp = churn_lab
    rng = random.Random(11)
    kills = running = 0
    duplicates: list[str] = []

    def kill_soon() -> None:
        """kill -9 the agent at a random moment of what is in flight, then start it again."""
        nonlocal kills
        time.sleep(rng.uniform(0.0, 0.8))
        try:
            os.kill(agent_pid(), signal.SIGKILL)
        except ProcessLookupError:
            pass
        kills += 1
        assert lab("restart-agent", "node1").returncode == 0

    for round_no in range(CYCLES // PER_ROUND):
        names = [f"mc{round_no}x{slot}" for slot in range(PER_ROUND)]
        objs = [pod_object(n, slot) for slot, n in enumerate(names)]
        assert lab("apply", "-f", str(manifest(objs, tmp / "pods.json"))).returncode == 0
        kill_soon()  # during the ADDs
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            now = {p["metadata"]["name"]: p for p in pods()}
            if all(n in now and settled(now[n]) for n in names):
                break
            time.sleep(0.3)
        else:
            raise AssertionError(f"round {round_no}: pods did not settle")
        held: Counter[tuple[str, str]] = Counter()
        for n in names:
            status = json.loads((now[n]["metadata"].get("annotations") or {}).get(ANNOTATION_STATUS, "[]"))
            assert len(status) == 4, (n, status)
            running += 1
            for entry in status:
                for ip in entry["ips"]:
                    held[(entry["name"], ip)] += 1
        duplicates += [f"{net} {ip} x{count}" for (net, ip), count in held.items() if count > 1]
        assert lab("delete", "-f", str(tmp / "pods.json")).returncode == 0
        if round_no % 2:
            kill_soon()  # during the DELs: what they leave, the restart's reconcile and the GC remove
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(p["metadata"]["name"] in names for p in pods()):
            time.sleep(0.3)
    # the runtime's GC, once the agent is up: no attachment is valid any more
    node = STATE / "node1"
    conf = {"cniVersion": "1.1.0", "name": f"{NAME}-node1", "type": "sanderling-cni",
            "agentSocket": str(node / "cni.sock"), "cni.dev/valid-attachments": []}
    deadline = time.monotonic() + 30
    while True:
        gc = subprocess.run([str(node / "cni" / "bin" / "sanderling-cni")], input=json.dumps(conf), text=True,
                            capture_output=True, env={"CNI_COMMAND": "GC", "CNI_PATH": str(node / "cni" / "bin")})
        if gc.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    retried = len({line.split("pod ")[1].split(":")[0] for line in (STATE / "controlplane.log").read_text().splitlines()
                   if "CNI ADD failed" in line and "pod default/mc" in line})
    print(f"\nmultinet churn: {CYCLES} pod lifecycles with 3 secondary networks each, all attached, {retried} of "
          f"them after a failed ADD (agent down), agent killed -9 {kills} times")
    assert gc.returncode == 0, gc.stdout
    assert kills == CYCLES // PER_ROUND + CYCLES // PER_ROUND // 2 and running == CYCLES
    assert duplicates == []
    db = f"--db=unix:{node / 'ovs' / 'db.sock'}"
    ports = {b: subprocess.run(["ovs-vsctl", db, "list-ports", b], capture_output=True, text=True).stdout.split()
             for b in ("br-int", "br-physnet1", "br-l2")}
    assert ports == {"br-int": [], "br-physnet1": ["phys0"], "br-l2": []}, ports
    links = [ln.split(":")[1].strip().split("@")[0] for ln in node_sh("ip", "-o", "link").splitlines()]
    assert [ln for ln in links if ln.startswith("sl")] == [], links
    assert list((node / "state" / "node1" / "attachments").glob("*.json")) == []
    store = AllocationStore(node / "state" / "node1" / "ipam.db")
    try:
        assert store.all() == []
    finally:
        store.close()
    pools = json.loads(lab("get", "ippools", "-o", "json").stdout)
    assert [p["metadata"]["name"] for p in pools if (p.get("status") or {}).get("allocations")] == []
    flows = subprocess.run(["ovs-ofctl", "-O", "OpenFlow13", "dump-flows", f"unix:{node / 'ovs' / 'br-physnet1.mgmt'}"],
                           capture_output=True, text=True).stdout
    assert "in_port=" not in flows, flows
