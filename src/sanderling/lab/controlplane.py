"""The lab control plane process: API server, controllers, scheduler and one kubelet per node.

`python -m sanderling.lab.controlplane --state DIR --listen 127.0.0.1:PORT [--netns NS --netns-listen
IP:PORT]` serves the Kubernetes API from DIR/api.db: on the host's loopback (for the CLI and
kubectl) and, when a namespace is given, on the lab underlay inside that namespace (for the
agents). The socket in the host namespace is bound first, then the process enters the
control-plane namespace, so it serves both without touching the host's network configuration.

Against the same store it runs what a control plane runs: node podCIDR allocation from the
cluster CIDR, the EndpointSlice controller, a scheduler (pods without spec.nodeName go to the
node with the fewest pods) and the kubelets of the nodes registered with the
`lab.sanderling.io/cni-bin` and `lab.sanderling.io/cni-conf` annotations (ClusterIPs and NodePorts
are allocated by the API server's admission). Restarting it loses nothing: objects are in SQLite
and running pods are adopted from their status.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import socket
import sys
from pathlib import Path
from typing import Any

from sanderling.lab import endpointslices
from sanderling.lab.apiserver.server import listen, serve
from sanderling.lab.apiserver.store import ApiError, Store, WatchEvent
from sanderling.lab.kubelet import Kubelet, NodeRuntime
from sanderling.netlink import netns
from sanderling.process import until_signalled

log = logging.getLogger("sanderling.lab.controlplane")
PODS, NODES, SERVICES = "/pods", "/nodes", "/services"
SLICES = "discovery.k8s.io/endpointslices"
ANN_BIN, ANN_CONF, ANN_NETNS = "lab.sanderling.io/cni-bin", "lab.sanderling.io/cni-conf", "lab.sanderling.io/netns"
CLUSTER_CIDR = ipaddress.IPv4Network("10.244.0.0/16")
NODE_PREFIX = 24
NODE_PREFIX6 = 64


class ControlPlane:
    def __init__(self, store: Store, cluster_cidr: ipaddress.IPv4Network | None = CLUSTER_CIDR,
                 allow_commands: bool = False, cluster_cidr6: ipaddress.IPv6Network | None = None) -> None:
        self.store = store
        self.allow_commands = allow_commands
        self.cluster_cidr = cluster_cidr  # None: an IPv6-only cluster
        self.cluster_cidr6 = cluster_cidr6  # dual-stack: every node also gets a /64 of it
        self.kubelets: dict[str, Kubelet] = {}
        self.queue: asyncio.Queue[WatchEvent] = asyncio.Queue()
        self._busy: set[str] = set()
        self._attempts: dict[str, int] = {}  # pod -> ADDs retried so far (for the backoff)
        self._gc_task: asyncio.Future[None] | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.store.listeners.append(lambda ev: loop.call_soon_threadsafe(self.queue.put_nowait, ev))
        for node in self.store.list(NODES, None)[0]:
            self._register(node)
            self._allocate_pod_cidr(node)
        for pod in self.store.list(PODS, None)[0]:
            self._adopt(pod)
            self.queue.put_nowait(WatchEvent(0, PODS, pod["metadata"]["namespace"], "MODIFIED", pod))
        for svc in self.store.list(SERVICES, None)[0]:
            self.queue.put_nowait(WatchEvent(0, SERVICES, svc["metadata"]["namespace"], "MODIFIED", svc))
        self._gc_task = asyncio.ensure_future(self.collect_garbage())

    async def collect_garbage(self, attempts: int = 30, interval: float = 2.0) -> None:
        """Sandboxes of pods deleted while no control plane ran (no event will ever say so): CNI
        DEL and remove them, retrying while a node's agent cannot answer yet."""
        for _ in range(attempts):
            live: dict[str, dict[str, str]] = {}
            for pod in self.store.list(PODS, None)[0]:
                node = (pod.get("spec") or {}).get("nodeName") or ""
                meta = pod["metadata"]
                live.setdefault(node, {})[f"{meta['namespace']}/{meta['name']}"] = meta.get("uid", "")
            left = 0
            for node, kubelet in self.kubelets.items():
                for netns_name, record in kubelet.orphans(live.get(node, {})):
                    if not await asyncio.to_thread(kubelet.remove_orphan, netns_name, record):
                        left += 1
            if not left:
                return
            await asyncio.sleep(interval)

    def _register(self, node: dict[str, Any]) -> None:
        ann = node["metadata"].get("annotations") or {}
        name = node["metadata"]["name"]
        if ANN_BIN in ann and name not in self.kubelets:
            host_ip = next((a["address"] for a in (node.get("status") or {}).get("addresses") or []
                            if a.get("type") == "InternalIP"), "")
            self.kubelets[name] = Kubelet(NodeRuntime(name, Path(ann[ANN_BIN]), Path(ann[ANN_CONF]),
                                                      ann.get(ANN_NETNS, name), host_ip),
                                          allow_commands=self.allow_commands)
            log.info("kubelet for node %s", name)

    def _allocate_pod_cidr(self, node: dict[str, Any]) -> None:
        """Node IPAM: a node without spec.podCIDR gets the first free /24 of the cluster CIDR and,
        dual-stack, the first free /64 of the IPv6 one (spec.podCIDRs lists both, IPv4 first);
        on an IPv6-only cluster only the /64."""
        if (node.get("spec") or {}).get("podCIDR"):
            return
        name = node["metadata"]["name"]
        taken = {c for n in self.store.list(NODES, None)[0] for c in (n.get("spec") or {}).get("podCIDRs") or []}
        cidrs = []
        for cluster, prefix in ((self.cluster_cidr, NODE_PREFIX), (self.cluster_cidr6, NODE_PREFIX6)):
            if cluster is None:
                continue
            free = next((str(net) for net in cluster.subnets(new_prefix=prefix) if str(net) not in taken), None)
            if free is None:
                log.error("node %s: no free /%d left in the cluster CIDR %s", name, prefix, cluster)
                return
            cidrs.append(free)
        self.store.patch(NODES, "", name, {"spec": {"podCIDR": cidrs[0], "podCIDRs": cidrs}})
        log.info("node %s: podCIDRs %s", name, ", ".join(cidrs))

    def _sync_slices(self, namespace: str, only: str | None = None) -> None:
        """EndpointSlices of the namespace's Services (or of one Service) equal to what its pods say."""
        services = self.store.list(SERVICES, namespace)[0]
        if only is not None:
            services = [s for s in services if s["metadata"]["name"] == only]
        pods = self.store.list(PODS, namespace)[0]
        existing: dict[str, dict[str, Any]] = {}
        for sl in self.store.list(SLICES, namespace)[0]:
            labels = sl["metadata"].get("labels") or {}
            if labels.get(endpointslices.MANAGED_BY) == endpointslices.CONTROLLER:
                existing[sl["metadata"]["name"]] = sl
        owned_by = {name: (sl["metadata"].get("labels") or {}).get(endpointslices.SERVICE_NAME)
                    for name, sl in existing.items()}
        wanted_names: set[str] = set()
        for svc in services:
            desired = endpointslices.desired_slices(svc, pods)
            for sl in desired or []:
                name = sl["metadata"]["name"]
                wanted_names.add(name)
                current = existing.get(name)
                if current is None:
                    self.store.create(SLICES, namespace, sl)
                elif not endpointslices.same_content(current, sl):
                    sl["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                    self.store.update(SLICES, namespace, name, sl)
        live = {s["metadata"]["name"] for s in self.store.list(SERVICES, namespace)[0]}
        for name, svc_name in owned_by.items():
            if name in wanted_names:
                continue
            if only is None or svc_name == only or svc_name not in live:
                self.store.delete(SLICES, namespace, name)

    def _adopt(self, pod: dict[str, Any]) -> None:
        """After a restart: pods already running keep running; remember them."""
        from sanderling.lab.kubelet import RunningPod

        node = (pod.get("spec") or {}).get("nodeName")
        if node in self.kubelets and (pod.get("status") or {}).get("podIP"):
            meta = pod["metadata"]
            kubelet = self.kubelets[node]
            kubelet.pods[f"{meta['namespace']}/{meta['name']}"] = RunningPod(
                kubelet.sandbox_name(meta["namespace"], meta["name"]), meta["uid"].replace("-", "")[:32])

    async def run(self) -> None:
        while True:
            event = await self.queue.get()
            try:
                if event.resource == NODES and event.type != "DELETED":
                    self._register(event.body)
                    self._allocate_pod_cidr(event.body)
                elif event.resource == PODS:
                    await self._pod(event)
                    self._sync_slices(event.namespace)
                elif event.resource == SERVICES:
                    self._sync_slices(event.namespace, event.body["metadata"]["name"])
            except Exception:  # one bad object must not stop the control plane
                log.exception("handling %s %s", event.type, event.body.get("metadata", {}).get("name"))

    async def _pod(self, event: WatchEvent) -> None:
        pod = event.body
        meta, spec = pod["metadata"], pod.get("spec") or {}
        key = f"{meta['namespace']}/{meta['name']}"
        node = spec.get("nodeName")
        if event.type == "DELETED":
            if node in self.kubelets:
                await asyncio.to_thread(self.kubelets[node].stop, meta["namespace"], meta["name"], meta.get("uid", ""))
            return
        if not node:
            self._schedule(pod)
            return
        kubelet = self.kubelets.get(node)
        status = pod.get("status") or {}
        if kubelet is None or key in kubelet.pods or key in self._busy or status.get("podIP") \
                or status.get("phase") == "Failed":
            return
        self._busy.add(key)
        asyncio.create_task(self._start(kubelet, pod, key))

    async def _start(self, kubelet: Kubelet, pod: dict[str, Any], key: str) -> None:
        try:
            status = await asyncio.to_thread(kubelet.start, pod)
            meta = pod["metadata"]
            status["hostIP"] = kubelet.node.host_ip
            status["hostIPs"] = [{"ip": kubelet.node.host_ip}] if kubelet.node.host_ip else []
            try:
                self.store.patch(PODS, meta["namespace"], meta["name"], {"status": status}, "status")
            except ApiError as exc:  # deleted meanwhile
                log.info("pod %s: status not recorded: %s", key, exc.message)
            if key in kubelet.retry_later:
                self._retry(pod, key)
            else:
                self._attempts.pop(key, None)
        finally:
            self._busy.discard(key)

    def _retry(self, pod: dict[str, Any], key: str) -> None:
        """ADD again after a backoff (0.2 s doubling to 5 s), if the pod is still there and not running."""
        attempt = self._attempts.get(key, 0)
        self._attempts[key] = attempt + 1
        meta = pod["metadata"]

        def again() -> None:
            try:
                current = self.store.get(PODS, meta["namespace"], meta["name"])
            except ApiError:
                self._attempts.pop(key, None)
                return
            if current["metadata"].get("uid") == meta.get("uid"):
                self.queue.put_nowait(WatchEvent(0, PODS, meta["namespace"], "MODIFIED", current))

        asyncio.get_running_loop().call_later(min(0.2 * 2 ** attempt, 5.0), again)

    def _schedule(self, pod: dict[str, Any]) -> None:
        if not self.kubelets:
            return
        load = {name: 0 for name in self.kubelets}
        for other in self.store.list(PODS, None)[0]:
            node = (other.get("spec") or {}).get("nodeName")
            if node in load:
                load[node] += 1
        target = min(sorted(load), key=lambda n: load[n])
        meta = pod["metadata"]
        self.store.patch(PODS, meta["namespace"], meta["name"], {"spec": {"nodeName": target}})
        log.info("scheduled %s/%s to %s", meta["namespace"], meta["name"], target)


def _listen(spec: str) -> socket.socket:
    host, _, port = spec.rpartition(":")
    return listen(host, int(port))


async def main_async(args: argparse.Namespace) -> int:
    sockets = [_listen(spec) for spec in args.listen]
    if args.netns:
        netns.enter(args.netns)  # before any thread exists: every later thread inherits it
        sockets += [_listen(spec) for spec in args.netns_listen]
    store = Store(args.state / "api.db")
    tls = None
    if args.tls_cert:
        import ssl

        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    token = args.token_file.read_text().strip() if args.token_file else None
    from sanderling.lab.apiserver.admission import ServiceAllocator

    cidr6 = ipaddress.IPv6Network(args.service_cidr6) if args.service_cidr6 else None
    allocator = None
    if cidr6 is not None:  # dual-stack, or IPv6-only (no IPv4 cluster CIDR: no IPv4 Service range either)
        allocator = ServiceAllocator(cidr6=cidr6) if args.cluster_cidr else ServiceAllocator(None, cidr6)
    runner = await serve(store, sockets, token=token, ssl_context=tls, allocator=allocator)
    plane = ControlPlane(store, ipaddress.IPv4Network(args.cluster_cidr) if args.cluster_cidr else None,
                         args.allow_workload_commands,
                         ipaddress.IPv6Network(args.cluster_cidr6) if args.cluster_cidr6 else None)
    plane.start()
    task = asyncio.create_task(plane.run())
    await until_signalled()
    task.cancel()
    await runner.cleanup()
    store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sanderling.lab.controlplane")
    p.add_argument("--state", type=Path, required=True)
    p.add_argument("--listen", action="append", required=True, help="HOST:PORT in the starting namespace")
    p.add_argument("--netns", help="control-plane network namespace to run in")
    p.add_argument("--netns-listen", action="append", default=[], help="HOST:PORT inside --netns")
    p.add_argument("--cluster-cidr", default=str(CLUSTER_CIDR), help='"" on an IPv6-only cluster')
    p.add_argument("--cluster-cidr6", default="", help="dual-stack: the cluster's IPv6 pod CIDR (a /64 per node)")
    p.add_argument("--service-cidr6", default="", help="dual-stack: the IPv6 Service CIDR")
    p.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (and --tls-key)")
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--token-file", type=Path, help="every client must send this bearer token")
    p.add_argument("--allow-workload-commands", action="store_true",
                   help="kubelets run a Pod's command (default: such pods fail, no program runs)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
