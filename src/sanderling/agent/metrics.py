"""The agent's Prometheus metrics, labelled in Kubernetes terms.

Two kinds. Event metrics (sync durations, CNI requests, proxy compiles, network programming
latency) are observed as they happen through hooks the sync loop, the CNI handler and the
Service proxy call. Dataplane metrics are read from the switch at scrape time: OVS already
counts every flow, group bucket, table, meter and port, and every flow's cookie names its owner,
so a scrape asks for those counters (a few OpenFlow stats requests on the agent's own session,
awaited like any other message, so the dataplane work interleaves; the group statistics, by far
the largest, through a worker process: agent/scrape_worker.py) and labels them:

- a Service group's bucket counts the connections that chose that endpoint (a group sees only a
  connection's first packet): `sanderling_service_endpoint_connections_total`;
- a NetworkPolicy rule's flow (its `conj_id` flow, or its direct allow flow) sees only the first
  packet of a connection (established traffic passes before the rule tables):
  `sanderling_policy_rule_connections_total` / `..._bytes_total`; an isolated pod's default-deny
  flows count the connections refused: `sanderling_policy_default_deny_connections_total`;
- a pod's port: `sanderling_pod_{rx,tx}_{packets,bytes}_total` (rx = what the pod received).

Label sets are bounded by the cluster's objects (no per-connection label).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sanderling.agent.scrape_worker import ScrapeWorker
from sanderling.compiler.services import bucket_endpoints
from sanderling.openflow import cookies
from sanderling.openflow.pipeline import PIPELINE

log = logging.getLogger(__name__)

LABEL_SLICE = 10  # Services labelled between two yields to the loop (~0.3 ms of work)
SYNC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
PROGRAMMING_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


@dataclass
class Sources:
    """What the metrics read; the parts the agent runs without (proxy, policy, CNI) stay None."""

    sync: Any  # SyncLoop
    informers: Callable[[], list[Any]]
    pods: Any  # PodFlows
    proxy: Any = None  # ServiceProxy
    policy: Any = None  # PolicyAgent
    pools: Callable[[], list[tuple[str, int, int]]] | None = None  # (pool, in use, free)


class AgentMetrics:
    def __init__(self, sources: Sources) -> None:
        self.sources = sources
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.sync_seconds = Histogram("sanderling_sync_duration_seconds",
                                      "Time to send one bundle of changed objects to the switch (or a full resync)",
                                      buckets=SYNC_BUCKETS, registry=r)
        self.bundles = Counter("sanderling_bundles", "Bundles the switch committed", ["result"], registry=r)
        self.refused = Counter("sanderling_objects_refused_by_switch",
                               "Objects whose flows the switch refused (each kept its previous flows)", registry=r)
        self.proxy_seconds = Histogram("sanderling_sync_proxy_rules_duration_seconds",
                                       "Time to compile the Services changed since the last compile "
                                       "(kube-proxy's sync_proxy_rules_duration_seconds)",
                                       buckets=SYNC_BUCKETS, registry=r)
        self.programming = Histogram("sanderling_network_programming_duration_seconds",
                                     "From an EndpointSlice change (its trigger time, else when the agent got "
                                     "it) to its Service's flows installed (kube-proxy's "
                                     "network_programming_duration_seconds)", buckets=PROGRAMMING_BUCKETS,
                                     registry=r)
        self.cni_seconds = Histogram("sanderling_cni_request_duration_seconds",
                                     "CNI requests answered by this agent, by command", ["command"],
                                     buckets=SYNC_BUCKETS, registry=r)
        self.cni_steps = Histogram("sanderling_cni_add_step_duration_seconds",
                                   "The steps of the ADDs this agent answered: ipam (address chosen and "
                                   "recorded), plumbing (veth made and addressed), ovsdb (port added, "
                                   "applied by ovs-vswitchd), flows (the pod's flows installed)", ["step"],
                                   buckets=SYNC_BUCKETS, registry=r)
        self.cni_failures = Counter("sanderling_cni_failures", "CNI requests answered with an error",
                                    ["command", "code"], registry=r)
        self._worker: ScrapeWorker | None = None
        # the bucket labels the worker has: Service -> {group id: the installed group they describe}
        self._sent_groups: dict[str, dict[int, Any]] = {}
        self._labels_generation = 0
        self._installed_changes = sources.sync.realizer.watch_installed("service/")
        r.register(_Collector(self))
        sources.sync.sync_observers.append(self._synced)

    # ---- hooks ---------------------------------------------------------------------------------

    def _synced(self, seconds: float, sent: int, refused: int) -> None:
        self.sync_seconds.observe(seconds)
        if sent:
            self.bundles.labels("committed").inc()
        if refused:
            self.refused.inc(refused)
        proxy = self.sources.proxy
        if proxy is None or not proxy.changed_at:
            return
        sync, now = self.sources.sync, time.time()
        pending = sync.realizer.pending
        for key, changed in list(proxy.changed_at.items()):
            object_key = f"service/{key}"
            if object_key in pending:
                continue
            if sync.installed(object_key):
                self.programming.observe(max(0.0, now - changed))
            del proxy.changed_at[key]  # installed, or gone (deleted, headless, refused: nothing to time)

    def proxy_compiled(self, seconds: float) -> None:
        self.proxy_seconds.observe(seconds)

    def cni_step(self, step: str, seconds: float) -> None:
        self.cni_steps.labels(step).observe(seconds)

    def cni_answered(self, command: str, seconds: float, code: int | None) -> None:
        self.cni_seconds.labels(command).observe(seconds)
        if code is not None:
            self.cni_failures.labels(command, str(code)).inc()

    # ---- scrape --------------------------------------------------------------------------------

    async def render_chunks(self) -> AsyncIterator[bytes]:
        """The exposition text: the agent's own metrics, then the dataplane's counters read now.

        The dataplane's families are written here directly: at 10,000 Services x 10 endpoints they
        hold 100,000 samples, and formatting them through prometheus_client objects alone took
        seconds; their label values are Kubernetes names, addresses and numbers. The biggest,
        the Service endpoints', comes from the scrape worker (agent/scrape_worker.py)."""
        yield generate_latest(self.registry)
        try:
            dataplane = await self._read_dataplane()
        except Exception as exc:  # no session right now: the agent's own metrics still answer
            log.debug("metrics: dataplane counters not read: %s", exc)
            return
        yield "".join(dataplane).encode()
        if self.sources.proxy is None or self.sources.sync.conn is None:
            return
        try:
            await self._send_bucket_labels()
            async for chunk in self.worker().scrape():
                yield chunk
        except RuntimeError as exc:
            log.warning("metrics: Service endpoint counters not read: %s", exc)

    async def render(self) -> bytes:
        return b"".join([chunk async for chunk in self.render_chunks()])

    async def close(self) -> None:
        if self._worker is not None:
            await self._worker.close()

    def worker(self) -> ScrapeWorker:
        if self._worker is None:
            self._worker = ScrapeWorker(self.sources.sync.target)
        return self._worker

    async def _send_bucket_labels(self) -> None:
        """Tell the worker which endpoint each bucket of the groups installed since the last
        scrape stands for, and which groups are gone. Only the Services whose installed state
        changed are looked at (the realizer logs them); all of them for a new worker or after a
        resync, in slices of LABEL_SLICE Services so that a change arriving meanwhile waits for
        one slice, not for all of them."""
        worker = self.worker()
        await worker.started()
        everything, changed = self._installed_changes.take()
        if worker.generation != self._labels_generation:
            self._labels_generation, self._sent_groups, everything = worker.generation, {}, True
        prefix = self._installed_changes.prefix
        keys = (set(self.sources.proxy.group_ids.services()) | set(self._sent_groups) if everything
                else {key[len(prefix):] for key in changed})
        realizer, ids_of = self.sources.sync.realizer, self.sources.proxy.group_ids.of
        changes: dict[int, list[str | None] | None] = {}
        for n, svc_key in enumerate(sorted(keys)):
            if n % LABEL_SLICE == LABEL_SLICE - 1:
                if changes:
                    await worker.send_labels(changes)
                    changes = {}
                await asyncio.sleep(0)
            state = realizer.installed(prefix + svc_key)
            before, now = self._sent_groups.pop(svc_key, {}), {}
            for group_key, gid in ids_of(svc_key).items() if state is not None else ():
                group = state.groups.get(gid)
                if group is None:
                    continue  # compiled, not installed yet: its installation is logged in turn
                now[gid] = group
                if before.get(gid) is not group:
                    changes[gid] = _bucket_labels(svc_key, group_key, group)
            changes.update((gid, None) for gid in before if gid not in now)
            if now:
                self._sent_groups[svc_key] = now
        if changes:
            await worker.send_labels(changes)

    def _agent_families(self) -> Iterator[Metric]:
        sync = self.sources.sync
        informers = self.sources.informers()
        synced = GaugeMetricFamily("sanderling_informer_synced", "1 once the informer has listed", labels=["resource"])
        watching = GaugeMetricFamily("sanderling_informer_watching", "1 while its watch stream is open",
                                     labels=["resource"])
        events = CounterMetricFamily("sanderling_informer_events", "Changes the informer handed on",
                                     labels=["resource"])
        for informer in informers:
            synced.add_metric([informer.name], 1.0 if informer.synced.is_set() else 0.0)
            watching.add_metric([informer.name], 1.0 if getattr(informer, "watching", False) else 0.0)
            events.add_metric([informer.name], float(getattr(informer, "events", 0)))
        yield from (synced, watching, events)
        yield _gauge("sanderling_generation", "Flow generation of this agent run", sync.realizer.generation)
        yield _gauge("sanderling_openflow_connected", "1 while the OpenFlow session is up", sync.conn is not None)
        yield _counter("sanderling_openflow_reconnects", "OpenFlow sessions opened after the first",
                       max(0, sync.resyncs - 1))
        yield _gauge("sanderling_objects_pending", "Desired objects not yet sent", len(sync.realizer.pending))
        yield _gauge("sanderling_objects_refused", "Objects the switch refused (see /readyz)",
                     len(sync.realizer.errors))
        pins = CounterMetricFamily("sanderling_packet_ins", "Packets sent to the agent, by the table that sent them",
                                   labels=["table"])
        for table, count in sorted(sync.packet_ins.items()):
            pins.add_metric([_table_name(table)], float(count))
        yield pins
        if self.sources.pools is not None:
            used = GaugeMetricFamily("sanderling_ipam_addresses_in_use", "Addresses allocated", labels=["pool"])
            free = GaugeMetricFamily("sanderling_ipam_addresses_free", "Addresses left", labels=["pool"])
            for pool, in_use, left in self.sources.pools():
                used.add_metric([pool], in_use)
                free.add_metric([pool], left)
            yield used
            yield free

    async def _read_dataplane(self) -> list[str]:
        conn = self.sources.sync.conn
        if conn is None:
            return []
        out: list[str] = []
        tables = [((_table_name(t.table_id),), t.active_count, t.lookup_count) for t in await conn.table_stats()
                  if t.table_id < len(PIPELINE.tables)]
        out.append(_family("sanderling_flows", "gauge", "Flows in each pipeline table (learned ones included)",
                           ("table",), ((labels, active) for labels, active, _ in tables)))
        out.append(_family("sanderling_table_lookups", "counter", "Packets looked up in each pipeline table",
                           ("table",), ((labels, lookups) for labels, _, lookups in tables)))
        if self.sources.sync.meters:
            meters = await conn.meter_stats()
            out.append(_family("sanderling_meter_drops", "counter", "Packets a rate limit (meter) dropped", ("meter",),
                               [((str(m.meter_id),), sum(m.band_packets)) for m in meters]))
        out += self._pod_families(await conn.port_stats())
        if self.sources.policy is not None:
            policy_flows = await conn.flow_stats(cookie=int(cookies.Category.POLICY) << cookies.CATEGORY_SHIFT,
                                                 cookie_mask=cookies.CATEGORY_MASK)
            out += self._policy_families(policy_flows)
        return out

    def _pod_families(self, ports: list[Any]) -> list[str]:
        pods = self.sources.pods.by_ofport
        rows = [((pod.namespace, pod.name, pod.interface), stat) for stat in ports
                if (pod := pods.get(stat.port_no)) is not None]
        labels = ("namespace", "pod", "interface")
        # the switch's tx on the pod's port is what the pod received
        return [
            _family("sanderling_pod_rx_packets", "counter", "Packets the pod's interface received", labels,
                    ((k, s.tx_packets) for k, s in rows)),
            _family("sanderling_pod_tx_packets", "counter", "Packets the pod's interface sent", labels,
                    ((k, s.rx_packets) for k, s in rows)),
            _family("sanderling_pod_rx_bytes", "counter", "Bytes the pod's interface received", labels,
                    ((k, s.tx_bytes) for k, s in rows)),
            _family("sanderling_pod_tx_bytes", "counter", "Bytes the pod's interface sent", labels,
                    ((k, s.rx_bytes) for k, s in rows)),
        ]

    def _policy_families(self, flows: list[Any]) -> list[str]:
        policy = self.sources.policy
        rules = policy.rules_by_cookie
        deny_owner = {cookies.cookie(cookies.Category.POLICY, f"isolated/{key}"): key for key in policy._isolated}
        rule_tables = {PIPELINE["IngressRule"]: "ingress", PIPELINE["EgressRule"]: "egress"}
        connections: dict[tuple[str, ...], float] = defaultdict(float)
        nbytes: dict[tuple[str, ...], float] = defaultdict(float)
        denied: dict[tuple[str, ...], float] = defaultdict(float)
        for stat in flows:
            cookie = cookies.with_generation(stat.cookie, 0)
            rule = rules.get(cookie)
            if rule is not None:  # NS/NAME/direction/index/variant
                parts = rule.split("/")
                if len(parts) >= 4:
                    labels = (parts[0], parts[1], parts[2], parts[3])
                    connections[labels] += stat.packet_count
                    nbytes[labels] += stat.byte_count
                continue
            pod = deny_owner.get(cookie)
            if pod is not None and stat.table_id in rule_tables:
                namespace, _, name = pod.partition("/")
                denied[(namespace, name, rule_tables[stat.table_id])] += stat.packet_count
        rule_labels = ("namespace", "policy", "direction", "rule")
        return [
            _family("sanderling_policy_rule_connections", "counter",
                    "Connections a NetworkPolicy rule allowed on this node (first packets)", rule_labels,
                    sorted(connections.items())),
            _family("sanderling_policy_rule_bytes", "counter",
                    "Bytes of the first packets of the connections a rule allowed", rule_labels,
                    sorted(nbytes.items())),
            _family("sanderling_policy_default_deny_connections", "counter",
                    "Connection attempts (first packets, retries included) refused because no rule of an "
                    "isolated pod allowed them", ("namespace", "pod", "direction"), sorted(denied.items())),
        ]


def _bucket_labels(svc_key: str, group_key: str, group: Any) -> list[str | None]:
    """The label set of each bucket's endpoint (None: the bucket hands over to a sub-group)."""
    namespace, _, name = svc_key.partition("/")
    parts = group_key[len(svc_key) + 1:].split("/")  # PROTO/PORT/cluster|local[/sub-index]
    if len(parts) < 3:
        return [None] * len(group.buckets)
    prefix = (f'namespace="{_escape(namespace)}",service="{_escape(name)}",protocol="{_escape(parts[0])}",'
              f'port="{_escape(parts[1])}",endpoint="')
    return [None if ep is None else f'{prefix}{ep}"' for ep in bucket_endpoints(group)]


def _escape(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def _family(name: str, kind: str, doc: str, labelnames: tuple[str, ...],
            rows: Any) -> str:
    """One metric family in the text format; counters get the `_total` suffix."""
    sample = f"{name}_total" if kind == "counter" else name
    lines = [f"# HELP {sample} {doc}\n# TYPE {sample} {kind}\n"]
    for labels, value in rows:
        inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in zip(labelnames, labels, strict=True))
        lines.append(f"{sample}{{{inner}}} {float(value)}\n")
    return "".join(lines)


class _Collector:
    """Hands prometheus_client the metrics computed at scrape time."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics._agent_families()


def _table_name(table_id: int) -> str:
    return PIPELINE.name_of(table_id) if 0 <= table_id < len(PIPELINE.tables) else str(table_id)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=float(value))
