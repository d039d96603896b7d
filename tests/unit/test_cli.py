"""The command lines as users run them: real processes, real exit codes, readable errors."""

from __future__ import annotations

import json
import subprocess
import sys


def run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=timeout)


def test_agent_without_ovs_prints_one_line_naming_the_socket(tmp_path):
    proc = run("sanderling.agent.main", "--node", "n1", "--pod-cidr", "10.244.1.0/24",
               "--ovs-run-dir", str(tmp_path / "nowhere"))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(tmp_path / "nowhere" / "db.sock") in lines[0]
    assert "start" in lines[0]


def test_ovs_status_without_ovs_fails_cleanly(tmp_path):
    proc = run("sanderling.cli.main", "ovs", "status", "--run-dir", str(tmp_path))
    assert proc.returncode == 1
    assert "db.sock" in proc.stderr and "Traceback" not in proc.stderr


def test_pipeline_table_lists_tables_in_order():
    proc = run("sanderling.cli.main", "pipeline")
    assert proc.returncode == 0
    names = [line.split()[1] for line in proc.stdout.splitlines()[2:]]
    assert names == ["Classifier", "SpoofGuard", "NeighborResponder", "UnSNAT", "Conntrack",
                     "ReplyOrigin", "ServiceLB",
                     "SessionAffinity", "AffinitySelect", "EndpointDNAT", "RequestOrigin", "PolicyConntrack",
                     "PolicyState",
                     "EgressRule", "IngressRule", "PolicyCommit", "ServiceMasq", "L3Forwarding", "Output", "Reject",
                     "NeighborAdvert"]


def test_bench_flows_small_run_reports_its_reference():
    proc = run("sanderling.cli.main", "bench", "flows", "--flows", "2000", "--repeats", "1", "--json")
    result = json.loads(proc.stdout)
    assert result["flows"] == 2000
    for key in ("controller_s", "ovs_ofctl_s", "ratio", "change_p99_ms"):
        assert result[key] > 0
    assert abs(result["ratio"] - result["controller_s"] / result["ovs_ofctl_s"]) < 0.05 * result["ratio"] + 0.02
    assert proc.returncode == (0 if result["floors_met"] else 1)


def test_unknown_benchmark_names_the_known_ones():
    proc = run("sanderling.cli.main", "bench", "nope")
    assert proc.returncode != 0 and "flows" in proc.stderr


def test_cni_shim_answers_version_and_refuses_the_rest_with_a_spec_error():
    ok = subprocess.run([sys.executable, "-m", "sanderling.cni.shim"], env={"CNI_COMMAND": "VERSION"},
                        capture_output=True, text=True)
    assert json.loads(ok.stdout)["supportedVersions"] == ["0.4.0", "1.0.0", "1.1.0"]
    bad = subprocess.run([sys.executable, "-m", "sanderling.cni.shim"], env={"CNI_COMMAND": "ADD"},
                         capture_output=True, text=True)
    assert bad.returncode == 1 and json.loads(bad.stdout)["code"] > 0


def test_cni_conformance_runner_fails_what_it_does_not_understand():
    """Issue 17: an expectation or side effect the runner cannot check is a FAIL, never a silent PASS."""
    from sanderling.conformance.cni import CniRunner

    runner = CniRunner.__new__(CniRunner)  # these checks need no node
    prose = runner.evaluate_prose("the plugin hums a tune", [])
    assert prose.status == "FAIL" and "not understood" in prose.why
    assert "not understood" in (runner.side_effect("the moon is full", None, []) or "")  # type: ignore[arg-type]
    assert runner.evaluate_prose("all succeed", []).status == "PASS"


def test_conformance_names_a_missing_file_instead_of_a_traceback(tmp_path):
    proc = run("sanderling.cli.main", "conformance", "proxy", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert "no such file" in proc.stderr and "nope.yaml" in proc.stderr and "Traceback" not in proc.stderr


def test_lab_on_the_upstream_control_plane_names_missing_binaries_and_how_to_build_them(tmp_path):
    import os

    if os.geteuid() != 0:
        raise AssertionError("lab commands need root; run the tests as root")
    proc = subprocess.run([sys.executable, "-m", "sanderling.cli.main", "lab", "--name", "slmissing", "up",
                           "--control-plane", "kubernetes"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SANDERLING_UPSTREAM_BIN": str(tmp_path)})
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "kube-apiserver" in lines[0] and "etcd" in lines[0] and str(tmp_path) in lines[0]
    assert "scripts/build-upstream.sh" in lines[0]
    assert not os.path.exists("/run/sanderling-lab/slmissing"), "nothing may start before the check"
