"""NetworkPolicy truth tables as MultiNetworkPolicies over a secondary network of a 3-node lab, with
real traffic over the pods' secondary interfaces: a layer2 overlay and a VLAN of the provider
network, three shared files each (the whole set: `sanderling conformance netpol --network NS/NAD
[--network-topology vlan] ../shared/conformance/netpol/*.yaml`) plus our SCTP case (flow level,
through the secondary bridges). Each step also checks that the pod network stays open."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import require_ovs
from .conftest import require_root

DIR = Path(__file__).resolve().parents[3] / "shared" / "conformance" / "netpol"
SCTP_CASE = Path(__file__).parent / "data" / "sctp-ingress-from-namespace.yaml"
FILES = {"layer2": ("np01-", "np10-", "np34-"), "vlan": ("np02-", "np17-", "np25-")}


@pytest.mark.parametrize("topology", ["layer2", "vlan"])
def test_netpol_conformance_on_a_secondary_network(topology):
    require_root()
    require_ovs()
    files = [f for prefix in FILES[topology] for f in sorted(DIR.glob(f"{prefix}*.yaml"))]
    assert len(files) == 3, files
    proc = subprocess.run([sys.executable, "-m", "sanderling.cli.main", "conformance", "netpol",
                           "--network", f"default/mnp-{topology}", "--network-topology", topology,
                           *map(str, files), str(SCTP_CASE)], capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].endswith(" 0 failed") and not lines[-1].startswith("0 passed"), lines[-1]
    assert any(f"via default/mnp-{topology} address" in line for line in lines)
    assert any("pod network open" in line for line in lines)
    assert sum("SCTP" in line and line.startswith("PASS") for line in lines) == 2
