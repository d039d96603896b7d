"""OVSDB through ovsdbapp: bridges, ports and their external_ids. Every failed transaction raises."""

from __future__ import annotations

import logging
import threading
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
        self._ports_cache: dict[str, tuple[tuple[int, ...], list[PortRecord]]] = {}
        # per row of the replica, what was read from it and at which of its versions (see `ports`)
        self._bridge_rows: dict[str, tuple[int, Any]] = {}
        self._bridge_ports: dict[str, tuple[Any, int, list[Any]]] = {}
        self._port_rows: dict[Any, tuple[int, list[Any], int]] = {}
        self._iface_records: dict[Any, tuple[int, PortRecord | None]] = {}
        self._cur_cfg: tuple[int, int] = (-1, 0)

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
        """The last configuration ovs-vswitchd has applied (from the replica; read again only
        after the Open_vSwitch row changed: every ADD's waiters ask on every change)."""
        version = self.api.idl.table_version("Open_vSwitch")
        if self._cur_cfg[0] != version:
            with self.api.idl.replica_lock:
                rows = list(self.api.tables["Open_vSwitch"].rows.values())
                self._cur_cfg = (version, int(_committed(rows[0], "cur_cfg", 0)) if rows else 0)
        return self._cur_cfg[1]

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
        request, and a queued read transaction costs milliseconds each under load. Only rows
        that changed since the last read are read again (each IDL attribute read converts the
        column: under twenty concurrent ADDs re-reading every port on every change was 7% of the
        agent's time). The read holds the replica's lock, so it never finds it in the middle of
        an update (a row the IDL's thread took out for a moment, one a reference names but not
        inserted yet: a port missing from one read had its ofport handed to another pod).
        """
        idl = self.api.idl
        tables = self.api.tables
        # (a reconnect empties the replica without telling rows apart: the row counts say so)
        seqno = (idl.table_version("Interface"), idl.table_version("Port"), idl.table_version("Bridge"),
                 len(tables["Interface"].rows), len(tables["Port"].rows))
        cached = self._ports_cache.get(bridge)
        if cached is not None and cached[0] == seqno:
            return list(cached[1])
        with idl.replica_lock:
            ports = self._ports_from_replica(bridge)
        self._ports_cache[bridge] = (seqno, ports)
        return list(ports)

    def _ports_from_replica(self, bridge: str) -> list[PortRecord]:
        idl = self.api.idl
        tables = self.api.tables
        version = idl.table_version("Bridge")
        known = self._bridge_rows.get(bridge)
        # (found again when the Bridge table changed, or the row is not the replica's any more: a
        # reconnect replaces every row)
        if known is None or known[0] != version or (
                known[1] is not None and tables["Bridge"].rows.get(known[1].uuid) is not known[1]):
            row = next((b for b in list(tables["Bridge"].rows.values()) if _committed(b, "name", "") == bridge), None)
            known = self._bridge_rows[bridge] = (version, row)
        bridge_row = known[1]
        if bridge_row is None:
            return []
        bridge_version = idl.row_version(bridge_row.uuid)
        ports = self._bridge_ports.get(bridge)
        if ports is None or ports[0] is not bridge_row or ports[1] != bridge_version:
            ports = (bridge_row, bridge_version, _refs(bridge_row, "ports", tables["Port"].rows))
            self._bridge_ports[bridge] = ports
        out = []
        for port in ports[2]:
            port_version = idl.row_version(port.uuid)
            seen = self._port_rows.get(port.uuid)
            if seen is None or seen[0] != port_version:
                seen = self._port_rows[port.uuid] = (port_version, _refs(port, "interfaces", tables["Interface"].rows),
                                                     _optional_int(_committed(port, "tag", []), 0))
            for iface in seen[1]:
                iface_version = idl.row_version(iface.uuid) + (port_version << 32)
                cached = self._iface_records.get(iface.uuid)
                if cached is None or cached[0] != iface_version:
                    name = _committed(iface, "name", None)
                    record = None if not name else PortRecord(
                        name, _optional_int(_committed(iface, "ofport", []), -1),
                        dict(_committed(iface, "external_ids", {})),
                        _optional_int(_committed(iface, "ofport_request", []), 0), seen[2])
                    cached = (iface_version, record)
                    if name:  # a row still being filled in by an update is read again next time
                        self._iface_records[iface.uuid] = cached
                if cached[1] is not None:
                    out.append(cached[1])
        if len(self._iface_records) > 2 * len(out) + 64:  # forget the rows of deleted ports
            live = {r.name for r in out}
            self._iface_records = {u: c for u, c in self._iface_records.items() if c[1] is None or c[1].name in live}
            self._port_rows = {u: p for u, p in self._port_rows.items() if u in tables["Port"].rows}
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

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # how many changes each row and each table took in (readers compare these to know
            # what to read again); written by the IDL's thread, after the row changed
            self._row_versions: dict[Any, int] = {}
            self._table_versions: dict[str, int] = {}
            # held while the replica takes in updates: a reader holding it never sees a row taken
            # out for a moment, half filled, or referring to one not inserted yet
            self.replica_lock = threading.RLock()
            super().__init__(*args, **kwargs)

        def run(self) -> Any:
            with self.replica_lock:
                return super().run()

        def row_version(self, uuid: Any) -> int:
            return self._row_versions.get(uuid, 0)

        def table_version(self, table: str) -> int:
            return self._table_versions.get(table, 0)

        def cooperative_yield(self) -> None:
            """No green threads here: the interpreter switches threads on its own."""

        def notify(self, event: Any, row: Any, updates: Any = None) -> None:
            table = row._table.name
            if event == "delete":  # (ovs.db.idl.ROW_DELETE) nothing reads a deleted row again
                self._row_versions.pop(row.uuid, None)
            else:
                self._row_versions[row.uuid] = self._row_versions.get(row.uuid, 0) + 1
            self._table_versions[table] = self._table_versions.get(table, 0) + 1
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


def _committed(row: Any, column: str, default: Any) -> Any:
    """A column of a replica row as ovsdb-server committed it. A row's attributes also show what
    a transaction still being built in ovsdbapp's thread changed (and forgets again, without any
    update, if that transaction is retried or dropped); a read kept until the row's next update
    must not see those."""
    data = row._data
    if data is None or column not in data:
        return default
    return data[column].to_python(row._uuid_to_row)


def _refs(row: Any, column: str, rows: dict[Any, Any]) -> list[Any]:
    """The rows a committed reference column names (read under the replica's lock, all there)."""
    data = row._data
    if data is None or column not in data:
        return []
    return [rows[uuid] for uuid in data[column].as_list() if uuid in rows]


def _optional_int(value: Any, default: int) -> int:
    """OVSDB optional columns come back as [] (absent), [n] or n."""
    if isinstance(value, list):
        value = value[0] if value else None
    return int(value) if value is not None else default
