"""Installs the CNI plugin binary and writes the conflist, as a node agent does at start-up."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from sanderling.cni import shim

CONFLIST_NAME = "10-sanderling.conflist"
# where scripts/setup.sh builds the compiled front (cni-shim/, Go standard library only)
COMPILED_SHIM = Path(os.environ.get("SANDERLING_UPSTREAM_BIN", "/var/cache/sanderling/bin")) / "sanderling-cni"


def compiled_shim(choice: str) -> Path | None:
    """The compiled front to install for `cni-shim` = auto | python | PATH (None: the Python shim).

    auto takes the one setup built when it is there; a PATH that is not an executable is an
    error the operator has to fix, not a silent fall back."""
    if choice == "python":
        return None
    if choice == "auto":
        return COMPILED_SHIM if os.access(COMPILED_SHIM, os.X_OK) else None
    path = Path(choice)
    if not os.access(path, os.X_OK):
        raise SystemExit(f"cni-shim {choice}: not an executable file (build it with scripts/setup.sh, "
                         "or set cni-shim to auto or python)")
    return path


def install_binary(bin_dir: Path, name: str = "sanderling-cni", socket: Path | None = None,
                   interpreter: str = "", compiled: Path | None = None) -> Path:
    """Install the plugin as `name`: the compiled front with the Python shim beside it as
    `name`-py (the front's fall back), or the Python shim alone.

    The Python shim is copied with a shebang that runs the real interpreter, isolated and
    without site.

    A pyenv shim or a venv wrapper costs ~50 ms per exec; `-IS` on the real binary ~10 ms.
    `socket` becomes the plugin's default agent socket: a config that names none (a
    NetworkAttachmentDefinition's, the same on every node) reaches this node's agent.
    `interpreter`: the host's Python when the agent runs in a container (the shim runs on the
    host, started by the container runtime); default the agent's own.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    if compiled is not None:
        _install_python(bin_dir / f"{name}-py", socket, interpreter)
        target = bin_dir / name
        tmp = target.with_suffix(".tmp")
        shutil.copyfile(compiled, tmp)
        tmp.chmod(0o755)
        os.replace(tmp, target)
        return target
    return _install_python(bin_dir / name, socket, interpreter)


def _install_python(target: Path, socket: Path | None, interpreter: str) -> Path:
    interpreter = interpreter or os.path.realpath(sys.executable)
    source = Path(shim.__file__).read_text()
    if socket is not None:
        line = f'DEFAULT_SOCKET = "{shim.DEFAULT_SOCKET}"'
        assert line in source, "the shim's default socket line moved"
        source = source.replace(line, f"DEFAULT_SOCKET = {str(socket)!r}", 1)
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
