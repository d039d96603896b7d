"""`sanderling lab ...`: a whole cluster on one machine, in network namespaces.

Topology (routed mode): an underlay bridge in the `<name>-fabric` namespace; every node a
namespace `<name>-nodeN` with its own ovsdb-server/ovs-vswitchd (userspace datapath), br-int,
agent (routed mode: the bridge's LOCAL port is the pod gateway), an `uplink` on the underlay and
a route to every other node's pod subnet; the control plane (API server on 127.0.0.1, scheduler,
kubelets) as one process. Everything carries the lab's name, so `lab down` finds it all, also
after a crash, and removes it; the host's own network configuration is never touched.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sanderling.lab.node import LocalNode, teardown_prefix
from sanderling.netlink import veth
from sanderling.netlink.netns import ipr
from sanderling.ovs.runtime import OvsRuntime
from sanderling.process import terminate

STATE_ROOT = Path("/run/sanderling-lab")
CLUSTER_CIDR = ipaddress.IPv4Network("10.244.0.0/16")
UNDERLAY = ipaddress.IPv4Network("172.30.0.0/24")


@dataclass
class Lab:
    name: str = "sanderling"
    progress: Callable[[str], None] = lambda _m: None

    @property
    def state_dir(self) -> Path:
        return STATE_ROOT / self.name

    @property
    def fabric(self) -> str:
        return f"{self.name}-fabric"

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    def state(self) -> dict[str, Any]:
        path = self.state_dir / "state.json"
        return json.loads(path.read_text()) if path.exists() else {}

    # ---- up ------------------------------------------------------------------------------

    def up(self, nodes: int = 3, mode: str = "routed") -> None:
        if mode != "routed":
            raise SystemExit("sanderling lab: only --mode routed is available so far (overlay comes next)")
        if self.state():
            raise SystemExit(f"lab {self.name} is already up; `sanderling lab down --name {self.name}` first")
        self.down(quiet=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        port = _free_port()
        self.progress("underlay: bridge in namespace " + self.fabric)
        veth.ensure_netns(self.fabric)
        with ipr(self.fabric) as fab:
            fab.link("add", ifname="fabric0", kind="bridge")
            fab.link("set", index=fab.link_lookup(ifname="fabric0")[0], state="up")
        self.progress(f"control plane: API server on 127.0.0.1:{port}, scheduler, kubelets")
        cp_log = open(self.state_dir / "controlplane.log", "ab")
        cp = subprocess.Popen([sys.executable, "-m", "sanderling.lab.controlplane", "--state", str(self.state_dir),
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=cp_log, start_new_session=True)
        assert cp.stdout is not None
        if cp.stdout.readline().strip() != b"ready":
            raise SystemExit(f"control plane did not start; see {self.state_dir / 'controlplane.log'}")
        from sanderling.lab.apiserver.__main__ import write_kubeconfig

        write_kubeconfig(self.kubeconfig, f"http://127.0.0.1:{port}")
        records: list[dict[str, Any]] = []
        lab_nodes: list[LocalNode] = []
        subnets = list(CLUSTER_CIDR.subnets(new_prefix=24))
        for i in range(1, nodes + 1):
            name = f"node{i}"
            pod_cidr = str(subnets[i])
            underlay_ip = str(UNDERLAY.network_address + 10 + i)
            self.progress(f"node {name}: OVS (userspace datapath), agent, pod CIDR {pod_cidr}, underlay {underlay_ip}")
            node = LocalNode(name, pod_cidr, self.state_dir, prefix=self.name, kubeconfig=self.kubeconfig,
                             gateway=True, agent_session=True)
            node.start()
            node.attach_underlay(self.fabric, "fabric0", f"{underlay_ip}/{UNDERLAY.prefixlen}")
            records.append({"name": name, "pod_cidr": pod_cidr, "underlay_ip": underlay_ip, "netns": node.netns,
                            "dir": str(node.dir), "cni_bin": str(node.cni_bin),
                            "cni_conf": str(node.dir / "cni" / "net.d" / "10-sanderling.conflist"),
                            "agent_pid": node.agent.pid if node.agent else 0})
            lab_nodes.append(node)
        for node, rec in zip(lab_nodes, records, strict=True):
            for other in records:
                if other is not rec:
                    node.route(other["pod_cidr"], other["underlay_ip"])
        for node in lab_nodes:
            node.wait_ready(60)
        from sanderling.kube.client import KubeApi

        api = KubeApi(self.kubeconfig)
        from lightkube.resources.core_v1 import Node

        for rec in records:
            api.client.create(Node.from_dict({  # type: ignore[call-overload]
                "metadata": {"name": rec["name"], "annotations": {
                    "lab.sanderling.io/cni-bin": rec["cni_bin"], "lab.sanderling.io/cni-conf": rec["cni_conf"],
                    "lab.sanderling.io/netns": rec["netns"]}},
                "spec": {"podCIDR": rec["pod_cidr"], "podCIDRs": [rec["pod_cidr"]]},
                "status": {"addresses": [{"type": "InternalIP", "address": rec["underlay_ip"]}]}}))
        state = {"name": self.name, "mode": mode, "api_port": port, "controlplane_pid": cp.pid,
                 "nodes": records}
        (self.state_dir / "state.json").write_text(json.dumps(state, indent=2))
        self.progress(f"lab {self.name} up in {time.monotonic() - started:.1f}s")

    # ---- down ----------------------------------------------------------------------------

    def down(self, quiet: bool = False) -> None:
        state = self.state()
        pids = [state.get("controlplane_pid", 0)] + [n.get("agent_pid", 0) for n in state.get("nodes", [])]
        for pid in pids:
            _kill(pid)
        if self.state_dir.exists():
            for ovs_dir in self.state_dir.glob("*/ovs"):
                OvsRuntime(ovs_dir, datapath="netdev").stop()
        for ns in _netns_with_prefix(self.name + "-"):
            teardown_prefix(ns)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        if not quiet:
            self.progress(f"lab {self.name} is down")


def _kill(pid: int) -> None:
    terminate(pid, timeout=5.0)


def _netns_with_prefix(prefix: str) -> list[str]:
    root = Path("/var/run/netns")
    return sorted(p.name for p in root.iterdir() if p.name.startswith(prefix)) if root.is_dir() else []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
