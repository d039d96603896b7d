"""Running another CNI plugin for one of a pod's networks, as the CNI spec says a runtime does.

The plugin is found in the CNI path, gets its config on stdin (`name` and `cniVersion` from the
NetworkAttachmentDefinition, `prevResult` chained through a conflist, `runtimeConfig` with the
pod's requested ips/mac), CNI_IFNAME = the interface the pod asked for, and runs in the node's
network namespace (where a macvlan master or a host-device lives). ADD runs the chain in order,
DEL in reverse with the last result as prevResult, and goes on past failures.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sanderling.cni import errors as E
from sanderling.cni.errors import CniFailure
from sanderling.netlink.netns import netns_path

TIMEOUT = 60.0


@dataclass(frozen=True)
class DelegateCall:
    container_id: str
    netns: str
    ifname: str
    cni_args: str            # CNI_ARGS, as the runtime passed it
    cni_path: tuple[str, ...]
    node_netns: str | None


def find_plugin(kind: str, path: tuple[str, ...]) -> Path:
    for directory in path:
        candidate = Path(directory) / kind
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise CniFailure(E.E_BAD_CONFIG, f"CNI plugin {kind!r} not found in {':'.join(path) or 'an empty CNI path'}")


def plugin_configs(network_config: dict[str, Any], name: str) -> tuple[str, list[dict[str, Any]]]:
    """(cniVersion, each plugin's config with name and cniVersion filled in)."""
    version = str(network_config.get("cniVersion", "1.0.0"))
    plugins = network_config["plugins"] if "plugins" in network_config else [network_config]
    return version, [{**p, "cniVersion": version, "name": network_config.get("name", name)} for p in plugins]


def _run(call: DelegateCall, command: str, conf: dict[str, Any]) -> dict[str, Any] | None:
    binary = find_plugin(str(conf["type"]), call.cni_path)
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": call.container_id, "CNI_NETNS": call.netns,
           "CNI_IFNAME": call.ifname, "CNI_ARGS": call.cni_args, "CNI_PATH": ":".join(call.cni_path),
           "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    argv = [str(binary)]
    if call.node_netns:
        argv = ["nsenter", f"--net={netns_path(call.node_netns)}", *argv]
    try:
        proc = subprocess.run(argv, input=json.dumps(conf), env=env, capture_output=True, text=True,
                              timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        raise CniFailure(E.E_TRY_LATER, f"plugin {conf['type']} {command} did not answer in {TIMEOUT:.0f}s") from None
    out: Any = None
    if proc.stdout.strip():
        try:
            out = json.loads(proc.stdout)
        except ValueError:
            out = None
    if proc.returncode != 0:
        if isinstance(out, dict) and "msg" in out:
            code = out["code"] if isinstance(out.get("code"), int) else E.E_PLUMBING
            detail = f": {out['details']}" if out.get("details") else ""
            raise CniFailure(code, f"plugin {conf['type']} {command}: {out['msg']}{detail}")
        raise CniFailure(E.E_PLUMBING, f"plugin {conf['type']} {command} exited {proc.returncode}: "
                                       f"{(proc.stderr or proc.stdout).strip()[:300]}")
    return out if isinstance(out, dict) else None


def add(call: DelegateCall, confs: list[dict[str, Any]], runtime: dict[str, Any]) -> dict[str, Any]:
    """ADD through the chain; the last plugin's result. On failure the caller runs `delete`."""
    result: dict[str, Any] | None = None
    for conf in confs:
        conf = dict(conf)
        if runtime:
            conf["runtimeConfig"] = {**(conf.get("runtimeConfig") or {}), **runtime}
        if result is not None:
            conf["prevResult"] = result
        result = _run(call, "ADD", conf) or result
    if result is None:
        raise CniFailure(E.E_PLUMBING, f"plugins {[c['type'] for c in confs]} returned no result")
    return result


def delete(call: DelegateCall, confs: list[dict[str, Any]], runtime: dict[str, Any],
           result: dict[str, Any] | None) -> list[str]:
    """DEL through the chain in reverse; every failure, each named (DEL goes on past them)."""
    problems = []
    for conf in reversed(confs):
        conf = dict(conf)
        if runtime:
            conf["runtimeConfig"] = {**(conf.get("runtimeConfig") or {}), **runtime}
        if result is not None:
            conf["prevResult"] = result
        try:
            _run(call, "DEL", conf)
        except CniFailure as exc:
            problems.append(exc.msg)
    return problems
