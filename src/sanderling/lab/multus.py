"""Multus (thin plugin) in front of Sanderling on a lab node, as a cluster running Multus has it.

The Multus binary is built once per machine from its Go module by `scripts/build-upstream.sh`
into a cache outside the repository. On each node it becomes the runtime's first CNI config
(`00-multus.conf`, its default network delegate = the agent's Sanderling conflist), reads the
pod's networks annotation and NADs from the API with the node's kubeconfig, calls `sanderling`
for `"type": "sanderling"` networks and other plugins for the rest, and writes network-status.
The agents then run with `--multus`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

UPSTREAM_BIN = Path(os.environ.get("SANDERLING_UPSTREAM_BIN", "/var/cache/sanderling/bin"))
CONF_NAME = "00-multus.conf"


def binary() -> Path:
    path = UPSTREAM_BIN / "multus"
    if not path.is_file():
        raise SystemExit(f"sanderling lab: {path} is missing; run `bash scripts/setup.sh` (it builds Multus from its "
                         "Go module once per machine)")
    return path


def install(node_dir: Path, kubeconfig: Path, sanderling_conflist: dict[str, object]) -> tuple[Path, Path]:
    """Multus's binary and config for one node; (plugin binary, config) for the node's runtime."""
    bin_dir, conf_dir = node_dir / "cni" / "bin", node_dir / "cni" / "net.d"
    bin_dir.mkdir(parents=True, exist_ok=True)
    conf_dir.mkdir(parents=True, exist_ok=True)
    target = bin_dir / "multus"
    shutil.copy2(binary(), target)
    conf = {"cniVersion": "1.0.0", "name": "multus-cni-network", "type": "multus",
            "kubeconfig": str(kubeconfig), "cniDir": str(node_dir / "multus" / "cache"),
            "binDir": str(bin_dir), "logFile": str(node_dir / "multus.log"), "logLevel": "verbose",
            "delegates": [sanderling_conflist]}
    conf_path = conf_dir / CONF_NAME
    conf_path.write_text(json.dumps(conf, indent=2) + "\n")
    return target, conf_path
