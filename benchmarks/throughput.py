"""bench throughput: iperf3 TCP between pods through the full pipeline vs a kernel Linux bridge.

Two lab nodes (routed mode, userspace datapath with userspace TSO): pod to pod on one node, and
pod to pod across the underlay. Reference in the same run: two namespaces on a kernel Linux
bridge with default offloads, as a user would have it. One iperf3 stream each, `seconds` long.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sanderling.lab import fabric
from sanderling.lab.node import LocalNode, teardown_prefix
from sanderling.netlink import veth
from sanderling.netlink.netns import ipr

PREFIX = "slthr"
BRIDGE_NS = f"{PREFIX}-br"


def _iperf(client_ns: str, server_ns: str, server_ip: str, seconds: int) -> float:
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = subprocess.run(["ip", "netns", "exec", client_ns, "iperf3", "-c", server_ip, "-t", str(seconds), "-J"],
                             capture_output=True, text=True, timeout=seconds + 30)
        result = json.loads(out.stdout)
        if "error" in result:
            raise RuntimeError(f"iperf3 {client_ns} -> {server_ip}: {result['error']}")
        return float(result["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        server.kill()
        server.wait()


def _bridge_reference(seconds: int, repeats: int) -> list[float]:
    teardown_prefix(BRIDGE_NS)
    veth.ensure_netns(BRIDGE_NS)
    with ipr(BRIDGE_NS) as h:
        h.link("add", ifname="br0", kind="bridge")
        h.link("set", index=h.link_lookup(ifname="br0")[0], state="up")
    for i, ip in ((1, "10.199.0.1/24"), (2, "10.199.0.2/24")):
        veth.plumb(veth.PodInterface(f"{BRIDGE_NS}-p{i}", f"brv{i}", ip, f"0a:00:00:00:99:0{i}", "10.199.0.254"),
                   node_netns=BRIDGE_NS)
        with ipr(BRIDGE_NS) as h:
            h.link("set", index=h.link_lookup(ifname=f"brv{i}")[0], master=h.link_lookup(ifname="br0")[0])
    return [_iperf(f"{BRIDGE_NS}-p1", f"{BRIDGE_NS}-p2", "10.199.0.2", seconds) for _ in range(repeats)]


def run(seconds: int = 5, repeats: int = 3, progress: Callable[[str], None] = lambda _m: None,
        **_: Any) -> dict[str, Any]:
    """Medians of `repeats` rounds; each round measures Sanderling and the bridge back to back, so a
    noisy moment on this 2-core machine hits both sides instead of one."""
    teardown_prefix(BRIDGE_NS)
    base = Path(tempfile.mkdtemp(prefix="sanderling-bench-thr-"))
    nodes: list[LocalNode] = []
    same: list[float] = []
    cross: list[float] = []
    bridge: list[float] = []
    try:
        progress("two lab nodes (routed, userspace datapath with userspace TSO)")
        nodes = fabric.routed_nodes(PREFIX, base, ["10.244.41.0/24", "10.244.42.0/24"], "172.31.251.0/24")
        n1, n2 = nodes
        a, b = n1.add_pod("bench", "a", "10.244.41.10"), n1.add_pod("bench", "b", "10.244.41.11")
        c = n2.add_pod("bench", "c", "10.244.42.10")
        for node, pod in ((n1, a), (n1, b), (n2, c)):
            node.wait_programmed(pod)
        for r in range(1, repeats + 1):
            progress(f"round {r}/{repeats}: iperf3 {seconds}s same node, across nodes, kernel Linux bridge")
            same.append(_iperf(a.netns, b.netns, b.ip, seconds))
            cross.append(_iperf(a.netns, c.netns, c.ip, seconds))
            bridge += _bridge_reference(seconds, 1)
    finally:
        fabric.teardown(PREFIX, nodes)
        teardown_prefix(BRIDGE_NS)
    med = statistics.median
    return {"benchmark": "throughput", "seconds": seconds, "repeats": repeats,
            "same_node_gbps": round(med(same), 2), "cross_node_gbps": round(med(cross), 2),
            "bridge_gbps": round(med(bridge), 2), "ratio_same_node": round(med(same) / med(bridge), 3),
            "runs_gbps": {"same_node": [round(x, 2) for x in same], "cross_node": [round(x, 2) for x in cross],
                          "bridge": [round(x, 2) for x in bridge]},
            "floors": {"ratio_same_node": [">=", 0.6]}}
