"""Pod ports on a real ovsdb-server and ovs-vswitchd (dummy datapath): batched, inserted by the
hand-written transaction when new, through ovsdbapp otherwise, each caller told when its port is
in the replica and open."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from sanderling.ovs.ovsdb import PortChange
from sanderling.ovs.port_batcher import PortBatcher
from sanderling.ovs.runtime import OvsError


def _port(name: str, ofport: int, **ext: str) -> PortChange:
    return PortChange(name, external_ids=tuple(sorted(ext.items())), ofport_request=ofport, iface_type="dummy")


def test_new_ports_that_arrive_together_are_one_transaction_and_open_at_their_ofports(bridge):
    async def scenario() -> PortBatcher:
        batcher = PortBatcher(bridge.db, bridge.name)
        names = [f"{bridge.name}n{i}" for i in range(5)]
        cfgs = await asyncio.gather(*(batcher.commit(_port(n, 20 + i, pod=n)) for i, n in enumerate(names)))
        assert len(set(cfgs)) == 1  # one transaction, one configuration to wait for
        await asyncio.gather(*(batcher.visible(n) for n in names))
        await batcher.applied(cfgs[0])
        await batcher.rpc.close()
        return batcher

    batcher = asyncio.run(scenario())
    assert batcher.batches == 1 and batcher.inserted_directly == 5
    records = {r.name: r for r in bridge.db.ports(bridge.name)}
    for i in range(5):
        record = records[f"{bridge.name}n{i}"]
        assert record.ofport == 20 + i and record.external_ids == {"pod": f"{bridge.name}n{i}"}


def test_an_existing_port_is_updated_through_ovsdbapp_and_a_delete_removes_it(bridge, dummy_ovs):
    name = f"{bridge.name}x"
    dummy_ovs.vsctl("add-port", bridge.name, name, "--", "set", "interface", name, "type=dummy",
                    "ofport_request=30")

    async def scenario() -> PortBatcher:
        batcher = PortBatcher(bridge.db, bridge.name)
        await batcher.visible(name)
        await batcher.apply(_port(name, 30, pod="again"))
        updated = {r.name: r for r in bridge.db.ports(bridge.name)}[name]
        assert updated.external_ids == {"pod": "again"} and updated.ofport == 30
        await batcher.apply(PortChange(name, delete=True))
        await batcher.rpc.close()
        return batcher

    batcher = asyncio.run(scenario())
    assert batcher.inserted_directly == 0
    assert name not in bridge.db.port_names(bridge.name)
    out = subprocess.run(["ovs-vsctl", f"--db={dummy_ovs.db_endpoint}", "list-ports", bridge.name],
                         capture_output=True, text=True, check=True).stdout
    assert name not in out.split()


def test_ports_for_a_bridge_that_does_not_exist_fail_with_the_reason(dummy_db):
    async def scenario() -> None:
        batcher = PortBatcher(dummy_db, "nosuchbr")
        try:
            with pytest.raises(OvsError) as failed:
                await batcher.commit(_port("nosuchp", 5))
            assert "nosuchbr" in str(failed.value)
        finally:
            await batcher.rpc.close()

    asyncio.run(scenario())
    assert "nosuchp" not in {r.name for b in dummy_db.bridges() for r in dummy_db.ports(b)}


def test_the_replica_parses_updates_with_ovs_c_json_parser():
    """setup links Debian's C parser into .venv; the pure-Python one costs the agent a CPU core's
    share under pod churn (every update lexed a character at a time)."""
    import ovs.json

    assert ovs.json.PARSER == ovs.json.PARSER_C


def test_the_ports_read_from_the_replica_follow_every_change_while_read_concurrently(bridge, dummy_ovs):
    """`Ovsdb.ports` reads again only the rows that changed; read from another thread all along
    (as the agent's threads and event loop do while the IDL's thread applies updates), it still
    ends up equal to what ovsdb-server holds after every burst: ports added together, their
    external_ids changed, some deleted."""
    import threading

    stop = threading.Event()
    reads = 0
    failures: list[Exception] = []

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                bridge.db.ports(bridge.name)
            except Exception as exc:  # a read that raised is a failure of the test, not of the thread
                failures.append(exc)
            reads += 1

    def truth() -> dict[str, tuple[int, dict[str, str]]]:
        out = subprocess.run(["ovs-vsctl", f"--db={dummy_ovs.db_endpoint}", "--format=json", "--columns=name,ofport,"
                              "external_ids", "list", "Interface"], capture_output=True, text=True, check=True).stdout
        import json
        rows = json.loads(out)["data"]
        return {name: (ofport if isinstance(ofport, int) else -1, dict(ext[1])) for name, ofport, ext in rows
                if name.startswith(f"{bridge.name}c")}

    def replica() -> dict[str, tuple[int, dict[str, str]]]:
        return {r.name: (r.ofport, r.external_ids) for r in bridge.db.ports(bridge.name)
                if r.name.startswith(f"{bridge.name}c")}

    async def burst(batcher: PortBatcher, round_: int) -> None:
        names = [f"{bridge.name}c{round_}x{i}" for i in range(8)]
        cfgs = await asyncio.gather(*(batcher.commit(_port(n, 40 + 8 * (round_ % 4) + i, pod=n)) for i, n in
                                      enumerate(names)))
        await batcher.applied(max(cfgs))
        await asyncio.gather(*(batcher.apply(_port(n, 40 + 8 * (round_ % 4) + i, pod=f"{n}-again"))
                               for i, n in enumerate(names[:3])))
        await asyncio.gather(*(batcher.apply(PortChange(n, delete=True)) for n in names[3:]))

    async def scenario() -> None:
        batcher = PortBatcher(bridge.db, bridge.name)
        try:
            for round_ in range(12):
                await burst(batcher, round_)
                deadline = asyncio.get_running_loop().time() + 5
                while replica() != truth():
                    assert asyncio.get_running_loop().time() < deadline, (replica(), truth())
                    await asyncio.sleep(0.01)
                for name in list(replica()):
                    await batcher.apply(PortChange(name, delete=True))
        finally:
            await batcher.rpc.close()

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        asyncio.run(scenario())
    finally:
        stop.set()
        thread.join()
    assert failures == []
    assert reads > 100
    assert replica() == truth() == {}


def test_a_transaction_still_being_built_is_not_read_as_the_replica(bridge, dummy_ovs):
    """ovs's IDL shows the changes of a transaction ovsdbapp's thread is building on the rows
    themselves, and forgets them without any update when that transaction is retried or changes
    nothing; a replica read kept until the row's next update must give what ovsdb-server holds."""
    import ovs.db.idl

    name = f"{bridge.name}t"
    dummy_ovs.vsctl("add-port", bridge.name, name, "--", "set", "interface", name, "type=dummy",
                    "external_ids:pod=committed")
    idl = bridge.db.api.idl
    deadline = time.monotonic() + 5
    while (row := next((r for r in list(idl.tables["Interface"].rows.values())
                        if r._data and r.name == name), None)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    while idl.row_version(row.uuid) == 0:  # the IDL notifies of an update after applying all its rows
        assert time.monotonic() < deadline
        time.sleep(0.01)
    txn = ovs.db.idl.Transaction(idl)  # while it is open the IDL's thread takes in no update
    try:
        row.external_ids = {"pod": "not committed"}
        assert row.external_ids == {"pod": "not committed"}  # what the row's attributes show now
        during = {r.name: r.external_ids for r in bridge.db.ports(bridge.name)}[name]
    finally:
        txn.abort()
    after = {r.name: r.external_ids for r in bridge.db.ports(bridge.name)}[name]
    assert during == after == {"pod": "committed"}
