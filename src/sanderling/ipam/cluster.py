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
        # each requested address is in one of the node's subnets or in an IPPool; both in one place
        homes: list[IPPool | None] = []
        for asked in (requested, requested6):
            if not asked:
                continue
            ip = ipaddress.ip_address(asked.split("/")[0])
            if any(ip in c for c in node_cidrs if c.version == ip.version):
                homes.append(None)
                continue
            pool = self.pool_containing(ip, pools)
            if pool is None:
                raise outside_error(str(ip), node_text, pools)
            homes.append(pool)
        if homes:
            if len(homes) == 2 and homes[0] is not homes[1]:
                where_from = ", ".join("the node's subnets" if h is None else f"IPPool {h.name}" for h in homes)
                raise IpamError(E_OUTSIDE_POOLS, f"requested addresses {requested} and {requested6} come from "
                                                 f"different places ({where_from}); ask for both from one")
            return requested, requested6, mac, homes[0]
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

    def pool_containing(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
                        pools: list[IPPool]) -> IPPool | None:
        return next((p for p in pools if p.contains(ip)), None)

    def allocate(self, pool: IPPool, req: Request, versions: tuple[int, ...] = (4,)) -> Allocation:
        """One address of each family in both `versions` (the node's) and the pool (IPv4 first:
        the allocation's `ip`, then its `ip6`), each an entry of the pool's allocations."""
        owner = {"pod": f"{req.pod_namespace}/{req.pod_name}", "node": self.node, "containerID": req.container_id,
                 "ifname": req.ifname}
        families = [v for v in pool.versions if v in versions]
        if not families:
            have = " and ".join(f"IPv{v}" for v in pool.versions)
            raise IpamError(E_OUTSIDE_POOLS, f"IPPool {pool.name} holds {have} addresses only; this node's pods are "
                                             + " and ".join(f"IPv{v}" for v in versions))
        wanted = {4: req.ip, 6: req.ip6}
        for version, asked in wanted.items():
            if asked and version not in families:  # never drop a fixed address silently
                raise IpamError(E_OUTSIDE_POOLS, f"requested address {asked} is IPv{version}, and this node's pods "
                                                 f"from IPPool {pool.name} get " + " and ".join(
                                                     f"IPv{v}" for v in families) + " addresses only")

        def change(_obj: Any, allocations: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
            mine = [ip for ip, o in allocations.items()
                    if o.get("containerID") == req.container_id and o.get("ifname") == req.ifname]
            if mine:
                return None, sorted(mine, key=lambda ip: ":" in ip)
            got: list[str] = []
            for version in families:
                fixed = (wanted[version] or "").split("/")[0]
                if fixed:
                    holder = allocations.get(fixed)
                    if holder is not None:
                        raise IpamError(E_IP_IN_USE, f"requested address {fixed} of pool {pool.name} is already in "
                                                     f"use by {holder.get('pod')} on node {holder.get('node')}")
                    allocations[fixed] = owner
                    got.append(fixed)
                    continue
                free = next((str(ip) for ip in pool.usable(version) if str(ip) not in allocations), None)
                if free is None:
                    kind = f"IPv{version} " if len(pool.versions) > 1 else ""
                    raise IpamError(E_EXHAUSTED, f"IPPool {pool.name} ({', '.join(map(str, pool.cidrs))}, "
                                                 f"{pool.usable_count(version)} {kind}addresses) is exhausted")
                allocations[free] = owner
                got.append(free)
            return allocations, got

        ips = self.api.update_pool_allocations(pool.name, change)
        alloc = Allocation(ips[0], PREFIX + pool.name, req.container_id, req.ifname, req.pod_namespace, req.pod_name,
                           req.mac, ips[1] if len(ips) > 1 else "")
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
            gone = [ip for ip in alloc.ips
                    if (allocations.get(ip) or {}).get("containerID") == alloc.container_id]
            for ip in gone:
                del allocations[ip]
            return (allocations if gone else None), None

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
