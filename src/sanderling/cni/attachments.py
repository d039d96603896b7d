"""A pod's secondary networks: attach them after its default network, detach them all on DEL.

The pod's `k8s.v1.cni.cncf.io/networks` annotation names NetworkAttachmentDefinitions; each is
either a Sanderling network on OVS (`"type": "sanderling"`, topology vlan or layer2, addresses
from the network's cluster-wide IPPool or the annotation) or another plugin run as a delegate.
Every attachment is written to the container's record (state/<node>/attachments/<id>.json)
*before* it is made, so a DEL, GC or restart reconcile after a kill -9 at any point finds and
undoes it. A failure at any attachment undoes the ones already made and names the annotation
entry; the default network is undone by the caller. What the pod got ends up in its
`k8s.v1.cni.cncf.io/network-status` annotation.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sanderling.cni import delegate
from sanderling.cni import errors as E
from sanderling.cni.errors import CniFailure
from sanderling.ipam.allocator import IpamError, Request
from sanderling.ipam.cluster import PREFIX as POOL_PREFIX
from sanderling.ipam.cluster import ClusterIpam
from sanderling.ipam.store import AllocationStore
from sanderling.model.attachments import (
    ANNOTATION_NETWORKS,
    ANNOTATION_STATUS,
    Network,
    NetworkSelection,
    parse_nad,
    parse_selections,
    status_entry,
)
from sanderling.model.errors import ModelError
from sanderling.model.network import mac_for_ip, stable_mac
from sanderling.netlink import veth
from sanderling.netlink.netns import ipr
from sanderling.ovs import ovsdb
from sanderling.ovs.runtime import OvsError
from sanderling.ovs.secondary import SecondaryBridges, SecondaryError, SecondaryPort

log = logging.getLogger(__name__)


class Api(Protocol):
    """What attaching needs from the Kubernetes API."""

    def pod(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def nad(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def nads(self) -> list[dict[str, Any]]: ...

    def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str | None]) -> None: ...

    def ensure_pool(self, name: str, spec: dict[str, Any]) -> None: ...

    def event(self, namespace: str, pod: str, reason: str, message: str, node: str, kind: str = ...,
              involved_kind: str = ...) -> None: ...


@dataclass(frozen=True)
class PodCall:
    """The pod and the runtime's request, as the default network's ADD saw them."""

    namespace: str
    name: str
    container_id: str
    netns: str
    cni_args: str


@dataclass(frozen=True)
class Primary:
    network: str      # the default network's name (the conflist's)
    ifname: str
    ips: tuple[str, ...]
    mac: str


class Records:
    """One JSON file per container listing its secondary attachments (written before each one)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, container_id: str) -> Path:
        return self.dir / f"{container_id}.json"

    def load(self, container_id: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path(container_id).read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            log.error("attachment record %s unreadable (%s); the OVS ports still name the container",
                      self.path(container_id), exc)
            return None
        return data if isinstance(data, dict) else None

    def save(self, container_id: str, record: dict[str, Any]) -> None:
        tmp = self.path(container_id).with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.path(container_id))

    def remove(self, container_id: str) -> None:
        self.path(container_id).unlink(missing_ok=True)

    def containers(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.json"))


class MultiNetwork:
    def __init__(self, api: Api, cluster: ClusterIpam, store: AllocationStore, bridges: SecondaryBridges,
                 records: Records, cni_path: tuple[str, ...], node: str, node_netns: str | None) -> None:
        self.api = api
        self.cluster = cluster
        self.store = store
        self.bridges = bridges
        self.records = records
        self.cni_path = cni_path
        self.node = node
        self.node_netns = node_netns

    # ---- ADD ------------------------------------------------------------------------------

    def add(self, call: PodCall, primary: Primary) -> list[dict[str, Any]]:
        """Attach every network the pod selects; its network-status. Undoes itself on failure."""
        where = f"pod/{call.namespace}/{call.name}"
        pod = self.api.pod(call.namespace, call.name) or {}
        annotations = (pod.get("metadata") or {}).get("annotations") or {}
        try:
            selections = parse_selections(annotations.get(ANNOTATION_NETWORKS, ""), call.namespace, where,
                                          primary.ifname)
        except ModelError as exc:
            raise self._refuse(call, E.E_BAD_CONFIG, str(exc)) from None
        status = [status_entry(primary.network, primary.ifname, list(primary.ips), primary.mac,
                               not any(s.default_route for s in selections))]
        if not selections:
            self._write_status(call, status)
            return status
        record: dict[str, Any] = {"pod": f"{call.namespace}/{call.name}", "netns": call.netns,
                                  "cniArgs": call.cni_args, "attachments": []}
        try:
            for index, sel in enumerate(selections):
                entry = f"annotation {ANNOTATION_NETWORKS} entry {index + 1} ({sel.network}@{sel.interface})"
                network = self._network(call, sel, entry)
                status.append(self._attach(call, sel, network, record, entry))
            for sel in selections:
                if sel.default_route:
                    self._default_route(call, sel)
            self._write_status(call, status)
        except BaseException:
            problems = self._detach_all(call.container_id, record)
            if problems:
                log.error("%s: undoing its secondary networks left problems: %s", where, "; ".join(problems))
            raise
        return status

    def _refuse(self, call: PodCall, code: int, message: str) -> CniFailure:
        self.api.event(call.namespace, call.name, "NetworkAttachmentFailed", message, self.node)
        return CniFailure(code, message)

    def _network(self, call: PodCall, sel: NetworkSelection, entry: str) -> Network:
        try:
            obj = self.api.nad(sel.namespace, sel.name)
        except Exception as exc:
            raise CniFailure(E.E_TRY_LATER, f"{entry}: Kubernetes API: {exc}") from None
        if obj is None:
            raise self._refuse(call, E.E_BAD_CONFIG, f"pod {call.namespace}/{call.name}: {entry}: "
                                                     f"NetworkAttachmentDefinition {sel.network} does not exist")
        try:
            network = parse_nad(obj)
        except ModelError as exc:
            raise self._refuse(call, E.E_BAD_CONFIG, f"pod {call.namespace}/{call.name}: {entry}: {exc}") from None
        if network.topology == "layer2":
            self._check_vni(call, network, entry)
        return network

    def _check_vni(self, call: PodCall, network: Network, entry: str) -> None:
        for obj in self.api.nads():
            try:
                other = parse_nad(obj)
            except ModelError:
                continue
            if other.topology == "layer2" and other.vni == network.vni and other.key != network.key:
                raise self._refuse(call, E.E_BAD_CONFIG, f"pod {call.namespace}/{call.name}: {entry}: layer2 "
                                                         f"networks {network.key} and {other.key} share VNI "
                                                         f"{network.vni}; give one of them its own \"vni\"")

    def _attach(self, call: PodCall, sel: NetworkSelection, network: Network, record: dict[str, Any],
                entry: str) -> dict[str, Any]:
        item: dict[str, Any] = {"network": network.key, "ifname": sel.interface}
        record["attachments"].append(item)
        if not network.sanderling:
            version, confs = delegate.plugin_configs(network.config, network.name)
            for conf in confs:
                if sel.cni_args:
                    conf["args"] = {**(conf.get("args") or {}), "cni": dict(sel.cni_args)}
                if network.resource_name:
                    conf["resourceName"] = network.resource_name
            runtime = {k: v for k, v in (("ips", list(sel.ips)), ("mac", sel.mac)) if v}
            item.update(kind="delegate", confs=confs, runtime=runtime)
            self.records.save(call.container_id, record)
            dcall = delegate.DelegateCall(call.container_id, call.netns, sel.interface, call.cni_args, self.cni_path,
                                          self.node_netns)
            try:
                result = delegate.add(dcall, confs, runtime)
            except CniFailure as exc:
                raise self._refuse(call, exc.code, f"pod {call.namespace}/{call.name}: {entry}: {exc.msg}") from None
            item["result"] = result
            self.records.save(call.container_id, record)
            ips, mac = from_result(result, sel.interface)
            log.info("pod %s/%s: %s on %s via plugin %s: %s %s", call.namespace, call.name, sel.interface,
                     network.key, confs[-1]["type"], ",".join(ips) or "no address", mac)
            return status_entry(network.key, sel.interface, ips, mac, bool(sel.default_route))
        item.update(kind="sanderling")
        self.records.save(call.container_id, record)
        try:
            cidrs = self._addresses(call, sel, network)
            mac = sel.mac or (mac_for_ip(cidrs[0].split("/")[0]) if cidrs else stable_mac(call.container_id,
                                                                                          sel.interface))
            mtu = self.bridges.default_mtu(network)
            self.bridges.attach(SecondaryPort(network, call.container_id, sel.interface, call.netns, call.namespace,
                                              call.name, cidrs, mac, mtu, guarded=bool(cidrs)))
        except (IpamError, ModelError) as exc:
            message = exc.msg if isinstance(exc, IpamError) else str(exc)
            code = exc.code if isinstance(exc, IpamError) else E.E_BAD_CONFIG
            raise self._refuse(call, code, f"pod {call.namespace}/{call.name}: {entry}: {message}") from None
        except SecondaryError as exc:
            raise self._refuse(call, E.E_BAD_CONFIG, f"pod {call.namespace}/{call.name}: {entry}: {exc}") from None
        except (OSError, OvsError) as exc:
            raise CniFailure(E.E_PLUMBING, f"pod {call.namespace}/{call.name}: {entry}: {exc}") from None
        item.update(cidrs=list(cidrs), mac=mac)
        self.records.save(call.container_id, record)
        log.info("pod %s/%s: %s on %s (%s%s): %s %s", call.namespace, call.name, sel.interface, network.key,
                 network.topology, f" VLAN {network.vlan}" if network.vlan else "", ",".join(cidrs) or "no address",
                 mac)
        return status_entry(network.key, sel.interface, list(cidrs), mac, bool(sel.default_route))

    def _addresses(self, call: PodCall, sel: NetworkSelection, network: Network) -> tuple[str, ...]:
        """Static ips (checked against the network's pool when it has one) or one from the pool."""
        where = f"pod/{call.namespace}/{call.name}"
        if network.subnet is None:
            return sel.ips
        self.api.ensure_pool(network.pool_name, {
            "cidrs": [str(network.subnet)], "excludes": [str(e) for e in network.excludes], "network": network.key})
        pool = next((p for p in self.cluster.pools(network.key) if p.name == network.pool_name), None)
        if pool is None:
            raise ModelError(where, network.key, f"IPPool {network.pool_name} of the network is not readable")
        if len(sel.ips) > 1:
            raise ModelError(where, "ips", f"one address per interface on {network.key}")
        requested = None
        if sel.ips:
            iface = ipaddress.IPv4Interface(sel.ips[0])
            if iface.ip not in network.subnet:
                raise ModelError(where, "ips", f"{sel.ips[0]} is outside the network's subnet {network.subnet}")
            requested = str(iface.ip)
        alloc = self.cluster.allocate(pool, Request(call.container_id, sel.interface, call.namespace, call.name,
                                                    requested, sel.mac))
        return (f"{alloc.ip}/{network.subnet.prefixlen}",)

    def _default_route(self, call: PodCall, sel: NetworkSelection) -> None:
        with ipr(call.netns) as h:
            idx = h.link_lookup(ifname=sel.interface)[0]
            h.route("replace", dst="0.0.0.0/0", gateway=sel.default_route[0], oif=idx)

    def _write_status(self, call: PodCall, status: list[dict[str, Any]]) -> None:
        try:
            self.api.annotate_pod(call.namespace, call.name, {ANNOTATION_STATUS: json.dumps(status)})
        except Exception as exc:
            raise CniFailure(E.E_TRY_LATER, f"pod {call.namespace}/{call.name}: network-status not written: "
                                            f"{exc}") from None

    def add_one(self, call: PodCall, sel: NetworkSelection, network: Network, version: str) -> dict[str, Any]:
        """One Sanderling network for one interface, called as a plugin (Multus in front): the
        CNI result of that interface. Undoes itself on failure."""
        record = self.records.load(call.container_id) or {"pod": f"{call.namespace}/{call.name}",
                                                           "netns": call.netns, "cniArgs": call.cni_args,
                                                           "attachments": []}
        if any(i.get("ifname") == sel.interface for i in record["attachments"]):
            raise CniFailure(E.E_INTERFACE_EXISTS, f"container {call.container_id} already has {sel.interface}")
        mine: dict[str, Any] = {"attachments": []}
        try:
            self._attach(call, sel, network, record, f"network {network.name}@{sel.interface}")
        except BaseException:
            mine["attachments"] = [i for i in record["attachments"] if i.get("ifname") == sel.interface]
            self._detach_all(call.container_id, {**record, **mine}, forget=False)
            record["attachments"] = [i for i in record["attachments"] if i.get("ifname") != sel.interface]
            self._save_or_remove(call.container_id, record)
            raise
        item = record["attachments"][-1]
        ips = [{"address": c, "interface": 1, **({"version": "4"} if version == "0.4.0" else {})}
               for c in item.get("cidrs") or []]
        return {"cniVersion": version, "interfaces": [
            {"name": veth.host_veth_name(call.container_id, sel.interface)},
            {"name": sel.interface, "mac": item.get("mac", ""), "sandbox": call.netns}], "ips": ips, "dns": {}}

    def delete_one(self, container_id: str, ifname: str) -> list[str]:
        """Undo one interface's attachment (DEL as a plugin); the others of the container stay."""
        record = self.records.load(container_id) or {"attachments": []}
        mine = [i for i in record.get("attachments") or [] if i.get("ifname") == ifname]
        if not mine:  # a lost record: the port still names its container and interface
            mine = [{"ifname": ifname, "kind": "sanderling"}]
        problems = self._detach_all(container_id, {**record, "attachments": mine}, forget=False)
        if not problems:
            record["attachments"] = [i for i in record.get("attachments") or [] if i.get("ifname") != ifname]
            self._save_or_remove(container_id, record)
        return problems

    def _save_or_remove(self, container_id: str, record: dict[str, Any]) -> None:
        if record.get("attachments"):
            self.records.save(container_id, record)
        else:
            self.records.remove(container_id)

    # ---- DEL ------------------------------------------------------------------------------

    def delete(self, container_id: str) -> list[str]:
        """Undo every secondary attachment of the container; the problems, each named."""
        record = self.records.load(container_id) or {"attachments": []}
        return self._detach_all(container_id, record)

    def _detach_all(self, container_id: str, record: dict[str, Any], forget: bool = True) -> list[str]:
        """Undo the record's attachments (all of the container's, unless `forget` is False: then
        only those listed, and the record file is the caller's)."""
        problems: list[str] = []
        ifnames = {str(i.get("ifname", "")) for i in record.get("attachments") or []}
        for item in reversed(record.get("attachments") or []):
            ifname = str(item.get("ifname", ""))
            try:
                if item.get("kind") == "delegate":
                    dcall = delegate.DelegateCall(container_id, str(record.get("netns", "")), ifname,
                                                  str(record.get("cniArgs", "")), self.cni_path, self.node_netns)
                    problems += [f"{item.get('network')}@{ifname}: {p}" for p in delegate.delete(
                        dcall, list(item.get("confs") or []), dict(item.get("runtime") or {}), item.get("result"))]
                else:
                    self.bridges.detach(container_id, ifname)
            except Exception as exc:  # go on with the others, report together
                problems.append(f"{item.get('network')}@{ifname}: {exc}")
        # ports whose record was lost (unreadable file): OVS names their container
        for _bridge, port in self.bridges.pod_ports():
            if port.external_ids.get(ovsdb.EXT_CONTAINER_ID) == container_id and \
                    (forget or port.external_ids.get(ovsdb.EXT_INTERFACE) in ifnames):
                ifname = port.external_ids.get(ovsdb.EXT_INTERFACE, "")
                ifnames.add(ifname)
                try:
                    self.bridges.detach(container_id, ifname)
                except Exception as exc:
                    problems.append(f"{port.name}: {exc}")
        for alloc in self.store.all():
            if alloc.container_id != container_id or alloc.ifname not in ifnames:
                continue
            try:
                released = self.store.release(container_id, alloc.ifname)
                if released is not None and released.pool.startswith(POOL_PREFIX):
                    self.cluster.release(released)
            except Exception as exc:
                problems.append(f"address {alloc.ip} of {alloc.ifname}: {exc}")
        if not problems and forget:
            self.records.remove(container_id)
        return problems


def from_result(result: dict[str, Any], ifname: str) -> tuple[list[str], str]:
    """Addresses and MAC of the pod-side interface in a CNI result (any version)."""
    interfaces = result.get("interfaces") or []
    mac, index = "", None
    for i, iface in enumerate(interfaces):
        if isinstance(iface, dict) and iface.get("sandbox") and iface.get("name") == ifname:
            mac, index = str(iface.get("mac", "")), i
    ips = []
    for ip in result.get("ips") or []:
        if isinstance(ip, dict) and ip.get("address") and (ip.get("interface") in (None, index)):
            ips.append(str(ip["address"]))
    return ips, mac
