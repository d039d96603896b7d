"""charts/sanderling renders deploy/: `helm lint` is clean, `helm template` with the default values
gives exactly deploy/'s objects (the chart adds one thing, the configuration's hash on the pod
template, so that `helm upgrade` with a changed configuration rolls the agents), values reach the
agent's configuration, and a placement the chart cannot do is refused with a message."""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from sanderling.lab.kubernetes import UPSTREAM_BIN

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "sanderling"
HASH = "sanderling.io/config-hash"


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    binary = UPSTREAM_BIN / "helm"
    if not os.access(binary, os.X_OK):
        pytest.fail(f"helm is missing from {UPSTREAM_BIN}: build it once with `bash scripts/build-upstream.sh`")
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120)


def by_name(docs: list[dict]) -> dict[str, dict]:
    out = {}
    for doc in docs:
        doc = copy.deepcopy(doc)
        if doc["kind"] == "ConfigMap":  # the file inside compared as what it says
            doc["data"] = {k: yaml.safe_load(v) for k, v in doc["data"].items()}
        out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


def rendered(*sets: str) -> dict[str, dict]:
    out = helm("template", "sanderling", str(CHART), "--include-crds", *[a for s in sets for a in ("--set", s)])
    assert out.returncode == 0, out.stderr
    return by_name([d for d in yaml.safe_load_all(out.stdout) if d])


def deploy() -> dict[str, dict]:
    files = sorted((ROOT / "deploy").glob("*.yaml")) + sorted((ROOT / "deploy" / "crds").glob("*.yaml"))
    return by_name([d for f in files for d in yaml.safe_load_all(f.read_text()) if d])


def test_helm_lint_is_clean():
    out = helm("lint", str(CHART))
    assert out.returncode == 0 and "0 chart(s) failed" in out.stdout, out.stdout + out.stderr


def test_default_values_render_deploy():
    chart = rendered()
    template = chart["DaemonSet/sanderling-agent"]["spec"]["template"]["metadata"]
    assert len(template["annotations"].pop(HASH)) == 16
    if not template["annotations"]:
        del template["annotations"]
    assert chart == deploy()


def test_values_reach_the_configuration_and_roll_the_agents():
    default, changed = rendered(), rendered("mtu=9000", "mode=overlay", "statusPort=9500",
                                            "kubeApiServer=https://10.0.0.1:6443")
    config = changed["ConfigMap/sanderling-config"]["data"]["config.yaml"]
    assert (config["mtu"], config["mode"], config["status-address"]) == (9000, "overlay", "0.0.0.0:9500")
    assert config["kube-api-server"] == "https://10.0.0.1:6443"
    assert "kube-api-server" not in default["ConfigMap/sanderling-config"]["data"]["config.yaml"]
    agent = changed["DaemonSet/sanderling-agent"]["spec"]["template"]
    assert agent["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] == 9500
    assert agent["metadata"]["annotations"][HASH] != \
        default["DaemonSet/sanderling-agent"]["spec"]["template"]["metadata"]["annotations"][HASH]


def test_an_ovs_placement_the_chart_cannot_do_is_refused():
    out = helm("template", "sanderling", str(CHART), "--set", "ovs.placement=container")
    assert out.returncode != 0 and 'ovs.placement "container": only "host" is supported' in out.stderr, out.stderr
