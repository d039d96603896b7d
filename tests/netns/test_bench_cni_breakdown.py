"""`bench cni` takes the mean ADD apart with the agent's own metrics (issue 18's breakdown): every
step the agent timed is there and positive, the steps and the rest add up to the agent's whole
ADD, and what the agent did not see (plugin start, socket round trip, exec) is what is left of the
runtime's measure."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import require_root


def test_bench_cni_breakdown_adds_up():
    require_root()
    out = subprocess.run([sys.executable, "-m", "sanderling.cli.main", "bench", "cni", "--json", "--concurrency",
                          "4", "--rounds", "2"], capture_output=True, text=True, timeout=600)
    assert out.returncode in (0, 1), out.stderr[-2000:]  # 1: the relative floors are not met yet (issue 18)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    parts = result["breakdown_ms"]
    assert result["p50_ratio"] == round(result["p50_ms"] / result["reference_p50_ms"], 2) or \
        abs(result["p50_ratio"] - result["p50_ms"] / result["reference_p50_ms"]) < 0.02, result
    assert result["floors"] == {"p50_ratio": ["<=", 1.0], "p99_ratio": ["<=", 1.0]}
    print(f"\nbench cni, 4 at once: p50 {result['p50_ms']} ms (reference {result['reference_p50_ms']} ms); {parts}")
    for step in ("ipam", "plumbing", "ovsdb", "flows"):
        assert parts[step] > 0, (step, parts)
    steps = sum(parts[s] for s in ("ipam", "plumbing", "ovsdb", "flows", "agent_other"))
    assert abs(steps - parts["agent_total"]) <= 0.5, parts
    assert parts["agent_other"] >= 0 and parts["shim_and_exec"] > 0, parts
