"""bench lab-pods [--pods N]: a 3-node lab from nothing, then 100 (N) pods from apply to all Running with IPs.

Times `lab up` (namespaces, OVS instances, agents, control plane) and then the pods: every pod is
created through the API at once, as `lab apply` of one file would; the clock stops when the API
reports every one Running with a podIP. Reference in the same run: the time the kubelets spend
outside Sanderling for the same pods (sandbox namespace creation and deletion alone, the floor any
CNI plugin sits on), so the ratio says how much of the wait is ours.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

NAME = "slbenchpods"


def _sandbox_reference(count: int) -> float:
    """Create and delete `count` network namespaces 8 at a time (what the kubelets do anyway)."""
    from sanderling.netlink import veth

    names = [f"{NAME}-ref-{i}" for i in range(count)]
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(veth.ensure_netns, names))
        list(pool.map(veth.delete_netns, names))
    return time.monotonic() - started


def run(progress: Callable[[str], None] = lambda _m: None, pods: int = 100, nodes: int = 3, mode: str = "routed",
        **_: Any) -> dict[str, Any]:
    from lightkube.resources.core_v1 import Namespace, Pod

    from sanderling.kube.client import KubeApi
    from sanderling.lab.cluster import Lab

    lab = Lab(NAME, progress)
    lab.down(quiet=True)
    try:
        started = time.monotonic()
        lab.up(nodes, mode)
        up_s = time.monotonic() - started
        client = KubeApi(lab.kubeconfig).client
        client.create(Namespace.from_dict({"metadata": {"name": "bench"}}))  # type: ignore[call-overload]
        progress(f"creating {pods} pods")
        started = time.monotonic()
        for i in range(pods):
            client.create(Pod.from_dict({  # type: ignore[call-overload]
                "metadata": {"name": f"p{i:03d}", "namespace": "bench", "labels": {"app": "bench"}},
                "spec": {"containers": [{"name": "c", "image": "none", "ports": [{"containerPort": 8080}]}]}}))
        running = 0
        deadline = started + 300
        ips: list[str] = []
        while time.monotonic() < deadline:
            listed = list(client.list(Pod, namespace="bench"))
            ips = [p.status.podIP for p in listed if p.status and p.status.phase == "Running" and p.status.podIP]
            if len(ips) != running:
                running = len(ips)
                progress(f"{running}/{pods} running after {time.monotonic() - started:.1f}s")
            if running == pods:
                break
            time.sleep(0.2)
        seconds = time.monotonic() - started
        if running != pods:
            raise RuntimeError(f"only {running} of {pods} pods running after {seconds:.0f}s; see "
                               f"{lab.state_dir}/controlplane.log")
        per_node = [sum(1 for p in client.list(Pod, namespace="bench") if p.spec and p.spec.nodeName == n["name"])
                    for n in lab.state()["nodes"]]
        distinct = len(set(ips))
        progress("reference: the same number of sandbox namespaces created and deleted")
        reference = statistics.median(_sandbox_reference(pods) for _ in range(3))
    finally:
        lab.down(quiet=True)
        subprocess.run(["sh", "-c", f"for n in $(ip netns | grep -o '^{NAME}-ref-[0-9]*'); do ip netns del $n; done"],
                       check=False)
    return {"pods": pods, "nodes": nodes, "mode": mode, "seconds": round(seconds, 2),
            "lab_up_s": round(up_s, 2), "pods_per_node": per_node, "distinct_ips": distinct,
            "reference_sandboxes_s": round(reference, 2), "ratio": round(seconds / reference, 2),
            "floors": {"seconds": ["<=", 60], "lab_up_s": ["<=", 30]}}
