"""Issue 17's chaos run, bounded for CI: `sanderling bench chaos --seconds 60` on a 3-node lab.

Pods, Services and NetworkPolicies churn through the API while agents and ovs-vswitchd are killed
-9 and the control plane restarts at random; afterwards every pod must run, every agent be ready,
each node's flows and groups equal what a freshly started agent installs from the same API state,
nothing leak, and one NetworkPolicy conformance case pass on the same lab. The seed is fixed so a
failure can be replayed; the benchmark runs longer with other seeds.
"""

from __future__ import annotations

import json
import subprocess
import sys

from ..conftest import require_ovs
from .conftest import require_root


def test_churn_under_faults_converges_to_a_fresh_compile_with_nothing_leaked():
    require_root()
    require_ovs()
    proc = subprocess.run([sys.executable, "-m", "sanderling.cli.main", "bench", "chaos", "--seconds", "60",
                           "--json"], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print("\n" + json.dumps(result, indent=1))
    assert sum(result["actions"].values()) >= 60, result["actions"]
    assert sum(result["faults"].values()) >= 3, result["faults"]
    assert result["pods_not_running"] == [], result
    assert result["agents_not_ready"] == {}, result
    assert all(lines > 100 for lines in result["flow_lines"].values()), result["flow_lines"]
    assert not any(result["flow_differences"].values()), result["difference_samples"]
    assert result["leaks"] == {}, result["leaks"]
    assert result["netpol_passed"] > 0 and result["netpol_failed"] == 0, result["netpol_failures"]
    assert result["ok"] is True
