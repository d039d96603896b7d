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


PERIOD = 0.5  # a read of the counters starts every PERIOD seconds (a scrape, or the reference's dump)
CLUSTER_CIDR = ipaddress.IPv4Network("10.200.0.0/14")  # room for 100k+ endpoint addresses


CLUSTER_CIDR6 = ipaddress.IPv6Network("fd00:10:200::/56")
FAMILY = [4]  # --ip-family ipv6: the same Services with IPv6 addresses only (ClusterIP and endpoints)


def vip(i: int) -> str:
    if FAMILY[0] == 6:
        return str(ipaddress.IPv6Address("fd00:10:96::") + 10 + i)
    return str(ipaddress.IPv4Address("10.96.0.0") + 10 + i)


def endpoint_ip(i: int) -> str:
    return str((CLUSTER_CIDR6 if FAMILY[0] == 6 else CLUSTER_CIDR).network_address + 2 + i)


def objects(count: int, endpoints: int, first: int = 0) -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for i in range(first, first + count):
        name = f"svc-{i}"
        out.append(("service", f"bench/{name}", {
            "metadata": {"namespace": "bench", "name": name},
            "spec": {"type": "ClusterIP", "clusterIP": vip(i), "clusterIPs": [vip(i)],
                     "ipFamilies": [f"IPv{FAMILY[0]}"],
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}))
        out.append(("slice", f"bench/{name}-x", {
            "metadata": {"namespace": "bench", "name": f"{name}-x", "labels": {"kubernetes.io/service-name": name}},
            "addressType": f"IPv{FAMILY[0]}", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [endpoint_ip(i * endpoints + e)], "conditions": {"ready": True},
                           "nodeName": f"node{e % 3 + 2}"} for e in range(endpoints)]}))
    return out


def feed(proxy: ServiceProxy, objs: list[tuple[str, str, dict[str, Any]]]) -> None:
    for kind, key, obj in objs:
        (proxy.service_changed if kind == "service" else proxy.slice_changed)(key, obj)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    cfg = ProxyConfig("node1", (ipaddress.IPv4Address("172.30.0.11"),), (ipaddress.IPv4Address("172.30.0.11"),),
                      ipaddress.IPv4Network("10.244.0.0/16"), ipaddress.IPv4Address("10.244.0.254"),
                      ipaddress.IPv4Network("10.96.0.0/12"),
                      masq_ip6=ipaddress.IPv6Address("fd00:10:244::fffe"),
                      local_cidr6=ipaddress.IPv6Network("fd00:10:244::/56"),
                      service_cidr6=ipaddress.IPv6Network("fd00:10:96::/108"))
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

    reading = [False]  # a read of the counters (a scrape, or the reference's dump) is in progress

    async def change_some(count: int, seconds: float = 0.0, overlapping: list[float] | None = None) -> list[float]:
        """Changes one after another, each timed to its commit; those that overlapped a read of
        the counters also go to `overlapping`."""
        times: list[float] = []
        until = time.perf_counter() + seconds
        while len(times) < count or time.perf_counter() < until:
            key = rng.choice(keys)
            obj = json.loads(json.dumps(slices[key]))
            obj["endpoints"][rng.randrange(len(obj["endpoints"]))]["addresses"] = [endpoint_ip(serial[0])]
            serial[0] += 1
            slices[key] = obj
            t0 = time.perf_counter()
            read_at_start = reading[0]
            proxy.slice_changed(key, obj)
            proxy.flush()
            await realizer.sync(conn)
            times.append((time.perf_counter() - t0) * 1000)
            if overlapping is not None and (read_at_start or reading[0]):
                overlapping.append(times[-1])
            await asyncio.sleep(0)  # let a scrape in, as the agent's loop would
        return sorted(times)

    changes = await change_some(args.changes)
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # what holding these Services takes
    if args.sync_only:  # the IPv6 comparison: the full sync and the changes, nothing else
        conn.close()
        return {"flows": len(flows), "groups": len(groups), "compile_s": round(compiled - started, 3),
                "full_sync_s": round(synced - started, 3), "changes": len(changes),
                "change_p50_ms": round(statistics.median(changes), 2),
                "change_p99_ms": round(changes[int(len(changes) * 0.99) - 1], 2), "rss_mb": round(rss_kb / 1024, 1)}
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

    async def scrape_loop(period: float = PERIOD) -> int:
        n = 0
        while not stop.is_set():
            started = time.perf_counter()
            reading[0] = True
            async for _chunk in metrics.render_chunks():  # streamed, as the status endpoint sends it
                pass
            reading[0] = False
            n += 1
            try:  # the next scrape when the period is over, or at once to the end of the window
                await asyncio.wait_for(stop.wait(), max(0.0, period - (time.perf_counter() - started)))
            except TimeoutError:
                pass
        return n

    async def ofctl_loop() -> int:
        """The reference: the same group statistics read at the same cadence by ovs-ofctl, so
        ovs-vswitchd's own cost of answering (its main thread builds the 2 MB reply) is apart."""
        n = 0
        while not stop.is_set():
            started = time.perf_counter()
            reading[0] = True
            proc = await asyncio.create_subprocess_exec("ovs-ofctl", "-O", "OpenFlow13", "dump-group-stats",
                                                        args.target, stdout=asyncio.subprocess.DEVNULL)
            await proc.wait()
            reading[0] = False
            n += 1
            await asyncio.sleep(max(0.0, PERIOD - (time.perf_counter() - started)))
        return n

    # alternating windows, so that a noisy moment of the machine does not land on one side only
    during: list[float] = []
    during_ofctl: list[float] = []
    in_scrape: list[float] = []  # the changes that overlapped a scrape
    in_dump: list[float] = []  # ... an ovs-ofctl dump
    scraped = 0
    for _ in range(6):
        for loop, samples, overlapping in ((scrape_loop, during, in_scrape), (ofctl_loop, during_ofctl, in_dump)):
            stop.clear()
            reader = asyncio.ensure_future(loop())
            samples += await change_some(max(25, args.changes // 20), seconds=2.0, overlapping=overlapping)
            stop.set()
            count = await reader
            scraped += count if loop is scrape_loop else 0
    for samples in (during, during_ofctl, in_scrape, in_dump):
        samples.sort()
    # as Prometheus scrapes (every 15 s here; its default is 1 min): the p99 of the changes made in
    # 15 s windows with a scrape at their start, against windows as long without one, alternating
    realistic: list[float] = []
    quiet: list[float] = []
    for _ in range(2):
        quiet += await change_some(100, seconds=15.0)
        stop.clear()
        reader = asyncio.ensure_future(scrape_loop(15.0))
        realistic += await change_some(100, seconds=15.0)
        stop.set()
        await reader
    realistic.sort()
    quiet.sort()
    conn.close()
    await metrics.worker().close()
    rss_end_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
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
            # per change, apart from how much of the time is spent reading: the changes that
            # overlapped a scrape against those that overlapped an ovs-ofctl dump
            "overlapping_scrape_p99_ms": round(in_scrape[int(len(in_scrape) * 0.99) - 1], 2),
            "overlapping_dump_p99_ms": round(in_dump[int(len(in_dump) * 0.99) - 1], 2),
            "overlapping_ratio": round(in_scrape[int(len(in_scrape) * 0.99) - 1]
                                       / in_dump[int(len(in_dump) * 0.99) - 1], 3),
            "changes_overlapping": [len(in_scrape), len(in_dump)],
            "change_p99_scraped_every_15s_ms": round(realistic[int(len(realistic) * 0.99) - 1], 2),
            "change_p99_not_scraped_ms": round(quiet[int(len(quiet) * 0.99) - 1], 2),
            "scraped_every_15s_ratio": round(realistic[int(len(realistic) * 0.99) - 1]
                                             / quiet[int(len(quiet) * 0.99) - 1], 3),
            "rss_mb": round(rss_kb / 1024, 1),
            "rss_mb_after_scrapes": round(rss_end_kb / 1024, 1)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True)
    p.add_argument("--services", type=int, default=10000)
    p.add_argument("--endpoints", type=int, default=10)
    p.add_argument("--changes", type=int, default=1000)
    p.add_argument("--dump", default="")
    p.add_argument("--ip-family", choices=["ipv4", "ipv6"], default="ipv4")
    p.add_argument("--sync-only", action="store_true", help="the full sync and the changes only (no scrapes)")
    args = p.parse_args()
    FAMILY[0] = 6 if args.ip_family == "ipv6" else 4
    tune_gc()  # as the agent does
    print(json.dumps(asyncio.run(main_async(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
