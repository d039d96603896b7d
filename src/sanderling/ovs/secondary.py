"""The bridges of Sanderling's secondary networks on one node, and the pod ports on them.

- a provider bridge `br-<physnet>` per physical network given to the agent
  (`--provider-network physnet1=eth1`): the uplink is a trunk port, each pod port an access port
  of its network's VLAN or a trunk of its allowed VLANs, so the fabric sees 802.1Q frames;
- the layer2 bridge `br-l2`: one kernel VXLAN device per layer2 network (its own VNI), each
  network on its own local VLAN tag, so networks share the bridge and never each other's frames.

Neither bridge is joined to br-int: a secondary network is isolated from the pod network by
construction. Flows (NORMAL switching, a spoof guard on ports with IPAM, each packet's network, and
MultiNetworkPolicy) come from `compiler.secondary` and `compiler.policy` and are replaced as a whole
(`ovs-ofctl replace-flows --bundle` sends only the difference, atomically) after every port change
and every policy change. This class is their one owner: policy producers hand it their flows per
network through `NetworkFlows`, never touching the bridge. Every port carries its pod, container, interface, network
and addresses in external_ids: that is what DEL, the restart reconcile and GC go by.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from sanderling.compiler.secondary import GuardedPort, NetworkPort, compile_bridge, on_network
from sanderling.model.attachments import Network
from sanderling.netlink import veth, vxlan
from sanderling.openflow import ir
from sanderling.openflow.registers import FIRST_NETWORK_ZONE, LAST_NETWORK_ZONE
from sanderling.ovs import ovsdb
from sanderling.ovs.ovsdb import Ovsdb, PortChange, PortRecord
from sanderling.ovs.runtime import OvsError, OvsRuntime

log = logging.getLogger(__name__)

L2_BRIDGE = "br-l2"
VXLAN_OVERHEAD = 50


class SecondaryError(RuntimeError):
    """The node cannot carry this network (not configured here, no VLAN tag left, ...)."""


@dataclass(frozen=True)
class SecondaryPort:
    """One pod interface on a Sanderling secondary network."""

    network: Network
    container_id: str
    ifname: str
    netns: str
    pod_namespace: str
    pod_name: str
    cidrs: tuple[str, ...]   # addresses with prefix; empty for pure L2
    mac: str
    mtu: int
    guarded: bool            # the addresses came from Sanderling (annotation or pool): guard them


def provider_bridge(physnet: str) -> str:
    return f"br-{physnet}"[:15]


class SecondaryBridges:
    def __init__(self, db: Ovsdb, runtime: OvsRuntime, node_netns: str | None, providers: dict[str, str],
                 vxlan_port: int = 8472, datapath: str = "netdev", underlay_mtu: int = 1500,
                 tx_checksum_off: bool = False, meters: tuple[ir.Meter, ...] = (),
                 static_flows: tuple[ir.Flow, ...] = ()) -> None:
        self.db = db
        self.runtime = runtime
        self.node_netns = node_netns
        self.providers = providers
        self.vxlan_port = vxlan_port
        self.datapath = datapath
        self.underlay_mtu = underlay_mtu
        self.tx_checksum_off = tx_checksum_off
        self.meters = meters  # on every bridge before any flow: policy logging's packet-ins use them
        self.static_flows = static_flows  # on every bridge, beside the classifier (the Services' static flows)
        self._lock = threading.Lock()
        self._vteps: set[str] = set()
        self._network_ids: dict[str, int] = {}
        # bridge -> (network, object key) -> that object's policy flows (already on their network)
        self._policy: dict[str, dict[tuple[str, str], tuple[ir.Flow, ...]]] = {}
        self._groups: dict[str, dict[tuple[str, str], tuple[ir.Group, ...]]] = {}  # bridge -> object -> groups
        self._group_ids: dict[str, dict[str, int]] = {}
        # what the last sync put on each bridge, per policy object; objects changed since
        self._installed: dict[str, dict[tuple[str, str], tuple[ir.Flow, ...]]] = {}
        self._installed_groups: dict[str, dict[tuple[str, str], tuple[ir.Group, ...]]] = {}
        self._dirty: dict[str, set[tuple[str, str]]] = {}

    # ---- set-up ---------------------------------------------------------------------------

    def bridges(self) -> list[str]:
        return [provider_bridge(p) for p in sorted(self.providers)] + [L2_BRIDGE]

    def setup(self) -> None:
        """Provider bridges with their uplinks, the layer2 bridge; flows from the ports there are."""
        for physnet, uplink in sorted(self.providers.items()):
            bridge = provider_bridge(physnet)
            self.db.ensure_bridge(bridge, self.datapath)
            self.db.add_port(bridge, uplink, external_ids={"sanderling.io/uplink": physnet})
            self._ensure_meters(bridge)
            self.sync_flows(bridge)
            log.info("provider network %s: bridge %s, uplink %s", physnet, bridge, uplink)
        self.db.ensure_bridge(L2_BRIDGE, self.datapath)
        self._ensure_meters(L2_BRIDGE)
        self.sync_flows(L2_BRIDGE)

    def _ensure_meters(self, bridge: str) -> None:
        """Add, or modify if it exists (never delete: OpenFlow deletes a meter's flows with it)."""
        for meter in self.meters:
            try:
                self.runtime.ofctl(bridge, "add-meter", meter.text())
            except OvsError:
                self.runtime.ofctl(bridge, "mod-meter", meter.text())

    def bridge_for(self, network: Network) -> str:
        if network.topology == "layer2":
            return L2_BRIDGE
        if network.physical_network not in self.providers:
            known = ", ".join(sorted(self.providers)) or "none"
            raise SecondaryError(f"physical network {network.physical_network!r} of {network.key} is not configured "
                                 f"on this node (configured: {known}); start the agent with --provider-network "
                                 f"{network.physical_network}=INTERFACE")
        return provider_bridge(network.physical_network)

    def default_mtu(self, network: Network) -> int:
        if network.mtu:
            return network.mtu
        return self.underlay_mtu - VXLAN_OVERHEAD if network.topology == "layer2" else self.underlay_mtu

    # ---- pod ports ------------------------------------------------------------------------

    def attach(self, port: SecondaryPort) -> str:
        """Plumb the pod's interface and add its port; returns the host-side veth name."""
        bridge = self.bridge_for(port.network)
        host_if = veth.host_veth_name(port.container_id, port.ifname)
        veth.plumb(veth.PodInterface(port.netns, host_if, port.cidrs[0] if port.cidrs else "", port.mac, "",
                                     port.ifname, port.mtu, port.cidrs[1:]),
                   self.node_netns, self.tx_checksum_off)
        ext = {ovsdb.EXT_POD_NAMESPACE: port.pod_namespace, ovsdb.EXT_POD_NAME: port.pod_name,
               ovsdb.EXT_CONTAINER_ID: port.container_id, ovsdb.EXT_INTERFACE: port.ifname,
               ovsdb.EXT_NETWORK: port.network.key, ovsdb.EXT_MAC: port.mac,
               ovsdb.EXT_IP: ",".join(c.split("/")[0] for c in port.cidrs) if port.guarded else ""}
        with self._lock:
            tag, trunks = port.network.vlan, tuple(port.network.trunk_ids())
            if port.network.topology == "layer2":
                tag = self._ensure_layer2(port.network)
            self.db.apply_port_changes(bridge, [PortChange(host_if, external_ids=tuple(sorted(ext.items())),
                                                           ofport_request=self._free_ofport(bridge, host_if),
                                                           tag=tag, trunks=trunks)])
            self._sync_flows(bridge)
        return host_if

    def detach(self, container_id: str, ifname: str) -> str | None:
        """Remove the port and the veth; the bridge it was on, or None if there was none."""
        host_if = veth.host_veth_name(container_id, ifname)
        found = None
        with self._lock:
            for bridge in self.bridges():
                records = self.db.ports(bridge)
                if any(r.name == host_if for r in records):
                    self.db.apply_port_changes(bridge, [PortChange(host_if, delete=True)])
                    self._sync_flows(bridge)
                    found = bridge
                    if bridge == L2_BRIDGE:
                        self._prune_layer2()
        veth.unplumb(host_if, self.node_netns)
        return found

    def pod_ports(self) -> list[tuple[str, PortRecord]]:
        """(bridge, port) of every pod interface on a secondary network of this node."""
        return [(b, r) for b in self.bridges() for r in self.db.ports(b)
                if r.external_ids.get(ovsdb.EXT_CONTAINER_ID)]

    def _free_ofport(self, bridge: str, host_if: str) -> int:
        records = self.db.ports(bridge)
        existing = next((r for r in records if r.name == host_if), None)
        if existing is not None and existing.effective_ofport > 0:
            return existing.effective_ofport
        taken = {r.ofport for r in records} | {r.ofport_request for r in records}
        return next(n for n in range(1, 0xFF00) if n not in taken)

    # ---- layer2 tunnels -------------------------------------------------------------------

    def _ensure_layer2(self, network: Network) -> int:
        """The network's VXLAN device on br-l2 and its local VLAN tag (allocated on first use)."""
        records = self.db.ports(L2_BRIDGE)
        vni = str(network.vni)
        for r in records:
            if r.external_ids.get(ovsdb.EXT_VNI) == vni and r.tag:
                return r.tag
        used = {r.tag for r in records if r.tag}
        tag = next((t for t in range(1, 4095) if t not in used), 0)
        if not tag:
            raise SecondaryError(f"node has 4094 layer2 networks in use; {network.key} cannot be added")
        device = vxlan.ensure(self.node_netns, network.vni, self.vxlan_port, self.underlay_mtu - VXLAN_OVERHEAD)
        vxlan.set_flood(self.node_netns, network.vni, self._vteps)
        self.db.apply_port_changes(L2_BRIDGE, [PortChange(
            device, external_ids=((ovsdb.EXT_NETWORK, network.key), (ovsdb.EXT_VNI, vni)),
            ofport_request=self._free_ofport(L2_BRIDGE, device), tag=tag)])
        log.info("layer2 network %s: VNI %d, device %s, local tag %d", network.key, network.vni, device, tag)
        return tag

    def _prune_layer2(self) -> None:
        """A layer2 network no pod of this node uses any more loses its tunnel device here."""
        records = self.db.ports(L2_BRIDGE)
        in_use = {r.tag for r in records if r.external_ids.get(ovsdb.EXT_CONTAINER_ID)}
        for r in records:
            vni = r.external_ids.get(ovsdb.EXT_VNI)
            if vni and r.tag not in in_use:
                self.db.apply_port_changes(L2_BRIDGE, [PortChange(r.name, delete=True)])
                vxlan.remove(self.node_netns, int(vni))
                log.info("layer2 network %s: no pod here any more; device %s removed",
                         r.external_ids.get(ovsdb.EXT_NETWORK), r.name)

    def set_vteps(self, vteps: set[str]) -> None:
        """The other nodes' underlay addresses: where layer2 floods go."""
        with self._lock:
            self._vteps = set(vteps)
            for r in self.db.ports(L2_BRIDGE):
                vni = r.external_ids.get(ovsdb.EXT_VNI)
                if vni:
                    vxlan.set_flood(self.node_netns, int(vni), self._vteps)

    # ---- policy -------------------------------------------------------------------------

    def network_id(self, network: str) -> int:
        """The network's number on this node: what its packets carry in SECONDARY_NETWORK and its
        conntrack zone. Derived from the name (the same after a restart, so tracked connections
        survive it), the next free one on a collision."""
        with self._lock:
            return self._network_id(network)

    def _network_id(self, network: str) -> int:
        nid = self._network_ids.get(network)
        if nid is None:
            span = LAST_NETWORK_ZONE - FIRST_NETWORK_ZONE + 1
            taken = set(self._network_ids.values())
            start = zlib.crc32(network.encode()) % span
            nid = next(FIRST_NETWORK_ZONE + (start + i) % span for i in range(span)
                       if FIRST_NETWORK_ZONE + (start + i) % span not in taken)
            self._network_ids[network] = nid
        return nid

    def flows_for(self, network: Network) -> NetworkFlows:
        """The desired-state window of one network's policy (SecondaryError: not carried here)."""
        return NetworkFlows(self, network)

    def group_id(self, bridge: str, key: str) -> int:
        """A group number on `bridge` for `key` (a service port), stable while the agent runs."""
        with self._lock:
            ids = self._group_ids.setdefault(bridge, {})
            return ids.setdefault(key, len(ids) + 1)

    def set_policy(self, bridge: str, network: str, key: str, flows: Iterable[ir.Flow],
                   groups: Iterable[ir.Group] = ()) -> bool:
        """One object (a policy's, a Service's) of a network (no flows: removed); installed by the
        next `flush_policy`. True if it changed."""
        flows, groups = tuple(flows), tuple(groups)
        with self._lock:
            objects = self._policy.setdefault(bridge, {})
            object_groups = self._groups.setdefault(bridge, {})
            if objects.get((network, key), ()) == flows and object_groups.get((network, key), ()) == groups:
                return False
            if flows:
                objects[(network, key)] = flows
            else:
                objects.pop((network, key), None)
            if groups:
                object_groups[(network, key)] = groups
            else:
                object_groups.pop((network, key), None)
            self._dirty.setdefault(bridge, set()).add((network, key))
        return True

    def clear_network(self, network: str) -> None:
        """Every policy object of a network (its NAD went away or changed)."""
        with self._lock:
            for bridge, objects in self._policy.items():
                gone = [k for k in objects if k[0] == network]
                for k in gone:
                    del objects[k]
                    self._groups.get(bridge, {}).pop(k, None)
                self._dirty.setdefault(bridge, set()).update(gone)

    def flush_policy(self) -> None:
        """Install what producers changed (blocking: call it off the event loop): only the
        difference of the changed objects, in one bundle; the whole bridge if that fails."""
        with self._lock:
            dirty, self._dirty = self._dirty, {}
            for bridge, keys in sorted(dirty.items()):
                if bridge not in self._installed:
                    self._sync_flows(bridge)
                    continue
                try:
                    self._apply_delta(bridge, keys)
                except SecondaryError as exc:
                    log.error("%s: policy change not applied (%s); replacing all its flows", bridge, exc)
                    self._sync_flows(bridge)

    def _apply_delta(self, bridge: str, keys: set[tuple[str, str]]) -> None:
        """Groups added or changed first, then the flows in one bundle, then groups gone."""
        installed, desired = self._installed[bridge], self._policy.get(bridge, {})
        installed_groups, desired_groups = self._installed_groups.setdefault(bridge, {}), self._groups.get(bridge, {})
        old_groups = {g.group_id: g for k in keys for g in installed_groups.get(k, ())}
        new_groups = {g.group_id: g for k in keys for g in desired_groups.get(k, ())}
        self._put_groups(bridge, [g for gid, g in new_groups.items() if old_groups.get(gid) != g])
        old = {f.key: f for k in keys for f in installed.get(k, ())}
        new = {f.key: f for k in keys for f in desired.get(k, ())}
        lines = [f"add {f.text()}" for key, f in new.items() if old.get(key) != f]
        lines += [f"delete_strict {f.text(cookie=0).split(' actions=')[0]}" for key, f in old.items() if key not in new]
        if lines:
            self._ofctl_file(bridge, "add-flows", lines)
        for gid in sorted(set(old_groups) - set(new_groups)):
            self._ofctl(bridge, "del-groups", f"group_id={gid}")
        for k in keys:
            if k in desired:
                installed[k] = desired[k]
            else:
                installed.pop(k, None)
            if k in desired_groups:
                installed_groups[k] = desired_groups[k]
            else:
                installed_groups.pop(k, None)

    def _put_groups(self, bridge: str, groups: list[ir.Group]) -> None:
        for group in groups:
            self._ofctl(bridge, "mod-group", group.text(), options=("--may-create",))

    def _ofctl(self, bridge: str, command: str, *args: str, options: tuple[str, ...] = ()) -> None:
        try:
            self.runtime.ofctl(bridge, command, *args, options=options)
        except OvsError as exc:
            raise SecondaryError(f"{command} on {bridge} failed: {exc}") from exc

    def _ofctl_file(self, bridge: str, command: str, lines: list[str]) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".flows") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            try:
                self.runtime.ofctl(bridge, command, f.name, options=("--bundle",))
            except OvsError as exc:
                raise SecondaryError(f"flows of {bridge} not replaced: {exc}") from exc

    def policy_flow_count(self, bridge: str) -> int:
        with self._lock:
            return sum(len(f) for f in self._policy.get(bridge, {}).values())

    # ---- flows ----------------------------------------------------------------------------

    def sync_flows(self, bridge: str) -> None:
        with self._lock:
            self._sync_flows(bridge)

    def _sync_flows(self, bridge: str) -> None:
        guarded, networks = [], []
        records = self.db.ports(bridge)
        uplink = next((r for r in records if r.external_ids.get("sanderling.io/uplink")), None)
        vlans: dict[int, str] = {}
        for r in records:
            network = r.external_ids.get(ovsdb.EXT_NETWORK, "")
            if not network or r.effective_ofport <= 0:
                continue
            nid = self._network_id(network)
            ips = tuple(i for i in r.external_ids.get(ovsdb.EXT_IP, "").split(",") if i)
            mac = r.external_ids.get(ovsdb.EXT_MAC, "")
            if ips and mac:
                guarded.append(GuardedPort(r.effective_ofport, mac, ips, nid))
            elif r.tag:  # an unguarded access port, or a layer2 network's tunnel device (other nodes)
                networks.append(NetworkPort(r.effective_ofport, nid, uplink=bool(r.external_ids.get(ovsdb.EXT_VNI))))
            if r.tag and r.external_ids.get(ovsdb.EXT_CONTAINER_ID):
                vlans.setdefault(r.tag, network)  # one network per VLAN of the uplink (the first by port)
        if uplink is not None and uplink.effective_ofport > 0:
            networks += [NetworkPort(uplink.effective_ofport, self._network_id(n), vlan, uplink=True)
                         for vlan, n in vlans.items()]
        flows = [f.text() for f in compile_bridge(guarded, networks)] + [f.text() for f in self.static_flows]
        objects = dict(self._policy.get(bridge, {}))
        groups = dict(self._groups.get(bridge, {}))
        self._put_groups(bridge, [g for object_groups in groups.values() for g in object_groups])
        for object_flows in objects.values():
            flows += (f.text() for f in object_flows)
        self._ofctl_file(bridge, "replace-flows", flows)
        self._installed[bridge] = objects
        self._installed_groups[bridge] = groups
        self._dirty.pop(bridge, None)


class NetworkFlows:
    """One network's policy flows as a producer sees them (set or remove its own objects): each
    flow is put on the network (matches SECONDARY_NETWORK) and goes to the network's bridge."""

    def __init__(self, bridges: SecondaryBridges, network: Network) -> None:
        self.bridges = bridges
        self.network = network.key
        self.bridge = bridges.bridge_for(network)
        self.network_id = bridges.network_id(network.key)

    def set_object(self, key: str, flows: Iterable[ir.Flow], groups: Iterable[ir.Group] = ()) -> None:
        self.bridges.set_policy(self.bridge, self.network, key, on_network(flows, self.network_id), groups)

    def remove_object(self, key: str) -> None:
        self.bridges.set_policy(self.bridge, self.network, key, ())
