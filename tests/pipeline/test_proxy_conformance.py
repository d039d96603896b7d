"""The kube-proxy conformance files from ../shared, traced through the real pipeline on OVS."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ..conftest import require_ovs

FILES = sorted((Path(__file__).resolve().parents[3] / "shared" / "conformance" / "proxy").glob("*.yaml"))


def test_proxy_conformance_runner_passes_every_file():
    require_ovs()
    assert FILES, "no proxy conformance files found in ../shared/conformance/proxy"
    proc = subprocess.run([sys.executable, "-m", "sanderling.cli.main", "conformance", "proxy", *map(str, FILES)],
                          capture_output=True, text=True, timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.endswith(" 0 failed") and not last.startswith("0 passed"), last
