"""`sanderling-agent`: the per-node process."""

from __future__ import annotations

import asyncio
import functools
import gc
import ipaddress
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sanderling.agent.config import AgentConfig, ConfigError
from sanderling.agent.config import load as load_config
from sanderling.agent.node_flows import NodeFlows
from sanderling.agent.nodeport_steering import NodePortSteering
from sanderling.agent.pod_flows import PodFlows
from sanderling.agent.pods_source import PodsOfPorts
from sanderling.agent.sync import SyncLoop
from sanderling.cni.handler import CniHandler
from sanderling.cni.install import compiled_shim, install_binary, write_conflist
from sanderling.cni.server import CniServer
from sanderling.compiler.nodes import TUNNEL_OFPORT, TUNNEL_PORT_NAME
from sanderling.ipam.allocator import Allocator, Pool
from sanderling.ipam.store import AllocationStore
from sanderling.model.attachments import SANDERLING_TYPE
from sanderling.model.errors import ModelError
from sanderling.model.network import NodeNetwork
from sanderling.model.nodes import Remote
from sanderling.netlink import veth
from sanderling.netlink.gateway import ensure_gateway
from sanderling.netlink.routes import link_local_toward, sync_routes
from sanderling.openflow import cookies
from sanderling.openflow.pipeline import PIPELINE
from sanderling.openflow.realizer import Realizer
from sanderling.ovs.ovsdb import Ovsdb
from sanderling.ovs.runtime import SYSTEM_RUNDIR, OvsError, OvsRuntime

log = logging.getLogger("sanderling.agent")

GENERATION_KEY = "sanderling.io/generation"


def tune_gc() -> None:
    """The agent holds hundreds of thousands of long-lived immutable flow objects; the default
    collector thresholds rescan them over and over while a big sync allocates (measured: 40% of
    compiling 10,000 Services). Collect the young generation less often; nothing here is cyclic
    garbage in bulk."""
    gc.set_threshold(50_000, 20, 50)


def install_cni(args: AgentConfig, secondary: bool) -> None:
    """The plugin and the conflist on the host (the agent at start; `sanderling node install-cni`,
    the DaemonSet's init container, the same before the agent runs)."""
    compiled = compiled_shim(args.cni_shim)
    install_binary(args.cni_bin_dir, socket=args.cni_socket, interpreter=args.cni_interpreter, compiled=compiled)
    if secondary:  # the plugin of `"type": "sanderling"` networks (Multus calls it by that name)
        install_binary(args.cni_bin_dir, SANDERLING_TYPE, socket=args.cni_socket, interpreter=args.cni_interpreter,
                       compiled=compiled)
    write_conflist(args.cni_conf_dir, args.cni_network, args.cni_socket, args.mtu, version=args.cni_conf_version)


def use_api_server(args: AgentConfig) -> None:
    """`kube-api-server` replaces the `kubernetes` Service in the in-cluster credentials: every
    client of this process (and of the workers it starts) reads KUBERNETES_SERVICE_HOST/PORT."""
    if args.kube_api_server and args.kubeconfig is None:
        import urllib.parse

        url = urllib.parse.urlsplit(args.kube_api_server)
        os.environ["KUBERNETES_SERVICE_HOST"] = url.hostname or ""
        os.environ["KUBERNETES_SERVICE_PORT"] = str(url.port or 443)


def _kube_enabled(args: AgentConfig) -> bool:
    return args.kubeconfig is not None or bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def _async_client(args: AgentConfig) -> Any:
    from lightkube import AsyncClient, KubeConfig

    config = (KubeConfig.from_file(str(args.kubeconfig)) if args.kubeconfig is not None
              else KubeConfig.from_service_account())
    return AsyncClient(config=config, field_manager="sanderling-agent")


def _remembered_node(args: AgentConfig) -> Path:
    return args.state_dir / args.node / "node.json"


async def _own_node(args: AgentConfig) -> dict[str, Any]:
    """This node's Node object once it has a spec.podCIDR; wait (logging why) until then.

    What it said is remembered in the state directory: an agent restarted while the API is
    unreachable starts from it (its node's pods keep working and CNI ADDs go on) instead of
    waiting; its informers list when the API is back."""
    import json

    from sanderling.kube.client import KubeApi

    remembered = _remembered_node(args)
    api = await asyncio.to_thread(KubeApi, args.kubeconfig, 3)
    said = ""
    while True:
        try:
            node = await asyncio.to_thread(api.node, args.node)
            why = "no Node object yet" if node is None else "its Node has no spec.podCIDR yet"
            if node is not None and (node.get("spec") or {}).get("podCIDR"):
                remembered.parent.mkdir(parents=True, exist_ok=True)
                remembered.write_text(json.dumps({"spec": node["spec"], "status": {
                    "addresses": (node.get("status") or {}).get("addresses") or []}}))
                return node
        except Exception as exc:  # API not reachable yet: keep trying
            why = f"API not reachable ({exc})"
            if remembered.exists():
                log.warning("node %s: API not reachable (%s); starting from the pod CIDR remembered in %s",
                            args.node, exc, remembered)
                return dict(json.loads(remembered.read_text()))
        if why != said:
            log.info("node %s: waiting for its pod CIDR: %s", args.node, why)
            said = why
        await asyncio.sleep(0.5)


def _check_permissions(args: AgentConfig) -> None:
    """Stop at once, naming it, if the API denies a permission the agent needs; an API that does
    not answer now is not a reason to stop (the node keeps working on what it remembers)."""
    from sanderling.agent import permissions
    from sanderling.kube.client import KubeApi

    try:
        permissions.check(KubeApi(args.kubeconfig, timeout=3).client)
    except permissions.MissingPermission:
        raise
    except Exception as exc:
        log.warning("node %s: permissions not checked, the API did not answer (%s)", args.node, exc)


def masquerade_ip(node: NodeNetwork) -> ipaddress.IPv4Address | None:
    """The node's masquerade address for services: the last usable one of its pod subnet (kept out
    of IPAM), so replies to it route into br-int on every node like any pod address. None on an
    IPv6-only node."""
    return node.pod_cidr.broadcast_address - 1 if node.pod_cidr is not None else None


def masquerade_ip6(node: NodeNetwork) -> ipaddress.IPv6Address | None:
    """A dual-stack or IPv6-only node's IPv6 masquerade address: the last but one of its IPv6 pod subnet (far
    above the addresses IPAM hands out, and reserved anyway)."""
    return node.pod_cidr6.broadcast_address - 1 if node.pod_cidr6 is not None else None


def proxy_config(args: AgentConfig, node: NodeNetwork, node_ips: list[str]) -> Any:
    from sanderling.compiler.services import ProxyConfig

    ips = tuple(ipaddress.IPv4Address(ip) for ip in node_ips if ":" not in ip)
    ranges = [ipaddress.IPv4Network(c, strict=False) for c in args.node_port_addresses.split(",") if c.strip()]
    return ProxyConfig(
        node_name=node.name, node_ips=ips, node_port_ips=tuple(ip for ip in ips if not ranges
                                                               or any(ip in r for r in ranges)),
        local_cidr=ipaddress.IPv4Network(args.cluster_cidr), masq_ip=masquerade_ip(node),
        service_cidr=ipaddress.IPv4Network(args.service_cidr), masquerade_all=args.masquerade_all,
        external_ip_cidrs=tuple(ipaddress.IPv4Network(c.strip(), strict=False)
                                for c in args.external_ip_cidrs.split(",") if c.strip()),
        answer_masq_arp=True, gateway_mac=node.gateway_mac, masq_ip6=masquerade_ip6(node),
        # NodePorts on the node's IPv6 addresses (nodePortAddresses are IPv4 CIDRs)
        node_port_ips6=tuple(ipaddress.IPv6Address(ip) for ip in node_ips if ":" in ip)
        if node.pod_cidr6 is not None else (),
        local_cidr6=ipaddress.IPv6Network(args.cluster_cidr6) if args.cluster_cidr6 else node.pod_cidr6,
        service_cidr6=ipaddress.IPv6Network(args.service_cidr6) if args.service_cidr6 else None)


def start_proxy(client: Any, api: Any, cfg: Any, sync: SyncLoop, node_flows: NodeFlows,
                args: AgentConfig, sources: Any = None) -> tuple[list[Any], NodePortSteering | None]:
    """Service and EndpointSlice informers feeding the kube-proxy replacement, and the NodePort
    steering (routed through the node: --gateway)."""
    from lightkube.resources.core_v1 import Service
    from lightkube.resources.discovery_v1 import EndpointSlice

    from sanderling.agent.health_check import HealthChecks
    from sanderling.agent.service_proxy import ServiceProxy
    from sanderling.kube.informer import Informer

    def report(namespace: str, name: str, message: str) -> None:
        asyncio.get_running_loop().run_in_executor(
            None, lambda: api.event(namespace, name, "InvalidService", message, args.node, kind="Warning",
                                    involved_kind="Service"))

    from sanderling.compiler.services import REJECT_METER, REJECT_RATE_PPS
    from sanderling.openflow.ir import Meter

    sync.meters.append(Meter(REJECT_METER, REJECT_RATE_PPS, REJECT_RATE_PPS // 4))
    steering = NodePortSteering(cfg, node_flows.node, sync, args.node_netns, args.bridge) if args.gateway else None
    proxy = ServiceProxy(cfg, sync.scope("service"), sync.kick, report,
                         schedule=asyncio.get_running_loop().call_soon)
    health = HealthChecks(cfg.node_name)

    def health_changed(ports: dict[int, tuple[str, int]]) -> None:
        async def apply() -> None:
            await health.update(ports)
            # the health ports are served by the node itself, not steered into br-int; endpoint
            # changes alter only their answers, so the filters change only with the set of ports
            if steering is not None:
                await steering.steer(keep=tuple(sorted(ports)))
        asyncio.ensure_future(apply())

    proxy.on_health = health_changed
    proxy.start()
    if sources is not None:
        sources.proxy = proxy
    informers = [Informer(client, Service, proxy.service_changed), Informer(client, EndpointSlice, proxy.slice_changed)]
    log.info("node %s: kube-proxy replacement on (service CIDR %s, masquerade address %s, node ports on %s)",
             cfg.node_name, cfg.service_cidr, cfg.masq_ip, ", ".join(map(str, cfg.node_port_ips)) or "nothing")
    return informers, steering


async def open_gate(informers: list[Any], sync: SyncLoop, view: Any) -> None:
    """The readiness gate: once every informer has listed, the sync loop may install the whole
    desired state and sweep the previous generation (see agent/sync.py)."""
    started = time.monotonic()
    for informer in informers:
        await informer.synced.wait()
    # the other nodes' destinations from the complete listing, before the sweep: the cluster
    # view derives them on events, and a quiet cluster may send none after the lists (the chaos
    # run caught a restarted agent sweeping every route to other nodes until a Node heartbeat)
    await view.synced()
    assert sync.gate is not None
    sync.gate.set()
    sync.kick()
    log.info("node %s: %d informers listed in %.2f s", sync.name, len(informers),
             time.monotonic() - started)


def policy_informers(client: Any, api: Any, sync: SyncLoop, args: AgentConfig, sources: Any = None,
                     pod_hooks: tuple[Callable[[str, Any], None], ...] = (),
                     namespace_hooks: tuple[Callable[[str, Any], None], ...] = ()) -> list[Any]:
    """NetworkPolicy, Namespace and Pod informers feeding policy enforcement (and, through the
    hooks, whoever else needs every Pod and Namespace: one watch each)."""
    from lightkube.resources.core_v1 import Namespace, Pod
    from lightkube.resources.networking_v1 import NetworkPolicy

    from sanderling.agent.policy_agent import PolicyAgent
    from sanderling.kube.informer import Informer

    def report(namespace: str, name: str, message: str) -> None:
        asyncio.get_running_loop().run_in_executor(
            None, lambda: api.event(namespace, name, "InvalidNetworkPolicy", message, args.node,
                                    involved_kind="NetworkPolicy", api_version="networking.k8s.io/v1"))

    agent = PolicyAgent(args.node, sync.scope("policy"), sync.kick, asyncio.get_running_loop().call_soon, report)
    agent.start()
    if sources is not None:
        sources.policy = agent
    from sanderling.compiler.policy import LOG_METER, LOG_RATE_PPS
    from sanderling.openflow.ir import Meter

    sync.meters.append(Meter(LOG_METER, LOG_RATE_PPS, LOG_RATE_PPS // 5))
    sync.packet_in_hooks.append(agent.packet_in)
    return [Informer(client, NetworkPolicy, agent.policy_changed),
            Informer(client, Pod, fan_out(agent.pod_changed, *pod_hooks)),
            Informer(client, Namespace, fan_out(agent.namespace_changed, *namespace_hooks), namespaced=False)]


def fan_out(*hooks: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
    """One informer callback calling several consumers in turn."""
    if len(hooks) == 1:
        return hooks[0]

    def call(key: str, obj: Any) -> None:
        for hook in hooks:
            hook(key, obj)
    return call


def secondary_informers(client: Any, multi: Any, services: Any) -> list[Any]:
    """The informers only secondary networks need: NADs (both), MultiNetworkPolicies, Services."""
    from lightkube.resources.core_v1 import Service

    from sanderling.kube.client import MultiNetworkPolicyResource, NadResource
    from sanderling.kube.informer import Informer

    nad_hooks = [c.nad_changed for c in (multi, services) if c is not None]
    informers = [Informer(client, NadResource, fan_out(*nad_hooks))] if nad_hooks else []
    if multi is not None:
        informers.append(Informer(client, MultiNetworkPolicyResource, multi.policy_changed))
    if services is not None:
        informers.append(Informer(client, Service, services.service_changed))
    return informers


def multi_policy_served(args: AgentConfig) -> bool:
    """Whether the cluster serves MultiNetworkPolicy (its CRD is in deploy/crds); without it
    secondary networks are unfiltered, and the log says so (blocking: run it in a thread). An API
    that does not answer now is no reason to stop (an agent restarts while the control plane is
    down): assume it does, its informer retries."""
    from lightkube import ApiError

    from sanderling.kube.client import KubeApi, MultiNetworkPolicyResource

    try:
        client = KubeApi(args.kubeconfig, timeout=3).client
        next(iter(client.list(MultiNetworkPolicyResource, namespace="*", chunk_size=1)), None)
    except ApiError as exc:
        if exc.status.code == 404:
            log.warning("node %s: the API serves no MultiNetworkPolicy (k8s.cni.cncf.io/v1beta1): secondary "
                        "networks are not filtered; install deploy/crds/multi-networkpolicies.k8s.cni.cncf.io.yaml",
                        args.node)
            return False
        log.warning("node %s: MultiNetworkPolicy not listed (%s); watching it anyway", args.node, exc)
    except Exception as exc:
        log.warning("node %s: MultiNetworkPolicy not listed, the API did not answer (%s); watching it anyway",
                    args.node, exc)
    return True


class SecondaryFlusher:
    """Installs what the secondary networks' producers (MultiNetworkPolicy, Services) changed on
    the node's secondary bridges: coalesced, off the loop (ovs-ofctl blocks)."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.bridges: Any = None  # set once the bridges exist
        self._loop = asyncio.get_running_loop()
        self._pending = False

    def changed(self) -> None:
        if not self._pending:
            self._pending = True
            self._loop.run_in_executor(None, self._install)

    def _install(self) -> None:
        self._pending = False
        if self.bridges is not None:
            try:
                self.bridges.flush_policy()
            except Exception as exc:
                log.error("node %s: secondary-network flows not installed: %s", self.node, exc)


def _reporter(api: Any, args: AgentConfig, reason: str, kind: str, api_version: str) -> Callable[[str, str, str], None]:
    loop = asyncio.get_running_loop()

    def report(namespace: str, name: str, message: str) -> None:
        loop.run_in_executor(None, lambda: api.event(namespace, name, reason, message, args.node,
                                                     involved_kind=kind, api_version=api_version))
    return report


def multi_policy_agents(api: Any, args: AgentConfig, flusher: SecondaryFlusher) -> Any:
    """The MultiNetworkPolicy agents of this node (their bridges are attached later)."""
    from sanderling.agent.multi_policy import MultiPolicyAgents

    return MultiPolicyAgents(args.node, flusher.changed, asyncio.get_running_loop().call_soon,
                             _reporter(api, args, "MultiNetworkPolicyNotEnforced", "MultiNetworkPolicy",
                                       "k8s.cni.cncf.io/v1beta1"))


def network_services(api: Any, args: AgentConfig, flusher: SecondaryFlusher) -> Any:
    """Services on secondary networks (their bridges are attached later); this node's
    EndpointSlices of them are written off the loop."""
    from sanderling.agent.network_services import NetworkServices

    loop = asyncio.get_running_loop()

    def write(namespace: str, name: str, obj: dict[str, Any] | None) -> None:
        loop.run_in_executor(None, _write_slice, api, namespace, name, obj)

    return NetworkServices(args.node, flusher.changed, write,
                           _reporter(api, args, "NetworkServiceNotBalanced", "Service", "v1"))


class VirtualIps:
    """Virtual IPs of Services on secondary networks, from the network's IPPool (blocking: run in a
    thread). The address is written into the Service's annotations, with the pool it came from."""

    def __init__(self, cluster: Any, api: Any, node: str) -> None:
        self.cluster = cluster
        self.api = api
        self.node = node

    def allocate(self, svc: Any) -> None:
        from lightkube.resources.core_v1 import Service
        from lightkube.types import PatchType

        from sanderling.model.network_services import NETWORK_IP, NETWORK_IP_POOL

        where = f"service/{svc.key}"
        try:
            pools = self.cluster.pools(svc.network)
            if not pools:
                raise RuntimeError(f"network {svc.network} has no IPPool yet (it is made with the network's first "
                                   "pod); give the address in service.sanderling.io/network-ip")
            ip = self.cluster.allocate_service(pools[0], svc.key)
            self.api.client.patch(Service, svc.name, {"metadata": {"annotations": {
                NETWORK_IP: ip, NETWORK_IP_POOL: pools[0].name}}}, namespace=svc.namespace,
                patch_type=PatchType.MERGE)
            log.info("%s: virtual IP %s on %s from IPPool %s", where, ip, svc.network, pools[0].name)
        except Exception as exc:
            log.error("%s: no virtual IP allocated: %s", where, exc)
            self.api.event(svc.namespace, svc.name, "NetworkServiceNotBalanced",
                           f"{where}: no virtual IP allocated on {svc.network}: {exc}", self.node,
                           involved_kind="Service")

    def release(self, svc: Any) -> None:
        try:
            self.cluster.release_service(svc.vip_pool, svc.key)
        except Exception as exc:
            log.error("service/%s: virtual IP %s not given back to IPPool %s: %s", svc.key, svc.vip, svc.vip_pool, exc)


def _write_slice(api: Any, namespace: str, name: str, obj: dict[str, Any] | None) -> None:
    from lightkube import ApiError, codecs
    from lightkube.resources.discovery_v1 import EndpointSlice

    from sanderling.kube.apply import create_or_replace

    try:
        if obj is None:
            api.client.delete(EndpointSlice, name, namespace=namespace)
        else:
            create_or_replace(api.client, codecs.from_dict(obj))
    except ApiError as exc:
        if obj is not None or exc.status.code != 404:
            log.error("endpointslice/%s/%s: not written: %s", namespace, name, exc)
    except Exception as exc:
        log.error("endpointslice/%s/%s: not written: %s", namespace, name, exc)


async def publish_next_hop6(args: AgentConfig, address: str) -> None:
    """Routed dual-stack: other nodes route this node's IPv6 pod subnet to the link-local address
    of its underlay interface (Linux takes no IPv4 next hop for an IPv6 route), which they read from
    an annotation of this Node. Retried while the address is tentative or the API refuses."""
    from sanderling.kube.client import KubeApi
    from sanderling.model.nodes import NEXT_HOP6

    problem = ""
    for _ in range(120):
        hop = await asyncio.to_thread(link_local_toward, args.node_netns, address)
        if hop is None:
            problem = f"no IPv6 link-local address on the interface holding {address}"
        else:
            try:
                api = KubeApi(args.kubeconfig, timeout=5)
                await asyncio.to_thread(api.annotate_node, args.node, {NEXT_HOP6: hop})
                log.info("node %s: IPv6 pod subnet reachable via %s (annotation %s)", args.node, hop, NEXT_HOP6)
                return
            except Exception as exc:
                problem = f"annotating node {args.node}: {exc}"
        await asyncio.sleep(1.0)
    log.error("node %s: IPv6 next hop not published (%s): other nodes cannot route to its IPv6 pods",
              args.node, problem)


class RouteKeeper:
    """Kernel routes the agent owns (other nodes' destinations, the service CIDR), synced off the
    event loop, latest wins. Routed mode: other nodes' destinations via their underlay address.
    Overlay mode (`local_via`: the node's masquerade address per family, on br-int): the same
    destinations into br-int, which tunnels them, so the node itself reaches other nodes' pods."""

    def __init__(self, netns: str | None, extra: dict[str, str] | None = None,
                 local_via: dict[int, str] | None = None) -> None:
        self.netns = netns
        self.extra = extra or {}
        self.local_via = local_via
        self._wanted: dict[str, str] | None = None
        self._prune = False  # until the cluster has been listed, routes of a previous agent stay
        self._running = False

    def update(self, remotes: list[Remote] | None) -> None:
        """Other nodes' destinations from the cluster view; None before it has listed (only the
        extra routes are ensured, nothing is removed)."""
        if self.local_via is not None:
            via = self.local_via
            self._wanted = {**self.extra, **{str(r.dst): via[r.dst.version] for r in remotes or ()
                                             if r.dst.version in via}}
        else:
            # an IPv6 subnet is routed once its node has published its link-local next hop
            self._wanted = {**self.extra, **{str(r.dst): str(r.via) if r.dst.version == 4 else f"{r.via6}%{r.via}"
                                             for r in remotes or () if r.dst.version == 4 or r.via6}}
        self._prune = self._prune or remotes is not None
        if not self._running:
            self._running = True
            asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            while self._wanted is not None:
                wanted, self._wanted = self._wanted, None
                try:
                    await asyncio.to_thread(sync_routes, self.netns, wanted, self._prune)
                except Exception as exc:
                    log.error("routes to other nodes not set: %s; retrying", exc)
                    self._wanted = self._wanted or wanted
                    await asyncio.sleep(1.0)
        finally:
            self._running = False


async def serve(args: AgentConfig) -> int:
    started = time.monotonic()
    # netlink and OVSDB calls block: give concurrent CNI requests enough threads to not queue
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=64,
                                                                       thread_name_prefix="blocking"))
    if _kube_enabled(args):  # before anything else: a missing permission is named, not discovered later
        await asyncio.to_thread(_check_permissions, args)
    runtime = OvsRuntime(args.ovs_run_dir, private=args.ovs_run_dir != SYSTEM_RUNDIR, datapath=args.datapath)
    runtime.check()
    node_ips: list[str] = list(args.node_ip or [])
    if _kube_enabled(args) and (args.pod_cidr is None or not node_ips):
        own: dict[str, Any] | None
        if args.pod_cidr is None:
            own = await _own_node(args)  # nothing works without it: wait
        else:  # only the node's addresses (for NodePorts) are missing: look once
            from sanderling.kube.client import KubeApi

            try:
                own = await asyncio.to_thread(lambda: KubeApi(args.kubeconfig, timeout=3).node(args.node))
            except Exception as exc:
                log.warning("node %s: Node object not readable (%s); NodePorts need --node-ip", args.node, exc)
                own = None
        if own is not None:
            spec = own.get("spec") or {}
            args.pod_cidr = args.pod_cidr or ",".join(spec.get("podCIDRs") or [spec["podCIDR"]])
            node_ips = node_ips or [a["address"] for a in (own.get("status") or {}).get("addresses") or []
                                    if a.get("type") == "InternalIP"]
    if args.pod_cidr is None:
        raise ModelError(f"node/{args.node}", "podCIDR", "give --pod-cidr, or --kubeconfig to read it from the "
                                                          "node's Node object")
    node = NodeNetwork.build(args.node, args.pod_cidr, args.gateway_mac)
    checked = time.monotonic()
    db = Ovsdb(runtime.db_endpoint)
    log.info("OVSDB %s connected in %.2fs (OVS check %.2fs)", runtime.db_endpoint, time.monotonic() - checked,
             checked - started)
    db.ensure_bridge(args.bridge, args.datapath)
    if args.gateway:
        db.set_bridge_hwaddr(args.bridge, node.gateway_mac)
        # pyroute2's sync API runs its own event loop: keep it off this one
        await asyncio.to_thread(ensure_gateway, args.bridge,
                                f"{node.gateway_ip}/{node.pod_cidr.prefixlen}" if node.pod_cidr else "",
                                node.gateway_mac, args.node_netns,
                                f"{node.gateway_ip6}/{node.pod_cidr6.prefixlen}" if node.pod_cidr6 else "")
        if args.mode == "overlay":
            # the node's own packets to other nodes' pods are tunneled by OVS, whose userspace VXLAN
            # drops what still carries checksum offload flags ("Tunneling packets with HW offload
            # flags is not supported"): every TCP and UDP packet of the node's, measured 0 of 10
            await asyncio.to_thread(veth.ethtool_tx_off, args.bridge, args.node_netns)
    previous = int(db.bridge_external_ids(args.bridge).get(GENERATION_KEY, "0") or 0)
    generation = cookies.next_generation(previous)
    db.set_bridge_external_id(args.bridge, GENERATION_KEY, str(generation))
    if args.mode == "overlay":
        db.add_port(args.bridge, TUNNEL_PORT_NAME, ofport_request=TUNNEL_OFPORT, iface_type="vxlan",
                    options={"remote_ip": "flow"})
    if args.external_bridge:
        from sanderling.ovs.external import ExternalBridge

        ExternalBridge(args.external_bridge, args.bridge, tuple(args.external_uplink), tuple(args.external_controller),
                       args.external_fail_mode, tuple(v.strip() for v in args.external_protocols.split(",")),
                       tuple(args.external_ssl), args.datapath).setup(db, runtime)
    log.info("node %s: bridge %s, pod CIDRs %s (%s), %s mode, generation %d (previous %d), %d tables",
             node.name, args.bridge, ", ".join(map(str, node.pod_cidrs)), node.families, args.mode, generation,
             previous, len(PIPELINE.tables))
    port_errors: dict[str, str] = {}
    sync = SyncLoop(node.name, runtime.mgmt_target(args.bridge), Realizer(generation))
    node_flows = NodeFlows(node, sync, gateway=args.gateway, mode=args.mode)
    if args.external_bridge:
        node_flows.set_external(tuple(c.strip() for c in args.external_cidrs.split(",") if c.strip()),
                                # (br-ext's routing is IPv4: the node's IPv4 subnet and addresses)
                                (args.cluster_cidr, args.service_cidr,
                                 *(str(c) for c in node.pod_cidrs if c.version == 4),
                                 *(f"{ip}/32" for ip in node_ips if ":" not in ip)),
                                masquerade_ip(node) if args.external_masquerade else None)
    pod_flows = PodFlows(node, sync, PodsOfPorts(lambda: db.ports(args.bridge), port_errors))
    from sanderling.agent.metrics import AgentMetrics, Sources

    listed: list[Any] = []  # every informer the node's flows depend on, for /readyz
    sources = Sources(sync, lambda: listed, pod_flows)
    metrics = AgentMetrics(sources)
    view = None
    api: Any = None  # the one synchronous Kubernetes client (events, IPPools, pod annotations)
    if _kube_enabled(args):
        from sanderling.kube.client import KubeApi

        api = KubeApi(args.kubeconfig)
    remote_hooks: list[Callable[[list[Remote]], None]] = []  # more listeners to the other nodes
    multi: Any = None  # MultiNetworkPolicy agents, given the secondary bridges once they exist
    net_services: Any = None  # Services on secondary networks, the same
    flusher = SecondaryFlusher(args.node)
    proxy_tasks: list[asyncio.Task[None]] = []
    if _kube_enabled(args):
        from sanderling.agent.cluster_view import ClusterView

        proxy_cfg = None if args.no_proxy else proxy_config(args, node, node_ips)
        # host -> ClusterIP: the service CIDR is routed into br-int via the masquerade address
        extra_routes = ({args.service_cidr: str(proxy_cfg.masq_ip)}
                        if proxy_cfg is not None and proxy_cfg.masq_ip is not None and args.gateway else {})
        if proxy_cfg is not None and args.gateway and proxy_cfg.masq_ip6 is not None and args.service_cidr6:
            extra_routes[args.service_cidr6] = str(proxy_cfg.masq_ip6)  # on br-int's IPv6 subnet
        local_via = None
        if args.mode == "overlay" and proxy_cfg is not None:  # into br-int through the masquerade address
            local_via = {v: str(ip) for v, ip in ((4, proxy_cfg.masq_ip), (6, proxy_cfg.masq_ip6)) if ip is not None}
        routes = RouteKeeper(args.node_netns, extra_routes, local_via) if args.gateway else None
        if routes is not None:
            routes.update(None)
            if args.mode == "routed" and node.pod_cidr6 is not None and node_ips:
                asyncio.ensure_future(publish_next_hop6(args, node_ips[0]))

        def remotes_changed(remotes: list[Remote]) -> None:
            node_flows.set_remotes(remotes)
            for hook in remote_hooks:
                hook(remotes)
            if routes is not None:
                routes.update(remotes if args.mode == "routed" or local_via is not None else [])
            log.info("node %s: %d remote destinations (%s)", node.name, len(remotes),
                     ", ".join(f"{r.dst} via {r.via}" for r in remotes[:8]) + (" ..." if len(remotes) > 8 else ""))

        client = _async_client(args)

        def node_refused(name: str, message: str) -> None:
            asyncio.get_running_loop().run_in_executor(
                None, lambda: api.event("default", name, "PodCIDRRefused", message, args.node,
                                           involved_kind="Node"))

        view = ClusterView(client, node.name, remotes_changed, ipaddress.IPv4Network(args.service_cidr),
                           node_refused)
        view.start()
        informers: list[Any] = []
        if proxy_cfg is not None:
            proxy_informers, steering = start_proxy(client, api, proxy_cfg, sync, node_flows, args, sources)
            sources.proxy.flush_observers.append(metrics.proxy_compiled)
            informers += proxy_informers
            if steering is not None:
                await steering.steer()
        if not args.no_policy:  # its own switch: --no-proxy does not turn policy off
            if not args.no_cni and await asyncio.to_thread(multi_policy_served, args):
                multi = multi_policy_agents(api, args, flusher)
        if not args.no_cni and not args.no_proxy:
            net_services = network_services(api, args, flusher)
            remote_hooks.append(lambda remotes: net_services.nodes_changed([r.node for r in remotes]))
        consumers = [c for c in (multi, net_services) if c is not None]
        if not args.no_policy:
            informers += policy_informers(client, api, sync, args, sources,
                                          tuple(c.pod_changed for c in consumers),
                                          (multi.namespace_changed,) if multi is not None else ())
        elif net_services is not None:
            from lightkube.resources.core_v1 import Pod

            from sanderling.kube.informer import Informer

            informers.append(Informer(client, Pod, net_services.pod_changed))
        # secondary networks' own informers do not hold br-int's gate (a cluster without the
        # MultiNetworkPolicy CRD must not keep Services and NetworkPolicies pending)
        secondary = secondary_informers(client, multi, net_services)
        proxy_tasks = [asyncio.create_task(i.run()) for i in [*informers, *secondary]]
        sync.gate = asyncio.Event()
        listed += [*view.informers, *informers]
        proxy_tasks.append(asyncio.create_task(open_gate(listed, sync, view)))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sync.stop)
    server = None
    store = None
    status_runners: list[Any] = []

    async def serve_status() -> None:
        """Started beside the sync loop, not before it: the dataplane must not wait for aiohttp."""
        from sanderling.agent.status import AgentStatus

        host, _, port = args.status_address.rpartition(":")
        try:
            from sanderling.agent.owners import owners
            from sanderling.agent.trace import NodeTracer

            tracer = NodeTracer(node.name, node.gateway_mac, lambda: pod_flows.by_ofport,
                                lambda: owners(sync.realizer.keys(), sources.policy),
                                lambda flow: runtime.appctl("ofproto/trace", *(["--ct-next", "trk,new"] * 6),
                                                            args.bridge, flow))
            status = AgentStatus(sync, lambda: listed, metrics, tracer)
            status_runners.append(await status.start(host or "127.0.0.1", int(port)))
        except OSError as exc:  # the dataplane does not depend on it: say so and go on
            log.error("node %s: status endpoint not served on %s: %s (set --status-address)", node.name,
                      args.status_address, exc)
    if not args.no_cni:
        store, corrupt = AllocationStore.open_or_replace(args.state_dir / node.name / "ipam.db")
        # the masquerade address is the proxy's and br-ext's (reserved when either uses it)
        masquerading = (_kube_enabled(args) and not args.no_proxy) or \
            bool(args.external_bridge and args.external_masquerade)
        reserved = {a for a in (node.gateway_ip, masquerade_ip(node) if masquerading else None) if a is not None}
        reserved6 = {a for a in (node.gateway_ip6, masquerade_ip6(node)) if a is not None}
        pool6 = Pool("node6", node.pod_cidr6, frozenset(reserved6)) if node.pod_cidr6 is not None else None
        if node.pod_cidr is None:  # an IPv6-only node: its IPv6 subnet is the primary pool
            assert pool6 is not None
            allocator = Allocator(store, [Pool("node", pool6.cidr, pool6.reserved)])
        else:
            allocator = Allocator(store, [Pool("node", node.pod_cidr, frozenset(reserved))], pool6)
        cluster = None
        if _kube_enabled(args):
            from sanderling.ipam.cluster import ClusterIpam

            assert api is not None
            cluster = ClusterIpam(api, node.name, store)
        multinet = None
        if cluster is not None:
            multinet = secondary_networks(args, db, runtime, cluster, store, node.name)
            bridges = multinet.bridges

            def vteps_changed(remotes: list[Remote]) -> None:  # off the loop: netlink calls block
                loop.run_in_executor(None, bridges.set_vteps, {str(r.via) for r in remotes})

            remote_hooks.append(vteps_changed)
            flusher.bridges = bridges
            if net_services is not None:
                vips = VirtualIps(cluster, api, args.node)
                net_services.allocate_vip = lambda svc: loop.run_in_executor(None, vips.allocate, svc)
                net_services.release_vip = lambda svc: loop.run_in_executor(None, vips.release, svc)
                net_services.attach(bridges)
                if view is not None and view.remotes:
                    net_services.nodes_changed([r.node for r in view.remotes])
            if multi is not None:
                multi.attach(bridges)
            if multi is not None or net_services is not None:
                from sanderling.agent.multi_policy import listen_packet_ins

                stopping = asyncio.Event()
                proxy_tasks += [asyncio.create_task(listen_packet_ins(
                    runtime.mgmt_target(b), multi, stopping, functools.partial(bridges.sync_flows, b)))
                    for b in bridges.bridges()]
            if view is not None and view.remotes:
                vteps_changed(view.remotes)
        handler = CniHandler(node, db, args.bridge, allocator, pod_flows, args.node_netns, args.mtu, cluster,
                             tunnel=args.mode == "overlay", multinet=multinet, network_name=args.cni_network,
                             native_networks=not args.multus)
        handler.observers.append(metrics.cni_answered)
        handler.step_observers.append(metrics.cni_step)
        sources.pools = allocator.usage
        if corrupt is not None:
            restored = await handler.restore_from_ovsdb()
            log.error("node %s: the IPAM database was not readable: moved to %s, %d allocation(s) rebuilt from "
                      "OVSDB's pod ports", node.name, corrupt, restored)
        await handler.reconcile()
        server = CniServer(handler, args.cni_socket)
        await server.start()
        install_cni(args, secondary=multinet is not None)
        log.info("CNI: plugin in %s, conflist %s in %s", args.cni_bin_dir, args.cni_network, args.cni_conf_dir)
    if args.status_address:
        proxy_tasks.append(asyncio.create_task(serve_status()))
    try:
        await sync.run()
    except asyncio.CancelledError:
        pass
    finally:
        for task in proxy_tasks:
            task.cancel()
        if view is not None:
            view.stop()
        if server is not None:
            await server.stop()
        for runner in status_runners:
            await runner.cleanup()
        await metrics.close()
        if store is not None:
            store.close()
        db.close()
    return 0


def secondary_networks(args: AgentConfig, db: Ovsdb, runtime: OvsRuntime, cluster: Any, store: Any,
                       node: str) -> Any:
    """The node's secondary-network bridges and the attacher the CNI handler calls."""
    from sanderling.cni.attachments import MultiNetwork, Records
    from sanderling.ovs.secondary import SecondaryBridges

    providers = {}
    for item in args.provider_network:
        physnet, _, iface = item.partition("=")
        if not physnet or not iface:
            raise ModelError(f"node/{node}", "--provider-network", f"{item!r}: want PHYSNET=INTERFACE")
        providers[physnet] = iface
    checksum_off = args.mode == "overlay" or not db.userspace_tso_enabled()
    from sanderling.compiler.network_services import static_flows as service_static_flows
    from sanderling.compiler.policy import LOG_METER, LOG_RATE_PPS
    from sanderling.compiler.services import REJECT_METER, REJECT_RATE_PPS
    from sanderling.openflow.ir import Meter

    bridges = SecondaryBridges(db, runtime, args.node_netns, providers, args.layer2_port, args.datapath,
                               args.underlay_mtu, tx_checksum_off=checksum_off,
                               meters=(Meter(LOG_METER, LOG_RATE_PPS, LOG_RATE_PPS // 5),
                                       Meter(REJECT_METER, REJECT_RATE_PPS, REJECT_RATE_PPS // 4)),
                               static_flows=tuple(service_static_flows(REJECT_METER)))
    bridges.setup()
    return MultiNetwork(cluster.api, cluster, store, bridges, Records(args.state_dir / node / "attachments"),
                        tuple(p for p in args.cni_path.split(":") if p), node, args.node_netns)


class AgentLockError(RuntimeError):
    """Another agent runs for this node."""


def hold_agent_lock(path: Path) -> Any:
    """An exclusive lock for the life of the process (the kernel drops it when the process dies,
    also on kill -9): two agents on one node would fight over the bridge, the IPAM database and the
    CNI socket, so the second refuses to start."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - held open on purpose until the process ends
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise AgentLockError(f"another agent (pid {holder}) holds {path}; stop it first") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def main(argv: list[str] | None = None) -> int:
    try:
        args = load_config(argv)
    except ConfigError as exc:  # one line naming the setting, before anything is touched
        print(f"sanderling-agent: {exc}", file=sys.stderr)
        return 1
    tune_gc()
    use_api_server(args)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        lock = hold_agent_lock(args.state_dir / args.node / "agent.lock")
    except AgentLockError as exc:
        print(f"sanderling-agent: {exc}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(serve(args))
    except (OvsError, ModelError) as exc:
        print(f"sanderling-agent: {exc}", file=sys.stderr)
        return 1
    finally:
        lock.close()


if __name__ == "__main__":
    sys.exit(main())
