"""The Service endpoint counters of /metrics, read by the scrape worker process from a real
ovs-vswitchd, follow what the agent installs: endpoints changed, Services deleted, a worker killed (the next
scrape starts another and tells it everything again)."""

from __future__ import annotations

import asyncio
import ipaddress
import re

from sanderling.agent.metrics import AgentMetrics, Sources
from sanderling.agent.service_proxy import ServiceProxy
from sanderling.agent.sync import SyncLoop
from sanderling.compiler.services import ProxyConfig
from sanderling.openflow.realizer import Realizer

from .test_sync_loop import running, until

CFG = ProxyConfig("n1", (ipaddress.IPv4Address("172.30.0.11"),), (ipaddress.IPv4Address("172.30.0.11"),),
                  ipaddress.IPv4Network("10.244.0.0/16"), ipaddress.IPv4Address("10.244.0.254"),
                  ipaddress.IPv4Network("10.96.0.0/12"))
SAMPLE = re.compile(r'^sanderling_service_endpoint_connections_total\{namespace="(.*?)",service="(.*?)",'
                    r'protocol="(.*?)",port="(.*?)",endpoint="(.*?)"\} (\S+)$')


class NoPods:
    by_ofport: dict = {}


def service(name: str, vip: str) -> dict:
    return {"metadata": {"namespace": "shop", "name": name},
            "spec": {"clusterIP": vip, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}


def endpoint_slice(name: str, addresses: list[str]) -> dict:
    return {"metadata": {"namespace": "shop", "name": f"{name}-a", "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}, "nodeName": "n2"} for a in addresses]}


async def endpoints(metrics: AgentMetrics) -> dict[str, set[str]]:
    """Service -> the endpoints the scrape lists for it (each once, counters at a number)."""
    text = (await metrics.render()).decode()
    found: dict[str, set[str]] = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            assert float(m.group(6)) >= 0
            assert m.group(5) not in found.get(m.group(2), set()), f"{m.group(5)} listed twice"
            found.setdefault(m.group(2), set()).add(m.group(5))
    return found


def test_scrape_worker_follows_installed_services(bridge):
    sync = SyncLoop("n1", bridge.target, Realizer(1), poll_interval=30.0)
    proxy = ServiceProxy(CFG, sync.scope("service"), sync.kick)
    proxy.start()
    metrics = AgentMetrics(Sources(sync, lambda: [], NoPods(), proxy=proxy))

    def change(name: str, vip: str, addresses: list[str] | None) -> None:
        if addresses is None:
            proxy.service_changed(f"shop/{name}", None)
            proxy.slice_changed(f"shop/{name}-a", None)
        else:
            proxy.service_changed(f"shop/{name}", service(name, vip))
            proxy.slice_changed(f"shop/{name}-a", endpoint_slice(name, addresses))
        proxy.flush()

    async def installed() -> None:
        await sync.flush()
        await until("nothing pending", lambda: not sync.realizer.pending)

    async def body() -> None:
        change("web", "10.96.0.10", ["10.244.1.2", "10.244.1.3"])
        change("api", "10.96.0.11", ["10.244.1.4"])
        await installed()
        assert await endpoints(metrics) == {"web": {"10.244.1.2:8080", "10.244.1.3:8080"}, "api": {"10.244.1.4:8080"}}
        first = metrics.worker().proc
        assert first is not None and first.returncode is None

        change("web", "10.96.0.10", ["10.244.1.2", "10.244.1.9"])  # one endpoint replaced
        change("api", "10.96.0.11", None)  # deleted
        await installed()
        assert await endpoints(metrics) == {"web": {"10.244.1.2:8080", "10.244.1.9:8080"}}
        assert metrics.worker().proc is first, "one worker for every scrape"

        first.kill()  # a worker that died: the next scrape starts another, which learns every label
        await first.wait()
        change("db", "10.96.0.12", ["10.244.1.7"])
        await installed()
        assert await endpoints(metrics) == {"web": {"10.244.1.2:8080", "10.244.1.9:8080"}, "db": {"10.244.1.7:8080"}}
        assert metrics.worker().proc is not first

        await metrics.worker().close()

    asyncio.run(running(sync, body))
