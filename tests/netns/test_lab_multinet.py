"""Several networks per pod on a 3-node lab: VLAN provider networks (access and trunk), layer2
overlays, a macvlan delegate; reachability and isolation, 802.1Q on the wire, fixed ips/mac,
network-status against the pod's real interfaces, and bad input refused for that pod alone."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from sanderling.model.attachments import ANNOTATION_STATUS

from .conftest import LabCli, wait_for

NAME = "slmn"
lab = LabCli(NAME)
KUBECONFIG = Path("/run/sanderling-lab") / NAME / "kubeconfig"


def nad(name: str, config: dict | str) -> str:
    text = config if isinstance(config, str) else json.dumps(config)
    return json.dumps({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
                       "metadata": {"name": name, "namespace": "default"}, "spec": {"config": text}})


def sanderling(**kw: object) -> dict:
    return {"cniVersion": "1.0.0", "type": "sanderling", **kw}


def pod(name: str, node: str, networks: object) -> str:
    value = networks if isinstance(networks, str) else json.dumps(networks)
    return json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": name, "namespace": "default", "annotations": {"k8s.v1.cni.cncf.io/networks": value}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x", "ports": [{"containerPort": 8080}]}]}})


NADS = [
    nad("vlan100", sanderling(topology="vlan", vlanID=100, subnet="10.100.0.0/24", gateway="10.100.0.1")),
    nad("vlan200", sanderling(topology="vlan", vlanID=200)),  # no IPAM: the pod brings its address
    nad("trunk", sanderling(topology="vlan", trunk=[{"id": 100}, {"minID": 300, "maxID": 310}])),
    nad("l2a", sanderling(topology="layer2", subnet="10.50.0.0/24")),
    nad("l2b", sanderling(topology="layer2")),
    nad("mv", {"cniVersion": "1.0.0", "type": "macvlan", "master": "data0", "mode": "bridge",
               "ipam": {"type": "static"}, "capabilities": {"ips": True}}),
    # a chain: tuning changes the MAC macvlan made, finding the interface in prevResult
    nad("mvt", {"cniVersion": "1.0.0", "name": "mvt", "plugins": [
        {"type": "macvlan", "master": "data0", "mode": "bridge", "ipam": {"type": "static"},
         "capabilities": {"ips": True}},
        {"type": "tuning", "mac": "02:00:00:00:aa:01"}]}),
    # bad NADs
    nad("badjson", "{\"type\": \"sanderling\", "),
    nad("vlan4095", sanderling(topology="vlan", vlanID=4095)),
    nad("overlap", sanderling(topology="vlan", trunk=[{"minID": 10, "maxID": 20}, {"id": 15}])),
]
GOOD = [
    pod("a1", "node1", [{"name": "vlan100", "ips": ["10.100.0.10/24"], "mac": "02:00:00:00:01:0a"},
                        {"name": "l2a"}, {"name": "mv", "ips": ["10.30.0.11/24"]}]),
    pod("a2", "node2", [{"name": "vlan100"}, {"name": "l2a"}, {"name": "mv", "ips": ["10.30.0.12/24"]}]),
    pod("a3", "node3", "vlan100,l2b@l2"),
    pod("v2", "node3", [{"name": "vlan200", "ips": ["10.100.0.99/24"]}]),  # VLAN 200, VLAN 100's subnet
    pod("t1", "node2", [{"name": "trunk", "interface": "trunk0"}]),
    pod("r1", "node1", [{"name": "vlan100", "default-route": ["10.100.0.1"]}]),
    pod("c2", "node2", [{"name": "mvt", "interface": "tun0", "ips": ["10.30.0.31/24"]}]),
]
BAD = {  # pod -> what its failure must say
    "bad-json-annotation": ("[{\"name\": \"vlan100\"", "not valid JSON"),
    "bad-short-annotation": ("vlan100,,l2a", "entry 2"),
    "bad-unknown-nad": ("nosuchnet", "NetworkAttachmentDefinition default/nosuchnet does not exist"),
    "bad-nad-json": ("badjson", "spec.config: not valid JSON"),
    "bad-vlan-4095": ("vlan4095", "4095 is not a VLAN ID"),
    "bad-trunk-overlap": ("overlap", "overlap"),
    "bad-long-ifname": ("vlan100@averyveryverylongname", "1 to 15 characters"),
    "bad-dup-ip": (json.dumps([{"name": "vlan100", "ips": ["10.100.0.10/24"]}]), "already in use by default/a1"),
}


def kubectl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["kubectl", "--kubeconfig", str(KUBECONFIG), *args], capture_output=True, text=True,
                          timeout=60)


def pods() -> dict[str, dict]:
    return {p["metadata"]["name"]: p for p in json.loads(lab("get", "pods", "-o", "json").stdout)}




def in_pod(name: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return lab("exec", f"default/{name}", "--", *argv, timeout=60)


def reaches(src: str, ip: str) -> bool:
    return in_pod(src, "ping", "-c", "1", "-W", "1", ip).returncode == 0


def status_of(p: dict) -> list[dict]:
    return json.loads(p["metadata"].get("annotations", {}).get(ANNOTATION_STATUS, "[]"))


@pytest.fixture(scope="module")
def multinet_lab(tmp_path_factory):
    manifest = tmp_path_factory.mktemp("multinet") / "all.json"
    manifest.write_text("\n---\n".join(NADS + GOOD))
    lab.up_with(3, manifest, len(GOOD))
    yield
    down = lab("down")
    assert down.returncode == 0, down.stderr


def test_every_pair_on_a_shared_network_reaches_each_other_on_it(multinet_lab):
    everything = pods()
    st = {name: {e["interface"]: e for e in status_of(p)} for name, p in everything.items()}
    # fixed address and MAC honoured
    assert st["a1"]["net1"]["ips"] == ["10.100.0.10"] and st["a1"]["net1"]["mac"] == "02:00:00:00:01:0a"
    vlan100 = {n: st[n]["net1"]["ips"][0] for n in ("a1", "a2")} | {"a3": st["a3"]["net1"]["ips"][0]}
    assert len(set(vlan100.values())) == 3 and "10.100.0.1" not in vlan100.values()  # the gateway is excluded
    for src in vlan100:
        for dst, ip in vlan100.items():
            if src != dst:
                assert reaches(src, ip), f"{src} -> {dst} {ip} on vlan100"
    l2a = {n: st[n]["net2"]["ips"][0] for n in ("a1", "a2")}
    assert reaches("a1", l2a["a2"]) and reaches("a2", l2a["a1"])
    assert reaches("a1", "10.30.0.12") and reaches("a2", "10.30.0.11")  # the macvlan delegate, across nodes
    tcp = in_pod("a1", "python3", "-c", f"import socket; s=socket.create_connection(('{vlan100['a2']}', 8080), 3); "
                                       "print(s.recv(64).decode())")
    assert tcp.returncode == 0 and "a2" in tcp.stdout, tcp.stdout + tcp.stderr


def test_networks_are_isolated(multinet_lab):
    st = {name: {e["interface"]: e for e in status_of(p)} for name, p in pods().items()}
    # VLAN 200 with an address in VLAN 100's subnet reaches nobody of VLAN 100
    assert not reaches("v2", "10.100.0.10")
    # layer2 networks: from each other and from the pod network
    in_pod("a3", "ip", "addr", "add", "10.50.0.201/24", "dev", "l2")  # l2b has no IPAM: same subnet as l2a
    assert not reaches("a3", st["a2"]["net2"]["ips"][0])
    assert not reaches("v2", st["a2"]["net2"]["ips"][0])  # pod network only: no way onto l2a
    assert not reaches("v2", "10.30.0.12")


def test_vlan_frames_are_tagged_on_the_wire_and_trunks_carry_only_their_vlans(multinet_lab):
    fabric = subprocess.Popen(["ip", "netns", "exec", f"{NAME}-fabric", "tcpdump", "-l", "-e", "-nn", "-i", "fabric0",
                               "-c", "2", "vlan 100 and icmp"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    trunk = subprocess.Popen([*lab.argv("exec", "default/t1", "--"), "tcpdump", "-l", "-e", "-nn", "-i", "trunk0",
                              "-c", "3", "vlan and arp"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for proc in (fabric, trunk):
            assert proc.stderr is not None
            assert "listening on" in proc.stderr.readline() + proc.stderr.readline()
        in_pod("v2", "ping", "-c", "1", "-W", "1", "10.100.0.250")   # ARP on VLAN 200: not for the trunk
        in_pod("a1", "ping", "-c", "1", "-W", "1", "10.100.0.251")   # ARP on VLAN 100: tagged to the trunk
        in_pod("a3", "ping", "-c", "1", "-W", "1", "10.100.0.10")    # node3 -> node1 across the fabric
        fabric_out = fabric.communicate(timeout=20)[0]
        in_pod("a2", "ping", "-c", "1", "-W", "1", "10.100.0.252")   # two more VLAN 100 ARPs
        in_pod("a3", "ping", "-c", "1", "-W", "1", "10.100.0.253")
        trunk_out = trunk.communicate(timeout=20)[0]
    finally:
        for proc in (fabric, trunk):
            if proc.poll() is None:
                proc.kill()
    assert "ethertype 802.1Q (0x8100)" in fabric_out and "vlan 100" in fabric_out, fabric_out
    lines = trunk_out.splitlines()
    assert len(lines) == 3 and all("vlan 100" in line for line in lines), trunk_out
    assert "10.100.0.250" not in trunk_out


def test_default_route_moves_to_the_chosen_network(multinet_lab):
    routes = json.loads(in_pod("r1", "ip", "-j", "route", "show", "default").stdout)
    assert [(r["gateway"], r["dev"]) for r in routes] == [("10.100.0.1", "net1")], routes
    declared = {e["interface"]: e["default"] for e in status_of(pods()["r1"])}
    assert declared == {"eth0": False, "net1": True}


def test_spoof_guard_and_mtu_on_secondary_ports(multinet_lab):
    vlan_a1 = "10.100.0.10"
    assert reaches("a2", vlan_a1)
    in_pod("a2", "ip", "addr", "add", "10.100.0.77/24", "dev", "net1")
    try:  # an address the IPAM did not give it: dropped at its port (IP and ARP)
        spoofed = in_pod("a2", "ping", "-c", "1", "-W", "1", "-I", "10.100.0.77", vlan_a1)
        assert spoofed.returncode != 0, spoofed.stdout
    finally:
        in_pod("a2", "ip", "addr", "del", "10.100.0.77/24", "dev", "net1")
    mtus = {link["ifname"]: link["mtu"] for link in json.loads(in_pod("a1", "ip", "-j", "link").stdout)}
    assert mtus["net1"] == 1500 and mtus["net2"] == 1450  # layer2: the underlay's MTU less VXLAN's 50 bytes


def test_a_delegate_chain_runs_with_prev_result(multinet_lab):
    link = json.loads(in_pod("c2", "ip", "-j", "link", "show", "tun0").stdout)[0]
    assert link["address"] == "02:00:00:00:aa:01"  # tuning found tun0 in macvlan's result
    assert {e["interface"]: e["mac"] for e in status_of(pods()["c2"])}["tun0"] == "02:00:00:00:aa:01"
    assert reaches("c2", "10.30.0.11")


def test_host_device_moves_a_node_interface_into_the_pod_and_back(multinet_lab, tmp_path):
    """host-device stands in for an SR-IOV VF (no hardware here): a node interface handed to the
    pod, the NAD's resourceName carried to the plugin's config as a device plugin flow does."""
    node_ns = f"{NAME}-node1"
    subprocess.run(["ip", "-n", node_ns, "link", "add", "vf0", "type", "veth", "peer", "name", "vf0peer"], check=True)
    hostdev = json.loads(nad("hostdev", {"cniVersion": "1.0.0", "type": "host-device", "device": "vf0",
                                         "ipam": {"type": "host-local", "subnet": "10.40.0.0/24"}}))
    hostdev["metadata"]["annotations"] = {"k8s.v1.cni.cncf.io/resourceName": "example.com/vf"}
    manifest = tmp_path / "hostdev.json"
    manifest.write_text(json.dumps(hostdev) + "\n---\n" + pod("h1", "node1", "hostdev@vf"))
    assert lab("apply", "-f", str(manifest)).returncode == 0
    found = wait_for(lambda: (pods().get("h1", {}).get("status") or {}).get("podIP"), what="h1 running")
    assert found
    inside = json.loads(in_pod("h1", "ip", "-j", "addr", "show", "vf").stdout)[0]
    assert [a["local"] for a in inside["addr_info"] if a["family"] == "inet"][0].startswith("10.40.0.")
    gone = subprocess.run(["ip", "-n", node_ns, "link", "show", "vf0"], capture_output=True)
    assert gone.returncode != 0  # the device left the node for the pod
    records = list((Path("/run/sanderling-lab") / NAME / "node1" / "state" / "node1" / "attachments").glob("*.json"))
    confs = [c for r in records for a in json.loads(r.read_text())["attachments"] for c in a.get("confs", [])
             if c.get("type") == "host-device"]
    assert confs and confs[0]["resourceName"] == "example.com/vf"
    assert lab("delete", "-f", str(manifest)).returncode == 0
    wait_for(lambda: subprocess.run(["ip", "-n", node_ns, "link", "show", "vf0"], capture_output=True).returncode == 0,
             what="vf0 back on node1")


FLAKY = """#!/bin/sh
# a delegate whose DEL fails while /tmp/{name}-del-fails exists
read -r conf
case "$CNI_COMMAND" in
ADD) echo '{{"cniVersion": "1.0.0", "interfaces": [], "ips": []}}' ;;
DEL) if [ -e /tmp/{name}-del-fails ]; then
       echo '{{"code": 11, "msg": "flaky: DEL refused on purpose"}}'; exit 1; fi ;;
VERSION) echo '{{"cniVersion": "1.0.0", "supportedVersions": ["1.0.0"]}}' ;;
esac
"""


def test_del_goes_on_past_a_failing_delegate_and_reports_it(multinet_lab, tmp_path):
    node = Path("/run/sanderling-lab") / NAME / "node3"
    plugin = node / "cni" / "bin" / "flaky"
    plugin.write_text(FLAKY.format(name=NAME))
    plugin.chmod(0o755)
    marker = Path(f"/tmp/{NAME}-del-fails")
    marker.touch()
    manifest = tmp_path / "flaky.json"
    manifest.write_text(nad("flaky", {"cniVersion": "1.0.0", "type": "flaky"}) + "\n---\n" +
                        pod("f1", "node3", "vlan100,flaky"))
    try:
        assert lab("apply", "-f", str(manifest)).returncode == 0
        wait_for(lambda: (pods().get("f1", {}).get("status") or {}).get("podIP"), what="f1 running")
        records = node / "state" / "node3" / "attachments"
        cid = next(r.stem for r in records.glob("*.json") if json.loads(r.read_text())["pod"] == "default/f1")
        conf = {"cniVersion": "1.1.0", "name": f"{NAME}-node3", "type": "sanderling-cni",
                "agentSocket": str(node / "cni.sock")}
        env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0", "CNI_PATH": str(plugin.parent),
               "CNI_NETNS": "", "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=f1"}
        first = subprocess.run([str(node / "cni" / "bin" / "sanderling-cni")], input=json.dumps(conf), env=env,
                               capture_output=True, text=True)
        assert first.returncode != 0 and "flaky: DEL refused on purpose" in first.stdout, first.stdout
        db = f"--db=unix:{node / 'ovs' / 'db.sock'}"
        ports = subprocess.run(["ovs-vsctl", db, "--columns=name", "find", "Interface",
                                'external_ids:"sanderling.io/pod-name"=f1'], capture_output=True, text=True)
        assert ports.returncode == 0 and ports.stdout.strip() == ""  # the VLAN port went, past the failing delegate
        assert (records / f"{cid}.json").exists()  # kept: the failed DEL is retried from it
        marker.unlink()
        again = subprocess.run([str(node / "cni" / "bin" / "sanderling-cni")], input=json.dumps(conf), env=env,
                               capture_output=True, text=True)
        assert again.returncode == 0, again.stdout
        assert not (records / f"{cid}.json").exists()
    finally:
        marker.unlink(missing_ok=True)
        lab("delete", "-f", str(manifest))


def test_network_status_is_what_the_pod_has(multinet_lab):
    good = {json.loads(p)["metadata"]["name"] for p in GOOD}
    for name, p in pods().items():
        if name not in good:
            continue
        addrs = json.loads(in_pod(name, "ip", "-j", "addr").stdout)
        have = {a["ifname"]: ([i["local"] for i in a.get("addr_info", []) if i["family"] == "inet"], a["address"])
                for a in addrs if a["ifname"] != "lo"}
        declared = {e["interface"]: (e["ips"], e["mac"]) for e in status_of(p)}
        if name == "a3":  # the test above added an address to l2 by hand
            have["l2"] = ([ip for ip in have["l2"][0] if ip != "10.50.0.201"], have["l2"][1])
        assert declared == have, name
        assert [e["default"] for e in status_of(p)].count(True) == 1


def test_bad_input_fails_that_pod_only_with_a_message_and_an_event(multinet_lab, tmp_path):
    manifest = tmp_path / "bad.json"
    nodes = ["node1", "node2", "node3"]
    manifest.write_text("\n---\n".join(pod(name, nodes[i % 3], value) for i, (name, (value, _)) in
                                       enumerate(BAD.items())))
    assert lab("apply", "-f", str(manifest)).returncode == 0

    def all_failed() -> dict[str, str] | None:
        found = {}
        for name, p in pods().items():
            for c in (p.get("status") or {}).get("conditions") or []:
                if c.get("reason") == "NetworkSetupFailed":
                    found[name] = c.get("message", "")
        return found if set(BAD) <= set(found) else None

    failed = wait_for(all_failed, what="every bad pod to fail its ADD")
    for name, (_, problem) in BAD.items():
        assert problem in failed[name], (name, failed[name])
    events = json.loads(kubectl("get", "events", "-o", "json").stdout)["items"]
    reasons = {(e["involvedObject"]["name"], e["reason"]) for e in events}
    for name in BAD:
        if name != "bad-dup-ip":
            assert (name, "NetworkAttachmentFailed") in reasons, name
    assert ("bad-dup-ip", "AddressNotAssigned") in reasons or ("bad-dup-ip", "NetworkAttachmentFailed") in reasons
    # nothing of theirs is left on any node, and the good pods still work
    for node in nodes:
        db = f"/run/sanderling-lab/{NAME}/{node}/ovs/db.sock"
        ports = subprocess.run(["ovs-vsctl", f"--db=unix:{db}", "--columns=external_ids", "list", "Interface"],
                               capture_output=True, text=True).stdout
        for name in BAD:
            assert f'"{name}"' not in ports, (node, name)
    assert reaches("a1", "10.30.0.12") and reaches("a2", "10.100.0.10")


def mnp_manifest(name: str, policy_for: str, spec: dict) -> str:
    return json.dumps({"apiVersion": "k8s.cni.cncf.io/v1beta1", "kind": "MultiNetworkPolicy", "metadata": {
        "name": name, "namespace": "default", "annotations": {"k8s.v1.cni.cncf.io/policy-for": policy_for}},
        "spec": spec})


def test_multi_network_policy_filters_its_network_only_and_names_what_it_cannot_enforce(multinet_lab, tmp_path):
    """a1 (node1) accepts on vlan100 only from pods labelled role=friend (r1, node1, whose default
    route is on vlan100: network-status marks that entry "default"); a2 (node2)
    is refused there over the VLAN, and still reaches a1 on l2a and on the pod network. Policies
    naming a missing NAD, a delegated network or a malformed list get an Event each saying so, and
    change nothing else."""
    st = {name: {e["interface"]: e for e in status_of(p)} for name, p in pods().items()}
    a1_l2a = st["a1"]["net2"]["ips"][0]
    a1_pod_ip = pods()["a1"]["status"]["podIP"]
    assert reaches("a2", "10.100.0.10") and reaches("r1", "10.100.0.10")
    for name, label in (("a1", "role=locked"), ("r1", "role=friend")):
        out = kubectl("label", "pod", name, label, "--overwrite")
        assert out.returncode == 0, out.stderr
    manifest = tmp_path / "mnp.json"
    manifest.write_text("\n---\n".join([
        mnp_manifest("locked", "vlan100", {
            "podSelector": {"matchLabels": {"role": "locked"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "friend"}}}]}]}),
        mnp_manifest("half-enforced", "default/vlan100,nosuch,mv", {"podSelector": {"matchLabels": {"role": "none"}}}),
        mnp_manifest("malformed", "vlan100,,l2a", {"podSelector": {}}),
    ]))
    assert lab("apply", "-f", str(manifest)).returncode == 0
    try:
        wait_for(lambda: not reaches("a2", "10.100.0.10"), what="a2 refused by a1 on vlan100")
        assert reaches("r1", "10.100.0.10")            # the friend, on the same node
        assert not reaches("a3", "10.100.0.10")        # from node3, over the VLAN
        assert reaches("a2", a1_l2a) and reaches("a2", a1_pod_ip)  # other networks stay open
        assert reaches("a1", st["a2"]["net1"]["ips"][0])  # a1's own connections (egress) are not isolated

        def events() -> dict[str, str] | None:
            items = json.loads(kubectl("get", "events", "-o", "json").stdout)["items"]
            said = {e["involvedObject"]["name"]: e["message"] for e in items
                    if e["reason"] == "MultiNetworkPolicyNotEnforced"}
            return said if {"half-enforced", "malformed"} <= set(said) else None

        said = wait_for(events, what="Events on the policies that cannot be enforced")
        assert "default/nosuch: no such NetworkAttachmentDefinition" in said["half-enforced"]
        assert "default/mv: a delegated network (macvlan)" in said["half-enforced"]
        assert "default/vlan100" not in said["half-enforced"].split("not enforced on", 1)[1]
        assert "entry 2" in said["malformed"] and "locked" not in said
    finally:
        assert lab("delete", "-f", str(manifest)).returncode == 0
        for name in ("a1", "r1"):
            kubectl("label", "pod", name, "role-")
    wait_for(lambda: reaches("a2", "10.100.0.10"), what="vlan100 open again once the policy is gone")
