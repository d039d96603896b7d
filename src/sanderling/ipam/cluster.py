"""Addresses from cluster-wide IPPools, allocated through the Kubernetes API.

The pool object's status holds the allocations; every change is a read-modify-write with the
resourceVersion read (optimistic concurrency), so two nodes can never take the same address.
The node also records each pool allocation in its local store (pool "ippool/NAME"), which is
what DEL releases and what the start-up reconcile compares against.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from sanderling.ipam.allocator import E_EXHAUSTED, E_IP_IN_USE, E_OUTSIDE_POOLS, IpamError, Request
from sanderling.ipam.store import Allocation, AllocationStore
from sanderling.kube.client import KubeApi
from sanderling.model.errors import ModelError
from sanderling.model.ippool import ANNOTATION_IPS, ANNOTATION_MAC, ANNOTATION_POOL, IPPool, parse_ips_annotation
from sanderling.model.network import parse_mac

log = logging.getLogger(__name__)
PREFIX = "ippool/"


class ClusterIpam:
    def __init__(self, api: KubeApi, node: str, store: AllocationStore) -> None:
        self.api = api
        self.node = node
        self.store = store

    def pools(self, network: str = "") -> list[IPPool]:
        """The pod network's pools, or the pool of one secondary network."""
        out = []
        for obj in self.api.pools():
            try:
                pool = IPPool.from_object(obj)
                if pool.network == network:
                    out.append(pool)
            except ModelError as exc:
                log.error("%s", exc)  # one bad pool does not hide the others
        return sorted(out, key=lambda p: p.name)

    def decide(self, namespace: str, name: str, requested: str | None, requested6: str | None, mac: str,
               node_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
               ) -> tuple[str | None, str | None, str, IPPool | None]:
        """Addresses (IPv4, IPv6), MAC and pool for a Kubernetes pod: the runtime's request
        first, then the pod's annotations (fixed addresses, MAC, named pool), then the
        namespace's named pool, then the first IPPool whose selectors match. Pool None: the
        node's own subnets."""
        where = f"pod/{namespace}/{name}"
        pod = self.api.pod(namespace, name) or {}
        meta = pod.get("metadata") or {}
        annotations, labels = meta.get("annotations") or {}, meta.get("labels") or {}
        if not requested and not requested6 and ANNOTATION_IPS in annotations:
            for text in parse_ips_annotation(annotations[ANNOTATION_IPS], where):
                if ":" in text:
                    requested6 = text
                else:
                    requested = text
        if not mac and ANNOTATION_MAC in annotations:
            mac = parse_mac(where, f"annotation {ANNOTATION_MAC}", annotations[ANNOTATION_MAC])
        pools = self.pools()
        node_text = ", ".join(map(str, node_cidrs))
        if requested6:
            ip6 = ipaddress.IPv6Address(requested6.split("/")[0])
            if not any(ip6 in c for c in node_cidrs if c.version == 6):
                raise outside_error(str(ip6), node_text, [])  # IPPools hold IPv4 addresses
        if requested:
            ip = ipaddress.IPv4Address(requested.split("/")[0])
            if any(ip in c for c in node_cidrs if c.version == 4):
                return requested, requested6, mac, None
            if requested6:
                raise IpamError(E_OUTSIDE_POOLS, f"requested address {ip} is outside this node's pod subnets "
                                                 f"({node_text}); an IPPool address has no IPv6 twin")
            pool = self.pool_containing(ip, pools)
            if pool is None:
                raise outside_error(str(ip), node_text, pools)
            return str(ip), None, mac, pool
        if requested6:
            return None, requested6, mac, None
        ns_labels, ns_annotations = self.api.namespace_labels(namespace)
        named = annotations.get(ANNOTATION_POOL) or ns_annotations.get(ANNOTATION_POOL)
        if named:
            found = next((p for p in pools if p.name == named), None)
            if found is None:
                known = ", ".join(p.name for p in pools) or "none"
                raise IpamError(E_OUTSIDE_POOLS, f"IPPool {named} (annotation {ANNOTATION_POOL}) does not exist; "
                                                 f"IPPools: {known}")
            return None, None, mac, found
        return None, None, mac, next((p for p in pools if p.selects(ns_labels, labels)), None)

    def pool_containing(self, ip: ipaddress.IPv4Address, pools: list[IPPool]) -> IPPool | None:
        return next((p for p in pools if p.contains(ip)), None)

    def allocate(self, pool: IPPool, req: Request) -> Allocation:
        owner = {"pod": f"{req.pod_namespace}/{req.pod_name}", "node": self.node, "containerID": req.container_id,
                 "ifname": req.ifname}

        def change(_obj: Any, allocations: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
            mine = [ip for ip, o in allocations.items()
                    if o.get("containerID") == req.container_id and o.get("ifname") == req.ifname]
            if mine:
                return None, mine[0]
            if req.ip:
                holder = allocations.get(req.ip)
                if holder is not None:
                    raise IpamError(E_IP_IN_USE, f"requested address {req.ip} of pool {pool.name} is already in use "
                                                 f"by {holder.get('pod')} on node {holder.get('node')}")
                allocations[req.ip] = owner
                return allocations, req.ip
            for ip in pool.usable():
                if str(ip) not in allocations:
                    allocations[str(ip)] = owner
                    return allocations, str(ip)
            raise IpamError(E_EXHAUSTED, f"IPPool {pool.name} ({', '.join(map(str, pool.cidrs))}, "
                                         f"{pool.usable_count()} addresses) is exhausted")

        ip = self.api.update_pool_allocations(pool.name, change)
        alloc = Allocation(ip, PREFIX + pool.name, req.container_id, req.ifname, req.pod_namespace, req.pod_name,
                           req.mac)
        try:
            with self.store.transaction() as txn:
                if txn.find(req.container_id, req.ifname) is None:
                    txn.insert(alloc)
        except Exception:
            self.release(alloc)
            raise
        return alloc

    def release(self, alloc: Allocation) -> None:
        pool = alloc.pool[len(PREFIX):]

        def change(_obj: Any, allocations: dict[str, Any]) -> tuple[dict[str, Any] | None, None]:
            owner = allocations.get(alloc.ip)
            if owner is None or owner.get("containerID") != alloc.container_id:
                return None, None
            del allocations[alloc.ip]
            return allocations, None

        try:
            self.api.update_pool_allocations(pool, change)
        except LookupError:
            pass  # the pool is gone, and its allocations with it

    def allocate_service(self, pool: IPPool, service: str) -> str:
        """A virtual IP for a Service (`namespace/name`) from `pool`: the one it has if it has one,
        so every agent asking gets the same address (compare-and-swap on the pool)."""
        def change(_obj: Any, allocations: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
            mine = [ip for ip, o in allocations.items() if o.get("service") == service]
            if mine:
                return None, mine[0]
            for ip in pool.usable():
                if str(ip) not in allocations:
                    allocations[str(ip)] = {"service": service}
                    return allocations, str(ip)
            raise IpamError(E_EXHAUSTED, f"IPPool {pool.name} ({pool.usable_count()} addresses) is exhausted")

        return str(self.api.update_pool_allocations(pool.name, change))

    def release_service(self, pool: str, service: str) -> None:
        def change(_obj: Any, allocations: dict[str, Any]) -> tuple[dict[str, Any] | None, None]:
            gone = [ip for ip, o in allocations.items() if o.get("service") == service]
            for ip in gone:
                del allocations[ip]
            return (allocations if gone else None), None

        try:
            self.api.update_pool_allocations(pool, change)
        except LookupError:
            pass  # the pool is gone, and its allocations with it

    def reconcile(self, live: set[tuple[str, str]]) -> int:
        """Release this node's pool allocations that no local record or live container backs."""
        local = {(a.container_id, a.ifname) for a in self.store.all()}
        released = 0
        for obj in self.api.pools():
            name = (obj.get("metadata") or {}).get("name", "")
            for ip, owner in ((obj.get("status") or {}).get("allocations") or {}).items():
                if owner.get("node") != self.node or (owner.get("containerID"), owner.get("ifname")) in local:
                    continue
                log.warning("reconcile: IPPool %s address %s of %s has no local record on %s; releasing", name, ip,
                            owner.get("pod"), self.node)
                self.release(Allocation(ip, PREFIX + name, owner.get("containerID", ""), owner.get("ifname", ""),
                                        "", "", ""))
                released += 1
        return released


def outside_error(ip: str, node_cidr: str, pools: list[IPPool]) -> IpamError:
    names = [f"node ({node_cidr})"] + [f"{p.name} ({', '.join(map(str, p.cidrs))})" for p in pools]
    return IpamError(E_OUTSIDE_POOLS, f"requested address {ip} is outside every pool: {', '.join(names)}")
