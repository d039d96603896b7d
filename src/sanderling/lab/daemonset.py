"""The lab installed the way a cluster is: `helm install` of charts/sanderling (`lab up --agents daemonset`).

Nothing of Sanderling is started by the lab itself: the chart brings the CRDs, the namespace,
the ServiceAccount and its least-privilege ClusterRole, the ConfigMap and the DaemonSet; the
DaemonSet controller makes one pod per node, the scheduler binds it, and the lab kubelet of that
node runs its init container (`sanderling node install-cni`) and its agent container as
processes (`lab.host_pods`), with the mounted ConfigMap and a ServiceAccount token, reporting
readiness from the agent's /readyz. So RBAC, the configuration file, the probes and a rolling
update are exercised by the real control plane.

The lab's values (`lab_values`) differ from a production cluster's defaults only where the lab
differs: OVS's userspace datapath, the lab's Service CIDR, the API server's address on the
underlay (the agent replaces kube-proxy, so the `kubernetes` Service cannot be its way in), the
provider network of the lab's VLANs.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from sanderling.lab.cluster import Lab

CHART = Path(__file__).resolve().parents[3] / "charts" / "sanderling"
RELEASE = "sanderling"
NAMESPACE = "sanderling-system"
SELECTOR = "app.kubernetes.io/name=sanderling-agent"


def lab_values(mode: str) -> dict[str, Any]:
    from sanderling.lab.cluster import API_PORT, API_UNDERLAY_IP, PHYSNET, PROVIDER_NIC
    from sanderling.lab.kubernetes import SERVICE_CIDR

    return {"mode": mode, "serviceCIDR": SERVICE_CIDR, "ovs": {"datapath": "netdev"},
            "kubeApiServer": f"https://{API_UNDERLAY_IP}:{API_PORT}",
            "extraConfig": {"provider-network": [f"{PHYSNET}={PROVIDER_NIC}"]}}


def helm(lab: Lab, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """helm (built by setup) against the lab's API; SystemExit with helm's words on failure."""
    from sanderling.lab.kubernetes import UPSTREAM_BIN

    binary = UPSTREAM_BIN / "helm"
    if not binary.exists():
        raise SystemExit(f"sanderling lab: --agents daemonset needs helm in {UPSTREAM_BIN}; build it with "
                         "`bash scripts/build-upstream.sh`")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(lab.state_dir), "HELM_CACHE_HOME": str(lab.state_dir / "helm"),
           "HELM_CONFIG_HOME": str(lab.state_dir / "helm"), "HELM_DATA_HOME": str(lab.state_dir / "helm"),
           "KUBECONFIG": str(lab.kubeconfig)}
    proc = subprocess.run([str(binary), *args], capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"sanderling lab: helm {' '.join(args[:2])}: {proc.stderr.strip()}")
    return proc


def values_file(lab: Lab, values: dict[str, Any]) -> Path:
    path = lab.state_dir / "helm-values.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=True))
    return path


def install(lab: Lab, mode: str) -> None:
    helm(lab, "install", RELEASE, str(CHART), "--namespace", "default", "-f", str(values_file(lab, lab_values(mode))))


def upgrade(lab: Lab, values: dict[str, Any]) -> None:
    """`helm upgrade` with the lab's values and `values` over them (a changed ConfigMap or image
    rolls the DaemonSet)."""
    merged = lab_values(lab.state()["mode"])
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    helm(lab, "upgrade", RELEASE, str(CHART), "--namespace", "default", "-f", str(values_file(lab, merged)))


def agent_pods(lab: Lab) -> list[dict[str, Any]]:
    from lightkube import Client, KubeConfig
    from lightkube.resources.core_v1 import Pod

    client = Client(config=KubeConfig.from_file(str(lab.kubeconfig)))
    return [p.to_dict() for p in client.list(Pod, namespace=NAMESPACE,
                                             labels={"app.kubernetes.io/name": "sanderling-agent"})]


def is_ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions) \
        and not (pod["metadata"].get("deletionTimestamp"))


def daemonset_status(lab: Lab) -> dict[str, Any]:
    from lightkube import Client, KubeConfig
    from lightkube.resources.apps_v1 import DaemonSet

    client = Client(config=KubeConfig.from_file(str(lab.kubeconfig)))
    ds = client.get(DaemonSet, "sanderling-agent", namespace=NAMESPACE).to_dict()
    return {"generation": ds["metadata"].get("generation"), **(ds.get("status") or {})}


def wait_rolled_out(lab: Lab, nodes: list[str], timeout: float = 180) -> None:
    """Until the DaemonSet's current generation runs Ready on every node (as `kubectl rollout
    status`); SystemExit naming the nodes still waiting and why."""
    deadline = time.monotonic() + timeout
    why = ""
    while time.monotonic() < deadline:
        try:
            status = daemonset_status(lab)
            pods = {p["spec"].get("nodeName"): p for p in agent_pods(lab) if is_ready(p)}
            done = (status.get("observedGeneration") == status.get("generation")
                    and status.get("updatedNumberScheduled") == len(nodes)
                    and status.get("numberAvailable") == len(nodes) and all(n in pods for n in nodes))
            if done:
                return
            waiting = [p for p in agent_pods(lab) if not is_ready(p)]
            why = "; ".join(f"{p['spec'].get('nodeName')}: " + _not_ready(p) for p in waiting) or json.dumps(
                {k: status.get(k) for k in ("updatedNumberScheduled", "numberAvailable")})
        except Exception as exc:  # the API may still be settling
            why = str(exc)
        time.sleep(0.5)
    raise SystemExit(f"sanderling lab: the agents' DaemonSet is not ready on every node after {timeout:.0f}s: {why} "
                     f"(logs: {lab.state_dir}/NODE/pods/*/agent.log)")


def _not_ready(pod: dict[str, Any]) -> str:
    conditions = (pod.get("status") or {}).get("conditions") or []
    ready = next((c for c in conditions if c["type"] == "Ready"), None)
    return (ready or {}).get("message") or (pod.get("status") or {}).get("phase", "Pending")


def restart_pod(lab: Lab, node: str, timeout: float = 120) -> None:
    """Delete the agent's pod on `node`; return once its successor there is Ready."""
    from lightkube import Client, KubeConfig
    from lightkube.resources.core_v1 import Pod

    old = [p for p in agent_pods(lab) if p["spec"].get("nodeName") == node]
    client = Client(config=KubeConfig.from_file(str(lab.kubeconfig)))
    for pod in old:
        client.delete(Pod, pod["metadata"]["name"], namespace=NAMESPACE)
    gone = {p["metadata"]["uid"] for p in old}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = [p for p in agent_pods(lab) if p["spec"].get("nodeName") == node and p["metadata"]["uid"] not in gone]
        if fresh and is_ready(fresh[0]):
            return
        time.sleep(0.2)
    raise SystemExit(f"sanderling lab: the agent's pod on {node} not Ready {timeout:.0f}s after a restart")


def agent_log(node_dir: Path) -> Path:
    """The newest agent container log of a node (one directory per pod uid)."""
    logs = sorted(node_dir.glob("pods/*/agent.log"), key=lambda p: p.stat().st_mtime)
    return logs[-1] if logs else node_dir / "pods" / "agent.log"


def agent_processes(lab: Lab) -> list[int]:
    """Agent processes still running in any node's network namespace."""
    pids = []
    for rec in lab.state().get("nodes", []):
        out = subprocess.run(["ip", "netns", "pids", rec["netns"]], capture_output=True, text=True)
        for pid in out.stdout.split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"sanderling-agent" in cmdline or b"sanderling.agent.main" in cmdline:
                pids.append(int(pid))
    return pids


def node_host(lab: Lab, node: str) -> Any:
    from sanderling.lab.host_pods import NodeHost

    rec = next(n for n in lab.state()["nodes"] if n["name"] == node)
    return NodeHost(node, rec["netns"], rec["underlay_ip"], Path(rec["dir"]))


def cleanup_node(lab: Lab, node: str, config: str) -> subprocess.CompletedProcess[str]:
    """`sanderling node cleanup --config` run on the node (its namespace and host paths), with
    the configuration the agents had: the documented last step of an uninstall."""
    import sys

    from sanderling.lab import host_view

    host = node_host(lab, node)
    etc = host.host_path("/etc/sanderling")
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "config.yaml").write_text(config)
    binds = {**host.view(), "/etc/sanderling": str(etc)}
    program = [str(Path(sys.executable).parent / "sanderling"), "node", "cleanup", "--config",
               "/etc/sanderling/config.yaml", "--", "--node", node]
    return subprocess.run(host_view.argv_for(host.netns, binds, program), capture_output=True, text=True, timeout=120)


def leftovers(lab: Lab, node: str) -> list[str]:
    """What of Sanderling a node still has: bridges, pod veths, CNI files, the socket."""
    from sanderling.lab.cluster import DATA_NIC, PROVIDER_NIC
    from sanderling.netlink.netns import ipr
    from sanderling.ovs.runtime import OvsRuntime

    host = node_host(lab, node)
    found = [f"bridge {b}" for b in OvsRuntime(host.host_path("/var/run/openvswitch"), netns=host.netns)
             .vsctl("list-br").split()]
    with ipr(host.netns) as h:
        for link in h.get_links():
            name = link.get_attr("IFLA_IFNAME")
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            if kind in ("veth", "vxlan") and name not in ("uplink", PROVIDER_NIC, DATA_NIC):
                found.append(f"{kind} {name}")
    for path in ("/etc/cni/net.d/10-sanderling.conflist", "/opt/cni/bin/sanderling-cni", "/run/sanderling/cni.sock"):
        if host.host_path(path).exists():
            found.append(path)
    return found
