"""Installs the CNI plugin binary and writes the conflist, as a node agent does at start-up."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from sanderling.cni import shim

CONFLIST_NAME = "10-sanderling.conflist"


def install_binary(bin_dir: Path, name: str = "sanderling-cni", socket: Path | None = None,
                   interpreter: str = "") -> Path:
    """Copy the shim with a shebang that runs the real interpreter, isolated and without site.

    A pyenv shim or a venv wrapper costs ~50 ms per exec; `-IS` on the real binary ~10 ms.
    `socket` becomes the plugin's default agent socket: a config that names none (a
    NetworkAttachmentDefinition's, the same on every node) reaches this node's agent.
    `interpreter`: the host's Python when the agent runs in a container (the shim runs on the
    host, started by the container runtime); default the agent's own.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    interpreter = interpreter or os.path.realpath(sys.executable)
    source = Path(shim.__file__).read_text()
    if socket is not None:
        line = f'DEFAULT_SOCKET = "{shim.DEFAULT_SOCKET}"'
        assert line in source, "the shim's default socket line moved"
        source = source.replace(line, f"DEFAULT_SOCKET = {str(socket)!r}", 1)
    target = bin_dir / name
    tmp = target.with_suffix(".tmp")
    tmp.write_text(f"#!{interpreter} -IS\n{source}")
    tmp.chmod(0o755)
    os.replace(tmp, target)
    return target


def conflist(network: str, agent_socket: Path, mtu: int = 1500, version: str = "1.1.0") -> dict[str, object]:
    return {"cniVersion": version, "name": network,
            "plugins": [{"type": "sanderling-cni", "agentSocket": str(agent_socket), "mtu": mtu,
                         "capabilities": {"ips": True, "mac": True}}]}


def write_conflist(conf_dir: Path, network: str, agent_socket: Path, mtu: int = 1500,
                   filename: str = CONFLIST_NAME, version: str = "1.1.0") -> Path:
    conf_dir.mkdir(parents=True, exist_ok=True)
    target = conf_dir / filename
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(conflist(network, agent_socket, mtu, version), indent=2) + "\n")
    os.replace(tmp, target)
    return target
