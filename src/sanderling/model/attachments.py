"""Multiple networks per pod, per the Network Plumbing Working Group's de-facto standard.

Pure parsing and validation, no I/O: a pod's `k8s.v1.cni.cncf.io/networks` annotation (the short
form `net-a,other-ns/net-b@ifname` or the JSON list) becomes `NetworkSelection`s, a
NetworkAttachmentDefinition (`spec.config`, one CNI config or a conflist) becomes a `Network`,
and what the pod really got becomes its `k8s.v1.cni.cncf.io/network-status`. Every error names
the annotation entry or the NAD and what is wrong with it, so the pod's ADD fails with a message
a user can act on.
"""

from __future__ import annotations

import ipaddress
import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

from sanderling.model.errors import ModelError
from sanderling.model.network import parse_mac

ANNOTATION_NETWORKS = "k8s.v1.cni.cncf.io/networks"
ANNOTATION_STATUS = "k8s.v1.cni.cncf.io/network-status"
ANNOTATION_RESOURCE = "k8s.v1.cni.cncf.io/resourceName"
SANDERLING_TYPE = "sanderling"
TOPOLOGIES = ("vlan", "layer2")
SELECTION_KEYS = {"name", "namespace", "interface", "ips", "mac", "default-route", "cni-args"}
SANDERLING_KEYS = {"cniVersion", "name", "type", "topology", "vlanID", "trunk", "physicalNetwork", "subnet",
                   "excludeSubnets", "mtu", "vni", "gateway", "ipam", "capabilities"}
RUNTIME_KEYS = ("runtimeConfig", "prevResult", "args")  # what a runtime (or Multus) adds to a config
DELEGATED_NAMESPACE = "cni"  # networks Multus hands over by config alone are keyed cni/<config name>
_IFNAME = re.compile(r"^[A-Za-z0-9_.\-]{1,15}$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SHORT = re.compile(r"^(?:(?P<ns>[^/@]+)/)?(?P<name>[^/@]+)(?:@(?P<ifname>.+))?$")
MAX_VNI = 0xFFFFFF


@dataclass(frozen=True)
class NetworkSelection:
    """One entry of a pod's networks annotation, with its interface name decided."""

    namespace: str
    name: str
    interface: str
    ips: tuple[str, ...] = ()
    mac: str = ""
    default_route: tuple[str, ...] = ()
    cni_args: tuple[tuple[str, Any], ...] = ()

    @property
    def network(self) -> str:
        return f"{self.namespace}/{self.name}"


def _entry_error(pod: str, index: int, entry: Any, problem: str) -> ModelError:
    return ModelError(pod, f"annotation {ANNOTATION_NETWORKS} entry {index + 1} ({entry!r})"[:200], problem)


def check_interface_name(pod: str, what: str, name: str) -> None:
    if not isinstance(name, str) or not _IFNAME.match(name):
        raise ModelError(pod, what, f"interface name {name!r} is not valid: 1 to 15 characters of letters, digits, "
                                    "'.', '-', '_'")
    if name in (".", "..", "lo"):
        raise ModelError(pod, what, f"interface name {name!r} is reserved")


def _check_ips(pod: str, index: int, entry: Any, ips: Any) -> tuple[str, ...]:
    if not isinstance(ips, list) or not all(isinstance(i, str) for i in ips):
        raise _entry_error(pod, index, entry, "ips must be a list of addresses such as \"10.10.0.5/24\"")
    out = []
    for ip in ips:
        try:
            iface = ipaddress.ip_interface(ip)
        except ValueError:
            raise _entry_error(pod, index, entry, f"ips: {ip!r} is not an IP address") from None
        if iface.version != 4:
            raise _entry_error(pod, index, entry, f"ips: {ip!r}: only IPv4 is supported on secondary networks")
        out.append(ip)
    return tuple(out)


def parse_selections(value: str, pod_namespace: str, pod: str, primary_ifname: str = "eth0") -> list[NetworkSelection]:
    """The annotation's networks, in order, each with its interface (`net1`, `net2`, ... unless named)."""
    text = value.strip()
    if not text:
        return []
    raw: list[Any]
    if text.startswith("["):
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ModelError(pod, f"annotation {ANNOTATION_NETWORKS}", f"not valid JSON: {exc}") from None
        if not isinstance(raw, list):
            raise ModelError(pod, f"annotation {ANNOTATION_NETWORKS}", "the JSON form must be a list of objects")
    elif text.startswith("{"):
        raise ModelError(pod, f"annotation {ANNOTATION_NETWORKS}", "the JSON form must be a list ([{...}]), "
                                                                    "not a single object")
    else:
        raw = []
        for index, part in enumerate(p.strip() for p in text.split(",")):
            m = _SHORT.match(part)
            if not part or m is None:
                raise _entry_error(pod, index, part, "want NAME, NAMESPACE/NAME or NAMESPACE/NAME@INTERFACE")
            raw.append({k: v for k, v in (("namespace", m["ns"]), ("name", m["name"]), ("interface", m["ifname"]))
                        if v is not None})
    out: list[NetworkSelection] = []
    used = {primary_ifname}
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise _entry_error(pod, index, entry, "each entry must be an object with at least \"name\"")
        unknown = sorted(set(entry) - SELECTION_KEYS)
        if unknown:
            raise _entry_error(pod, index, entry, f"unsupported key(s) {', '.join(unknown)}; supported: "
                                                  f"{', '.join(sorted(SELECTION_KEYS))}")
        name, namespace = entry.get("name"), entry.get("namespace", pod_namespace)
        for what, v in (("name", name), ("namespace", namespace)):
            if not isinstance(v, str) or not _DNS_LABEL.match(v) or len(v) > 253:
                raise _entry_error(pod, index, entry, f"{what} {v!r} is not a valid object name")
        interface = entry.get("interface") or f"net{index + 1}"
        check_interface_name(pod, f"annotation {ANNOTATION_NETWORKS} entry {index + 1}", interface)
        if interface in used:
            raise _entry_error(pod, index, entry, f"interface {interface} is used twice in this pod")
        used.add(interface)
        mac = ""
        if entry.get("mac") is not None:
            if not isinstance(entry["mac"], str):
                raise _entry_error(pod, index, entry, "mac must be a string")
            try:
                mac = parse_mac(pod, "mac", entry["mac"])
            except ModelError as exc:
                raise _entry_error(pod, index, entry, exc.problem) from None
        routes = entry.get("default-route") or []
        if not isinstance(routes, list) or not all(isinstance(r, str) for r in routes):
            raise _entry_error(pod, index, entry, "default-route must be a list of gateway addresses")
        for r in routes:
            try:
                ipaddress.IPv4Address(r)
            except ValueError:
                raise _entry_error(pod, index, entry, f"default-route: {r!r} is not an IPv4 address") from None
        cni_args = entry.get("cni-args") or {}
        if not isinstance(cni_args, dict):
            raise _entry_error(pod, index, entry, "cni-args must be an object")
        assert isinstance(name, str) and isinstance(namespace, str)
        out.append(NetworkSelection(namespace, name, interface, _check_ips(pod, index, entry, entry.get("ips") or []),
                                    mac, tuple(routes), tuple(sorted(cni_args.items()))))
    if sum(1 for s in out if s.default_route) > 1:
        raise ModelError(pod, f"annotation {ANNOTATION_NETWORKS}", "default-route is set on more than one network")
    return out


# ---- NetworkAttachmentDefinitions ------------------------------------------------------------


@dataclass(frozen=True)
class VlanRange:
    low: int
    high: int


@dataclass(frozen=True)
class Network:
    """A NAD, decided: a Sanderling network on OVS, or a delegated plugin's config."""

    namespace: str
    name: str
    config: dict[str, Any]                    # the CNI config (or conflist) as given
    topology: str = ""                        # "vlan" / "layer2" for Sanderling networks, "" for delegates
    vlan: int = 0                             # access VLAN
    trunk: tuple[VlanRange, ...] = ()         # trunk ranges (vlan topology)
    physical_network: str = ""
    vni: int = 0                              # layer2 tunnel key
    subnet: ipaddress.IPv4Network | None = None
    excludes: tuple[ipaddress.IPv4Network, ...] = ()
    gateway: ipaddress.IPv4Address | None = None
    mtu: int = 0
    resource_name: str = ""
    plugins: tuple[dict[str, Any], ...] = field(default=())  # delegate chain

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def sanderling(self) -> bool:
        return bool(self.topology)

    def trunk_ids(self) -> list[int]:
        return sorted({v for r in self.trunk for v in range(r.low, r.high + 1)})

    @property
    def pool_name(self) -> str:
        """The IPPool holding this network's cluster-wide allocations."""
        return f"net-{self.namespace}-{self.name}"[:253]


def _vlan_id(nad: str, what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4094:
        raise ModelError(nad, what, f"{value!r} is not a VLAN ID (1-4094; 0 and 4095 are reserved by 802.1Q)")
    return value


def _trunk(nad: str, value: Any) -> tuple[VlanRange, ...]:
    if not isinstance(value, list) or not value:
        raise ModelError(nad, "trunk", "must be a non-empty list of {\"id\": N} or {\"minID\": A, \"maxID\": B}")
    ranges: list[VlanRange] = []
    for i, item in enumerate(value):
        what = f"trunk[{i}]"
        if not isinstance(item, dict):
            raise ModelError(nad, what, "must be {\"id\": N} or {\"minID\": A, \"maxID\": B}")
        if set(item) == {"id"}:
            low = high = _vlan_id(nad, what, item["id"])
        elif set(item) == {"minID", "maxID"}:
            low, high = _vlan_id(nad, what + ".minID", item["minID"]), _vlan_id(nad, what + ".maxID", item["maxID"])
            if low > high:
                raise ModelError(nad, what, f"minID {low} is above maxID {high}")
        else:
            raise ModelError(nad, what, f"keys {sorted(item)}: want exactly id, or minID and maxID")
        for other in ranges:
            if low <= other.high and other.low <= high:
                raise ModelError(nad, what, f"VLANs {low}-{high} overlap {other.low}-{other.high}")
        ranges.append(VlanRange(low, high))
    return tuple(ranges)


def default_vni(namespace: str, name: str) -> int:
    """A stable tunnel key for a layer2 network without an explicit `vni` (collisions are refused)."""
    return 1 + zlib.crc32(f"{namespace}/{name}".encode()) % (MAX_VNI - 1)


def parse_nad(obj: dict[str, Any]) -> Network:
    """A NetworkAttachmentDefinition object -> Network; ModelError naming the NAD otherwise."""
    meta = obj.get("metadata") or {}
    namespace, name = meta.get("namespace", ""), meta.get("name", "")
    where = f"NetworkAttachmentDefinition/{namespace}/{name}"
    annotations = meta.get("annotations") or {}
    text = (obj.get("spec") or {}).get("config")
    if not isinstance(text, str) or not text.strip():
        raise ModelError(where, "spec.config", "is empty; it must hold a CNI config (JSON)")
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise ModelError(where, "spec.config", f"not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ModelError(where, "spec.config", "must be a JSON object (a CNI config or conflist)")
    if "plugins" in config:
        plugins = config["plugins"]
        if not isinstance(plugins, list) or not plugins or not all(isinstance(p, dict) for p in plugins):
            raise ModelError(where, "spec.config.plugins", "must be a non-empty list of plugin configs")
    else:
        plugins = [config]
    for i, p in enumerate(plugins):
        if not isinstance(p.get("type"), str) or not re.match(r"^[A-Za-z0-9_.\-]+$", p["type"]):
            raise ModelError(where, f"plugin {i} type", f"{p.get('type')!r} is not a plugin name")
    version = config.get("cniVersion", "1.0.0")
    if not isinstance(version, str):
        raise ModelError(where, "spec.config.cniVersion", "must be a string")
    resource = annotations.get(ANNOTATION_RESOURCE, "")
    if plugins[0]["type"] != SANDERLING_TYPE:
        return Network(namespace, name, config, resource_name=str(resource), plugins=tuple(plugins))
    if len(plugins) > 1:
        raise ModelError(where, "spec.config.plugins", "a sanderling network is one plugin, not a chain")
    conf = plugins[0]
    unknown = sorted(set(conf) - SANDERLING_KEYS)
    if unknown:
        raise ModelError(where, "spec.config", f"unknown key(s) {', '.join(unknown)} for type sanderling; known: "
                                               f"{', '.join(sorted(SANDERLING_KEYS))}")
    if conf.get("ipam"):
        raise ModelError(where, "spec.config.ipam", "a sanderling network allocates itself: use subnet and "
                                                    "excludeSubnets, or no IPAM (pure L2)")
    topology = conf.get("topology")
    if topology not in TOPOLOGIES:
        raise ModelError(where, "spec.config.topology", f"{topology!r}: want one of {', '.join(TOPOLOGIES)}")
    vlan, physnet, vni = 0, "", 0
    trunk: tuple[VlanRange, ...] = ()
    if topology == "vlan":
        if ("vlanID" in conf) == ("trunk" in conf):
            raise ModelError(where, "spec.config", "a vlan network needs exactly one of vlanID (access) and trunk")
        if "vlanID" in conf:
            vlan = _vlan_id(where, "spec.config.vlanID", conf["vlanID"])
        else:
            trunk = _trunk(where, conf["trunk"])
        physnet = conf.get("physicalNetwork", "physnet1")
        if not isinstance(physnet, str) or not re.match(r"^[a-z0-9][a-z0-9-]{0,11}$", physnet):
            raise ModelError(where, "spec.config.physicalNetwork", f"{physnet!r}: 1-12 lowercase letters, digits, '-'")
    else:
        for key in ("vlanID", "trunk", "physicalNetwork"):
            if key in conf:
                raise ModelError(where, f"spec.config.{key}", "only for topology vlan")
        vni = conf.get("vni", default_vni(namespace, name))
        if isinstance(vni, bool) or not isinstance(vni, int) or not 1 <= vni <= MAX_VNI:
            raise ModelError(where, "spec.config.vni", f"{vni!r} is not a VXLAN network identifier (1-{MAX_VNI})")
    subnet: ipaddress.IPv4Network | None = None
    excludes: tuple[ipaddress.IPv4Network, ...] = ()
    gateway: ipaddress.IPv4Address | None = None
    if conf.get("subnet") is not None:
        try:
            subnet = ipaddress.IPv4Network(conf["subnet"])
            excludes = tuple(ipaddress.IPv4Network(e) for e in conf.get("excludeSubnets") or [])
        except (ValueError, TypeError) as exc:
            raise ModelError(where, "spec.config.subnet", f"{exc}") from None
        if subnet.prefixlen > 30:
            raise ModelError(where, "spec.config.subnet", f"{subnet} is too small for pods (want /30 or larger)")
        if trunk:
            raise ModelError(where, "spec.config.subnet", "a trunk port carries tagged frames: addresses belong on "
                                                          "the pod's VLAN interfaces, not on the trunk")
    elif conf.get("excludeSubnets"):
        raise ModelError(where, "spec.config.excludeSubnets", "needs subnet")
    if conf.get("gateway") is not None:
        try:
            gateway = ipaddress.IPv4Address(conf["gateway"])
        except ValueError:
            raise ModelError(where, "spec.config.gateway", f"{conf['gateway']!r} is not an IPv4 address") from None
        if subnet is None or gateway not in subnet:
            raise ModelError(where, "spec.config.gateway", "must be inside subnet")
        excludes = (*excludes, ipaddress.IPv4Network(f"{gateway}/32"))
    mtu = conf.get("mtu", 0)
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not (mtu == 0 or 576 <= mtu <= 9000):
        raise ModelError(where, "spec.config.mtu", f"{mtu!r}: want 576-9000")
    return Network(namespace, name, config, topology, vlan, trunk, physnet, vni, subnet, excludes, gateway, mtu,
                   str(resource))


def network_from_config(conf: dict[str, Any]) -> Network:
    """A `"type": "sanderling"` config as Multus (or any runtime) passes it, without its NAD:
    the network is known by the config's name, the same on every node."""
    name = conf.get("name")
    if not isinstance(name, str) or not _DNS_LABEL.match(name):
        raise ModelError("CNI config", "name", f"{name!r}: a sanderling network's config needs its network name "
                                                "(lowercase letters, digits, '-')")
    plain = {k: v for k, v in conf.items() if k not in RUNTIME_KEYS}
    return parse_nad({"metadata": {"namespace": DELEGATED_NAMESPACE, "name": name},
                      "spec": {"config": json.dumps(plain)}})


# ---- network-status --------------------------------------------------------------------------


def status_entry(network: str, interface: str, ips: list[str], mac: str, default: bool) -> dict[str, Any]:
    """One entry of network-status: `name` as namespace/name, addresses without prefix."""
    return {"name": network, "interface": interface, "ips": [i.split("/")[0] for i in ips], "mac": mac,
            "default": default, "dns": {}}
