"""Allocating pod addresses from the node's pod subnet (and requested fixed addresses).

Round-robin from a persisted cursor, so a released address is not handed out again at once
(a late packet for the old pod must not reach the new one). Errors name what the operator
needs: the pod holding a requested address, the pools an address is outside of, the size of
an exhausted pool.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass

from sanderling.ipam.store import Allocation, AllocationStore, Txn


class IpamError(Exception):
    """An allocation that cannot be made; `code` is the CNI error code to report."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


E_IP_IN_USE = 100
E_OUTSIDE_POOLS = 101
E_EXHAUSTED = 102
MAX_SPAN = 1 << 32  # addresses of a pool searched for a free one


@dataclass(frozen=True)
class Pool:
    """A range pods can get addresses from; the node subnet minus network, gateway, broadcast."""

    name: str
    cidr: ipaddress.IPv4Network | ipaddress.IPv6Network
    reserved: frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address] = frozenset()

    @property
    def size(self) -> int:
        return self.cidr.num_addresses - 2 - len(self.reserved)

    def usable(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return (ip in self.cidr and ip not in self.reserved
                and ip not in (self.cidr.network_address, self.cidr.broadcast_address))


@dataclass(frozen=True)
class Request:
    container_id: str
    ifname: str
    pod_namespace: str = ""
    pod_name: str = ""
    ip: str | None = None  # a requested fixed address
    mac: str = ""
    ip6: str | None = None  # a requested fixed IPv6 address (dual-stack nodes)


class Allocator:
    """`pools`: ranges tried in order (IPv4; on an IPv6-only node the IPv6 pod subnet, whose
    addresses then fill the allocation's `ip`); `pool6`: the node's IPv6 pod subnet on a
    dual-stack node, which gives every allocation of the node pool its IPv6 address too."""

    def __init__(self, store: AllocationStore, pools: list[Pool], pool6: Pool | None = None) -> None:
        self.store = store
        self.pools = pools
        self.pool6 = pool6

    def usage(self) -> list[tuple[str, int, int]]:
        """(pool, addresses in use, addresses free) of every pool of this node."""
        counts: dict[str, int] = {}
        for alloc in self.store.all():
            counts[alloc.pool] = counts.get(alloc.pool, 0) + 1
        out = [(pool.name, counts.get(pool.name, 0), max(0, pool.size - counts.get(pool.name, 0)))
               for pool in self.pools]
        if self.pool6 is not None:
            used6 = sum(1 for alloc in self.store.all() if alloc.ip6)
            out.append((self.pool6.name, used6, max(0, self.pool6.size - used6)))
        return out

    def _pool_for(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Pool:
        for pool in self.pools:
            if pool.usable(ip):
                return pool
        names = ", ".join(f"{p.name} ({p.cidr})" for p in self.pools)
        raise IpamError(E_OUTSIDE_POOLS, f"requested address {ip} is outside every pool of this node: {names}")

    def allocate(self, req: Request) -> Allocation:
        """Allocate (or return the existing allocation of the same container and interface)."""
        with self.store.transaction() as txn:
            return self._allocate_in(txn, req)

    def allocate_many(self, reqs: list[Request]) -> list[Allocation | IpamError]:
        """Several allocations in one transaction: a burst of ADDs costs one commit, not one
        each behind the database's single writer. Each runs in a savepoint, so one that fails
        (an address in use, an exhausted pool) gets its error and leaves the others made."""
        out: list[Allocation | IpamError] = []
        with self.store.transaction() as txn:
            for req in reqs:
                txn.db.execute("SAVEPOINT one_allocation")
                try:
                    out.append(self._allocate_in(txn, req))
                except IpamError as exc:
                    txn.db.execute("ROLLBACK TO one_allocation")
                    out.append(exc)
                txn.db.execute("RELEASE one_allocation")
        return out

    def _allocate_in(self, txn: Txn, req: Request) -> Allocation:
        if req.ip6 and self.pool6 is None and not req.ip and self.pools and self.pools[0].cidr.version == 6:
            req = dataclasses.replace(req, ip=req.ip6, ip6=None)  # an IPv6-only node: its primary pool
        if req.ip6 and self.pool6 is None:
            raise IpamError(E_OUTSIDE_POOLS, f"requested IPv6 address {req.ip6} but this node has no IPv6 pod subnet")
        alloc = self._allocate_primary(txn, req)
        if self.pool6 is None or alloc.ip6 or alloc.pool != "node":
            return alloc
        ip6 = self._allocate6(txn, req)
        txn.db.execute("UPDATE allocations SET ip6=? WHERE ip=?", (ip6, alloc.ip))
        return dataclasses.replace(alloc, ip6=ip6)

    def _allocate6(self, txn: Txn, req: Request) -> str:
        pool = self.pool6
        assert pool is not None
        if req.ip6:
            try:
                ip = ipaddress.IPv6Address(req.ip6.split("/")[0])
            except ValueError:
                raise IpamError(E_OUTSIDE_POOLS, f"requested address {req.ip6!r} is not an IPv6 address") from None
            if not pool.usable(ip):
                raise IpamError(E_OUTSIDE_POOLS, f"requested address {ip} is not a pod address of this node's "
                                                 f"IPv6 subnet {pool.cidr}")
            holder = txn.holder(str(ip))
            if holder is not None:
                raise IpamError(E_IP_IN_USE, f"requested address {ip} is already in use by {holder.pod}")
            return str(ip)
        found = self._next_free(txn, pool, txn.used6())
        if found is None:
            raise IpamError(E_EXHAUSTED, f"no free address: the IPv6 pod subnet {pool.cidr} is exhausted")
        self._set_cursor(txn, pool, found)
        return str(found)

    def _allocate_primary(self, txn: Txn, req: Request) -> Allocation:
        existing = txn.find(req.container_id, req.ifname)
        if existing is not None:
            if req.ip and existing.ip != req.ip:
                raise IpamError(E_IP_IN_USE, f"{req.container_id}/{req.ifname} already holds {existing.ip}, "
                                             f"not the requested {req.ip}")
            return existing
        if req.ip:
            try:
                ip = ipaddress.ip_address(req.ip.split("/")[0])
            except ValueError:
                raise IpamError(E_OUTSIDE_POOLS, f"requested address {req.ip!r} is not an IP address") from None
            pool = self._pool_for(ip)
            holder = txn.holder(str(ip))
            if holder is not None:
                raise IpamError(E_IP_IN_USE, f"requested address {ip} is already in use by {holder.pod}")
            alloc = Allocation(str(ip), pool.name, req.container_id, req.ifname, req.pod_namespace,
                               req.pod_name, req.mac)
            txn.insert(alloc)
            return alloc
        for pool in self.pools:
            found = self._next_free(txn, pool, txn.used(pool.name))
            if found is not None:
                alloc = Allocation(str(found), pool.name, req.container_id, req.ifname, req.pod_namespace,
                                   req.pod_name, req.mac)
                txn.insert(alloc)
                self._set_cursor(txn, pool, found)
                return alloc
        summary = ", ".join(f"{p.name} ({p.cidr}, {p.size} addresses)" for p in self.pools)
        raise IpamError(E_EXHAUSTED, f"no free address: pool(s) exhausted: {summary}")

    def _next_free(self, txn: Txn, pool: Pool,
                   used: set[str]) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """Round-robin from the pool's cursor. An IPv6 subnet is searched in its first 2^32
        addresses (more than a node ever runs pods), so the cursor fits SQLite's 64-bit integer."""
        base = int(pool.cidr.network_address)
        kind = type(pool.cidr.network_address)
        first = base + 1
        last = min(int(pool.cidr.broadcast_address) - 1, base + MAX_SPAN)
        span = last - first + 1
        cursor = self._cursor(txn, pool)
        start = cursor + 1 if first <= cursor < last else first
        for offset in range(span):
            candidate = kind(first + (start - first + offset) % span)
            if candidate in pool.reserved or str(candidate) in used:
                continue
            return candidate
        return None

    @staticmethod
    def _cursor(txn: Txn, pool: Pool) -> int:
        """The pool's last address (IPv4: stored as is; IPv6: as its offset in the subnet)."""
        stored = txn.cursor(pool.name)
        if pool.cidr.version == 4 or stored < 0:
            return stored
        return int(pool.cidr.network_address) + stored

    @staticmethod
    def _set_cursor(txn: Txn, pool: Pool, last: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
        txn.set_cursor(pool.name, int(last) if pool.cidr.version == 4 else int(last) - int(pool.cidr.network_address))

    def release(self, container_id: str, ifname: str) -> Allocation | None:
        return self.store.release(container_id, ifname)

    def release_ip(self, ip: str) -> None:
        with self.store.transaction() as txn:
            txn.db.execute("DELETE FROM allocations WHERE ip=? OR ip6=?", (ip, ip))
