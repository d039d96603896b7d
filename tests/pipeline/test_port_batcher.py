"""Pod ports on a real ovsdb-server and ovs-vswitchd (dummy datapath): batched, inserted by the
hand-written transaction when new, through ovsdbapp otherwise, each caller told when its port is
in the replica and open."""

from __future__ import annotations

import asyncio
import subprocess

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
