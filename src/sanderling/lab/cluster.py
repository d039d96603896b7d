"""`sanderling lab ...`: a whole cluster on one machine, in network namespaces.

Topology: an underlay bridge in the `<name>-fabric` namespace; the control plane (API server,
controllers, scheduler, kubelets; one process) in `<name>-cp` on the underlay, also answering on
the host's loopback for the CLI and kubectl; every node a namespace `<name>-nodeN` with its own
ovsdb-server/ovs-vswitchd (userspace datapath), br-int and agent, an `uplink` on the underlay,
and two more cables to the fabric for secondary networks: `phys0` (the uplink of provider network
`physnet1`: its VLANs cross the fabric tagged) and `data0` (a plain NIC, e.g. a macvlan master).
Node objects are registered first; the control plane gives each a podCIDR and the agents read it
(and every other node's) from the API. Routed mode: the bridge's LOCAL port is the pod gateway
and the agents keep kernel routes to the other nodes' subnets. Overlay mode: the uplink is a port
of an OVS bridge `br-ex` holding the underlay address, and pods reach other nodes through VXLAN.
Everything carries the lab's name, so `lab down` finds it all, also after a crash, and removes
it; the host's own network configuration is never touched.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sanderling.cni.install import CONFLIST_NAME, conflist
from sanderling.lab import daemonset
from sanderling.lab.fabric import BRIDGE, attach_host, make_fabric
from sanderling.lab.kubelet import DELEGATE_PLUGINS
from sanderling.lab.multus import CONF_NAME as MULTUS_CONF
from sanderling.lab.multus import binary as multus_binary
from sanderling.lab.multus import install as install_multus
from sanderling.lab.node import LocalNode, teardown_prefix
from sanderling.lab.pki import Pki, ensure_pki
from sanderling.netlink.netns import ipr
from sanderling.ovs.runtime import OvsRuntime
from sanderling.process import terminate, terminate_all

PHYSNET = "physnet1"   # the lab's provider network: VLANs of the fabric, through each node's PROVIDER_NIC
PROVIDER_NIC = "phys0"
DATA_NIC = "data0"     # a plain second NIC per node (a macvlan master for delegated networks)
EXTERNAL_NIC = "ext0"  # `lab up --br-ext`: the external bridge's uplink
EXTERNAL_CONTROLLER_PORT = 6653  # where br-ext looks for its controller: the fabric's own address
STATE_ROOT = Path("/run/sanderling-lab")
UNDERLAY = ipaddress.IPv4Network("172.30.0.0/24")
# dual-stack and IPv6-only labs: each node's IPv6 address on the same fabric (NodePorts over IPv6;
# pod traffic between nodes stays on the IPv4 underlay)
UNDERLAY6 = ipaddress.IPv6Network("fd00:172:30::/64")
OUTSIDE_IP = UNDERLAY.network_address + 1  # the fabric namespace's own address: a client outside the cluster
API_UNDERLAY_IP = UNDERLAY.network_address + 2
API_PORT = 6443


@dataclass
class Lab:
    name: str = "sanderling"
    progress: Callable[[str], None] = lambda _m: None
    allow_workload_commands: bool = False  # kubelets run Pod commands (a root shell for anyone with API access)
    multus: bool = False  # Multus in front of Sanderling on every node (`lab up --multus`)
    agents: str = "process"  # or "daemonset": installed by helm, run by the lab kubelets
    br_ext: str = ""  # "on" or "masquerade": every node has br-ext, its controller on the fabric (`lab up --br-ext`)
    ip_family: str = "ipv4"  # "dual": pods get an IPv6 address too; "ipv6": only an IPv6 one (`lab up --ip-family`)

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

    @property
    def controlplane_netns(self) -> str:
        return f"{self.name}-cp"

    @property
    def pki(self) -> Pki:
        """The API's CA, certificate and bearer token (made at `up`, kept across restarts)."""
        return ensure_pki(self.state_dir / "pki", ("127.0.0.1", str(API_UNDERLAY_IP)))

    def up(self, nodes: int = 3, mode: str = "routed", allow_workload_commands: bool = False,
           multus: bool = False, control_plane: str = "sanderling", monitoring: bool = False,
           agents: str = "process", br_ext: str = "", ip_family: str = "ipv4") -> None:
        if mode not in ("routed", "overlay"):
            raise SystemExit(f"sanderling lab: --mode {mode}: choose routed or overlay")
        if ip_family not in ("ipv4", "dual", "ipv6"):
            raise SystemExit(f"sanderling lab: --ip-family {ip_family}: choose ipv4, dual or ipv6")
        if ip_family == "ipv6" and agents == "daemonset":
            raise SystemExit("sanderling lab: --ip-family ipv6 runs the agents as processes (in-cluster agents "
                             "would reach the API through the `kubernetes` Service, which has no endpoints on an "
                             "IPv6-only lab whose API listens on the IPv4 underlay)")
        self.ip_family = ip_family
        if agents == "daemonset" and (control_plane != "kubernetes" or multus):
            raise SystemExit("sanderling lab: --agents daemonset needs --control-plane kubernetes (the DaemonSet "
                             "controller and scheduler place the agents) and runs without --multus")
        self.agents = agents
        self.br_ext = br_ext
        if control_plane not in ("sanderling", "kubernetes"):
            raise SystemExit(f"sanderling lab: --control-plane {control_plane}: choose sanderling or kubernetes")
        if control_plane == "kubernetes":
            from sanderling.lab.kubernetes import binaries

            binaries()  # missing: say which and how to build them, before anything starts
        if self.state():
            raise SystemExit(f"lab {self.name} is already up; `sanderling lab down --name {self.name}` first")
        self.down(quiet=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        port = _free_port()
        self.progress(f"underlay: bridge {UNDERLAY} in namespace {self.fabric}")
        make_fabric(self.fabric)
        with ipr(self.fabric) as fab:  # the fabric itself is "outside the cluster": clients of NodePorts
            fab.addr("add", index=fab.link_lookup(ifname=BRIDGE)[0], address=str(OUTSIDE_IP),
                     prefixlen=UNDERLAY.prefixlen)
        attach_host(self.fabric, self.controlplane_netns, "cp" + hashlib.sha1(self.name.encode()).hexdigest()[:12],
                    f"{API_UNDERLAY_IP}/{UNDERLAY.prefixlen}")
        self.allow_workload_commands = allow_workload_commands
        self.multus = multus
        if multus:
            multus_binary()  # missing: say so before anything starts
        pki = self.pki
        from sanderling.lab.apiserver.__main__ import write_kubeconfig

        extra: dict[str, Any] = {}
        if control_plane == "kubernetes":
            self.progress(f"control plane in namespace {self.controlplane_netns}: etcd, kube-apiserver on "
                          f"{API_UNDERLAY_IP}:{API_PORT} (and 127.0.0.1:{port} for this host), "
                          "kube-controller-manager, kube-scheduler")
            extra = self._start_kubernetes(port, [f"node{i}" for i in range(1, nodes + 1)])
            cp_pid = 0
        else:
            self.progress(f"control plane in namespace {self.controlplane_netns}: API server on "
                          f"{API_UNDERLAY_IP}:{API_PORT} (and 127.0.0.1:{port} for this host), controllers, "
                          "scheduler, kubelets")
            cp_pid = self._start_controlplane(port)
            write_kubeconfig(self.kubeconfig, f"https://127.0.0.1:{port}", ca_cert=pki.ca_cert, token=pki.token)
            write_kubeconfig(self.node_kubeconfig, f"https://{API_UNDERLAY_IP}:{API_PORT}", ca_cert=pki.ca_cert,
                             token=pki.token)
        records = self._register_nodes(nodes)
        if control_plane == "kubernetes":
            extra["pids"]["lab-kubelets"] = self._start_kubelets(records, extra["node_tokens"])
            self._save_partial(port, extra)
        lab_nodes: list[LocalNode] = []
        for rec in records:
            self.progress(f"node {rec['name']}: OVS (userspace datapath), agent ({mode}), pod CIDR {rec['pod_cidr']} "
                          f"(allocated), underlay {rec['underlay_ip']}")
            node = self._local_node(rec, mode)
            if multus:
                install_multus(node.dir, self.node_kubeconfig,
                               conflist(node.cni_network, node.cni_socket, node.mtu, node.cni_conf_version))
            node.start(agent=False)  # the underlay first: the agents talk to the API and each other over it
            node.attach_underlay(self.fabric, BRIDGE, f"{rec['underlay_ip']}/{UNDERLAY.prefixlen}",
                                 f"{rec['underlay_ip6']}/{UNDERLAY6.prefixlen}" if rec.get("underlay_ip6") else "")
            for nic in (PROVIDER_NIC, DATA_NIC):  # secondary networks' cables: VLANs, and macvlan masters
                node.attach_nic(self.fabric, BRIDGE, nic)
            if br_ext:  # the external bridge's uplink, on the fabric where the operator's network is
                node.attach_nic(self.fabric, BRIDGE, EXTERNAL_NIC)
            lab_nodes.append(node)
        if agents == "process":
            for node, rec in zip(lab_nodes, records, strict=True):
                node.start_agent()
                rec["agent_pid"] = node.agent.pid if node.agent else 0
        state = {"name": self.name, "mode": mode, "api_port": port, "controlplane_pid": cp_pid, "nodes": records,
                 "allow_workload_commands": allow_workload_commands, "multus": multus,
                 "control_plane": control_plane, "agents": agents, "br_ext": br_ext, "ip_family": ip_family,
                 **extra}
        (self.state_dir / "state.json").write_text(json.dumps(state, indent=2))
        if agents == "daemonset":
            self.progress("helm install sanderling (charts/sanderling): CRDs, RBAC, ConfigMap, DaemonSet; the "
                          "lab kubelets run its pods")
            daemonset.install(self, mode)
            daemonset.wait_rolled_out(self, [r["name"] for r in records], timeout=180)
        for node in lab_nodes:
            node.wait_ready(60)
        if monitoring:
            from sanderling.lab import monitoring as prometheus

            self.progress(f"monitoring: Prometheus in namespace {self.fabric} scraping every agent every "
                          f"{prometheus.SCRAPE_INTERVAL_S} s (`sanderling lab query --name {self.name} PROMQL`)")
            state.setdefault("pids", {})["prometheus"] = prometheus.start(
                self.state_dir, self.fabric, {r["name"]: r["underlay_ip"] for r in records})
            state["monitoring"] = True
            (self.state_dir / "state.json").write_text(json.dumps(state, indent=2))
        self.progress(f"lab {self.name} up in {time.monotonic() - started:.1f}s")

    def _start_kubernetes(self, port: int, nodes: list[str]) -> dict[str, Any]:
        """Relay, etcd, kube-apiserver, controller manager, scheduler; CRDs and RBAC; the admin
        kubeconfig (the lab's token, as with the embedded server) and the agents' (their
        ServiceAccount's token). The pids go to state.json at once, so `down` finds them if
        anything later fails."""
        from sanderling.lab.apiserver.__main__ import write_kubeconfig
        from sanderling.lab.kubernetes import KubernetesControlPlane, agent_token, binaries, bootstrap_objects

        pki = self.pki
        pids: dict[str, int] = {}
        extra: dict[str, Any] = {"pids": pids}
        self._save_partial(port, extra)
        pids["relay"] = self._start_relay(port)
        kcp = KubernetesControlPlane(self.state_dir, self.controlplane_netns, pki, str(API_UNDERLAY_IP), API_PORT,
                                     port, self.family)
        try:
            pids.update(kcp.start(nodes))
        finally:
            self._save_partial(port, extra)
        write_kubeconfig(self.kubeconfig, f"https://127.0.0.1:{port}", ca_cert=pki.ca_cert, token=pki.token)
        extra["node_tokens"] = {n: kcp.node_token(n) for n in nodes}
        if self.agents == "daemonset":  # CRDs, RBAC and all come with the chart, after the nodes
            return extra
        self.progress("CRDs (IPPool, NetworkAttachmentDefinition) and the agents' RBAC (deploy/)")
        _create_and_wait(self.kubeconfig, bootstrap_objects())
        token = agent_token(binaries()["kubectl"], self.kubeconfig)
        write_kubeconfig(self.node_kubeconfig, f"https://{API_UNDERLAY_IP}:{API_PORT}", ca_cert=pki.ca_cert,
                         token=token)
        return extra

    def _save_partial(self, port: int, extra: dict[str, Any]) -> None:
        (self.state_dir / "state.json").write_text(json.dumps({"name": self.name, "api_port": port, "partial": True,
                                                                "nodes": [], **extra}, indent=2))

    def _start_relay(self, port: int) -> int:
        log = open(self.state_dir / "relay.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "sanderling.lab.relay", "--listen", f"127.0.0.1:{port}",
                                 "--netns", self.controlplane_netns, "--to", f"{API_UNDERLAY_IP}:{API_PORT}"],
                                stdout=subprocess.PIPE, stderr=log, start_new_session=True)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise SystemExit(f"API relay did not start; see {self.state_dir / 'relay.log'}")
        return proc.pid

    def _start_kubelets(self, records: list[dict[str, Any]], tokens: dict[str, str]) -> int:
        """The lab kubelets (one process, each node with its own credentials) on the real API."""
        state = self.state()
        config = {"server": f"https://{API_UNDERLAY_IP}:{API_PORT}", "ca": str(self.pki.ca_cert),
                  "allow_commands": self.allow_workload_commands or state.get("allow_workload_commands", False),
                  "nodes": [{"name": r["name"], "token": tokens[r["name"]], "netns": r["netns"],
                             "cni_bin": r["cni_bin"], "cni_conf": r["cni_conf"], "host_ip": r["underlay_ip"],
                             "dir": r["dir"], "daemonset": self.agents == "daemonset"}
                            for r in records]}
        path = self.state_dir / "kubelets.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the node tokens
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        log = open(self.state_dir / "kubelets.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "sanderling.lab.kubelets", "--config", str(path),
                                 "--netns", self.controlplane_netns],
                                stdout=subprocess.PIPE, stderr=log, start_new_session=True)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise SystemExit(f"lab kubelets did not start; see {self.state_dir / 'kubelets.log'}")
        return proc.pid

    def agent_log(self, node: str) -> Path:
        """Where a node's agent writes (LocalNode.agent_log of that node; its pod's container log
        when the DaemonSet runs it)."""
        if self.state().get("agents") == "daemonset":
            return daemonset.agent_log(self.state_dir / node)
        return self.state_dir / node / "agent.log"

    @property
    def node_kubeconfig(self) -> Path:
        """What the agents use: the API on the underlay."""
        return self.state_dir / "kubeconfig-nodes"

    def _start_controlplane(self, port: int) -> int:
        cp_log = open(self.state_dir / "controlplane.log", "ab")
        pki = self.pki
        allow = ["--allow-workload-commands"] if self.allow_workload_commands \
            or self.state().get("allow_workload_commands") else []
        family = self.family
        from sanderling.lab.kubernetes import CLUSTER_CIDR6, SERVICE_CIDR6
        cp = subprocess.Popen([sys.executable, "-m", "sanderling.lab.controlplane", "--state", str(self.state_dir),
                               "--listen", f"127.0.0.1:{port}", "--netns", self.controlplane_netns,
                               "--netns-listen", f"{API_UNDERLAY_IP}:{API_PORT}", "--tls-cert", str(pki.server_cert),
                               "--tls-key", str(pki.server_key), "--token-file", str(pki.token_file), *allow,
                               *(["--cluster-cidr6", CLUSTER_CIDR6, "--service-cidr6", SERVICE_CIDR6]
                                 if family != "ipv4" else []),
                               *(["--cluster-cidr", ""] if family == "ipv6" else [])],
                              stdout=subprocess.PIPE, stderr=cp_log, start_new_session=True)
        assert cp.stdout is not None
        if cp.stdout.readline().strip() != b"ready":
            raise SystemExit(f"control plane did not start; see {self.state_dir / 'controlplane.log'}")
        return cp.pid

    def _local_node(self, rec: dict[str, Any], mode: str) -> LocalNode:
        return LocalNode(rec["name"], rec["pod_cidr"], self.state_dir, prefix=self.name,
                         kubeconfig=self.node_kubeconfig, gateway=True, agent_session=True, mode=mode,
                         pod_cidr_from_api=True, agent_in_netns=True,
                         agent_args=("--provider-network", f"{PHYSNET}={PROVIDER_NIC}",
                                     # status and /metrics on every address of the node: the lab's
                                     # Prometheus scrapes them from the fabric
                                     "--status-address", "0.0.0.0:9465",
                                     # delegates: the node's own plugin directory first, then Debian's
                                     "--cni-path", f"{self.state_dir / rec['name'] / 'cni' / 'bin'}:{DELEGATE_PLUGINS}",
                                     *(["--multus"] if self.multus or self.state().get("multus") else []),
                                     *self._external_flags(), *self._dual_stack_flags()))

    @property
    def family(self) -> str:
        """ipv4, dual or ipv6: what `lab up --ip-family` chose (this run's, else the saved state's)."""
        if self.ip_family != "ipv4":
            return self.ip_family
        return str(self.state().get("ip_family") or "ipv4")

    def _dual_stack_flags(self) -> list[str]:
        """`lab up --ip-family dual|ipv6`: the agents serve IPv6 ClusterIPs of the IPv6 Service CIDR."""
        if self.family == "ipv4":
            return []
        from sanderling.lab.kubernetes import CLUSTER_CIDR6, SERVICE_CIDR6

        return ["--service-cidr6", SERVICE_CIDR6, "--cluster-cidr6", CLUSTER_CIDR6]

    def _external_flags(self) -> list[str]:
        """`lab up --br-ext [masquerade]`: every node's br-ext, its uplink and controller."""
        mode = self.br_ext or self.state().get("br_ext") or ""
        if not mode:
            return []
        return ["--external-bridge", "br-ext", "--external-uplink", EXTERNAL_NIC,
                "--external-controller", f"tcp:{OUTSIDE_IP}:{EXTERNAL_CONTROLLER_PORT}",
                *(["--external-masquerade"] if mode == "masquerade" else [])]

    def restart_agent(self, name: str) -> subprocess.Popen[bytes]:
        """Stop a node's agent (if it still runs) and start it again; its flows stay in OVS meanwhile.
        (Agents of the DaemonSet: `lab.daemonset.restart_pod`.)"""
        state = self.state()
        if state.get("agents") == "daemonset":
            raise SystemExit(f"lab {self.name} runs its agents from the DaemonSet: delete the agent's pod instead")
        rec = next((n for n in state.get("nodes", []) if n["name"] == name), None)
        if rec is None:
            raise SystemExit(f"lab {self.name} has no node {name}")
        _kill(rec.get("agent_pid", 0))
        node = self._local_node(rec, state["mode"])
        node.start_agent()
        assert node.agent is not None
        rec["agent_pid"] = node.agent.pid
        (self.state_dir / "state.json").write_text(json.dumps(state, indent=2))
        return node.agent

    def restart_controlplane(self, while_down: Callable[[], None] | None = None) -> None:
        """Stop and start the control plane (state is in SQLite, or etcd; agents relist and carry
        on). On the upstream control plane this restarts kube-apiserver, whose new watch cache
        answers the agents' old resourceVersions with 410."""
        state = self.state()
        if state.get("control_plane") == "kubernetes":  # kube-apiserver; etcd keeps the state
            from sanderling.lab.kubernetes import KubernetesControlPlane

            _kill(state["pids"]["kube-apiserver"])
            if while_down is not None:
                while_down()
            kcp = KubernetesControlPlane(self.state_dir, self.controlplane_netns, self.pki, str(API_UNDERLAY_IP),
                                         API_PORT, state["api_port"], self.family)
            state["pids"]["kube-apiserver"] = kcp.start_apiserver()
            (self.state_dir / "state.json").write_text(json.dumps(state, indent=2))
            kcp.wait_ready(90)
            return
        _kill(state.get("controlplane_pid", 0))
        if while_down is not None:
            while_down()
        state["controlplane_pid"] = self._start_controlplane(state["api_port"])
        (self.state_dir / "state.json").write_text(json.dumps(state, indent=2))

    def _register_nodes(self, count: int) -> list[dict[str, Any]]:
        """Node objects first: the control plane allocates each a podCIDR, the agents read it from there."""
        from lightkube.resources.core_v1 import Node

        from sanderling.kube.client import KubeApi

        api = KubeApi(self.kubeconfig)
        records = []
        for i in range(1, count + 1):
            name = f"node{i}"
            node_dir = self.state_dir / name
            # the runtime's plugin and config: Sanderling's, or Multus's with Sanderling as its default network
            plugin, conf = ("multus", MULTUS_CONF) if self.multus else ("sanderling-cni", CONFLIST_NAME)
            rec = {"name": name, "underlay_ip": str(UNDERLAY.network_address + 10 + i), "netns": f"{self.name}-{name}",
                   "dir": str(node_dir), "cni_bin": str(node_dir / "cni" / "bin" / plugin),
                   "cni_conf": str(node_dir / "cni" / "net.d" / conf),
                   "underlay_ip6": str(UNDERLAY6.network_address + 10 + i) if self.family != "ipv4" else ""}
            # the IPv4 address first: the underlay that pods' traffic between nodes takes
            addresses = [{"type": "InternalIP", "address": ip}
                         for ip in (rec["underlay_ip"], rec["underlay_ip6"]) if ip]
            api.client.create(Node.from_dict({  # type: ignore[call-overload]
                "metadata": {"name": name, "annotations": {
                    "lab.sanderling.io/cni-bin": rec["cni_bin"], "lab.sanderling.io/cni-conf": rec["cni_conf"],
                    "lab.sanderling.io/netns": rec["netns"]}},
                "status": {"addresses": addresses}}))
            records.append(rec)
        deadline = time.monotonic() + 30
        for rec in records:
            while True:
                node = api.node(rec["name"]) or {}
                spec = node.get("spec") or {}
                cidr = spec.get("podCIDR")
                if cidr and (self.ip_family != "dual" or len(spec.get("podCIDRs") or []) > 1):
                    rec["pod_cidr"] = ",".join(spec.get("podCIDRs") or [cidr])
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"node {rec['name']} got no podCIDR; see {self.state_dir / 'controlplane.log'}")
                time.sleep(0.05)
        return records

    # ---- down ----------------------------------------------------------------------------

    def down(self, quiet: bool = False) -> None:
        state = self.state()
        pids = [state.get("controlplane_pid", 0)] + [n.get("agent_pid", 0) for n in state.get("nodes", [])]
        pids += list((state.get("pids") or {}).values())  # the upstream control plane's processes
        terminate_all(pids)  # agents and control plane together, then every node's OVS together
        if self.state_dir.exists():
            runtimes = [OvsRuntime(ovs_dir, datapath="netdev") for ovs_dir in self.state_dir.glob("*/ovs")]
            terminate_all([pid for rt in runtimes for pid in rt.daemon_pids()])
            for rt in runtimes:
                rt.forget_pids()
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


def _create_and_wait(kubeconfig: Path, files: list[Path], timeout: float = 60.0) -> None:
    """Create the objects of `files` (admin) and wait until every CRD among them is Established."""
    import yaml
    from lightkube import ApiError, Client, KubeConfig, codecs
    from lightkube.resources.apiextensions_v1 import CustomResourceDefinition

    client = Client(config=KubeConfig.from_file(str(kubeconfig)), field_manager="sanderling-lab")
    crds = []
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            try:
                client.create(codecs.from_dict(doc))
            except ApiError as exc:
                if exc.status.code != 409:
                    raise SystemExit(f"sanderling lab: {path.name}: {doc['kind']} {doc['metadata']['name']}: "
                                     f"{exc.status.message}") from None
            if doc["kind"] == "CustomResourceDefinition":
                crds.append(doc["metadata"]["name"])
    deadline = time.monotonic() + timeout
    for name in crds:
        while True:
            crd = client.get(CustomResourceDefinition, name)
            conditions = (crd.status.conditions if crd.status else None) or []
            if any(c.type == "Established" and c.status == "True" for c in conditions):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"sanderling lab: CRD {name} not established after {timeout:.0f}s")
            time.sleep(0.1)
