"""`sanderling conformance netpol FILE...`: NetworkPolicy truth tables with real traffic in the lab.

A 3-node lab (routed) runs the files' topology: the namespaces with their labels, the pods spread
over the nodes (serving every TCP and UDP container port), one ClusterIP Service per pod. Each
step's actions go through the API like any client's (create/update policy, delete all policies,
relabel pods or namespaces); once the agents have converged, every pod probes every other pod's
Service ClusterIP and, separately, its pod IP, for each PROTO/port the step expects; both must
match the expected matrix (the diagonal is not checked when the file says ignore_loopback).
SCTP expectations are checked at the flow level: this kernel has no SCTP, so the verdict is an
`ofproto/trace` of an SCTP packet through the client's and the server's br-int, said per line.

With `--network NS/NAD` the same files run over a Sanderling secondary network instead (`layer2`,
or `vlan` on the lab's provider network): every pod gets an interface on it, each policy is
rewritten as a MultiNetworkPolicy for that network (`policy-for`), pods probe each other's
addresses on it (the traffic crosses the nodes over the layer2 tunnel or the VLAN), and SCTP is
traced through the secondary bridges. The pod network must stay unrestricted meanwhile: each step
also probes the pod IPs for its first TCP or UDP expectation, where every pair must connect.

With `--ip-family ipv6` the lab is IPv6-only (pods, Services) and each file runs as its IPv6
derivation: `${IP:ns/pod}` is the pod's IPv6 address and a prefix length written after it grows
by 96 (`/32`, one host in IPv4, becomes `/128`), as the proxy suite maps its IPv4 CIDRs;
`${CIDR4:ns/pod}` (in IPv4 a /4 around the pod, so a block holding every pod of the lab) becomes
the /8 around the pod's address (fd00::/8 holds every pod of the lab's fd00:10:244::/56 the same
way); SCTP is traced as IPv6 packets.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from sanderling.lab.cluster import PHYSNET, PROVIDER_NIC, Lab
from sanderling.model.attachments import ANNOTATION_NETWORKS, ANNOTATION_STATUS
from sanderling.model.multi_policy import POLICY_FOR
from sanderling.model.network import mac_for_ip
from sanderling.ovs.runtime import OvsRuntime

NAME = "slnetpol"
SETTLE_S = 1.5  # agents apply a change in milliseconds; leave room for the watch round trip
PLACEHOLDER = re.compile(r"\$\{(IP|CIDR4):([a-z0-9-]+/[a-z0-9-]+)\}(/[0-9]+)?")
IPV6_PREFIX_SHIFT = 96  # an IPv4 prefix length written after an IPv6 address: this much longer
IPV6_CIDR4_PREFIX = 8  # ${CIDR4:...} on IPv6: the block that holds every pod, as the IPv4 /4 does


# probes bind their source ports explicitly, and nothing else in a pod's namespace opens connections,
# so the run may use nearly all of them (minus the ports the pods serve)
FIRST_SOURCE_PORT, LAST_SOURCE_PORT = 10000, 65000


NETWORK_SUBNET = "10.77.0.0/16"
NETWORK_VLAN = 177
NETWORK_TOPOLOGIES = ("layer2", "vlan")


class SecondaryNetwork:
    """The network a `--network` run probes over: its NAD as the runner creates it."""

    def __init__(self, key: str, topology: str) -> None:
        if key.count("/") != 1 or not all(key.split("/")):
            raise ValueError(f"--network {key!r}: want NAMESPACE/NAME")
        if topology not in NETWORK_TOPOLOGIES:
            raise ValueError(f"--network-topology {topology!r}: want one of {', '.join(NETWORK_TOPOLOGIES)}")
        self.key, self.topology = key, topology
        self.namespace, self.name = key.split("/")

    def nad(self) -> dict[str, Any]:
        config: dict[str, Any] = {"cniVersion": "1.0.0", "type": "sanderling", "topology": self.topology,
                                  "subnet": NETWORK_SUBNET}
        if self.topology == "vlan":
            config.update(vlanID=NETWORK_VLAN, physicalNetwork=PHYSNET)
        return {"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
                "metadata": {"name": self.name, "namespace": self.namespace}, "spec": {"config": json.dumps(config)}}

    def bridge(self) -> str:
        from sanderling.ovs.secondary import L2_BRIDGE, provider_bridge

        return L2_BRIDGE if self.topology == "layer2" else provider_bridge(PHYSNET)

    def policy(self, obj: dict[str, Any]) -> dict[str, Any]:
        """A NetworkPolicy of the file as the MultiNetworkPolicy for this network."""
        out = json.loads(json.dumps(obj))
        out["apiVersion"] = "k8s.cni.cncf.io/v1beta2" if "endPort" in json.dumps(obj) else "k8s.cni.cncf.io/v1beta1"
        out["kind"] = "MultiNetworkPolicy"
        meta = out.setdefault("metadata", {})
        meta.setdefault("annotations", {})[POLICY_FOR] = self.key
        return out


class Runner:
    def __init__(self, lab: Lab, network: SecondaryNetwork | None = None) -> None:
        from sanderling.kube.client import KubeApi

        self.lab = lab
        self.network = network
        self.api: Any = KubeApi(lab.kubeconfig).client  # dynamic use of lightkube; typed loosely
        self.topology: dict[str, Any] | None = None
        self._next_port = FIRST_SOURCE_PORT
        self._server_ports: set[int] = set()  # never a source port: the pods listen there
        self._port_lock = threading.Lock()
        # "ns/name" -> {"ip", "node", "sandbox", "vip"}, with --network "net_ip" and "net_mac" too
        self.pods: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []

    # ---- topology ------------------------------------------------------------------------

    def setup(self, topology: dict[str, Any]) -> None:
        from lightkube import codecs

        if topology == self.topology:
            self.reset(topology)
            return
        self.teardown_objects()
        nodes = [n["name"] for n in self.lab.state()["nodes"]]
        ports = topology.get("container_ports") or []
        self._server_ports = {int(p["containerPort"]) for p in ports}
        for ns, spec in (topology.get("namespaces") or {}).items():
            self._apply(codecs.from_dict({"apiVersion": "v1", "kind": "Namespace",
                                          "metadata": {"name": ns, "labels": spec.get("labels") or {}}}))
        annotations = {}
        if self.network is not None:
            self._apply(codecs.from_dict({"apiVersion": "v1", "kind": "Namespace",
                                          "metadata": {"name": self.network.namespace}}))
            self._apply(codecs.from_dict(self.network.nad()))
            annotations = {ANNOTATION_NETWORKS: self.network.key}
        self.order = list(topology["pods"])
        for i, key in enumerate(self.order):
            ns, name = key.split("/")
            spec = topology["pods"][key]
            self._apply(codecs.from_dict({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "labels": spec.get("labels") or {},
                             "annotations": annotations},
                "spec": {"nodeName": nodes[i % len(nodes)], "containers": [{
                    "name": "c", "image": "none",
                    "ports": [{"name": p["name"], "containerPort": p["containerPort"],
                               "protocol": p.get("protocol", "TCP")} for p in ports]}]}}))
            svc_ports = [{"name": f"service-port-{p.get('protocol', 'TCP').lower()}-{p['containerPort']}",
                          "port": p["containerPort"], "targetPort": p["containerPort"],
                          "protocol": p.get("protocol", "TCP")} for p in ports]
            self._apply(codecs.from_dict({
                "apiVersion": "v1", "kind": "Service", "metadata": {"name": f"s-{ns}-{name}", "namespace": ns},
                "spec": {"selector": {"pod": (spec.get("labels") or {}).get("pod", name)}, "ports": svc_ports}}))
        self.topology = topology
        self._wait_running()

    def _apply(self, obj: Any) -> None:
        from sanderling.kube.apply import create_or_replace

        create_or_replace(self.api, obj)

    def _wait_running(self, timeout: float = 120) -> None:
        from lightkube.resources.core_v1 import Pod, Service

        deadline = time.monotonic() + timeout
        state = self.lab.state()
        netns = {n["name"]: n["netns"] for n in state["nodes"]}
        while time.monotonic() < deadline:
            ready = {}
            for key in self.order:
                ns, name = key.split("/")
                pod = self.api.get(Pod, name, namespace=ns)
                if pod.status and pod.status.podIP and pod.status.phase == "Running":
                    svc = self.api.get(Service, f"s-{ns}-{name}", namespace=ns)
                    node = pod.spec.nodeName if pod.spec else ""
                    ready[key] = {"ip": pod.status.podIP, "node": node, "vip": svc.spec.clusterIP if svc.spec else "",
                                  "sandbox": f"{netns[node]}-{ns}-{name}"[:60]}
                    if self.network is not None:
                        entry = self._network_entry(pod.metadata.annotations or {})
                        if entry is None:
                            del ready[key]
                            continue
                        ready[key].update(net_ip=entry["ips"][0], net_mac=entry.get("mac", ""))
            if len(ready) == len(self.order):
                self.pods = ready
                time.sleep(SETTLE_S)  # EndpointSlices reach the agents
                return
            time.sleep(0.3)
        raise RuntimeError(f"pods not running after {timeout}s; see {self.lab.state_dir}/controlplane.log")

    def _network_entry(self, annotations: dict[str, str]) -> dict[str, Any] | None:
        assert self.network is not None
        for entry in json.loads(annotations.get(ANNOTATION_STATUS, "[]")):
            if entry.get("name") == self.network.key and entry.get("ips"):
                return dict(entry)
        return None

    def reset(self, topology: dict[str, Any]) -> None:
        """Back to the file's starting point: no policies, the topology's labels."""
        from lightkube.resources.core_v1 import Namespace, Pod
        from lightkube.types import PatchType

        self.delete_all_policies()
        for ns, spec in (topology.get("namespaces") or {}).items():
            self.api.patch(Namespace, ns, {"metadata": {"labels": _replace_labels(
                self.api.get(Namespace, ns).metadata.labels, spec.get("labels") or {})}}, patch_type=PatchType.MERGE)
        for key, spec in topology["pods"].items():
            ns, name = key.split("/")
            self.api.patch(Pod, name, {"metadata": {"labels": _replace_labels(
                self.api.get(Pod, name, namespace=ns).metadata.labels, spec.get("labels") or {})}},
                namespace=ns, patch_type=PatchType.MERGE)

    def delete_all_policies(self) -> None:
        from lightkube.resources.networking_v1 import NetworkPolicy

        from sanderling.kube.client import MultiNetworkPolicyResource

        for pol in list(self.api.list(NetworkPolicy, namespace="*")):
            self.api.delete(NetworkPolicy, pol.metadata.name, namespace=pol.metadata.namespace)
        if self.network is not None:
            for mnp in list(self.api.list(MultiNetworkPolicyResource, namespace="*")):
                self.api.delete(MultiNetworkPolicyResource, mnp.metadata.name, namespace=mnp.metadata.namespace)

    def teardown_objects(self) -> None:
        from lightkube.resources.core_v1 import Namespace, Pod, Service

        self.delete_all_policies()
        for key in self.order:
            ns, name = key.split("/")
            for kind, obj_name in ((Pod, name), (Service, f"s-{ns}-{name}")):
                try:
                    self.api.delete(kind, obj_name, namespace=ns)
                except Exception:  # already gone
                    pass
        namespaces = {k.split("/")[0] for k in self.order}
        for ns in namespaces:
            try:
                self.api.delete(Namespace, ns)
            except Exception:
                pass
        self._wait_gone(namespaces)
        self.order, self.pods, self.topology = [], {}, None

    def _wait_gone(self, namespaces: set[str], timeout: float = 180.0) -> None:
        """kube-apiserver deletes a namespace asynchronously (its content first): the next file may
        use the same names, so wait until they are gone (the embedded server is immediate)."""
        from lightkube import ApiError
        from lightkube.resources.core_v1 import Namespace

        deadline = time.monotonic() + timeout
        for ns in sorted(namespaces):
            while time.monotonic() < deadline:
                try:
                    self.api.get(Namespace, ns)
                except ApiError as exc:
                    if exc.status.code == 404:
                        break
                    raise
                time.sleep(0.2)
            else:
                raise RuntimeError(f"namespace {ns} still terminating after {timeout:.0f}s")

    # ---- steps ---------------------------------------------------------------------------

    def substitute(self, obj: Any) -> Any:
        text = json.dumps(obj)

        def value(m: re.Match[str]) -> str:
            ip = self.pods[m.group(2)]["net_ip" if self.network is not None else "ip"]
            six = ":" in ip
            if m.group(1) == "CIDR4":
                block = str(ipaddress.ip_network(f"{ip}/{IPV6_CIDR4_PREFIX if six else 4}", strict=False))
                return block + (m.group(3) or "")
            if m.group(3) and six:
                return f"{ip}/{min(128, int(m.group(3)[1:]) + IPV6_PREFIX_SHIFT)}"
            return ip + (m.group(3) or "")
        return json.loads(PLACEHOLDER.sub(value, text))

    def act(self, action: dict[str, Any]) -> None:
        from lightkube import codecs
        from lightkube.resources.core_v1 import Namespace, Pod
        from lightkube.types import PatchType

        (kind, arg), = action.items()
        if kind in ("create_policy", "update_policy"):
            obj = self.substitute(arg)
            self._apply(codecs.from_dict(self.network.policy(obj) if self.network is not None else obj))
        elif kind == "delete_all_policies":
            self.delete_all_policies()
        elif kind == "set_pod_labels":
            key = arg.get("pod") or f"{arg['namespace']}/{arg['name']}"
            ns, name = key.split("/")
            labels = _replace_labels(self.api.get(Pod, name, namespace=ns).metadata.labels, arg.get("labels") or {})
            self.api.patch(Pod, name, {"metadata": {"labels": labels}}, namespace=ns, patch_type=PatchType.MERGE)
        elif kind == "set_namespace_labels":
            ns = arg.get("namespace") or arg.get("name")
            labels = _replace_labels(self.api.get(Namespace, ns).metadata.labels, arg.get("labels") or {})
            self.api.patch(Namespace, ns, {"metadata": {"labels": labels}}, patch_type=PatchType.MERGE)
        else:
            raise ValueError(f"unknown action {kind!r}")

    def _ports(self, count: int) -> int:
        """The first of `count` consecutive source ports no probe of the run has used."""
        with self._port_lock:
            first = self._next_port
            while any(first <= p < first + count for p in self._server_ports):
                first = max(p for p in self._server_ports if first <= p < first + count) + 1
            self._next_port = first + count
            return first

    def _reserve_ports(self, count: int) -> None:
        """Before a matrix (no probe in flight): when the source ports of the run run out, start
        again from the bottom with every node's conntrack flushed, so a reused 5-tuple can never
        meet an entry of an earlier probe (OVS keeps closing TCP connections for minutes)."""
        if self._next_port + count <= LAST_SOURCE_PORT:
            return
        for node in self.lab.state()["nodes"]:
            self._runtime(node["name"]).appctl("dpctl/flush-conntrack")
        print(f"... source ports {FIRST_SOURCE_PORT}-{LAST_SOURCE_PORT} used up: conntrack flushed on every node, "
              "starting again", file=sys.stderr, flush=True)
        self._next_port = FIRST_SOURCE_PORT

    def probe_matrix(self, proto: str, port: int, to: str) -> dict[tuple[str, str], bool]:
        """Every pod to every other pod's `to` address: "vip" (its Service), "ip" (pod network) or
        "net_ip" (its address on the --network)."""
        self._reserve_ports(len(self.order) * (len(self.order) + len(self._server_ports)))
        def client(src: str) -> dict[tuple[str, str], bool]:
            targets = {f"{proto.lower()}:{self.pods[dst][to]}:{port}": dst
                       for dst in self.order if dst != src}
            # every probe of the run gets a source port of its own: a 5-tuple reused while conntrack
            # still remembers an earlier connection (in the DNAT or the policy zone) would be taken
            # for that connection, an artefact of the probing
            first = self._ports(len(targets))
            ports = f"{first}-{first + len(targets) - 1}"
            out = subprocess.run(["ip", "netns", "exec", self.pods[src]["sandbox"], sys.executable, "-m",
                                  "sanderling.probe", "multi", *targets, "--timeout", "1", "--source-ports", ports],
                                 capture_output=True, text=True, timeout=60)
            answers = json.loads(out.stdout) if out.returncode == 0 else {}
            return {(src, targets[t]): bool(answers.get(t)) for t in targets}
        result: dict[tuple[str, str], bool] = {}
        with ThreadPoolExecutor(len(self.order)) as pool:
            for part in pool.map(client, self.order):
                result.update(part)
        return result

    def sctp_matrix(self, port: int) -> dict[tuple[str, str], bool]:
        """Flow-level: trace an SCTP INIT through the client's and the server's br-int."""
        return {(src, dst): self._sctp_allowed(src, dst, port) for src in self.order for dst in self.order
                if src != dst}

    def _sctp_allowed(self, src: str, dst: str, port: int) -> bool:
        if self.network is not None:
            return self._sctp_allowed_on_network(src, dst, port)
        s, d = self.pods[src], self.pods[dst]
        if ":" in s["ip"]:
            packet = f"sctp6,ipv6_src={s['ip']},ipv6_dst={d['ip']}"
        else:
            packet = f"sctp,nw_src={s['ip']},nw_dst={d['ip']}"
        first = self._trace(s["node"], f"in_port={self._ofport(s['node'], src)},dl_src={mac_for_ip(s['ip'])},"
                                       f"dl_dst=0a:58:0a:f4:00:01,{packet},nw_ttl=64,"
                                       f"sctp_src=40000,sctp_dst={port}")
        if first.endswith("drop"):
            return False
        if s["node"] == d["node"]:
            return True
        second = self._trace(d["node"], f"in_port=LOCAL,dl_src=0a:58:0a:f4:00:01,dl_dst=0a:58:0a:f4:00:01,"
                                        f"{packet},nw_ttl=63,sctp_src=40000,sctp_dst={port}")
        return not second.endswith("drop")

    def _sctp_allowed_on_network(self, src: str, dst: str, port: int) -> bool:
        """The INIT through the client's secondary bridge (from its port), then, on another node,
        through the server's (from the layer2 tunnel, or the uplink tagged with the VLAN)."""
        assert self.network is not None
        s, d = self.pods[src], self.pods[dst]
        bridge = self.network.bridge()
        packet = (f"dl_src={s['net_mac']},dl_dst={d['net_mac']},sctp,nw_src={s['net_ip']},nw_dst={d['net_ip']},"
                  f"nw_ttl=64,sctp_src=40000,sctp_dst={port}")
        first = self._trace(s["node"], f"in_port={self._ofport(s['node'], src, bridge)},{packet}", bridge)
        if first.endswith("drop"):
            return False
        if s["node"] == d["node"]:
            return True
        if self.network.topology == "layer2":
            entry = f"in_port={self._network_ofport(d['node'], bridge)}"
        else:
            entry = f"in_port={PROVIDER_NIC},dl_vlan={NETWORK_VLAN}"
        return not self._trace(d["node"], f"{entry},{packet}", bridge).endswith("drop")

    def _network_ofport(self, node: str, bridge: str) -> str:
        """The layer2 network's tunnel device on `bridge` of `node`."""
        assert self.network is not None
        out = self._runtime(node).vsctl("--bare", "--columns=ofport", "find", "Interface",
                                        f"external_ids:sanderling.io/network={self.network.key}",
                                        "external_ids:sanderling.io/vni!=\"\"")
        return out.strip().split()[0]

    def _runtime(self, node: str) -> OvsRuntime:
        rec = next(n for n in self.lab.state()["nodes"] if n["name"] == node)
        return OvsRuntime(Path(rec["dir"]) / "ovs", datapath="netdev")

    def _ofport(self, node: str, key: str, bridge: str = "br-int") -> str:
        ns, name = key.split("/")
        ports = self._runtime(node).vsctl("list-ports", bridge).split() if bridge != "br-int" else []
        out = self._runtime(node).vsctl("--bare", "--columns=name,ofport", "find", "Interface",
                                        f"external_ids:sanderling.io/pod-namespace={ns}",
                                        f"external_ids:sanderling.io/pod-name={name}")
        fields = out.split()
        pairs = list(zip(fields[::2], fields[1::2], strict=False))
        for port_name, ofport in pairs:
            if bridge == "br-int" or port_name in ports:
                return ofport
        raise RuntimeError(f"no port of {key} on {bridge} of {node}")

    def _trace(self, node: str, flow: str, bridge: str = "br-int") -> str:
        out = self._runtime(node).appctl("ofproto/trace", *(["--ct-next", "trk,new"] * 6), bridge, flow)
        actions = [line for line in out.splitlines() if line.startswith("Datapath actions:")]
        return actions[-1] if actions else "drop"


def _replace_labels(current: dict[str, str] | None, wanted: dict[str, str]) -> dict[str, Any]:
    """A merge patch that leaves exactly `wanted` (removed keys set to null)."""
    out: dict[str, Any] = {k: None for k in (current or {}) if k not in wanted}
    out.update(wanted)
    return out


def check_step(runner: Runner, case_id: str, step: dict[str, Any], order: list[str], ignore_loopback: bool
               ) -> tuple[int, list[str]]:
    """Probe every expectation of one step; (matrices passed, one line per failed matrix)."""
    passed = 0
    failures: list[str] = []
    spot_checked = False
    for key, expect in (step.get("expect") or {}).items():
        proto, port_text = key.split("/")
        port = int(port_text)
        want = {}
        for src, row in (expect.get("rows") or {}).items():
            for dst, bit in zip(order, str(row).split(), strict=True):
                want[(src, dst)] = bit == "1"
        label = f"{case_id} step {step.get('step')} {key}"
        if proto == "SCTP":
            views = {"flow level (this kernel has no SCTP)": runner.sctp_matrix(port)}
        elif runner.network is not None:
            views = {f"via {runner.network.key} address": runner.probe_matrix(proto, port, "net_ip")}
            if not spot_checked:  # the pod network stays open while the secondary one is filtered
                spot_checked = True
                got = runner.probe_matrix(proto, port, "ip")
                closed = [f"{s}->{d}" for (s, d), v in sorted(got.items()) if not v]
                if closed:
                    line = f"{label} pod network (no NetworkPolicy): {len(closed)} of {len(got)} pairs closed: " \
                           f"{'; '.join(closed[:6])}"
                    failures.append(line)
                    print(f"FAIL {line}", flush=True)
                else:
                    passed += 1
                    print(f"PASS {label} pod network open ({len(got)} pairs)", flush=True)
        else:
            views = {"via ClusterIP": runner.probe_matrix(proto, port, "vip"),
                     "via pod IP": runner.probe_matrix(proto, port, "ip")}
        for how, got in views.items():
            wrong = [f"{s}->{d} expected {int(want[(s, d)])} got {int(v)}" for (s, d), v in sorted(got.items())
                     if (s, d) in want and not (ignore_loopback and s == d) and want[(s, d)] != v]
            if wrong:
                line = f"{label} {how}: {len(wrong)} of {len(got)} pairs wrong: {'; '.join(wrong[:6])}"
                failures.append(line)
                print(f"FAIL {line}", flush=True)
            else:
                passed += 1
                print(f"PASS {label} {how}", flush=True)
    return passed, failures


def run_case(runner: Runner, path: Path) -> tuple[int, list[str]]:
    """One case file's steps on the runner's lab: (matrices passed, one line per failed matrix)."""
    case = yaml.safe_load(path.read_text())
    case_id = case.get("id", path.stem)
    runner.setup(case["topology"])
    order = str(case.get("matrix_format", "")).split("order ", 1)[-1].split(";")[0].split()
    order = [o for o in order if "/" in o] or runner.order
    passed, failures = 0, []
    for step in case.get("steps") or []:
        for action in step.get("actions") or []:
            runner.act(action)
        time.sleep(SETTLE_S)
        p, f = check_step(runner, case_id, step, order, bool(case.get("ignore_loopback", True)))
        passed += p
        failures += f
    runner.delete_all_policies()
    return passed, failures


def run(paths: list[Path], keep: bool = False, repeat: int = 1, control_plane: str = "sanderling",
        network: str | None = None, network_topology: str = "layer2", ip_family: str = "ipv4") -> int:
    """Every file's steps on one 3-node lab; with repeat > 1 (soak), all files again, `repeat` times
    on the same lab, and every failed matrix reported with its round at the end."""
    if repeat < 1:
        raise ValueError("--repeat must be at least 1")
    lab = Lab(NAME, lambda m: print(f"... {m}", file=sys.stderr, flush=True))
    lab.down(quiet=True)
    rounds: list[tuple[int, list[str]]] = []
    try:
        lab.up(3, "routed", control_plane=control_plane, ip_family=ip_family)
        runner = Runner(lab, SecondaryNetwork(network, network_topology) if network else None)
        for round_no in range(1, repeat + 1):
            if repeat > 1:
                print(f"=== round {round_no} of {repeat}", flush=True)
            passed, failures = 0, []
            for path in paths:
                p, f = run_case(runner, path)
                passed += p
                failures += f
            rounds.append((passed, failures))
    finally:
        if not keep:
            lab.down(quiet=True)
    passed = sum(p for p, _ in rounds)
    failed = sum(len(f) for _, f in rounds)
    if repeat > 1:
        for round_no, (p, f) in enumerate(rounds, 1):
            print(f"round {round_no}: {p} passed, {len(f)} failed")
        flakes = [(round_no, line) for round_no, (_, f) in enumerate(rounds, 1) for line in f]
        for round_no, line in flakes:
            print(f"flake in round {round_no}: {line}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0
