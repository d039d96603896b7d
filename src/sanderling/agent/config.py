"""The agent's configuration: one typed definition, read from flags and a YAML file.

Every setting is a field of `AgentConfig`; its flag is `--` + the key (`mtu` -> `--mtu`) and its
key in the file (`--config FILE`, the DaemonSet's ConfigMap) is the same name. Precedence:
defaults < file < flags. Everything is checked before the agent touches anything: an unknown
key, a value of the wrong type or out of range stops it with one line naming the key and what is
allowed (`ConfigError`), never a traceback and never half a start.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sanderling import VERSION
from sanderling.agent.status import DEFAULT_ADDRESS as STATUS_ADDRESS
from sanderling.model.network import split_cidrs
from sanderling.ovs.runtime import SYSTEM_RUNDIR

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class ConfigError(ValueError):
    """A setting the agent cannot use; the message is one line naming it."""


def _opt(default: Any, help: str, kind: str = "str", choices: tuple[str, ...] = (),
         low: int | None = None, high: int | None = None) -> Any:
    meta = {"help": help, "kind": kind, "choices": choices, "low": low, "high": high}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class AgentConfig:
    node: str = _opt("", "this node's name (required)")
    pod_cidr: str | None = _opt(None, "this node's pod subnet, e.g. 10.244.1.0/24, its IPv4 and IPv6 subnets "
                                      "joined by a comma (dual-stack) or an IPv6 one alone (IPv6-only; default: "
                                      "spec.podCIDRs of this node's Node object)", "podcidrs")
    mode: str = _opt("routed", "across nodes: routed (pod addresses on the underlay, no NAT) or overlay (VXLAN)",
                     "choice", ("routed", "overlay"))
    gateway_mac: str = _opt("0a:58:0a:f4:00:01", "MAC pods see for their gateway", "mac")
    bridge: str = _opt("br-int", "the integration bridge")
    ovs_run_dir: Path = _opt(SYSTEM_RUNDIR, "OVS run directory (a private instance from `sanderling ovs start`, or "
                                            "the system's)", "path")
    datapath: str = _opt("netdev", "OVS datapath type of the bridge", "choice", ("netdev", "dummy", "system"))
    node_netns: str | None = _opt(None, "network namespace holding br-int and the host ends of pod veths "
                                        "(lab nodes)")
    state_dir: Path = _opt(Path("/var/lib/sanderling"), "where the IPAM database lives", "path")
    cni_socket: Path = _opt(Path("/run/sanderling/cni.sock"), "the agent's CNI socket", "path")
    cni_conf_dir: Path = _opt(Path("/etc/cni/net.d"), "where the conflist is written", "path")
    cni_bin_dir: Path = _opt(Path("/opt/cni/bin"), "where the plugin is installed", "path")
    cni_network: str = _opt("sanderling", "network name in the conflist")
    cni_conf_version: str = _opt("1.1.0", "cniVersion of the conflist (older runtimes, e.g. podman 4, need 1.0.0)",
                                 "choice", ("0.4.0", "1.0.0", "1.1.0"))
    no_cni: bool = _opt(False, "do not serve CNI (pods are plugged by other means)", "bool")
    mtu: int = _opt(1500, "MTU of pod interfaces", "int", low=576, high=9216)
    kubeconfig: Path | None = _opt(None, "Kubernetes API access (in-cluster config when run as a pod); enables "
                                         "pod annotations and IPPools", "path")
    kube_api_server: str = _opt("", "https://HOST:PORT of the Kubernetes API for the in-cluster credentials (default: "
                                    "the `kubernetes` Service, KUBERNETES_SERVICE_HOST/PORT); set it where the agent "
                                    "replaces kube-proxy: that ClusterIP answers only once an agent programs it",
                                "url")
    gateway: bool = _opt(False, "route through the node: the bridge's LOCAL port gets the gateway address "
                                "(routed mode)", "bool")
    node_ip: list[str] = _opt([], "this node's address (default: the Node's InternalIP); repeatable", "ips")
    service_cidr: str = _opt("10.96.0.0/16", "the cluster's Service CIDR", "cidr")
    cluster_cidr: str = _opt("10.244.0.0/16", "pod addresses of the whole cluster: sources outside it are "
                                              "masqueraded to ClusterIPs", "cidr")
    service_cidr6: str = _opt("", "dual-stack: the cluster's IPv6 Service CIDR (IPv6 ClusterIPs are served on a node "
                                  "with an IPv6 pod subnet; this range is tracked and its unused addresses dropped)",
                              "cidr6")
    cluster_cidr6: str = _opt("", "dual-stack: IPv6 pod addresses of the whole cluster (sources outside it are "
                                  "masqueraded to IPv6 ClusterIPs; default: this node's IPv6 pod subnet)", "cidr6")
    node_port_addresses: str = _opt("", "comma-separated CIDRs: NodePorts answer on the node addresses inside "
                                        "them (default: all)", "cidrs")
    masquerade_all: bool = _opt(False, "SNAT every service connection", "bool")
    external_ip_cidrs: str = _opt("", "comma list of CIDRs a Service's externalIPs may come from (default none: "
                                      "externalIPs are ignored, as CVE-2020-8554 advises; 0.0.0.0/0 honours every "
                                      "one)", "cidrs")
    no_proxy: bool = _opt(False, "do not replace kube-proxy (no Service flows)", "bool")
    no_policy: bool = _opt(False, "do not enforce NetworkPolicies", "bool")
    provider_network: list[str] = _opt([], "PHYSNET=INTERFACE: a physical network for VLAN secondary networks and "
                                           "the node interface that reaches it; repeatable", "physnets")
    multus: bool = _opt(False, "Multus is in front: leave the networks annotation and network-status to it, serve "
                               "only the \"type\": \"sanderling\" networks it delegates", "bool")
    layer2_port: int = _opt(8472, "UDP port of layer2 networks' VXLAN tunnels", "int", low=1, high=65535)
    underlay_mtu: int = _opt(1500, "MTU of the node's underlay interfaces", "int", low=576, high=9216)
    cni_path: str = _opt("/opt/cni/bin:/usr/lib/cni", "where delegated plugins of secondary networks are looked up")
    cni_interpreter: str = _opt("", "the host's Python 3 the installed plugin runs with (it uses the standard library "
                                    "only; default: the agent's own interpreter, right when the agent runs on the "
                                    "host; /usr/bin/python3 when it runs in a container)")
    cni_shim: str = _opt("auto", "the plugin binary the runtime runs: auto (the compiled front scripts/setup.sh "
                                 "builds, when it is there; else the Python shim), python, or a PATH to the "
                                 "compiled front; the Python shim is installed beside it as its fall back")
    external_bridge: str = _opt("", "an OVS bridge handed to an external SDN controller (e.g. br-ext): the agent "
                                    "creates it, its patch pair to br-int and its uplinks, and never programs it")
    external_uplink: list[str] = _opt([], "an interface of the node on the external bridge; repeatable", "names")
    external_controller: list[str] = _opt([], "the external bridge's OpenFlow controller, tcp:IP:PORT or "
                                              "ssl:IP:PORT; repeatable", "targets")
    external_fail_mode: str = _opt("secure", "the external bridge without a controller: secure (forwards nothing "
                                             "until the controller programs it) or standalone (a learning "
                                             "switch)", "choice", ("secure", "standalone"))
    external_protocols: str = _opt("OpenFlow13", "comma list of OpenFlow versions the external bridge speaks "
                                                 "(OpenFlow10 ... OpenFlow15)")
    external_cidrs: str = _opt("0.0.0.0/0", "comma list of destination CIDRs pods reach through the external "
                                            "bridge (pod, service and node addresses always stay inside)", "cidrs")
    external_masquerade: bool = _opt(False, "pods' connections to the external CIDRs leave with the node's masquerade "
                                            "address (the last usable one of its pod CIDR) instead of their own",
                                     "bool")
    external_ssl: list[str] = _opt([], "PRIVATE-KEY CERTIFICATE CA-CERT files for ssl: controllers (three "
                                       "values, in that order)", "names")
    status_address: str = _opt(STATUS_ADDRESS, "HOST:PORT of /healthz, /readyz and /objects (\"\" for none)",
                               "hostport")
    log_level: str = _opt("INFO", "log level", "choice", ("DEBUG", "INFO", "WARNING", "ERROR"))


def keys() -> list[str]:
    return [f.name.replace("_", "-") for f in dataclasses.fields(AgentConfig)]


def _check(key: str, meta: dict[str, Any], value: Any) -> Any:
    """The value converted to the field's type, or ConfigError naming the key and what is allowed."""
    kind = meta["kind"]
    if value is None:
        return None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: {value!r} is not true or false")
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"{key}: {value!r} is not an integer")
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{key}: {value!r} is not an integer") from None
        if not meta["low"] <= number <= meta["high"]:
            raise ConfigError(f"{key}: {number} is out of range ({meta['low']}-{meta['high']})")
        return number
    if kind in ("ips", "physnets", "names", "targets"):
        items = value if isinstance(value, list) else [value]
        for item in items:
            if not isinstance(item, str):
                raise ConfigError(f"{key}: {item!r} is not a string")
            if kind == "ips":
                try:
                    ipaddress.ip_address(item)
                except ValueError:
                    raise ConfigError(f"{key}: {item!r} is not an IP address") from None
            elif kind == "targets" and not re.fullmatch(r"(tcp|ssl):[^:\s]+:\d{1,5}", item):
                raise ConfigError(f"{key}: {item!r} is not tcp:IP:PORT or ssl:IP:PORT")
            elif kind == "names" and not re.fullmatch(r"\S+", item):
                raise ConfigError(f"{key}: {item!r} is not a name")
            elif kind == "physnets" and not re.fullmatch(r"[^=\s]+=[^=\s]+", item):
                raise ConfigError(f"{key}: {item!r} is not PHYSNET=INTERFACE")
        return list(items)
    if kind == "cidrs" and isinstance(value, list):
        value = ",".join(str(v) for v in value)
    if not isinstance(value, str | Path):
        raise ConfigError(f"{key}: {value!r} is not a string")
    text = str(value)
    if kind == "path":
        return Path(text)
    if kind == "choice" and text not in meta["choices"]:
        raise ConfigError(f"{key}: {text!r} is not one of {', '.join(meta['choices'])}")
    if kind == "podcidrs":
        try:
            v4, v6 = split_cidrs(text)
            if not v4 and not v6:
                raise ValueError("no subnet named")
            if v4:
                ipaddress.IPv4Network(v4)
            if v6:
                ipaddress.IPv6Network(v6)
        except ValueError as exc:
            raise ConfigError(f"{key}: {text!r}: {exc} (e.g. 10.244.1.0/24, 10.244.1.0/24,fd00:10:244:1::/64 or, "
                              "IPv6-only, fd00:10:244:1::/64)") \
                from None
    if kind == "cidr6" and text:
        try:
            ipaddress.IPv6Network(text, strict=True)
        except ValueError:
            raise ConfigError(f"{key}: {text!r} is not an IPv6 CIDR (e.g. fd00:10:96::/112)") from None
    if kind in ("cidr", "cidrs"):
        for part in ([text] if kind == "cidr" else [c for c in text.split(",") if c.strip()]):
            try:
                ipaddress.IPv4Network(part.strip(), strict=kind == "cidr")
            except ValueError:
                raise ConfigError(f"{key}: {part.strip()!r} is not an IPv4 CIDR (e.g. 10.96.0.0/16)") from None
    if kind == "mac" and not (_MAC.match(text.lower()) and not int(text[:2], 16) & 1):
        raise ConfigError(f"{key}: {text!r} is not a unicast MAC address (aa:bb:cc:dd:ee:ff)")
    if kind == "url" and text:
        parsed = urllib.parse.urlsplit(text)
        try:
            parsed.port  # noqa: B018 (raises for a bad port)
        except ValueError:
            raise ConfigError(f"{key}: {text!r} has a bad port") from None
        if parsed.scheme != "https" or not parsed.hostname or parsed.path not in ("", "/"):
            raise ConfigError(f"{key}: {text!r} is not https://HOST[:PORT]")
    if kind == "hostport" and text:
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(f"{key}: {text!r} is not HOST:PORT")
    return text


def from_file(path: Path) -> dict[str, Any]:
    """The file's settings by field name; ConfigError for an unreadable file or an unknown key."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot be read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path}: not YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: want a mapping of keys to values, got {type(data).__name__}")
    known = set(keys())
    out = {}
    for key, value in data.items():
        if key not in known:
            near = difflib.get_close_matches(str(key), sorted(known), n=1)
            raise ConfigError(f"config {path}: unknown key {key!r}" + (f" (did you mean {near[0]!r}?)" if near else
                                                                      f" (keys: {', '.join(sorted(known))})"))
        out[key.replace("-", "_")] = value
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sanderling-agent", description="Sanderling node agent",
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", type=Path, help="YAML file with any of the settings below (flags override it)")
    p.add_argument("--version", action="version", version=f"sanderling-agent {VERSION}")
    for f in dataclasses.fields(AgentConfig):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = f"{meta['help']} (default: {default if default not in (None, '', []) else 'none'})"
        if meta["kind"] == "bool":
            p.add_argument(flag, action="store_true", help=help_text)
        elif meta["kind"] in ("ips", "physnets", "names", "targets"):
            p.add_argument(flag, action="append", help=help_text)
        else:
            p.add_argument(flag, help=help_text)
    return p


def load(argv: list[str] | None) -> AgentConfig:
    """Defaults, then the file, then the flags; every value checked (ConfigError on the first bad one)."""
    given = vars(parser().parse_args(argv))
    values: dict[str, Any] = {}
    path = given.pop("config", None)
    if path is not None:
        values.update(from_file(path))
    values.update(given)
    fields = {f.name: f for f in dataclasses.fields(AgentConfig)}
    checked = {name: _check(name.replace("_", "-"), dict(fields[name].metadata), value)
               for name, value in values.items()}
    config = AgentConfig(**checked)
    if not config.node:
        raise ConfigError("node: required (--node NAME, or `node:` in the config file)")
    _check_external(config)
    return config


OPENFLOW_VERSIONS = ("OpenFlow10", "OpenFlow11", "OpenFlow12", "OpenFlow13", "OpenFlow14", "OpenFlow15")


def _check_external(config: AgentConfig) -> None:
    """The external bridge's settings belong together."""
    for version in config.external_protocols.split(","):
        if version.strip() not in OPENFLOW_VERSIONS:
            raise ConfigError(f"external-protocols: {version.strip()!r} is not one of {', '.join(OPENFLOW_VERSIONS)}")
    if config.external_ssl and len(config.external_ssl) != 3:
        raise ConfigError(f"external-ssl: give three files (private key, certificate, CA certificate), got "
                          f"{len(config.external_ssl)}")
    if any(t.startswith("ssl:") for t in config.external_controller) and not config.external_ssl:
        raise ConfigError("external-controller: an ssl: target needs external-ssl (key, certificate, CA)")
    if not config.external_bridge:
        given = [k for k in ("external_uplink", "external_controller", "external_ssl", "external_masquerade")
                 if getattr(config, k)]
        if given:
            raise ConfigError(f"{given[0].replace('_', '-')}: set external-bridge too (the bridge it belongs to)")
    elif config.external_bridge == config.bridge:
        raise ConfigError(f"external-bridge: {config.external_bridge!r} is the integration bridge; name another")


def reference() -> str:
    """The settings as a Markdown table (README's "Agent configuration"; a test keeps them equal)."""
    rows = ["| key (flag `--key`) | default | what |", "|---|---|---|"]
    for f in dataclasses.fields(AgentConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = "none" if default in (None, "", []) else f"`{default}`"
        what = f.metadata["help"]
        if f.metadata["choices"]:
            what += f" ({' / '.join(f.metadata['choices'])})"
        if f.metadata["low"] is not None:
            what += f" ({f.metadata['low']}-{f.metadata['high']})"
        rows.append(f"| `{f.name.replace('_', '-')}` | {shown} | {what.replace('|', '/')} |")
    return "\n".join(rows) + "\n"
