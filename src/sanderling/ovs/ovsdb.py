"""OVSDB through ovsdbapp: bridges, ports and their external_ids. Every failed transaction raises."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sanderling.ovs.runtime import OvsError

log = logging.getLogger(__name__)

EXT_POD_NAMESPACE = "sanderling.io/pod-namespace"
EXT_POD_NAME = "sanderling.io/pod-name"
EXT_CONTAINER_ID = "sanderling.io/container-id"
EXT_INTERFACE = "sanderling.io/interface"
EXT_IP = "sanderling.io/ip"
EXT_MAC = "sanderling.io/mac"
EXT_NETWORK = "sanderling.io/network"      # secondary networks: the NAD, namespace/name
EXT_VNI = "sanderling.io/vni"              # the layer2 bridge's tunnel device of a network


@dataclass(frozen=True)
class PortRecord:
    name: str
    ofport: int
    external_ids: dict[str, str]
    ofport_request: int = 0
    tag: int = 0

    @property
    def effective_ofport(self) -> int:
        """The port number flows should use: assigned, or the requested one until it is."""
        return self.ofport if self.ofport > 0 else self.ofport_request


@dataclass(frozen=True)
class PortChange:
    """Add (with external_ids and an ofport request) or delete one port of a bridge."""

    name: str
    delete: bool = False
    external_ids: tuple[tuple[str, str], ...] = ()
    ofport_request: int = 0
    iface_type: str = ""
    tag: int = 0                      # access VLAN of the port (secondary networks)
    trunks: tuple[int, ...] = ()      # VLANs a trunk port carries tagged
    mtu_request: int = 0


NOISY_INTERFACE_COLUMNS = frozenset({
    "statistics", "status", "link_resets", "link_speed", "link_state", "duplex", "mtu", "admin_state",
    "lacp_current", "bfd_status", "cfm_fault", "cfm_fault_status", "cfm_flap_count", "cfm_health",
    "cfm_remote_mpids", "cfm_remote_opstate", "lldp"})


class Ovsdb:
    """A connection to one ovsdb-server."""

    def __init__(self, endpoint: str, timeout: float = 10.0) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from ovsdbapp.backend.ovs_idl import connection
            from ovsdbapp.schema.open_vswitch import impl_idl
        self._listeners: list[Callable[[], None]] = []
        try:
            idl = _idl_class(connection.OvsdbIdl)(endpoint, self._schema_helper(endpoint))
            idl.on_change = self._changed
            self._conn = connection.Connection(idl=idl, timeout=timeout)
            # ovsdbapp keeps the connection in a class attribute (one per process); a subclass
            # per instance lets one process talk to several ovsdb-servers (one per lab node).
            api_class = type("OvsdbIdlFor" + str(id(self)), (impl_idl.OvsdbIdl,), {"_ovsdb_connection": None})
            self.api: Any = api_class(self._conn)
        except Exception as exc:
            raise OvsError(f"cannot connect to OVSDB at {endpoint}: {exc}") from exc
        self.endpoint = endpoint
        self._ports_cache: dict[str, tuple[int, list[PortRecord]]] = {}

    @staticmethod
    def _schema_helper(endpoint: str) -> Any:
        """Replicate only the tables and columns the agent uses.

        ovs-vswitchd rewrites every Interface's statistics and status every few seconds; with
        those replicated, the IDL spent more CPU parsing them than the agent spent on pods.
        """
        from ovsdbapp.backend.ovs_idl import idlutils

        helper = idlutils.get_schema_helper(endpoint, "Open_vSwitch")
        for table in ("Open_vSwitch", "Bridge", "Port"):
            helper.register_table(table)
        iface_columns = [c for c in helper.schema_json["tables"]["Interface"]["columns"]
                         if c not in NOISY_INTERFACE_COLUMNS]
        helper.register_columns("Interface", iface_columns)
        return helper

    def _run(self, *commands: Any) -> Any:
        try:
            with self.api.transaction(check_error=True, log_errors=False) as txn:
                for cmd in commands:
                    txn.add(cmd)
            return txn.result
        except Exception as exc:
            raise OvsError(f"OVSDB transaction on {self.endpoint} failed: {exc}") from exc

    def _one(self, command: Any) -> Any:
        return self._run(command)[0]

    def ensure_bridge(self, name: str, datapath_type: str = "netdev", external_ids: dict[str, str] | None = None,
                      table_names: dict[int, str] | None = None, fail_mode: str = "secure",
                      protocols: tuple[str, ...] = ("OpenFlow13",)) -> None:
        """Create the bridge if needed: fail_mode secure (no NORMAL fallback), OpenFlow 1.3.

        `standalone` is for a plain L2 bridge nobody programs (the lab's underlay bridge)."""
        cmds = [
            self.api.add_br(name, may_exist=True, datapath_type=datapath_type),
            self.api.db_set("Bridge", name, ("fail_mode", fail_mode), ("protocols", list(protocols)),
                            ("datapath_type", datapath_type)),
        ]
        if external_ids:
            cmds.append(self.api.db_set("Bridge", name, ("external_ids", external_ids)))
        self._run(*cmds)

    def bridge_external_ids(self, name: str) -> dict[str, str]:
        rows = self._one(self.api.db_get("Bridge", name, "external_ids"))
        return dict(rows or {})

    def set_bridge_external_id(self, name: str, key: str, value: str) -> None:
        self._run(self.api.db_set("Bridge", name, ("external_ids", {key: value})))

    def set_bridge_hwaddr(self, name: str, mac: str) -> None:
        """Pin the MAC of the bridge's LOCAL port (OVS would otherwise pick one of its ports')."""
        self._run(self.api.db_set("Bridge", name, ("other_config", {"hwaddr": mac})))

    def bridges(self) -> list[str]:
        try:
            return [str(name) for name in self.api.list_br().execute(check_error=True)]
        except Exception as exc:
            raise OvsError(f"OVSDB read on {self.endpoint} failed: {exc}") from exc

    def delete_bridge(self, name: str) -> None:
        self._run(self.api.del_br(name, if_exists=True))

    def add_port(self, bridge: str, port: str, external_ids: dict[str, str] | None = None,
                 ofport_request: int | None = None, iface_type: str = "",
                 options: dict[str, str] | None = None) -> None:
        cols: list[tuple[str, Any]] = [("type", iface_type)]
        if options:
            cols.append(("options", options))
        if external_ids:
            cols.append(("external_ids", external_ids))
        if ofport_request:
            cols.append(("ofport_request", ofport_request))
        self._run(self.api.add_port(bridge, port, may_exist=True), self.api.db_set("Interface", port, *cols))

    def apply_port_changes(self, bridge: str, changes: list[PortChange]) -> None:
        """Many port adds/deletes in one transaction (one ovs-vswitchd reconfiguration); returns
        once ovs-vswitchd has applied it."""
        self._run(*self._port_commands(bridge, changes))

    def commit_port_changes(self, bridge: str, changes: list[PortChange]) -> int:
        """The same transaction, returning as soon as ovsdb-server has it (the replica too): the
        `next_cfg` it set, which `cur_cfg` reaches once ovs-vswitchd has applied it.

        ovsdbapp's own transactions wait for ovs-vswitchd inside its connection thread, so a
        second batch of ports could not even be committed while ovs-vswitchd worked on the
        first; committed this way, ovs-vswitchd takes whatever arrived meanwhile in its next
        reconfiguration, and each caller waits (`cur_cfg`, `on_cfg_change`) for its own."""
        commands = self._port_commands(bridge, changes)
        if not commands:
            return self.cur_cfg()
        try:
            txn = _no_wait_transaction(self.api)
            for cmd in commands:
                txn.add(cmd)
            txn.commit()
        except Exception as exc:
            raise OvsError(f"OVSDB transaction on {self.endpoint} failed: {exc}") from exc
        return int(txn.next_cfg)

    def cur_cfg(self) -> int:
        """The last configuration ovs-vswitchd has applied (from the replica)."""
        rows = list(self.api.tables["Open_vSwitch"].rows.values())
        return int(rows[0].cur_cfg) if rows else 0

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` (from the IDL's thread, so it must only hand over) after every change
        the replica takes in: a row inserted, updated or deleted."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # a listener's failure must not break the IDL's thread
                log.exception("OVSDB change listener failed")

    def _port_commands(self, bridge: str, changes: list[PortChange]) -> list[Any]:
        cmds: list[Any] = []
        for ch in changes:
            if ch.delete:
                cmds.append(self.api.del_port(ch.name, bridge=bridge, if_exists=True))
                continue
            cols: list[tuple[str, Any]] = [("type", ch.iface_type)]
            if ch.external_ids:
                cols.append(("external_ids", dict(ch.external_ids)))
            if ch.ofport_request:
                cols.append(("ofport_request", ch.ofport_request))
            if ch.mtu_request:
                cols.append(("mtu_request", ch.mtu_request))
            cmds += [self.api.add_port(bridge, ch.name, may_exist=True), self.api.db_set("Interface", ch.name, *cols)]
            if ch.tag:
                cmds.append(self.api.db_set("Port", ch.name, ("tag", ch.tag), ("vlan_mode", "access")))
            elif ch.trunks:
                cmds.append(self.api.db_set("Port", ch.name, ("trunks", list(ch.trunks)), ("vlan_mode", "trunk")))
        return cmds

    def delete_port(self, bridge: str, port: str) -> None:
        self._run(self.api.del_port(port, bridge=bridge, if_exists=True))

    def ports(self, bridge: str) -> list[PortRecord]:
        """Interfaces of the bridge with their ofport (-1 while OVS has not opened them yet).

        Read straight from the IDL's in-memory replica: the agent reads ports on every CNI
        request, and a queued read transaction costs milliseconds each under load. The
        replica is updated by ovsdbapp's thread, so a read that races an update is retried.
        """
        seqno = self.api.idl.change_seqno
        cached = self._ports_cache.get(bridge)
        if cached is not None and cached[0] == seqno:
            return list(cached[1])
        for _attempt in range(20):
            try:
                ports = self._ports_from_replica(bridge)
                break
            except RuntimeError:  # "changed size during iteration": an update landed meanwhile
                continue
        else:
            ports = self._ports_from_replica(bridge)
        self._ports_cache[bridge] = (seqno, ports)
        return list(ports)

    def _ports_from_replica(self, bridge: str) -> list[PortRecord]:
        tables = self.api.tables
        bridges = [b for b in list(tables["Bridge"].rows.values()) if b.name == bridge]
        if not bridges:
            return []
        out = []
        for port in list(getattr(bridges[0], "ports", [])):
            for iface in list(getattr(port, "interfaces", [])):
                name = getattr(iface, "name", None)
                if not name:
                    continue  # a row still being filled in by an update
                out.append(PortRecord(name, _optional_int(getattr(iface, "ofport", []), -1),
                                      dict(getattr(iface, "external_ids", {})),
                                      _optional_int(getattr(iface, "ofport_request", []), 0),
                                      _optional_int(getattr(port, "tag", []), 0)))
        return out

    def userspace_tso_enabled(self) -> bool:
        rows = self._one(self.api.db_list("Open_vSwitch", columns=["other_config"]))
        return bool(rows) and rows[0]["other_config"].get("userspace-tso-enable") == "true"

    def port_names(self, bridge: str) -> set[str]:
        return {p.name for p in self.ports(bridge)}

    def close(self) -> None:
        try:
            self._conn.stop(timeout=2)
        except Exception:  # already stopped
            pass


def _idl_class(base: type) -> type:
    """ovsdbapp's IDL, telling `on_change` about every change of a row (cur_cfg moves when
    ovs-vswitchd has applied a configuration, a port appears), and without its yield per row.

    ovsdbapp's IDL calls time.sleep(0) for every row of every update, for green threads; in a
    process of real threads each is a syscall, a timer-slack sleep and a fight for the GIL with
    the event loop: 20 ports committed in 71 ms with it, 50 ms without (lab node, unloaded)."""
    class Idl(base):  # type: ignore[valid-type,misc]
        on_change: Callable[[], None] | None = None

        def cooperative_yield(self) -> None:
            """No green threads here: the interpreter switches threads on its own."""

        def notify(self, event: Any, row: Any, updates: Any = None) -> None:
            super().notify(event, row, updates)
            if self.on_change is not None:
                self.on_change()
    return Idl


def _no_wait_transaction(api: Any) -> Any:
    """An ovs-vsctl-style transaction (it increments next_cfg) that records the new next_cfg
    instead of waiting for ovs-vswitchd to reach it."""
    from ovsdbapp.schema.open_vswitch.impl_idl import OvsVsctlTransaction

    class NoWait(OvsVsctlTransaction):  # type: ignore[misc]
        next_cfg = 0

        def do_post_commit(self, txn: Any) -> None:
            self.next_cfg = txn.get_increment_new_value()

    return NoWait(api, api.ovsdb_connection, api.ovsdb_connection.timeout, check_error=True, log_errors=False)


def _optional_int(value: Any, default: int) -> int:
    """OVSDB optional columns come back as [] (absent), [n] or n."""
    if isinstance(value, list):
        value = value[0] if value else None
    return int(value) if value is not None else default
