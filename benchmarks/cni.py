"""bench cni: CNI ADD latency through the shim, executed as a runtime executes it, 20 at once.

Sanderling: the installed `sanderling-cni` binary talking to a lab node's agent (OVS userspace
datapath, IPAM, flows). Reference, in the same run: Debian's containernetworking-plugins
`bridge` + `host-local`, run with a network namespace of their own as "the host" (so the host
is not touched). Both are driven by the same driver (benchmarks/_cni_driver.py): `rounds`
rounds of `concurrency` simultaneous ADDs, each timed from exec to exit, DELs between rounds; the
plugins take turns round by round, so drift in the machine's load falls on each alike.
`breakdown_ms`: the mean ADD taken apart with the agent's own metrics (its steps ipam, plumbing,
ovsdb, flows; the rest of its time; and the time it did not see: the plugin's start and socket
round trip, the exec).

The plugin is the compiled front (cni-shim/, built by scripts/setup.sh) when the node's agent
installed it; the Python shim it falls back to is measured in the same run (`python_shim`), so
the two fronts compare on the same node, agent and sandboxes.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sanderling.lab.node import LocalNode, teardown_prefix
from sanderling.netlink import veth

PREFIX = "slbench"
REFERENCE_DIR = Path("/usr/lib/cni")
DRIVER = Path(__file__).with_name("_cni_driver.py")


def _drive(job: dict[str, Any], netns: str | None = None) -> dict[str, Any]:
    argv = [sys.executable, str(DRIVER)]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    proc = subprocess.run(argv, input=json.dumps(job), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"CNI driver failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * len(ordered) + 0.5)) - 1)]


STEPS = ("ipam", "plumbing", "ovsdb", "flows")


def _agent_sums() -> dict[str, tuple[float, float]]:
    """(sum of seconds, count) of the agent's ADD steps and of its whole ADDs, from its /metrics."""
    import re
    import urllib.request

    from sanderling.agent.status import DEFAULT_ADDRESS

    text = urllib.request.urlopen(f"http://{DEFAULT_ADDRESS}/metrics", timeout=10).read().decode()
    out: dict[str, tuple[float, float]] = {}
    for name, label, key in (("sanderling_cni_add_step_duration_seconds", "step", None),
                             ("sanderling_cni_request_duration_seconds", "command", "ADD")):
        for part in ("sum", "count"):
            for m in re.finditer(rf'^{name}_{part}{{{label}="([^"]+)"}} (\S+)$', text, re.M):
                if key is None or m.group(1) == key:
                    step = m.group(1) if key is None else "agent"
                    total, count = out.get(step, (0.0, 0.0))
                    out[step] = (total + float(m.group(2)), count) if part == "sum" else (total, float(m.group(2)))
    return out


def _breakdown(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]],
               client_mean_ms: float) -> dict[str, float]:
    """Mean milliseconds per ADD: each step in the agent, the rest of the agent's time, and what
    the agent did not see (the plugin's start, its socket round trip, the runtime's exec)."""
    def mean(step: str) -> float:
        total = after.get(step, (0.0, 0.0))[0] - before.get(step, (0.0, 0.0))[0]
        count = after.get(step, (0.0, 0.0))[1] - before.get(step, (0.0, 0.0))[1]
        return total / count * 1000 if count else 0.0
    steps = {step: round(mean(step), 1) for step in STEPS}
    agent = mean("agent")
    return {**steps, "agent_other": round(agent - sum(steps.values()), 1), "agent_total": round(agent, 1),
            "shim_and_exec": round(client_mean_ms - agent, 1)}


class _Runs:
    """The ADD latencies and failures of one plugin over the rounds."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.failures: list[str] = []

    def add(self, result: dict[str, Any]) -> None:
        self.latencies += result["latencies_ms"]
        self.failures += result["failures"]


def _add_sums(total: dict[str, tuple[float, float]], before: dict[str, tuple[float, float]],
              after: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """`total` plus what the agent's sums grew by between `before` and `after`."""
    out = dict(total)
    for step, (seconds, count) in after.items():
        was_s, was_n = before.get(step, (0.0, 0.0))
        have_s, have_n = out.get(step, (0.0, 0.0))
        out[step] = (have_s + seconds - was_s, have_n + count - was_n)
    return out


def run(concurrency: int = 20, rounds: int = 5, progress: Callable[[str], None] = lambda _m: None,
        **_: Any) -> dict[str, Any]:
    if not (REFERENCE_DIR / "bridge").exists():
        raise SystemExit("bench cni needs Debian's containernetworking-plugins (run scripts/setup.sh)")
    teardown_prefix(f"{PREFIX}-n1")
    teardown_prefix(f"{PREFIX}-ref")
    base = Path(tempfile.mkdtemp(prefix="sanderling-bench-cni-"))
    node = LocalNode("n1", "10.244.200.0/24", base, prefix=PREFIX)
    try:
        progress("starting a lab node (OVS userspace datapath + agent)")
        node.start()
        node.wait_ready()
        ours_ns = [f"/var/run/netns/{PREFIX}-n1-s{i}" for i in range(concurrency)]
        ref_ns = [f"/var/run/netns/{PREFIX}-ref-s{i}" for i in range(concurrency)]
        for path in ours_ns + ref_ns:
            veth.ensure_netns(Path(path).name)
        veth.ensure_netns(f"{PREFIX}-ref")
        python_shim = node.cni_bin.with_name(node.cni_bin.name + "-py")
        front = "compiled" if python_shim.exists() else "python"

        def drive_ours(plugin: Path) -> dict[str, Any]:
            return _drive({
                "plugin": str(plugin), "rounds": 1, "sandboxes": ours_ns,
                "conf": {"cniVersion": "1.1.0", "name": node.cni_network, "type": "sanderling-cni",
                         "agentSocket": str(node.cni_socket)},
                "env": {"CNI_PATH": str(node.cni_bin.parent)}})

        def drive_reference() -> dict[str, Any]:
            return _drive({
                "plugin": str(REFERENCE_DIR / "bridge"), "rounds": 1, "sandboxes": ref_ns,
                "conf": {"cniVersion": "1.0.0", "name": "slbenchref", "type": "bridge", "bridge": "slref0",
                         "isGateway": True, "ipMasq": False,
                         "ipam": {"type": "host-local", "subnet": "10.99.0.0/16",
                                  "dataDir": str(base / "host-local")}},
                "env": {"CNI_PATH": str(REFERENCE_DIR)}}, netns=f"{PREFIX}-ref")

        # round by round, each plugin in turn: the machine's own drift (other work on the host, a
        # noisy neighbour) falls on all of them alike
        ours, python, ref = _Runs(), _Runs() if front == "compiled" else None, _Runs()
        steps: dict[str, tuple[float, float]] = {}
        for rnd in range(rounds):
            progress(f"round {rnd + 1}/{rounds}: {concurrency} concurrent ADDs each: sanderling ({front} front)"
                     + (", the Python shim" if python is not None else "") + ", bridge + host-local")
            before = _agent_sums()
            ours.add(drive_ours(node.cni_bin))
            steps = _add_sums(steps, before, _agent_sums())
            if python is not None:
                python.add(drive_ours(python_shim))
            ref.add(drive_reference())
    finally:
        node.teardown()
        teardown_prefix(f"{PREFIX}-ref")
        teardown_prefix(f"{PREFIX}-n1")
    failed = ours.failures + (python.failures if python else [])
    if failed or ref.failures:
        raise RuntimeError(f"ADDs failed: ours {failed[:2]} reference {ref.failures[:2]}")
    lat, rlat = ours.latencies, ref.latencies
    extra: dict[str, Any] = {}
    if python is not None:
        plat = python.latencies
        extra["python_shim"] = {
            "p50_ms": round(statistics.median(plat), 1), "p99_ms": round(_percentile(plat, 99), 1),
            "p50_ratio": round(statistics.median(plat) / statistics.median(rlat), 2),
            "p99_ratio": round(_percentile(plat, 99) / _percentile(rlat, 99), 2)}
    return {
        "benchmark": "cni",
        "front": front,
        "concurrency": concurrency,
        "rounds": rounds,
        "adds": len(lat),
        "p50_ms": round(statistics.median(lat), 1),
        "p99_ms": round(_percentile(lat, 99), 1),
        "reference_p50_ms": round(statistics.median(rlat), 1),
        "reference_p99_ms": round(_percentile(rlat, 99), 1),
        # issue 18's goal, relative and measured in one run: at most the reference's latency
        "p50_ratio": round(statistics.median(lat) / statistics.median(rlat), 2),
        "p99_ratio": round(_percentile(lat, 99) / _percentile(rlat, 99), 2),
        # where an ADD's time goes, mean ms per ADD (the agent's own metrics, over this run's ADDs)
        "breakdown_ms": _breakdown({}, steps, statistics.mean(lat)),
        **extra,
        # (the absolute p50 <= 30 ms was withdrawn: 20 interpreters starting at once on 2 cores cost more)
        "floors": {"p50_ratio": ["<=", 1.0], "p99_ratio": ["<=", 1.0]},
    }
