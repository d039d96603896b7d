"""deploy/sanderling.yaml is what the agent and the CLI accept: the ConfigMap's file loads as the
agent's configuration, both containers' commands parse, every host path the configuration names
is mounted, the probes ask the status port, and the DaemonSet runs everywhere, one node at a time.
(That the API server accepts the objects is the lab's test: kubectl apply --dry-run=server.)"""

from __future__ import annotations

from pathlib import Path

import yaml

from sanderling import VERSION
from sanderling.agent import config as agent_config
from sanderling.cli.main import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _objects() -> dict[str, dict]:
    docs = [d for f in sorted(DEPLOY.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def _pod() -> dict:
    return _objects()["DaemonSet/sanderling-agent"]["spec"]["template"]["spec"]


def test_configmap_is_a_valid_agent_configuration(tmp_path):
    text = _objects()["ConfigMap/sanderling-config"]["data"]["config.yaml"]
    (tmp_path / "config.yaml").write_text(text)
    cfg = agent_config.load(["--config", str(tmp_path / "config.yaml"), "--node", "n1"])
    assert cfg.status_address.startswith("0.0.0.0:")  # probes come from the kubelet on the node's address
    mounts = {m["mountPath"] for m in next(c for c in _pod()["containers"] if c["name"] == "agent")["volumeMounts"]}
    for path in (cfg.ovs_run_dir, cfg.state_dir, cfg.cni_conf_dir, cfg.cni_bin_dir, cfg.cni_socket.parent):
        assert str(path) in mounts, f"{path} is not mounted into the agent"


def test_commands_parse_and_probes_ask_the_status_port(tmp_path):
    pod = _pod()
    agent = next(c for c in pod["containers"] if c["name"] == "agent")
    argv = [a.replace("$(NODE_NAME)", "n1") for a in agent["command"][1:]]
    (tmp_path / "config.yaml").write_text(_objects()["ConfigMap/sanderling-config"]["data"]["config.yaml"])
    argv = [str(tmp_path / "config.yaml") if a == "/etc/sanderling/config.yaml" else a for a in argv]
    cfg = agent_config.load(argv)
    port = int(cfg.status_address.rpartition(":")[2])
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
    init = next(c for c in pod["initContainers"] if c["name"] == "install-cni")
    assert init["command"][0] == "sanderling"
    parsed = build_parser().parse_args(init["command"][1:])
    assert parsed.node_action == "install-cni"
    assert agent["image"] == init["image"] == f"sanderling/agent:{VERSION}"
    assert f'version = "{VERSION}"' in PYPROJECT.read_text()


def test_daemonset_runs_on_every_node_one_at_a_time_with_its_account():
    ds = _objects()["DaemonSet/sanderling-agent"]
    pod = ds["spec"]["template"]["spec"]
    assert {"operator": "Exists"} in pod["tolerations"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["hostNetwork"] is True
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    assert pod["serviceAccountName"] == "sanderling-agent" and "ServiceAccount/sanderling-agent" in _objects()
    agent = next(c for c in pod["containers"] if c["name"] == "agent")
    assert "privileged" not in agent.get("securityContext", {}), "capabilities, not blanket privileged"
    assert ds["metadata"]["namespace"] == "sanderling-system" and "Namespace/sanderling-system" in _objects()
