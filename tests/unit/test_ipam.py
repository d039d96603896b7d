"""IPAM: node subnet allocation, requested addresses, errors that name what matters, persistence."""

from __future__ import annotations

import ipaddress
import multiprocessing
from pathlib import Path

import pytest

from sanderling.ipam.allocator import E_EXHAUSTED, E_IP_IN_USE, E_OUTSIDE_POOLS, Allocator, IpamError, Pool, Request
from sanderling.ipam.store import AllocationStore

NET = ipaddress.IPv4Network("10.244.1.0/29")  # 6 usable, .1 is the gateway


def allocator(path: Path) -> Allocator:
    return Allocator(AllocationStore(path / "ipam.db"),
                     [Pool("node", NET, frozenset({ipaddress.IPv4Address("10.244.1.1")}))])


def test_allocates_distinct_addresses_skipping_gateway_network_broadcast(tmp_path):
    a = allocator(tmp_path)
    ips = [a.allocate(Request(f"c{i}", "eth0")).ip for i in range(5)]
    assert ips == ["10.244.1.2", "10.244.1.3", "10.244.1.4", "10.244.1.5", "10.244.1.6"]


def test_exhausted_pool_error_names_pool_and_size(tmp_path):
    a = allocator(tmp_path)
    for i in range(5):
        a.allocate(Request(f"c{i}", "eth0"))
    with pytest.raises(IpamError) as info:
        a.allocate(Request("c9", "eth0"))
    assert info.value.code == E_EXHAUSTED
    assert "node (10.244.1.0/29, 5 addresses)" in info.value.msg


def test_same_container_and_interface_gets_the_same_address(tmp_path):
    a = allocator(tmp_path)
    assert a.allocate(Request("c1", "eth0")).ip == a.allocate(Request("c1", "eth0")).ip
    assert a.allocate(Request("c1", "net1")).ip != a.allocate(Request("c1", "eth0")).ip


def test_requested_address_in_use_names_the_holder(tmp_path):
    a = allocator(tmp_path)
    a.allocate(Request("c1", "eth0", "prod", "web-1", ip="10.244.1.4"))
    with pytest.raises(IpamError) as info:
        a.allocate(Request("c2", "eth0", "prod", "web-2", ip="10.244.1.4"))
    assert info.value.code == E_IP_IN_USE and "prod/web-1" in info.value.msg


def test_requested_address_outside_pools_names_the_pools(tmp_path):
    with pytest.raises(IpamError) as info:
        allocator(tmp_path).allocate(Request("c1", "eth0", ip="10.9.9.9"))
    assert info.value.code == E_OUTSIDE_POOLS and "node (10.244.1.0/29)" in info.value.msg
    with pytest.raises(IpamError):
        allocator(tmp_path).allocate(Request("c1", "eth0", ip="10.244.1.1"))  # the gateway


def test_released_address_is_not_reused_at_once(tmp_path):
    a = allocator(tmp_path)
    first = a.allocate(Request("c1", "eth0")).ip
    a.release("c1", "eth0")
    assert a.allocate(Request("c2", "eth0")).ip != first


def test_allocations_survive_reopening(tmp_path):
    a = allocator(tmp_path)
    ip = a.allocate(Request("c1", "eth0", "ns", "p")).ip
    a.store.close()
    b = allocator(tmp_path)
    assert b.store.find("c1", "eth0").ip == ip
    assert b.allocate(Request("c2", "eth0")).ip != ip


def _grab(args: tuple[str, int]) -> list[str]:
    path, worker = args
    a = Allocator(AllocationStore(Path(path) / "ipam.db"), [Pool("node", ipaddress.IPv4Network("10.250.0.0/24"))])
    return [a.allocate(Request(f"w{worker}-{i}", "eth0")).ip for i in range(20)]


def test_concurrent_processes_never_share_an_address(tmp_path):
    allocator(tmp_path).store.close()  # create the schema, and hold no connection across the start of the workers
    # spawned, not forked: a forked child inherits SQLite's per-process lock bookkeeping of any
    # connection the parent still has open on the file (the parent's POSIX locks are not
    # inherited), which broke its locking in CI (40 duplicates in 120) when the garbage
    # collector had not yet closed a dropped store; separate processes are what shares this file
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        results = pool.map(_grab, [(str(tmp_path), w) for w in range(6)])
    ips = [ip for r in results for ip in r]
    assert len(ips) == 120 and len(set(ips)) == 120


def test_a_slash_8_pool_is_computed_not_enumerated():
    """Issue 20: an IPPool of a /8 neither blocks nor allocates per address."""
    import ipaddress as _ip
    import time as _time

    from sanderling.model.ippool import IPPool

    pool = IPPool.from_object({"metadata": {"name": "big"},
                               "spec": {"cidrs": ["10.0.0.0/8", "192.168.7.0/31"],
                                        "excludes": ["10.0.0.1", "10.0.0.0/30", "10.255.0.0/16"]}})
    started = _time.perf_counter()
    count = pool.usable_count()
    first = [str(a) for a, _ in zip(pool.usable(), range(2), strict=False)]
    assert _time.perf_counter() - started < 0.1
    assert count == (2**24 - 2) - 2 - 65536 + 2  # hosts, minus .1-.3 (.0 is no host), minus 10.255/16, plus the /31
    assert first == ["10.0.0.4", "10.0.0.5"]
    small = IPPool("s", (_ip.IPv4Network("10.1.0.0/29"),), (_ip.IPv4Network("10.1.0.2/32"),), None, None)
    assert [str(a) for a in small.usable()] == ["10.1.0.1", "10.1.0.3", "10.1.0.4", "10.1.0.5", "10.1.0.6"]
    assert small.usable_count() == 5


def test_a_batch_is_one_transaction_where_each_request_fails_alone(tmp_path):
    """A burst of ADDs allocates together (one commit); an address already held or a pool run
    dry fails that request only, and what the others got is kept."""
    a = allocator(tmp_path)
    a.allocate(Request("held", "eth0", "default", "holder", "10.244.1.4"))
    out = a.allocate_many([Request("b1", "eth0"), Request("b2", "eth0", ip="10.244.1.4"), Request("b3", "eth0"),
                           Request("b1", "eth0"), Request("b4", "eth0"), Request("b5", "eth0")])
    assert [getattr(r, "ip", None) for r in out] == ["10.244.1.2", None, "10.244.1.3", "10.244.1.2",
                                                      "10.244.1.5", "10.244.1.6"]
    assert isinstance(out[1], IpamError) and out[1].code == E_IP_IN_USE and "default/holder" in out[1].msg
    last = a.allocate_many([Request("b6", "eth0")])[0]
    assert isinstance(last, IpamError) and last.code == E_EXHAUSTED
    reopened = {x.container_id: x.ip for x in AllocationStore(tmp_path / "ipam.db").all()}
    assert reopened == {"held": "10.244.1.4", "b1": "10.244.1.2", "b3": "10.244.1.3", "b4": "10.244.1.5",
                        "b5": "10.244.1.6"}


def test_group_commit_batches_what_arrives_meanwhile_and_delivers_each_result():
    import asyncio

    from sanderling.group_commit import GroupCommit

    batches: list[list[int]] = []

    async def write(requests: list[int]) -> list[int | BaseException]:
        batches.append(requests)
        return [ValueError(f"odd {r}") if r % 2 else r * 10 for r in requests]

    async def scenario() -> list[object]:
        group: GroupCommit[int, int] = GroupCommit(write)
        return await asyncio.gather(*(group.submit(i) for i in range(6)), return_exceptions=True)

    results = asyncio.run(scenario())
    assert batches == [[0, 1, 2, 3, 4, 5]]
    assert results[0::2] == [0, 20, 40]
    assert [str(r) for r in results[1::2]] == ["odd 1", "odd 3", "odd 5"]


def test_a_dual_stack_allocation_holds_one_address_per_family_and_fails_whole(tmp_path):
    store = AllocationStore(tmp_path / "ipam.db")
    alloc = Allocator(store, [Pool("node", ipaddress.IPv4Network("10.244.1.0/24"),
                                   frozenset({ipaddress.IPv4Address("10.244.1.1")}))],
                      Pool("node6", ipaddress.IPv6Network("fd00:10:244:1::/64"),
                           frozenset({ipaddress.IPv6Address("fd00:10:244:1::1")})))
    first = alloc.allocate(Request("c1", "eth0", "prod", "a"))
    assert (first.ip, first.ip6) == ("10.244.1.2", "fd00:10:244:1::2")
    fixed = alloc.allocate(Request("c2", "eth0", "prod", "b", ip6="fd00:10:244:1::50"))
    assert fixed.ip6 == "fd00:10:244:1::50"
    # the IPv6 address taken: the request fails whole (its IPv4 address is not kept either)
    with pytest.raises(IpamError) as taken:
        alloc.allocate(Request("c3", "eth0", "prod", "c", ip6="fd00:10:244:1::50"))
    assert taken.value.code == 100 and "prod/b" in taken.value.msg
    assert store.find("c3", "eth0") is None
    with pytest.raises(IpamError) as outside:
        alloc.allocate(Request("c4", "eth0", ip6="fd00:99::5"))
    assert outside.value.code == 101 and "fd00:10:244:1::/64" in outside.value.msg
    assert ("node6", 2, 2 ** 64 - 2 - 1 - 2) in alloc.usage()  # less subnet and last, gateway, the two
    store.release("c1", "eth0")
    again = alloc.allocate(Request("c5", "eth0"))
    assert again.ip6 not in ("fd00:10:244:1::2", "fd00:10:244:1::50")  # round-robin, not reused at once
    # a store made before dual-stack gets the column on opening
    old = tmp_path / "old.db"
    import sqlite3

    db = sqlite3.connect(old)
    db.executescript(SCHEMA_V1)
    db.execute("INSERT INTO allocations VALUES ('10.0.0.5', 'node', 'c', 'eth0', '', '', '', 0)")
    db.commit()
    db.close()
    assert AllocationStore(old).find("c", "eth0").ip6 == ""


SCHEMA_V1 = """
CREATE TABLE allocations (ip TEXT PRIMARY KEY, pool TEXT NOT NULL, container_id TEXT NOT NULL,
    ifname TEXT NOT NULL, pod_namespace TEXT NOT NULL DEFAULT '', pod_name TEXT NOT NULL DEFAULT '',
    mac TEXT NOT NULL DEFAULT '', created REAL NOT NULL, UNIQUE (container_id, ifname));
CREATE TABLE cursors (pool TEXT PRIMARY KEY, last INTEGER NOT NULL);
"""


def test_an_ipv6_only_node_allocates_from_its_ipv6_subnet_as_the_primary_pool(tmp_path):
    """No IPv4 pool: the IPv6 subnet is the node pool, its address the allocation's primary one
    (a fixed IPv6 request lands there too); an IPv4 request is outside every pool."""
    store = AllocationStore(tmp_path / "ipam.db")
    alloc = Allocator(store, [Pool("node", ipaddress.IPv6Network("fd00:10:244:1::/64"),
                                   frozenset({ipaddress.IPv6Address("fd00:10:244:1::1")}))])
    first = alloc.allocate(Request("c1", "eth0", "prod", "a"))
    assert (first.ip, first.ip6, first.v4, first.v6) == ("fd00:10:244:1::2", "", "", "fd00:10:244:1::2")
    fixed = alloc.allocate(Request("c2", "eth0", "prod", "b", ip6="fd00:10:244:1::50"))
    assert (fixed.v4, fixed.v6, fixed.ips) == ("", "fd00:10:244:1::50", ("fd00:10:244:1::50",))
    with pytest.raises(IpamError) as taken:
        alloc.allocate(Request("c3", "eth0", "prod", "c", ip="fd00:10:244:1::50"))
    assert taken.value.code == E_IP_IN_USE and "prod/b" in taken.value.msg
    with pytest.raises(IpamError) as outside:
        alloc.allocate(Request("c4", "eth0", ip="10.244.1.5"))
    assert outside.value.code == E_OUTSIDE_POOLS and "fd00:10:244:1::/64" in outside.value.msg
    assert store.find("c2", "eth0").v6 == "fd00:10:244:1::50"


def test_the_fixed_ip_annotation_takes_one_address_per_family():
    from sanderling.model.errors import ModelError
    from sanderling.model.ippool import parse_ips_annotation

    assert parse_ips_annotation("10.244.1.5", "pod/a/b") == ["10.244.1.5"]
    assert parse_ips_annotation("fd00::5/64", "pod/a/b") == ["fd00::5"]
    assert parse_ips_annotation('["10.244.1.5", "fd00::5"]', "pod/a/b") == ["10.244.1.5", "fd00::5"]
    for bad, why in (("10.0.0.1,10.0.0.2", "two IPv4 addresses"), ("fd00::1,fd00::2", "two IPv6 addresses"),
                     ("nonsense", "'nonsense' is not an IP address"), ("[]", "names no address")):
        with pytest.raises(ModelError, match=why):
            parse_ips_annotation(bad, "pod/a/b")


def test_an_ippool_of_both_families_is_computed_per_family():
    from sanderling.model.ippool import IPPool

    pool = IPPool.from_object({"metadata": {"name": "both"}, "spec": {
        "cidrs": ["10.62.0.0/30", "fd00:62::/126"], "excludes": ["fd00:62::1", "10.62.0.2"]}})
    assert pool.versions == (4, 6)
    assert [str(ip) for ip in pool.usable(4)] == ["10.62.0.1"]
    assert [str(ip) for ip in pool.usable(6)] == ["fd00:62::2", "fd00:62::3"]  # not the subnet's anycast ::0
    assert (pool.usable_count(4), pool.usable_count(6), pool.usable_count()) == (1, 2, 3)
    assert pool.contains(ipaddress.ip_address("fd00:62::3")) and not pool.contains(ipaddress.ip_address("fd00:62::1"))
    assert not pool.contains(ipaddress.ip_address("10.62.0.2"))
    six = IPPool.from_object({"metadata": {"name": "six"}, "spec": {"cidrs": ["fd00:63::/64"]}})
    assert six.versions == (6,) and six.usable_count(4) == 0
    assert six.usable_count(6) == 2 ** 64 - 1  # computed, never enumerated
