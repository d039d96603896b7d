"""The CNI black-box conformance file from ../shared runs clean against the real plugin."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import require_ovs
from .conftest import require_root

CHECKS = Path(__file__).resolve().parents[3] / "shared" / "conformance" / "cni" / "cni-blackbox-checks.yaml"


@pytest.mark.parametrize("front", ["compiled", "python"])
def test_cni_conformance_runner_passes_every_check(front):
    """Both plugin fronts, the compiled one setup builds and the Python shim it falls back to."""
    require_root()
    require_ovs()
    assert CHECKS.exists(), f"{CHECKS} missing: the shared/ directory must sit beside the checkout"
    proc = subprocess.run([sys.executable, "-m", "sanderling.cli.main", "conformance", "cni", str(CHECKS),
                           "--cni-front", front], capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    assert f"({front} front)" in proc.stdout
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].endswith(" 0 failed"), proc.stdout + proc.stderr
    assert proc.returncode == 0
    assert not [line for line in lines if line.startswith("FAIL")]
    not_applicable = [line for line in lines if line.startswith("N/A")]
    assert all("delegat" in line for line in not_applicable), not_applicable
