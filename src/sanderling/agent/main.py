"""`sanderling-agent`: the per-node process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sanderling.agent.controller import NodeController
from sanderling.agent.pods_source import pods_from_ports
from sanderling.cni.handler import CniHandler
from sanderling.cni.install import install_binary, write_conflist
from sanderling.cni.server import CniServer
from sanderling.compiler.nodes import TUNNEL_OFPORT, TUNNEL_PORT_NAME
from sanderling.ipam.allocator import Allocator, Pool
from sanderling.ipam.store import AllocationStore
from sanderling.model.errors import ModelError
from sanderling.model.network import NodeNetwork
from sanderling.model.nodes import Remote
from sanderling.netlink.gateway import ensure_gateway
from sanderling.netlink.routes import sync_routes
from sanderling.openflow import cookies
from sanderling.openflow.pipeline import PIPELINE
from sanderling.openflow.realizer import Realizer
from sanderling.ovs.ovsdb import Ovsdb
from sanderling.ovs.runtime import SYSTEM_RUNDIR, OvsError, OvsRuntime

log = logging.getLogger("sanderling.agent")

GENERATION_KEY = "sanderling.io/generation"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sanderling-agent", description="Sanderling node agent")
    p.add_argument("--node", required=True, help="this node's name")
    p.add_argument("--pod-cidr", default=None,
                   help="this node's pod subnet, e.g. 10.244.1.0/24 (default: spec.podCIDR of this node's Node object)")
    p.add_argument("--mode", default="routed", choices=["routed", "overlay"],
                   help="across nodes: routed (pod addresses on the underlay, no NAT) or overlay (VXLAN)")
    p.add_argument("--gateway-mac", default="0a:58:0a:f4:00:01", help="MAC pods see for their gateway")
    p.add_argument("--bridge", default="br-int")
    p.add_argument("--ovs-run-dir", type=Path, default=SYSTEM_RUNDIR,
                   help="OVS run directory (a private instance from `sanderling ovs start`, or the system's)")
    p.add_argument("--datapath", default="netdev", choices=["netdev", "dummy"])
    p.add_argument("--node-netns", default=None,
                   help="network namespace holding br-int and the host ends of pod veths (lab nodes)")
    p.add_argument("--state-dir", type=Path, default=Path("/var/lib/sanderling"),
                   help="where the IPAM database lives")
    p.add_argument("--cni-socket", type=Path, default=Path("/run/sanderling/cni.sock"))
    p.add_argument("--cni-conf-dir", type=Path, default=Path("/etc/cni/net.d"))
    p.add_argument("--cni-bin-dir", type=Path, default=Path("/opt/cni/bin"))
    p.add_argument("--cni-network", default="sanderling", help="network name in the conflist")
    p.add_argument("--cni-conf-version", default="1.1.0", choices=["0.4.0", "1.0.0", "1.1.0"],
                   help="cniVersion of the conflist (older runtimes, e.g. podman 4, need 1.0.0)")
    p.add_argument("--no-cni", action="store_true", help="do not serve CNI (pods are plugged by other means)")
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument("--kubeconfig", type=Path, default=None,
                   help="Kubernetes API access (in-cluster config when run as a pod); enables pod annotations "
                        "and IPPools")
    p.add_argument("--gateway", action="store_true",
                   help="route through the node: the bridge's LOCAL port gets the gateway address (routed mode)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def _kube_enabled(args: argparse.Namespace) -> bool:
    return args.kubeconfig is not None or bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def _async_client(args: argparse.Namespace) -> Any:
    from lightkube import AsyncClient, KubeConfig

    config = (KubeConfig.from_file(str(args.kubeconfig)) if args.kubeconfig is not None
              else KubeConfig.from_service_account())
    return AsyncClient(config=config, field_manager="sanderling-agent")


async def _own_pod_cidr(args: argparse.Namespace) -> str:
    """spec.podCIDR of this node's Node object; wait (logging why) until it exists and has one."""
    from sanderling.kube.client import KubeApi

    api = await asyncio.to_thread(KubeApi, args.kubeconfig)
    said = ""
    while True:
        try:
            node = await asyncio.to_thread(api.node, args.node)
            why = "no Node object yet" if node is None else "its Node has no spec.podCIDR yet"
            if node is not None and (node.get("spec") or {}).get("podCIDR"):
                return str(node["spec"]["podCIDR"])
        except Exception as exc:  # API not reachable yet: keep trying
            why = f"API not reachable ({exc})"
        if why != said:
            log.info("node %s: waiting for its pod CIDR: %s", args.node, why)
            said = why
        await asyncio.sleep(0.5)


class RouteKeeper:
    """Kernel routes to other nodes' destinations (routed mode), synced off the event loop, latest wins."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._wanted: dict[str, str] | None = None
        self._running = False

    def update(self, remotes: list[Remote]) -> None:
        self._wanted = {str(r.dst): str(r.via) for r in remotes}
        if not self._running:
            self._running = True
            asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            while self._wanted is not None:
                wanted, self._wanted = self._wanted, None
                try:
                    await asyncio.to_thread(sync_routes, self.netns, wanted)
                except Exception as exc:
                    log.error("routes to other nodes not set: %s; retrying", exc)
                    self._wanted = self._wanted or wanted
                    await asyncio.sleep(1.0)
        finally:
            self._running = False


async def serve(args: argparse.Namespace) -> int:
    started = time.monotonic()
    # netlink and OVSDB calls block: give concurrent CNI requests enough threads to not queue
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=64,
                                                                       thread_name_prefix="blocking"))
    runtime = OvsRuntime(args.ovs_run_dir, private=args.ovs_run_dir != SYSTEM_RUNDIR, datapath=args.datapath)
    runtime.check()
    if args.pod_cidr is None:
        if not _kube_enabled(args):
            raise ModelError(f"node/{args.node}", "podCIDR", "give --pod-cidr, or --kubeconfig to read it from the "
                                                              "node's Node object")
        args.pod_cidr = await _own_pod_cidr(args)
    node = NodeNetwork.build(args.node, args.pod_cidr, args.gateway_mac)
    checked = time.monotonic()
    db = Ovsdb(runtime.db_endpoint)
    log.info("OVSDB %s connected in %.2fs (OVS check %.2fs)", runtime.db_endpoint, time.monotonic() - checked,
             checked - started)
    db.ensure_bridge(args.bridge, args.datapath)
    if args.gateway:
        db.set_bridge_hwaddr(args.bridge, node.gateway_mac)
        # pyroute2's sync API runs its own event loop: keep it off this one
        await asyncio.to_thread(ensure_gateway, args.bridge, f"{node.gateway_ip}/{node.pod_cidr.prefixlen}",
                                node.gateway_mac, args.node_netns)
    previous = int(db.bridge_external_ids(args.bridge).get(GENERATION_KEY, "0") or 0)
    generation = cookies.next_generation(previous)
    db.set_bridge_external_id(args.bridge, GENERATION_KEY, str(generation))
    if args.mode == "overlay":
        db.add_port(args.bridge, TUNNEL_PORT_NAME, ofport_request=TUNNEL_OFPORT, iface_type="vxlan",
                    options={"remote_ip": "flow"})
    log.info("node %s: bridge %s, pod CIDR %s, %s mode, generation %d (previous %d), %d tables",
             node.name, args.bridge, node.pod_cidr, args.mode, generation, previous, len(PIPELINE.tables))
    port_errors: dict[str, str] = {}
    controller = NodeController(node, runtime.mgmt_target(args.bridge), Realizer(generation),
                                lambda: pods_from_ports(db.ports(args.bridge), port_errors), gateway=args.gateway,
                                mode=args.mode)
    view = None
    if _kube_enabled(args):
        from sanderling.agent.cluster_view import ClusterView

        routes = RouteKeeper(args.node_netns) if args.gateway and args.mode == "routed" else None

        def remotes_changed(remotes: list[Remote]) -> None:
            controller.set_remotes(remotes)
            if routes is not None:
                routes.update(remotes)
            log.info("node %s: %d remote destinations (%s)", node.name, len(remotes),
                     ", ".join(f"{r.dst} via {r.via}" for r in remotes[:8]) + (" ..." if len(remotes) > 8 else ""))

        view = ClusterView(_async_client(args), node.name, remotes_changed)
        view.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, controller.stop)
    server = None
    store = None
    if not args.no_cni:
        store = AllocationStore(args.state_dir / node.name / "ipam.db")
        allocator = Allocator(store, [Pool("node", node.pod_cidr, frozenset({node.gateway_ip}))])
        cluster = None
        if _kube_enabled(args):
            from sanderling.ipam.cluster import ClusterIpam
            from sanderling.kube.client import KubeApi

            cluster = ClusterIpam(KubeApi(args.kubeconfig), node.name, store)
        handler = CniHandler(node, db, args.bridge, allocator, controller, args.node_netns, args.mtu, cluster,
                             tunnel=args.mode == "overlay")
        await handler.reconcile()
        server = CniServer(handler, args.cni_socket)
        await server.start()
        install_binary(args.cni_bin_dir)
        write_conflist(args.cni_conf_dir, args.cni_network, args.cni_socket, args.mtu, version=args.cni_conf_version)
        log.info("CNI: plugin in %s, conflist %s in %s", args.cni_bin_dir, args.cni_network, args.cni_conf_dir)
    try:
        await controller.run()
    except asyncio.CancelledError:
        pass
    finally:
        if view is not None:
            view.stop()
        if server is not None:
            await server.stop()
        if store is not None:
            store.close()
        db.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(serve(args))
    except (OvsError, ModelError) as exc:
        print(f"sanderling-agent: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
