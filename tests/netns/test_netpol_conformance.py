"""NetworkPolicy truth tables from ../shared with real traffic on a 3-node lab (two of the files:
the whole set runs with `sanderling conformance netpol ../shared/conformance/netpol/*.yaml`), on
the embedded API server and on the upstream control plane."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import require_ovs
from .conftest import require_root

DIR = Path(__file__).resolve().parents[3] / "shared" / "conformance" / "netpol"


@pytest.mark.parametrize("control_plane", ["sanderling", "kubernetes"])
def test_netpol_conformance_default_deny_and_ports(control_plane):
    require_root()
    require_ovs()
    files = sorted(DIR.glob("np01-*.yaml")) + sorted(DIR.glob("np14-*.yaml"))
    assert len(files) == 2, files
    proc = subprocess.run([sys.executable, "-m", "sanderling.cli.main", "conformance", "netpol",
                           "--control-plane", control_plane, *map(str, files)],
                          capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.endswith(" 0 failed") and not last.startswith("0 passed"), last
