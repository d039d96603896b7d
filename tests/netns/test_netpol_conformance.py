"""NetworkPolicy truth tables from ../shared with real traffic on a 3-node lab (two of the files:
the whole set runs with `sanderling conformance netpol ../shared/conformance/netpol/*.yaml`), on
the embedded API server and on the upstream control plane; and two on an IPv6-only lab (upstream)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import require_ovs
from .conftest import require_root

DIR = Path(__file__).resolve().parents[3] / "shared" / "conformance" / "netpol"


@pytest.mark.parametrize("control_plane,ip_family,names", [
    ("sanderling", "ipv4", ("np01", "np14")),
    ("kubernetes", "ipv4", ("np01", "np14")),
    # IPv6-only nodes on the upstream control plane: the ipBlock file derived to IPv6 (its /32 of a
    # pod's address a /128); the IPv6-only lab on the embedded one runs in test_lab
    ("kubernetes", "ipv6", ("np14", "np34")),
])
def test_netpol_conformance_default_deny_ports_and_ipblock(control_plane, ip_family, names):
    require_root()
    require_ovs()
    files = [f for name in names for f in sorted(DIR.glob(f"{name}-*.yaml"))]
    assert len(files) == len(names), files
    proc = subprocess.run([sys.executable, "-m", "sanderling.cli.main", "conformance", "netpol",
                           "--control-plane", control_plane, "--ip-family", ip_family, *map(str, files)],
                          capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.endswith(" 0 failed") and not last.startswith("0 passed"), last
