"""bench flows: install N ClusterIP-shaped flows through the controller vs `ovs-ofctl --bundle`.

Both load the same flows (exact match on ip, protocol, destination address and port, action
ct(commit,nat)) into a fresh bridge of a private ovs-vswitchd, each repeated and reported as the
median. Then, with all N installed, one flow is changed 200 times through the realizer and the
p99 of the change latency (compile-to-committed) is reported.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sanderling.openflow import cookies, ir
from sanderling.openflow.connection import Connection
from sanderling.openflow.realizer import Realizer
from sanderling.ovs.ovsdb import Ovsdb
from sanderling.ovs.runtime import OvsRuntime

FLOWS_PER_SERVICE = 4
CT_NAT = (ir.CT(commit=True, nat=ir.Nat()),)


def service_flows(index: int, port_shift: int = 0) -> list[ir.Flow]:
    """One ClusterIP with FLOWS_PER_SERVICE ports."""
    vip = 0x0A600000 + index
    cookie = cookies.cookie(cookies.Category.BENCH, f"svc/{index}")
    return [ir.Flow(0, 100, ir.Match((("dl_type", 0x0800, None), ("nw_proto", 6, None), ("nw_dst", vip, None),
                                      ("tcp_dst", 80 + p + port_shift, None))), CT_NAT, cookie)
            for p in range(FLOWS_PER_SERVICE)]


def build(n: int) -> dict[str, list[ir.Flow]]:
    services = (n + FLOWS_PER_SERVICE - 1) // FLOWS_PER_SERVICE
    out = {f"svc/{i}": service_flows(i) for i in range(services)}
    total = sum(len(v) for v in out.values())
    if total > n:
        last = f"svc/{services - 1}"
        out[last] = out[last][: len(out[last]) - (total - n)]
    return out


def _flow_count(runtime: OvsRuntime, bridge: str) -> int:
    out = runtime.ofctl(bridge, "dump-aggregate")
    return int(out.split("flow_count=")[1].split()[0])


async def _controller_run(runtime: OvsRuntime, bridge: str, objects: dict[str, list[ir.Flow]],
                          changes: int) -> tuple[float, list[float]]:
    conn = await Connection.open(runtime.mgmt_target(bridge))
    realizer = Realizer(1)
    start = time.perf_counter()
    for key, flows in objects.items():
        realizer.set_object(key, flows)
    await realizer.sync(conn)
    elapsed = time.perf_counter() - start
    latencies = []
    for i in range(changes):
        started = time.perf_counter()
        realizer.set_object("svc/0", service_flows(0, port_shift=1000 + i))
        await realizer.sync(conn)
        latencies.append((time.perf_counter() - started) * 1000)
    conn.close()
    return elapsed, latencies


def run(flows: int = 100_000, repeats: int = 3, changes: int = 200,
        progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sanderling-bench-") as tmp:
        runtime = OvsRuntime(Path(tmp), datapath="dummy")
        runtime.start()
        db = Ovsdb(runtime.db_endpoint)
        try:
            t0 = time.perf_counter()
            objects = build(flows)
            compile_s = time.perf_counter() - t0
            flow_file = Path(tmp) / "flows.txt"
            flow_file.write_text("".join(f.text() + "\n" for fl in objects.values() for f in fl))
            controller, reference, p99s, p50s = [], [], [], []
            for r in range(repeats):
                progress(f"run {r + 1}/{repeats}: controller")
                db.ensure_bridge(f"bc{r}", "dummy")
                elapsed, lat = asyncio.run(_controller_run(runtime, f"bc{r}", objects, changes if r == 0 else 0))
                if _flow_count(runtime, f"bc{r}") != flows:
                    raise RuntimeError("controller run did not install every flow")
                controller.append(elapsed)
                if lat:
                    lat.sort()
                    p99s.append(lat[int(len(lat) * 0.99) - 1])
                    p50s.append(statistics.median(lat))
                db.delete_bridge(f"bc{r}")
                progress(f"run {r + 1}/{repeats}: ovs-ofctl --bundle")
                db.ensure_bridge(f"bo{r}", "dummy")
                t = time.perf_counter()
                subprocess.run(["ovs-ofctl", "-O", "OpenFlow13", "--bundle", "add-flows",
                                runtime.mgmt_target(f"bo{r}"), str(flow_file)], check=True)
                reference.append(time.perf_counter() - t)
                if _flow_count(runtime, f"bo{r}") != flows:
                    raise RuntimeError("ovs-ofctl run did not install every flow")
                db.delete_bridge(f"bo{r}")
        finally:
            db.close()
            runtime.stop()
    controller_s = statistics.median(controller)
    ovs_ofctl_s = statistics.median(reference)
    return {
        "benchmark": "flows",
        "flows": flows,
        "repeats": repeats,
        "compile_s": round(compile_s, 3),
        "controller_s": round(controller_s, 3),
        "ovs_ofctl_s": round(ovs_ofctl_s, 3),
        "ratio": round(controller_s / ovs_ofctl_s, 3),
        "change_p50_ms": round(p50s[0], 3) if p50s else None,
        "change_p99_ms": round(p99s[0], 3) if p99s else None,
        "changes": changes,
        "floors": {"ratio": ["<=", 1.5], "change_p99_ms": ["<=", 5.0]},
    }
