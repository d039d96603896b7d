"""Invariants (hypothesis) on a real switch: incremental == from scratch, add+delete leaves
nothing, replay is idempotent."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sanderling.compiler import pods
from sanderling.model.network import NodeNetwork, PodPort
from sanderling.openflow.connection import Connection
from sanderling.openflow.realizer import Realizer

NODE = NodeNetwork.build("n", "10.244.9.0/24")

# an event: (pod index, None = delete | (ofport, ip last byte))
events = st.lists(st.tuples(st.integers(0, 5), st.one_of(st.none(), st.tuples(st.integers(1, 8),
                                                                               st.integers(10, 20)))),
                  min_size=1, max_size=12)


def pod(i: int, ofport: int, last: int) -> PodPort:
    return PodPort.build("ns", f"p{i}", ofport, f"0a:58:00:00:00:{i:02x}", f"10.244.9.{last}")


def table(bridge) -> list[str]:
    return bridge.dump_flows()


def _valid(desired: dict[int, PodPort]) -> dict[int, PodPort]:
    """Drop pods that would collide (same ofport or IP as an earlier pod): the realizer would
    report them as conflicts, which is tested elsewhere."""
    out, ports, ips = {}, set(), set()
    for i, p in sorted(desired.items()):
        if p.ofport in ports or p.ip in ips:
            continue
        ports.add(p.ofport)
        ips.add(p.ip)
        out[i] = p
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq=events)
def test_incremental_equals_from_scratch(bridge, dummy_db, seq):
    scratch = f"{bridge.name}s"
    dummy_db.ensure_bridge(scratch, "dummy")

    async def go():
        conn = await Connection.open(bridge.target)
        inc = Realizer(1)
        await inc.resync(conn)  # clears what the previous example left
        inc.set_object("static", pods.static_flows(NODE))
        desired: dict[int, PodPort] = {}
        for i, change in seq:
            if change is None:
                desired.pop(i, None)
            else:
                desired[i] = pod(i, *change)
            valid = _valid(desired)
            for j in range(6):
                if j in valid:
                    inc.set_object(f"p{j}", pods.pod_flows(NODE, valid[j]))
                else:
                    inc.remove_object(f"p{j}")
            result = await inc.sync(conn)
            assert not result.failed
        again = await inc.sync(conn)  # nothing pending: idempotent
        assert again.flow_mods == 0
        conn.close()
        conn2 = await Connection.open(bridge.runtime.mgmt_target(scratch))
        fresh = Realizer(1)
        fresh.set_object("static", pods.static_flows(NODE))
        for j, p in _valid(desired).items():
            fresh.set_object(f"p{j}", pods.pod_flows(NODE, p))
        await fresh.resync(conn2)
        conn2.close()
        return inc

    try:
        asyncio.run(go())
        out_inc = table(bridge)
        out_fresh = [line for line in bridge.runtime.ofctl(scratch, "dump-flows", "--no-stats").splitlines()
                     if "reply" not in line]
        assert out_inc == sorted(line.strip() for line in out_fresh)
    finally:
        dummy_db.delete_bridge(scratch)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ofports=st.lists(st.integers(1, 50), min_size=1, max_size=6, unique=True))
def test_add_then_delete_leaves_nothing(bridge, ofports):
    async def go():
        conn = await Connection.open(bridge.target)
        r = Realizer(1)
        await r.resync(conn)
        for n, port in enumerate(ofports):
            r.set_object(f"p{n}", pods.pod_flows(NODE, pod(n, port, 10 + n)))
        await r.sync(conn)
        per_pod = len(pods.pod_flows(NODE, PodPort.build("x", "y", 1, "0a:00:00:00:00:01", "10.244.9.9")))
        assert len(bridge.dump_flows()) == per_pod * len(ofports)
        for n in range(len(ofports)):
            r.remove_object(f"p{n}")
        await r.sync(conn)
        conn.close()
    asyncio.run(go())
    assert bridge.dump_flows() == []
