"""bench services: 10,000 Services x 10 endpoints through the agent's service path.

1. Full sync from an empty bridge (dummy datapath): Services and EndpointSlices fed to the
   ServiceProxy as the informers feed them, compiled, sent by the realizer; the reference is the
   very same flows and groups loaded by `ovs-ofctl --bundle` into another empty bridge.
2. 1,000 single-endpoint changes, each one EndpointSlice edit -> one bundle, timed to the commit.
3. RSS of that process (it holds what the agent holds for those Services).
3b. /metrics at that size (`scrape_s`: the agent's scrape, reading OVS's port and table stats
   and, in its scrape worker, the group stats of every endpoint), and the single-endpoint change
   p99 while a scrape runs every 0.5 s (`change_p99_during_scrapes_ms`); its reference is the
   change p99 while `ovs-ofctl dump-group-stats` reads the same counters at the same cadence
   (ovs-vswitchd's own cost of answering), and `scrape_change_ratio` the one over the other:
   a stress (a scrape takes 0.2-0.45 s, so the machine is scraping most of the time, against
   0.1 s for a dump); `overlapping_ratio` compares only the changes that overlapped a read,
   each kind's (a change's own slowdown, apart from how long the reads last). Then
   changes in 15 s windows with a scrape at the start of each, as Prometheus would scrape,
   alternating with 15 s windows without one (2 of each): the p99 of the one over the other's
   (`scraped_every_15s_ratio`).
3c. The same Services with IPv6 addresses only against IPv4 ones, through the same path, each on
   a fresh bridge (full sync and single-endpoint changes), the families in turn over 3 rounds:
   `ipv6_full_sync_ratio` and `ipv6_change_p99_ratio`, medians (`ipv4_only`, `ipv6_only`).
4. First-packet latency: TCP connect() from a pod to a ClusterIP through the real pipeline on
   the userspace datapath, with 10 Services installed and then with 10,000; the ratio.
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PREFIX = "slbsvc"
TEST_VIP = "10.96.255.250"

CONNECT_LOOP = """
import socket, sys, time, json
vip, n = sys.argv[1], int(sys.argv[2])
times = []
for _ in range(n):
    s = socket.socket(); s.settimeout(2)
    t0 = time.perf_counter(); s.connect((vip, 80)); times.append((time.perf_counter() - t0) * 1e6); s.close()
print(json.dumps(times))
"""


def _driver_module() -> Any:
    spec = importlib.util.spec_from_file_location("sanderling_bench_services_driver", HERE / "_services_driver.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ofctl_reference(runtime: Any, db: Any, flows_file: Path) -> float:
    db.ensure_bridge("ref", "dummy")
    started = time.perf_counter()
    runtime.ofctl("ref", "add-groups", str(flows_file) + ".groups", options=("--bundle",))
    runtime.ofctl("ref", "add-flows", str(flows_file), options=("--bundle",))
    elapsed = time.perf_counter() - started
    db.delete_bridge("ref")
    return elapsed


@contextmanager
def _private_bridge(name: str) -> Iterator[tuple[Any, Any, str, Path]]:
    """A fresh ovs-vswitchd (dummy datapath) with one empty bridge: (runtime, db, target, run dir),
    everything removed afterwards."""
    from sanderling.ovs.ovsdb import Ovsdb
    from sanderling.ovs.runtime import OvsRuntime

    run_dir = Path(tempfile.mkdtemp(prefix=f"sanderling-bench-{name}-"))
    runtime = OvsRuntime(run_dir, datapath="dummy")
    runtime.start()
    db = Ovsdb(runtime.db_endpoint)
    try:
        db.ensure_bridge(name, "dummy")
        yield runtime, db, runtime.mgmt_target(name), run_dir
    finally:
        db.close()
        runtime.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def _driver(target: str, services: int, endpoints: int, changes: int, *extra: str) -> dict[str, Any]:
    """The agent's service path in its own process (_services_driver.py): its JSON result."""
    proc = subprocess.run([sys.executable, str(HERE / "_services_driver.py"), "--target", target,
                           "--services", str(services), "--endpoints", str(endpoints), "--changes", str(changes),
                           *extra], capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"services driver {' '.join(extra)} failed: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _sync_only(family: str, services: int, endpoints: int, changes: int) -> dict[str, Any]:
    """One full sync and the changes, on a fresh bridge of a fresh ovs-vswitchd."""
    with _private_bridge("svcf") as (_runtime, _db, target, _dir):
        return _driver(target, services, endpoints, changes, "--ip-family", family, "--sync-only")


def _ipv6_compared(services: int, endpoints: int, changes: int, progress: Callable[[str], None],
                   rounds: int = 3) -> dict[str, Any]:
    """The same Services with IPv6 addresses only (ClusterIPs and endpoints) against IPv4 ones,
    through the same path, each on a fresh bridge: full sync and single-endpoint changes, the two
    families in turn round by round (the machine's load drifts), medians of the rounds."""
    runs: dict[str, list[dict[str, Any]]] = {"ipv4": [], "ipv6": []}
    for i in range(rounds):
        for family in ("ipv4", "ipv6"):
            progress(f"round {i + 1}/{rounds}: {services} Services over {family}: full sync, {changes} changes")
            runs[family].append(_sync_only(family, services, endpoints, changes))

    def median(family: str, key: str) -> float:
        return float(statistics.median(r[key] for r in runs[family]))

    out: dict[str, Any] = {f"{family}_only": {key: median(family, key) for key in
                                               ("full_sync_s", "compile_s", "change_p50_ms", "change_p99_ms")}
                           for family in runs}
    out["ipv6_only"]["flows"] = runs["ipv6"][0]["flows"]
    out["ipv6_full_sync_ratio"] = round(median("ipv6", "full_sync_s") / median("ipv4", "full_sync_s"), 3)
    out["ipv6_change_p99_ratio"] = round(median("ipv6", "change_p99_ms") / median("ipv4", "change_p99_ms"), 3)
    return out


def _sync_and_changes(services: int, endpoints: int, changes: int, progress: Callable[[str], None]) -> dict[str, Any]:
    with _private_bridge("svc") as (runtime, db, target, run_dir):
        dump = run_dir / "flows.txt"
        progress(f"{services} services x {endpoints} endpoints: full sync from an empty bridge, then {changes} "
                 "single-endpoint changes")
        result = _driver(target, services, endpoints, changes, "--dump", str(dump))
        progress("reference: the same flows and groups with ovs-ofctl --bundle")
        result["ovs_ofctl_s"] = round(_ofctl_reference(runtime, db, dump), 3)
        result["ratio"] = round(result["full_sync_s"] / result["ovs_ofctl_s"], 3)
        return result


def _first_packet(services: int, endpoints: int, progress: Callable[[str], None], samples: int = 300,
                  rounds: int = 3) -> dict[str, Any]:
    from sanderling.agent.service_proxy import ServiceProxy
    from sanderling.compiler import node_objects
    from sanderling.compiler.services import ProxyConfig
    from sanderling.lab.node import LocalNode, teardown_prefix
    from sanderling.model.network import PodPort
    from sanderling.openflow.connection import Connection
    from sanderling.openflow.realizer import Realizer

    driver = _driver_module()
    teardown_prefix(f"{PREFIX}-n1")
    base = Path(tempfile.mkdtemp(prefix="sanderling-bench-svc-fp-"))
    node = LocalNode("n1", "10.244.60.0/24", base, prefix=PREFIX)
    try:
        node.start(agent=False)
        client = node.add_pod("bench", "client", "10.244.60.10")
        server = node.add_pod("bench", "server", "10.244.60.11")
        node.serve(server, tcp=(8080,), udp=())
        cfg = ProxyConfig("n1", (), (), ipaddress.IPv4Network("10.244.0.0/16"), ipaddress.IPv4Address("10.244.60.254"),
                          ipaddress.IPv4Network("10.96.0.0/12"))
        test_service = [
            ("service", "bench/target", {"metadata": {"namespace": "bench", "name": "target"},
                                         "spec": {"clusterIP": TEST_VIP, "ports": [{"name": "http", "port": 80}]}}),
            ("slice", "bench/target-x", {"metadata": {"namespace": "bench", "name": "target-x",
                                                      "labels": {"kubernetes.io/service-name": "target"}},
                                         "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
                                         "endpoints": [{"addresses": [server.ip], "nodeName": "n1",
                                                        "conditions": {"ready": True}}]})]

        async def install_and_measure(count: int) -> list[float]:
            conn = await Connection.open(node.ovs.mgmt_target(node.bridge), timeout=10)
            realizer = Realizer(1)
            ports = [PodPort.build(pod.namespace, pod.name, node.ofport(pod), pod.mac, pod.ip)
                     for pod in (client, server)]
            for key, flows in node_objects.node_objects(node.network, ports).items():
                realizer.set_object(key, flows)
            proxy = ServiceProxy(cfg, realizer, lambda: None, schedule=lambda _fn: None)
            proxy.start()
            driver.feed(proxy, test_service + driver.objects(count - 1, endpoints))
            proxy.flush()
            await realizer.resync(conn)
            conn.close()
            out = node.pod_exec(client, [sys.executable, "-c", CONNECT_LOOP, TEST_VIP, "20"])  # warm up
            out = node.pod_exec(client, [sys.executable, "-c", CONNECT_LOOP, TEST_VIP, str(samples)], timeout=300)
            if out.returncode != 0:
                raise RuntimeError(f"connect loop failed: {out.stderr[-500:]}")
            return list(json.loads(out.stdout))

        small: list[float] = []
        big: list[float] = []
        for r in range(1, rounds + 1):  # alternated, so a noisy moment hits both sides
            progress(f"first packet, round {r}/{rounds}: {samples} connects to a ClusterIP with 10 services, "
                     f"then with {services}")
            small.append(statistics.median(asyncio.run(install_and_measure(10))))
            big.append(statistics.median(asyncio.run(install_and_measure(services))))
    finally:
        node.teardown()
        shutil.rmtree(base, ignore_errors=True)
    return {"first_packet_us_10": round(statistics.median(small), 1),
            f"first_packet_us_{services}": round(statistics.median(big), 1),
            "first_packet_ratio": round(statistics.median(big) / statistics.median(small), 3),
            "first_packet_rounds_us": {"10": [round(x, 1) for x in small], str(services): [round(x, 1) for x in big]}}


def run(progress: Callable[[str], None] = lambda _m: None, services: int = 10000, endpoints: int = 10,
        changes: int = 1000, **_: Any) -> dict[str, Any]:
    result = {"benchmark": "services", **_sync_and_changes(services, endpoints, changes, progress),
              **_ipv6_compared(services, endpoints, changes, progress), **_first_packet(services, endpoints, progress)}
    result["floors"] = {"full_sync_s": ["<=", 5], "change_p99_ms": ["<=", 20], "rss_mb": ["<=", 400],
                        "ipv6_full_sync_ratio": ["<=", 1.2], "ipv6_change_p99_ratio": ["<=", 1.2],
                        "first_packet_ratio": ["<=", 1.2], "scrape_s": ["<=", 1.0],
                        "change_p99_during_scrapes_ms": ["<=", 20], "scraped_every_15s_ratio": ["<=", 1.5],
                        "overlapping_ratio": ["<=", 1.0]}
    return result
