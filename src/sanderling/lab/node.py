"""One lab node: a network namespace with its own OVS (userspace datapath), br-int and agent.

Pods are network namespaces plugged into br-int with a veth pair and the OVSDB external_ids the
agent reads. Used by the demo, the network-namespace tests and (later) the multi-node lab.
Everything it creates carries the node's prefix, so `teardown()` finds it even after a crash.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import netns

from sanderling.ipam.store import Allocation, AllocationStore
from sanderling.model.network import NodeNetwork, mac_for_ip
from sanderling.netlink import veth
from sanderling.netlink.netns import drop_cached, ipr
from sanderling.ovs import ovsdb
from sanderling.ovs.ovsdb import Ovsdb
from sanderling.ovs.runtime import OvsRuntime
from sanderling.process import kill_netns_processes

UNDERLAY_BRIDGE = "br-ex"


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    ip: str
    mac: str
    netns: str
    host_ifname: str
    ip6: str = ""


class LocalNode:
    def __init__(self, name: str, pod_cidr: str, base_dir: Path, prefix: str = "sl", bridge: str = "br-int",
                 cni_conf_version: str = "1.1.0", kubeconfig: Path | None = None, gateway: bool = False,
                 agent_session: bool = False, mode: str = "routed", pod_cidr_from_api: bool = False,
                 agent_in_netns: bool = False, agent_args: tuple[str, ...] = ()) -> None:
        # the lab's agents live in their node's namespace, as a real one lives on its host: their
        # API connections leave through the node's own interfaces (tests with an API on the
        # host's loopback keep the agent outside)
        self.agent_in_netns = agent_in_netns
        self.agent_args = agent_args  # more sanderling-agent flags (e.g. --no-proxy)
        self.gateway = gateway
        self.mode = mode
        self.mtu = 1450 if mode == "overlay" else 1500  # VXLAN adds 50 bytes on a 1500-byte underlay
        self.pod_cidr_from_api = pod_cidr_from_api  # the agent reads it from its Node object
        self.agent_session = agent_session  # the agent outlives this process (`lab up`)
        self.cni_conf_version = cni_conf_version
        self.kubeconfig = kubeconfig
        self.name = name
        self.prefix = prefix
        self.network = NodeNetwork.build(name, pod_cidr)
        self.netns = f"{prefix}-{name}"
        self.dir = base_dir / name
        self.bridge = bridge
        self.ovs = OvsRuntime(self.dir / "ovs", netns=self.netns, datapath="netdev")
        self.db: Ovsdb | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.pods: dict[str, Pod] = {}
        self._servers: list[subprocess.Popen[bytes]] = []

    @property
    def cni_socket(self) -> Path:
        return self.dir / "cni.sock"

    @property
    def cni_network(self) -> str:
        return f"{self.prefix}-{self.name}"

    @property
    def cni_bin(self) -> Path:
        return self.dir / "cni" / "bin" / "sanderling-cni"

    @property
    def agent_log(self) -> Path:
        return self.dir / "agent.log"

    def start(self, agent: bool = True) -> None:
        """The node's namespace, OVS and br-int; then its agent unless the caller starts it later."""
        self.dir.mkdir(parents=True, exist_ok=True)
        veth.ensure_netns(self.netns)
        with ipr(self.netns) as h:
            h.link("set", index=h.link_lookup(ifname="lo")[0], state="up")
        self.ovs.start()
        self.db = Ovsdb(self.ovs.db_endpoint)
        self.db.ensure_bridge(self.bridge, "netdev")
        if agent:
            self.start_agent()

    def agent_flags(self) -> list[str]:
        """This node's agent configuration as flags (`sanderling node cleanup` takes the same)."""
        return ["--node", self.name,
                *([] if self.pod_cidr_from_api else
                  ["--pod-cidr", ",".join(str(c) for c in self.network.pod_cidrs)]),
                "--gateway-mac", self.network.gateway_mac, "--mode", self.mode, "--mtu", str(self.mtu),
                "--bridge", self.bridge, "--ovs-run-dir", str(self.ovs.run_dir), "--node-netns", self.netns,
                "--state-dir", str(self.dir / "state"), "--cni-socket", str(self.cni_socket),
                "--cni-conf-dir", str(self.dir / "cni" / "net.d"), "--cni-bin-dir", str(self.dir / "cni" / "bin"),
                "--cni-network", self.cni_network, "--cni-conf-version", self.cni_conf_version,
                *(["--kubeconfig", str(self.kubeconfig)] if self.kubeconfig else []),
                *(["--gateway"] if self.gateway else []), *self.agent_args]

    def start_agent(self) -> None:
        log = open(self.agent_log, "ab")
        self.agent = subprocess.Popen(
            [*(["ip", "netns", "exec", self.netns] if self.agent_in_netns else []),
             sys.executable, "-m", "sanderling.agent.main", *self.agent_flags()],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=self.agent_session)
        log.close()

    def kill_agent(self, sig: int = signal.SIGKILL) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.agent.send_signal(sig)
            try:
                self.agent.wait(10)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait(10)
        self.agent = None

    def attach_nic(self, fabric_netns: str, fabric_bridge: str, ifname: str) -> None:
        """One more interface of this node, `ifname`, cabled to the fabric bridge (no address):
        the uplink of a provider network, or a macvlan master."""
        # unique per lab, node and interface within 15 characters, whatever the lengths of the names
        tag = self.name if ifname == "uplink" else f"{self.name}/{ifname}"
        host_end = "ul" + hashlib.sha1(f"{self.prefix}/{tag}".encode()).hexdigest()[:12]
        with ipr(fabric_netns) as fab:
            if not fab.link_lookup(ifname=host_end):
                fab.link("add", ifname=host_end, kind="veth", peer={"ifname": "nictmp", "net_ns_fd": self.netns})
            idx = fab.link_lookup(ifname=host_end)[0]
            fab.link("set", index=idx, master=fab.link_lookup(ifname=fabric_bridge)[0], state="up")
        with ipr(self.netns) as h:
            tmp = h.link_lookup(ifname="nictmp")
            if tmp:
                h.link("set", index=tmp[0], ifname=ifname)
            idx = h.link_lookup(ifname=ifname)[0]
            h.link("set", index=idx, state="up")

    def attach_underlay(self, fabric_netns: str, fabric_bridge: str, ip_cidr: str, ip6_cidr: str = "") -> None:
        """A veth from this node to the underlay bridge in the fabric namespace (`ip6_cidr`: the
        node's IPv6 address there too)."""
        self.attach_nic(fabric_netns, fabric_bridge, "uplink")
        iface = ipaddress.IPv4Interface(ip_cidr)
        address_on = "uplink"
        if self.mode == "overlay":
            # OVS's userspace tunnels route and ARP through an OVS bridge that owns the underlay
            # address: the uplink becomes a port of br-ex, the address moves to br-ex's LOCAL port
            assert self.db is not None
            self.db.ensure_bridge(UNDERLAY_BRIDGE, "netdev", fail_mode="standalone")
            self.db.add_port(UNDERLAY_BRIDGE, "uplink")
            address_on = UNDERLAY_BRIDGE
        with ipr(self.netns) as h:
            deadline = time.monotonic() + 10
            while not h.link_lookup(ifname=address_on) and time.monotonic() < deadline:
                time.sleep(0.02)
            idx = h.link_lookup(ifname=address_on)[0]
            h.link("set", index=idx, state="up")
            h.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            if ip6_cidr:
                iface6 = ipaddress.IPv6Interface(ip6_cidr)
                h.addr("add", index=idx, address=str(iface6.ip), prefixlen=iface6.network.prefixlen,
                       flags=0x02)  # IFA_F_NODAD: the lab hands out distinct addresses
        self.underlay_ip = str(iface.ip)

    def route(self, cidr: str, via: str, dev: str | None = None) -> None:
        with ipr(self.netns) as h:
            if dev is None:
                h.route("replace", dst=cidr, gateway=via)
            else:
                h.route("replace", dst=cidr, gateway=via, oif=h.link_lookup(ifname=dev)[0])

    def uplink_link_local(self) -> str:
        """The IPv6 link-local address of this node's underlay interface: the next hop other nodes
        route this node's IPv6 pod subnet to when the underlay is IPv4 (Linux takes no IPv4 next
        hop for an IPv6 route; a link-local one needs no IPv6 addressing of the underlay)."""
        with ipr(self.netns) as h:
            idx = h.link_lookup(ifname="uplink")[0]
            for _ in range(100):
                for addr in h.get_addr(index=idx, family=10):
                    text = addr.get_attr("IFA_ADDRESS")
                    if text.startswith("fe80:") and not addr["flags"] & 0x40:  # not IFA_F_TENTATIVE
                        return str(text)
                time.sleep(0.05)
        raise RuntimeError(f"node {self.name}: its uplink has no usable IPv6 link-local address")

    def add_pod(self, namespace: str, name: str, ip: str, ip6: str = "") -> Pod:
        """A pod plugged by hand (no CNI); `ip6`: its IPv6 address (`ip` "" on an IPv6-only node)."""
        assert self.db is not None
        index = len(self.pods) + 1
        pod = Pod(namespace, name, ip, mac_for_ip(ip or ip6), f"{self.netns}-{namespace}-{name}"[:40],
                  f"{self.prefix}{self.name[-4:]}p{index}"[:15], ip6)
        cidr, cidr6 = self.network.pod_cidr, self.network.pod_cidr6
        veth.plumb(veth.PodInterface(pod.netns, pod.host_ifname, f"{ip}/{cidr.prefixlen}" if ip and cidr else "",
                                     pod.mac, str(self.network.gateway_ip) if ip else "",
                                     ip6_cidr=f"{ip6}/{cidr6.prefixlen}" if ip6 and cidr6 else "",
                                     gateway6=str(self.network.gateway_ip6) if ip6 else ""), node_netns=self.netns)
        self.db.add_port(self.bridge, pod.host_ifname, external_ids={
            ovsdb.EXT_POD_NAMESPACE: namespace, ovsdb.EXT_POD_NAME: name,
            ovsdb.EXT_IP: ",".join(filter(None, (ip, ip6))),
            ovsdb.EXT_MAC: pod.mac, ovsdb.EXT_INTERFACE: "eth0"})
        self.pods[f"{namespace}/{name}"] = pod
        return pod

    def remove_pod(self, pod: Pod) -> None:
        if self.db is not None:
            self.db.delete_port(self.bridge, pod.host_ifname)
        veth.unplumb(pod.host_ifname, self.netns)
        veth.delete_netns(pod.netns)
        self.pods.pop(f"{pod.namespace}/{pod.name}", None)

    def ofport(self, pod: Pod) -> int:
        assert self.db is not None
        for rec in self.db.ports(self.bridge):
            if rec.name == pod.host_ifname:
                return rec.ofport
        return -1

    def ofport_of(self, port_name: str) -> int:
        assert self.db is not None
        for rec in self.db.ports(self.bridge):
            if rec.name == port_name:
                return rec.effective_ofport
        return -1

    def host_links(self) -> set[str]:
        with ipr(self.netns) as h:
            return {link.get_attr("IFLA_IFNAME") for link in h.get_links()}

    def allocations(self) -> list[Allocation]:
        path = self.dir / "state" / self.name / "ipam.db"
        if not path.exists():
            return []
        store = AllocationStore(path)
        try:
            return store.all()
        finally:
            store.close()

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until the agent answers CNI STATUS with success (connected to OVS, plugin installed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.agent_status_code() == 0:
                return
            time.sleep(0.05)
        tail = ""
        if self.agent_log.exists():
            lines = [ln for ln in self.agent_log.read_text(errors="replace").splitlines() if "httpx" not in ln]
            tail = "\n".join(lines[-15:])
        raise TimeoutError(f"agent of {self.name} not ready after {timeout}s; see {self.agent_log}; it said:\n{tail}")

    def agent_status_code(self) -> int:
        """Exit code of the CNI plugin's STATUS: 0 when the agent can serve ADDs."""
        if not self.cni_bin.exists():
            return -1
        conf = json.dumps({"cniVersion": "1.1.0", "name": self.cni_network, "type": "sanderling-cni",
                           "agentSocket": str(self.cni_socket)})
        proc = subprocess.run([str(self.cni_bin)], input=conf, capture_output=True, text=True,
                              env={"CNI_COMMAND": "STATUS", "CNI_PATH": str(self.cni_bin.parent)})
        return proc.returncode

    def wait_programmed(self, pod: Pod, timeout: float = 10.0) -> None:
        """Until the agent has installed the pod's classifier flow."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            port = self.ofport(pod)
            if port > 0:
                try:
                    out = self.ovs.ofctl(self.bridge, "dump-flows", f"table=0,in_port={port}")
                    if "goto_table" in out:
                        return
                except Exception:  # vswitchd restarting
                    pass
            time.sleep(0.05)
        raise TimeoutError(f"agent of {self.name} did not program pod {pod.namespace}/{pod.name} in {timeout}s;"
                           f" see {self.agent_log}")

    def pod_exec(self, pod: Pod, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", pod.netns, *argv], capture_output=True, text=True,
                              timeout=timeout)

    def pod_popen(self, pod: Pod, argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["ip", "netns", "exec", pod.netns, *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        self._servers.append(proc)
        return proc

    def serve(self, pod: Pod, tcp: tuple[int, ...] = (8080,), udp: tuple[int, ...] = (8081,)) -> None:
        argv = [sys.executable, "-m", "sanderling.probe", "serve", "--name", pod.name]
        argv += [a for p in tcp for a in ("--tcp", str(p))] + [a for p in udp for a in ("--udp", str(p))]
        proc = self.pod_popen(pod, argv)
        assert proc.stdout is not None
        proc.stdout.readline()  # "ready"

    def probe(self, src: Pod, proto: str, dst_ip: str, port: int = 0, timeout: float = 1.0) -> bool:
        if proto == "icmp":
            res = self.pod_exec(src, ["ping", "-c", "1", "-W", str(max(1, int(timeout))), dst_ip])
        else:
            res = self.pod_exec(src, [sys.executable, "-m", "sanderling.probe", "connect", proto, dst_ip, str(port),
                                      "--timeout", str(timeout)])
        return res.returncode == 0

    def teardown(self) -> None:
        for proc in self._servers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self._servers.clear()
        self.kill_agent(signal.SIGTERM)
        for pod in list(self.pods.values()):
            veth.delete_netns(pod.netns)
        self.pods.clear()
        if self.db is not None:
            self.db.close()
            self.db = None
        self.ovs.stop()
        drop_cached()
        teardown_prefix(f"{self.netns}")
        shutil.rmtree(self.dir, ignore_errors=True)


def teardown_prefix(prefix: str) -> None:
    """Remove every network namespace whose name starts with prefix (the node's and its pods')."""
    for name in netns.listnetns():
        if name == prefix or name.startswith(prefix + "-"):
            kill_netns_processes(name)  # processes left inside (a crashed run) would keep it alive
            netns.remove(name)
