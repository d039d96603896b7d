"""The agent's service path in its own process, for `bench services` (its RSS is the agent's).

Feeds Service and EndpointSlice objects to the ServiceProxy exactly as the informers do, syncs
them to the bridge through the realizer on one OpenFlow connection, then makes single-endpoint
changes one at a time. Prints one JSON line: timings, flow and group counts, RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from sanderling.agent.main import tune_gc
from sanderling.agent.metrics import AgentMetrics, Sources
from sanderling.agent.service_proxy import ServiceProxy
from sanderling.compiler.services import ProxyConfig
from sanderling.openflow.connection import Connection
from sanderling.openflow.realizer import Realizer


class _BenchSync:
    """What the metrics read of the agent's sync loop, for this bare service path."""

    def __init__(self, conn: Connection, realizer: Realizer, target: str) -> None:
        self.conn, self.realizer, self.target = conn, realizer, target
        self.sync_observers: list[Any] = []
        self.packet_ins: dict[int, int] = {}
        self.meters: list[Any] = []
        self.resyncs = 1

    def installed(self, key: str) -> bool:
        return self.realizer.is_installed(key)


class _NoPods:
    by_ofport: dict[int, Any] = {}


CLUSTER_CIDR = ipaddress.IPv4Network("10.200.0.0/14")  # room for 100k+ endpoint addresses


def vip(i: int) -> str:
    return str(ipaddress.IPv4Address("10.96.0.0") + 10 + i)


def endpoint_ip(i: int) -> str:
    return str(CLUSTER_CIDR.network_address + 2 + i)


def objects(count: int, endpoints: int, first: int = 0) -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for i in range(first, first + count):
        name = f"svc-{i}"
        out.append(("service", f"bench/{name}", {
            "metadata": {"namespace": "bench", "name": name},
            "spec": {"type": "ClusterIP", "clusterIP": vip(i), "ports": [{"name": "http", "port": 80,
                                                                          "targetPort": 8080}]}}))
        out.append(("slice", f"bench/{name}-x", {
            "metadata": {"namespace": "bench", "name": f"{name}-x", "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [endpoint_ip(i * endpoints + e)], "conditions": {"ready": True},
                           "nodeName": f"node{e % 3 + 2}"} for e in range(endpoints)]}))
    return out


def feed(proxy: ServiceProxy, objs: list[tuple[str, str, dict[str, Any]]]) -> None:
    for kind, key, obj in objs:
        (proxy.service_changed if kind == "service" else proxy.slice_changed)(key, obj)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    cfg = ProxyConfig("node1", (ipaddress.IPv4Address("172.30.0.11"),), (ipaddress.IPv4Address("172.30.0.11"),),
                      ipaddress.IPv4Network("10.244.0.0/16"), ipaddress.IPv4Address("10.244.0.254"),
                      ipaddress.IPv4Network("10.96.0.0/12"))
    objs = objects(args.services, args.endpoints)
    conn = await Connection.open(args.target, timeout=10)
    realizer = Realizer(1)
    proxy = ServiceProxy(cfg, realizer, lambda: None, schedule=lambda _fn: None)  # flushed below, as the loop would
    started = time.perf_counter()
    proxy.start()
    feed(proxy, objs)
    proxy.flush()
    compiled = time.perf_counter()
    result = await realizer.sync(conn)
    await conn.barrier()
    synced = time.perf_counter()
    if result.failed:
        raise SystemExit(f"refused: {list(result.failed.items())[:2]}")
    flows = realizer.installed_flows()
    groups = [g for s in realizer.installed_state().values() for g in s.groups.values()]
    if args.dump:
        Path(args.dump).write_text("\n".join(f.text(cookie=realizer.cookie(f)) for f in flows) + "\n")
        Path(args.dump + ".groups").write_text("\n".join(g.text() for g in groups) + "\n")
    rng = random.Random(7)
    slices = {key: obj for kind, key, obj in objs if kind == "slice"}
    keys = sorted(slices)
    serial = [args.services * args.endpoints]

    async def change_some(count: int, seconds: float = 0.0) -> list[float]:
        times: list[float] = []
        until = time.perf_counter() + seconds
        while len(times) < count or time.perf_counter() < until:
            key = rng.choice(keys)
            obj = json.loads(json.dumps(slices[key]))
            obj["endpoints"][rng.randrange(len(obj["endpoints"]))]["addresses"] = [endpoint_ip(serial[0])]
            serial[0] += 1
            slices[key] = obj
            t0 = time.perf_counter()
            proxy.slice_changed(key, obj)
            proxy.flush()
            await realizer.sync(conn)
            times.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(0)  # let a scrape in, as the agent's loop would
        return sorted(times)

    changes = await change_some(args.changes)
    # /metrics at this size: the agent's scrape (OVS port and table stats read and labelled, the
    # group stats by its scrape worker), alone and while changes keep coming (their p99 must not move)
    metrics = AgentMetrics(Sources(_BenchSync(conn, realizer, args.target), lambda: [], _NoPods(), proxy=proxy))
    scrapes = []
    for _ in range(3):
        t0 = time.perf_counter()
        text = await metrics.render()
        scrapes.append(time.perf_counter() - t0)
    endpoint_series = text.count(b"sanderling_service_endpoint_connections_total{")
    stop = asyncio.Event()

    async def scrape_loop() -> int:
        n = 0
        while not stop.is_set():
            async for _chunk in metrics.render_chunks():  # streamed, as the status endpoint sends it
                pass
            n += 1
            await asyncio.sleep(0.5)
        return n

    async def ofctl_loop() -> int:
        """The reference: the same group statistics read at the same cadence by ovs-ofctl, so
        ovs-vswitchd's own cost of answering (its main thread builds the 2 MB reply) is apart."""
        n = 0
        while not stop.is_set():
            proc = await asyncio.create_subprocess_exec("ovs-ofctl", "-O", "OpenFlow13", "dump-group-stats",
                                                        args.target, stdout=asyncio.subprocess.DEVNULL)
            await proc.wait()
            n += 1
            await asyncio.sleep(0.5)
        return n

    # alternating windows, so that a noisy moment of the machine does not land on one side only
    during: list[float] = []
    during_ofctl: list[float] = []
    scraped = 0
    for _ in range(4):
        for loop, samples in ((scrape_loop, during), (ofctl_loop, during_ofctl)):
            stop.clear()
            reader = asyncio.ensure_future(loop())
            samples += await change_some(max(25, args.changes // 20), seconds=1.5)
            stop.set()
            count = await reader
            scraped += count if loop is scrape_loop else 0
    during.sort()
    during_ofctl.sort()
    conn.close()
    await metrics.worker().close()
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"services": args.services, "endpoints": args.services * args.endpoints, "flows": len(flows),
            "groups": len(groups), "compile_s": round(compiled - started, 3), "full_sync_s": round(synced - started, 3),
            "changes": len(changes), "change_p50_ms": round(statistics.median(changes), 2) if changes else None,
            "change_p99_ms": round(changes[int(len(changes) * 0.99) - 1], 2) if changes else None,
            "scrape_s": round(statistics.median(scrapes), 3), "scrape_endpoint_series": endpoint_series,
            "change_p99_during_scrapes_ms": round(during[int(len(during) * 0.99) - 1], 2),
            "change_p99_during_ofctl_dumps_ms": round(during_ofctl[int(len(during_ofctl) * 0.99) - 1], 2),
            "scrape_change_ratio": round(during[int(len(during) * 0.99) - 1]
                                         / during_ofctl[int(len(during_ofctl) * 0.99) - 1], 3),
            "scrapes_during_changes": scraped,
            "rss_mb": round(rss_kb / 1024, 1)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True)
    p.add_argument("--services", type=int, default=10000)
    p.add_argument("--endpoints", type=int, default=10)
    p.add_argument("--changes", type=int, default=1000)
    p.add_argument("--dump", default="")
    args = p.parse_args()
    tune_gc()  # as the agent does
    print(json.dumps(asyncio.run(main_async(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
