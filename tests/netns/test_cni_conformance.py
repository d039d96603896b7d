"""The CNI black-box conformance file from ../shared runs clean against the real plugin."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ..conftest import require_ovs
from .conftest import require_root

CHECKS = Path(__file__).resolve().parents[3] / "shared" / "conformance" / "cni" / "cni-blackbox-checks.yaml"


def test_cni_conformance_runner_passes_every_check():
    require_root()
    require_ovs()
    assert CHECKS.exists(), f"{CHECKS} missing: the shared/ directory must sit beside the checkout"
    proc = subprocess.run([sys.executable, "-m", "sanderling.cli.main", "conformance", "cni", str(CHECKS)],
                          capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].endswith(" 0 failed"), proc.stdout + proc.stderr
    assert proc.returncode == 0
    assert not [line for line in lines if line.startswith("FAIL")]
    not_applicable = [line for line in lines if line.startswith("N/A")]
    assert all("delegat" in line for line in not_applicable), not_applicable
