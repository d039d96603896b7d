"""Failed ADDs leave nothing behind, and their errors name what the operator needs."""

from __future__ import annotations

import json
import os
import subprocess

from sanderling.cni import errors as E
from sanderling.lab.node import LocalNode, teardown_prefix
from sanderling.netlink import veth

from ..conftest import require_ovs
from .conftest import lose_ipam_database, require_root


def add(node: LocalNode, cid: str, pod: str, ips: list[str] | None = None) -> tuple[int, dict]:
    veth.ensure_netns(f"slerr-n1-{cid}")
    conf = {"cniVersion": "1.1.0", "name": node.cni_network, "type": "sanderling-cni",
            "agentSocket": str(node.cni_socket)}
    if ips:
        conf["runtimeConfig"] = {"ips": ips}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": cid, "CNI_NETNS": f"/var/run/netns/slerr-n1-{cid}",
           "CNI_IFNAME": "eth0", "CNI_PATH": str(node.cni_bin.parent),
           "CNI_ARGS": f"K8S_POD_NAMESPACE=prod;K8S_POD_NAME={pod}"}
    proc = subprocess.run([str(node.cni_bin)], input=json.dumps(conf), env=env, capture_output=True, text=True)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}


def assert_nothing_left_for(node: LocalNode, cid: str) -> None:
    assert cid not in {a.container_id for a in node.allocations()}
    host_if = veth.host_veth_name(cid, "eth0")
    assert host_if not in node.host_links()
    assert host_if not in node.ovs.vsctl("list-ports", node.bridge).split()
    assert veth.interface_in_netns(f"/var/run/netns/slerr-n1-{cid}", "eth0") is None


def test_requested_ip_in_use_names_the_holder_and_leaves_nothing(cni_node):
    code, out = add(cni_node, "c1", "web-1", ["10.244.14.5/28"])
    assert code == 0, out
    code, out = add(cni_node, "c2", "web-2", ["10.244.14.5/28"])
    assert code == 1 and out["code"] == 100
    assert "10.244.14.5" in out["msg"] and "prod/web-1" in out["msg"]
    assert_nothing_left_for(cni_node, "c2")


def test_requested_ip_outside_pools_names_the_pools(cni_node):
    code, out = add(cni_node, "c3", "odd", ["192.168.77.7/24"])
    assert code == 1 and out["code"] == 101 and "10.244.14.0/28" in out["msg"]
    assert_nothing_left_for(cni_node, "c3")


def test_exhausted_pool_names_pool_and_size_and_leaves_nothing(cni_node):
    results = [add(cni_node, f"f{i}", f"fill-{i}") for i in range(13)]  # /28: 13 usable besides the gateway
    assert all(code == 0 for code, _ in results), results
    code, out = add(cni_node, "over", "one-too-many")
    assert code == 1 and out["code"] == 102
    assert "node (10.244.14.0/28, 13 addresses)" in out["msg"]
    assert_nothing_left_for(cni_node, "over")
    # and everything else still works: free one, the next ADD succeeds
    env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "f0", "CNI_IFNAME": "eth0", "CNI_PATH": "/x"}
    conf = json.dumps({"cniVersion": "1.1.0", "name": cni_node.cni_network, "type": "sanderling-cni",
                       "agentSocket": str(cni_node.cni_socket)})
    assert subprocess.run([str(cni_node.cni_bin)], input=conf, env=env, capture_output=True, text=True).returncode == 0
    assert add(cni_node, "again", "retry")[0] == 0


def test_a_second_agent_for_the_node_refuses_to_start(cni_node):
    """Issue 20: two agents would fight over the bridge, the IPAM database and the CNI socket."""
    before = cni_node.agent
    cni_node.start_agent()
    second = cni_node.agent
    assert second is not None and second.wait(20) == 1
    assert "another agent (pid" in cni_node.agent_log.read_text()
    cni_node.agent = before
    assert add(cni_node, "still", "served")[0] == 0  # the first one still serves


def test_a_corrupt_ipam_database_is_moved_aside_and_rebuilt_from_ovsdb(cni_node):
    """Issue 20: the allocations of live pods survive a database that no longer opens, so no
    address is handed out twice."""
    taken = {}
    for i in range(3):
        code, out = add(cni_node, f"live{i}", f"live-{i}")
        assert code == 0, out
        taken[f"live{i}"] = out["ips"][0]["address"].split("/")[0]
    lose_ipam_database(cni_node)
    db = cni_node.dir / "state" / "n1" / "ipam.db"
    assert {a.container_id: a.ip for a in cni_node.allocations()} == taken
    assert list(db.parent.glob("ipam.db.corrupt-*"))
    for i in range(3):  # new pods get other addresses
        code, out = add(cni_node, f"new{i}", f"new-{i}")
        assert code == 0 and out["ips"][0]["address"].split("/")[0] not in taken.values(), out


def test_a_full_state_disk_is_code_11_with_the_reason_and_recovers(tmp_path):
    """Issue 20: a full disk under the IPAM database is the node's problem, said as such (code 11,
    try again later, naming the database and what to do), never an internal error."""
    require_root()
    require_ovs()
    teardown_prefix("slerr-n1")
    node = LocalNode("n1", "10.244.14.0/28", tmp_path, prefix="slerr")
    state = node.dir / "state"
    state.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(state)], check=True)
    try:
        node.start()
        node.wait_ready()
        assert add(node, "before", "before")[0] == 0
        filler = state / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # fill the disk to the last byte
        for chunk in (65536, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
        os.close(fd)
        code, out = add(node, "full", "full")
        assert code == 1 and out["code"] == 11, out
        assert "ipam.db" in out["msg"] and "full" in out["msg"], out
        filler.unlink()
        code, out = add(node, "after", "after")
        assert code == 0, out
    finally:
        node.teardown()
        subprocess.run(["umount", "-l", str(state)])


def test_a_second_add_of_a_live_container_is_refused_and_leaves_it_as_it_was(cni_node):
    code, out = add(cni_node, "c9", "web-9")
    assert code == 0, out
    ip = out["ips"][0]["address"]
    code, again = add(cni_node, "c9", "web-9")
    assert code != 0 and again["code"] == E.E_INTERFACE_EXISTS and "eth0 already exists" in again["msg"], again
    assert [a.ip for a in cni_node.allocations() if a.container_id == "c9"] == [ip.split("/")[0]]
    host_if = veth.host_veth_name("c9", "eth0")
    assert host_if in cni_node.ovs.vsctl("list-ports", cni_node.bridge).split()
    inside = veth.interface_in_netns("/var/run/netns/slerr-n1-c9", "eth0")
    assert inside is not None and ip in inside.addresses and inside.mac == out["interfaces"][1]["mac"]
