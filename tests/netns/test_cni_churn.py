"""CNI under churn: ADD/DEL cycles in parallel while the agent is killed -9 at random moments.

Afterwards: no address was ever held by two live containers, and after a GC nothing is left
allocated, plumbed, plugged into OVS or programmed in its flow table.
"""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from sanderling.lab.node import LocalNode
from sanderling.netlink import veth

from .conftest import one_node

CYCLES = 1000
PARALLEL = 20


@pytest.fixture
def churn_node(tmp_path):
    yield from one_node(tmp_path, "slch", "10.244.12.0/24")


class Driver:
    """Executes the plugin the way a runtime does, retrying while the agent is down."""

    def __init__(self, node: LocalNode) -> None:
        self.node = node
        self.conf = json.dumps({"cniVersion": "1.1.0", "name": node.cni_network, "type": "sanderling-cni",
                                "agentSocket": str(node.cni_socket)})
        self.lock = threading.Lock()
        self.live: dict[str, str] = {}  # ip -> container holding it right now
        self.duplicates: list[str] = []
        self.add_ok = self.add_failed = 0

    def call(self, command: str, cid: str, netns: str) -> tuple[int, dict]:
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns, "CNI_IFNAME": "eth0",
               "CNI_PATH": str(self.node.cni_bin.parent), "CNI_ARGS": f"K8S_POD_NAMESPACE=churn;K8S_POD_NAME={cid}"}
        proc = subprocess.run([str(self.node.cni_bin)], input=self.conf, env=env, capture_output=True, text=True,
                              timeout=120)
        return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}

    def delete(self, cid: str, netns: str) -> None:
        delay = 0.05
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # a runtime retries DEL, backing off, until it succeeds
            code, out = self.call("DEL", cid, netns)
            if code == 0:
                return
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        raise AssertionError(f"DEL {cid} never succeeded: {out}")

    def cycle(self, slot: int, n: int) -> None:
        cid = f"churn{slot}x{n}"
        netns = f"/var/run/netns/slch-n1-s{slot}"
        code, out = self.call("ADD", cid, netns)
        if code != 0:
            self.add_failed += 1
            self.delete(cid, netns)  # a failed ADD is followed by a DEL
            return
        ip = out["ips"][0]["address"].split("/")[0]
        with self.lock:
            if ip in self.live:
                self.duplicates.append(f"{ip} given to {cid} while {self.live[ip]} holds it")
            self.live[ip] = cid
            self.add_ok += 1
        with self.lock:
            self.live.pop(ip, None)
        self.delete(cid, netns)


def test_churn_with_agent_kill_9_leaks_and_duplicates_nothing(churn_node):
    node = churn_node
    for slot in range(PARALLEL):
        veth.ensure_netns(f"slch-n1-s{slot}")
    driver = Driver(node)
    stop = threading.Event()
    kills = 0

    def killer() -> None:
        nonlocal kills
        rng = random.Random(7)
        while not stop.wait(rng.uniform(1.0, 3.0)):
            node.kill_agent()
            kills += 1
            time.sleep(rng.uniform(0.0, 0.3))
            node.start_agent()

    chaos = threading.Thread(target=killer)
    chaos.start()
    try:
        with ThreadPoolExecutor(PARALLEL) as pool:  # one sandbox per worker, its cycles in sequence
            list(pool.map(lambda slot: [driver.cycle(slot, n) for n in range(slot, CYCLES, PARALLEL)],
                          range(PARALLEL)))
    finally:
        stop.set()
        chaos.join()
    assert node.agent is not None
    deadline = time.monotonic() + 20
    while node.agent_status_code() != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    gc = subprocess.run([str(node.cni_bin)], env={"CNI_COMMAND": "GC", "CNI_PATH": str(node.cni_bin.parent)},
                        input=json.dumps({**json.loads(driver.conf), "cni.dev/valid-attachments": []}),
                        capture_output=True, text=True, timeout=120)
    print(f"\nchurn: {CYCLES} cycles, {driver.add_ok} ADDs succeeded, {driver.add_failed} failed "
          f"(agent down), agent killed -9 {kills} times")
    assert gc.returncode == 0, gc.stdout
    assert kills >= 3
    assert driver.add_ok > CYCLES // 5  # how many land depends on the random kills; all must be clean
    assert driver.duplicates == []
    assert node.allocations() == []
    assert [link for link in node.host_links() if link.startswith("sl")] == []
    assert node.ovs.vsctl("list-ports", node.bridge).split() == []
    time.sleep(0.5)
    assert "in_port=" not in node.ovs.ofctl(node.bridge, "dump-flows", "table=0")
