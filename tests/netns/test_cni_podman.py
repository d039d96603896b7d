"""A real container runtime (Debian's podman, runc, CNI backend) on a Sanderling network."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from sanderling.lab.node import LocalNode, teardown_prefix
from sanderling.netlink import veth

from ..conftest import require_ovs
from .conftest import require_root

# podman 4 (Debian 12) ships libcni 1.1: conflists up to cniVersion 1.0.0
CONF_VERSION = "1.0.0"
# this sandbox may not raise rlimits: ask for values below the host's hard limits
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


@pytest.fixture
def podman_node(tmp_path):
    require_root()
    require_ovs()
    for tool in ("podman", "runc", "busybox"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            pytest.fail(f"{tool} missing: run scripts/setup.sh (apt-get install podman runc busybox-static)")
    teardown_prefix("slpod-n1")
    node = LocalNode("n1", "10.244.11.0/24", tmp_path / "lab", prefix="slpod", cni_conf_version=CONF_VERSION)
    node.start()
    node.wait_ready()
    yield node
    node.teardown()


def make_rootfs(path):
    (path / "bin").mkdir(parents=True)
    shutil.copy(shutil.which("busybox"), path / "bin" / "busybox")
    for tool in ("sh", "ip", "nc", "sleep", "echo"):
        os.symlink("busybox", path / "bin" / tool)
    for d in ("proc", "sys", "dev", "etc", "tmp"):
        (path / d).mkdir()


def test_podman_container_gets_an_address_is_reachable_and_leaves_nothing(podman_node, tmp_path):
    node = podman_node
    rootfs = tmp_path / "rootfs"
    make_rootfs(rootfs)
    conf = tmp_path / "containers.conf"
    conf.write_text(f'[network]\nnetwork_backend = "cni"\nnetwork_config_dir = "{node.dir / "cni" / "net.d"}"\n'
                    f'cni_plugin_dirs = ["{node.cni_bin.parent}"]\n[engine]\ncgroup_manager = "cgroupfs"\n')
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    podman = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
    assert node.agent_status_code() == 0 or _wait_ready(node)
    run = subprocess.run([*podman, "run", "-d", *ULIMITS, "--network", node.cni_network, "--rootfs", str(rootfs),
                          "/bin/sh", "-c", "while true; do echo from-podman | nc -l -p 8080; done"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    cid = run.stdout.strip()
    try:
        allocs = [a for a in node.allocations() if a.container_id == cid]
        assert len(allocs) == 1, node.allocations()
        ip = allocs[0].ip
        shown = subprocess.run([*podman, "exec", cid, "ip", "-4", "addr", "show", "eth0"], env=env,
                               capture_output=True, text=True, timeout=60)
        assert f"inet {ip}/24" in shown.stdout
        client = node.add_pod("default", "client", "10.244.11.200")
        node.wait_programmed(client)
        assert node.probe(client, "icmp", ip)
        reply = node.pod_exec(client, ["python3", "-m", "sanderling.probe", "connect", "tcp", ip, "8080"])
        assert node.probe(client, "tcp", ip, 8080), reply.stderr
    finally:
        rm = subprocess.run([*podman, "rm", "-f", "-t", "0", cid], env=env, capture_output=True, text=True,
                            timeout=120)
    assert rm.returncode == 0, rm.stderr
    host_if = veth.host_veth_name(cid, "eth0")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(a.container_id == cid for a in node.allocations()):
        time.sleep(0.1)
    assert not any(a.container_id == cid for a in node.allocations()), "address not released"
    assert host_if not in node.host_links(), "veth left behind"
    assert host_if not in node.ovs.vsctl("list-ports", node.bridge).split(), "OVS port left behind"
    flows = node.ovs.ofctl(node.bridge, "dump-flows", "table=0")
    assert flows.count("in_port=") == 1, f"flows left behind:\n{flows}"  # only the client pod's


def _wait_ready(node: LocalNode) -> bool:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if node.agent_status_code() == 0:
            return True
        time.sleep(0.1)
    return False
