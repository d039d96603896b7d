"""The agent's sync loop against a real ovs-vswitchd: namespaces, retry schedule, coalescing, gate.

The clock is the loop's injectable one: a refused object's retry is made due by moving it, not
by waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from sanderling.agent.sync import RetrySchedule, SyncLoop
from sanderling.openflow import ir
from sanderling.openflow.connection import Connection
from sanderling.openflow.realizer import Realizer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def until(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.01)


def service_flow(vip: str, group: int) -> ir.Flow:
    return ir.Flow(0, 10, ir.match(proto="tcp", nw_dst=vip, tp_dst=80), (ir.GroupAction(group),))


def group(gid: int) -> ir.Group:
    return ir.Group(gid, "select", (ir.Bucket((ir.Output(1),), 10), ir.Bucket((ir.Output(2),), 10)))


async def running(sync: SyncLoop, body: Callable[[], Awaitable[None]]) -> None:
    task = asyncio.create_task(sync.run())
    try:
        await asyncio.wait_for(sync.connected.wait(), 10)
        await body()
    finally:
        sync.stop()
        sync.kick()
        await asyncio.wait_for(task, 10)


def test_each_namespace_has_one_owner_and_producers_stay_inside_theirs():
    sync = SyncLoop("n", "unix:/nonexistent", Realizer(1))
    services = sync.scope("service")
    with pytest.raises(ValueError, match="overlaps"):
        sync.scope("service/")
    with pytest.raises(ValueError, match="overlaps"):
        sync.scope("service/health")
    with pytest.raises(ValueError, match="outside this producer's namespace"):
        services.set_object("policy/p", [])
    services.set_object("service/a", [service_flow("10.96.0.1", 1)], [group(1)])
    assert sync.realizer.pending == {"service/a"}


def test_retry_schedule_doubles_to_its_cap_and_forgets_what_recovered():
    schedule = RetrySchedule(base=0.5, cap=2.0)
    schedule.update({"a"}, now=0.0)
    assert schedule.take_due(0.4) == [] and schedule.next_due() == 0.5
    assert schedule.take_due(0.5) == ["a"]  # then 1 s
    schedule.update({"a"}, now=0.6)  # failed again: keeps its doubled delay
    assert schedule.take_due(1.4) == [] and schedule.take_due(1.5) == ["a"]  # then 2 s (the cap)
    assert schedule.take_due(3.4) == [] and schedule.take_due(3.5) == ["a"]
    assert schedule.take_due(5.5) == ["a"]  # capped: 2 s again
    schedule.update(set(), now=6.0)
    assert "a" not in schedule and schedule.next_due() is None


def test_a_refused_object_is_retried_on_schedule_without_changing(bridge):
    """A Service flow pointing at a group that is not there yet is refused; once another producer
    installs the group, the retry (due by the clock, not by a change) installs the flow."""
    clock = Clock()
    sync = SyncLoop("n", bridge.target, Realizer(1), clock=clock, poll_interval=30.0)
    flows_of = sync.scope("svc/")
    groups_of = sync.scope("grp/")

    async def body() -> None:
        flows_of.set_object("svc/web", [service_flow("10.96.0.10", 77)])
        await until("svc/web refused", lambda: sync.error("svc/web") is not None)
        assert "group" in (sync.error("svc/web") or "").lower()
        groups_of.set_object("grp/web", [], [group(77)])
        await until("grp/web installed", lambda: sync.installed("grp/web"))
        await sync.flush()
        assert not sync.installed("svc/web"), "retried before it was due"
        clock.now += 0.5
        await sync.flush()
        assert sync.installed("svc/web") and sync.error("svc/web") is None
        assert any("nw_dst=10.96.0.10" in line and "group:77" in line for line in bridge.dump_flows())

    asyncio.run(running(sync, body))


def test_a_burst_of_changes_goes_out_as_one_bundle(bridge):
    sync = SyncLoop("n", bridge.target, Realizer(1), poll_interval=30.0, min_interval=0.05)
    services = sync.scope("service/")

    async def body() -> None:
        before = sync.bundles
        for i in range(200):  # one synchronous burst, as an informer's batch is
            services.set_object(f"service/s{i}", [service_flow(f"10.96.1.{i}", 100 + i)], [group(100 + i)])
        await until("200 Services installed", lambda: all(sync.installed(f"service/s{i}") for i in range(200)))
        assert sync.bundles - before == 1, sync.bundles - before

    asyncio.run(running(sync, body))
    assert sum("group:" in line for line in bridge.dump_flows()) == 200


def test_gate_keeps_the_previous_generation_until_the_informers_listed(bridge):
    async def previous_generation() -> None:
        conn = await Connection.open(bridge.target)
        old = Realizer(1)
        old.set_object("service/old", [service_flow("10.96.9.9", 9)], [group(9)])
        await old.resync(conn)
        conn.close()

    asyncio.run(previous_generation())
    sync = SyncLoop("n", bridge.target, Realizer(2), poll_interval=30.0)
    sync.gate = asyncio.Event()
    pods = sync.scope("pod/")
    services = sync.scope("service/")

    async def body() -> None:
        pods.set_object("pod/ns/a/eth0", [ir.Flow(0, 30, ir.match(in_port=1), (ir.Output(2),))])
        services.set_object("service/new", [service_flow("10.96.2.2", 2)], [group(2)])
        await until("the pod's flows", lambda: sync.installed("pod/ns/a/eth0"))
        await sync.flush()
        flows = bridge.dump_flows()
        assert any("nw_dst=10.96.9.9" in line for line in flows), "previous generation swept before the gate"
        assert not sync.installed("service/new") and not sync.swept
        assert sync.gate is not None
        sync.gate.set()
        sync.kick()
        await until("swept", lambda: sync.swept)
        flows = bridge.dump_flows()
        assert any("nw_dst=10.96.2.2" in line for line in flows)
        assert not any("nw_dst=10.96.9.9" in line for line in flows)

    asyncio.run(running(sync, body))


def test_setting_an_unchanged_object_does_not_wake_the_loop():
    """Producers that poll (the pods, from OVSDB before every sync) set the same objects again and
    again; only a real change may wake the loop, or it would sync in circles."""
    sync = SyncLoop("n", "unix:/nonexistent", Realizer(1))
    pods = sync.scope("pod/")
    flow = ir.Flow(0, 30, ir.match(in_port=1), (ir.Output(2),))
    pods.set_object("pod/ns/a/eth0", [flow])
    assert sync._wake.is_set()
    sync._wake.clear()
    pods.set_object("pod/ns/a/eth0", [flow])
    assert not sync._wake.is_set()
    pods.remove_object("pod/ns/a/eth0")
    assert sync._wake.is_set()


def test_the_pod_flows_hear_each_port_open_from_the_switch(bridge):
    """OpenFlow port-status messages, as ovs-vswitchd opens each port: a CNI ADD waiting for its
    port at its ofport is told then (before OVSDB's configuration number for the whole batch);
    a status for another ofport tells it nothing; a port deleted and added again is waited for
    again once the ADD forgot it."""
    from sanderling.agent.pod_flows import PodFlows
    from sanderling.model.network import NodeNetwork

    node = NodeNetwork.build("n", "10.244.1.0/24")
    sync = SyncLoop("n", bridge.target, Realizer(1), poll_interval=30.0)
    pods = PodFlows(node, sync, lambda: [])
    name = f"{bridge.name}st"

    async def body() -> None:
        right = asyncio.ensure_future(pods.port_opened(name, 33))
        wrong = asyncio.ensure_future(pods.port_opened(name, 34))
        await asyncio.to_thread(bridge.runtime.vsctl, "add-port", bridge.name, name, "--", "set", "interface", name,
                                "type=dummy", "ofport_request=33")
        await asyncio.wait_for(right, 10)
        assert not wrong.done()
        wrong.cancel()
        await pods.port_opened(name, 33)  # already reported: answered at once
        await asyncio.to_thread(bridge.runtime.vsctl, "del-port", bridge.name, name)
        pods.forget_port(name)
        again = asyncio.ensure_future(pods.port_opened(name, 33))
        await asyncio.sleep(0)
        assert not again.done()
        await asyncio.to_thread(bridge.runtime.vsctl, "add-port", bridge.name, name, "--", "set", "interface", name,
                                "type=dummy", "ofport_request=33")
        await asyncio.wait_for(again, 10)

    asyncio.run(running(sync, body))
