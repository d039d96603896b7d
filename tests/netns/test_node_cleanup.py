"""`sanderling node install-cni` and `sanderling node cleanup` on a real node: the init container's
install writes what the kubelet needs, and after the agent stopped the cleanup leaves no bridge,
flow, pod interface, conflist, plugin, socket or state behind; a second cleanup finds nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from sanderling.lab.node import LocalNode
from sanderling.ovs.ovsdb import Ovsdb


def node_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sanderling.cli.main", "node", *args], capture_output=True,
                          text=True, timeout=120)


def test_install_cni_then_cleanup_leaves_nothing(node: LocalNode, tmp_path: Path):
    flags = node.agent_flags()
    conf_dir, bin_dir = node.dir / "cni" / "net.d", node.dir / "cni" / "bin"
    # the init container's step, into fresh directories from a config file, as the DaemonSet runs it
    config = tmp_path / "config.yaml"
    config.write_text(f"cni-conf-dir: {tmp_path / 'net.d'}\ncni-bin-dir: {tmp_path / 'bin'}\n"
                      "cni-interpreter: /usr/bin/python3\ncni-socket: /run/sanderling/test.sock\n")
    installed = node_cli("install-cni", "--config", str(config))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    conflist = json.loads((tmp_path / "net.d" / "10-sanderling.conflist").read_text())
    assert conflist["plugins"][0]["type"] == "sanderling-cni"
    # the compiled front setup built, with the Python shim (the configured interpreter) as its fall back
    assert (tmp_path / "bin" / "sanderling-cni").read_bytes().startswith(b"\x7fELF")
    plugin = (tmp_path / "bin" / "sanderling-cni-py").read_text()
    assert plugin.startswith("#!/usr/bin/python3 -IS\n") and "/run/sanderling/test.sock" in plugin
    bad = node_cli("install-cni", "--", "--mtu", "70000")
    assert bad.returncode == 2 and "mtu" in bad.stdout and len(bad.stdout.strip().splitlines()) == 1, bad.stdout

    node.wait_ready()
    for cid in ("c1", "c2"):  # pods plugged by the runtime through the installed plugin
        netns = f"{node.netns}-{cid}"
        subprocess.run(["ip", "netns", "add", netns], check=True)
        added = subprocess.run(
            [str(node.cni_bin)], capture_output=True, text=True, timeout=60,
            input=json.dumps({"cniVersion": "1.1.0", "name": node.cni_network, "type": "sanderling-cni",
                              "agentSocket": str(node.cni_socket)}),
            env={"CNI_COMMAND": "ADD", "CNI_CONTAINERID": cid, "CNI_NETNS": f"/var/run/netns/{netns}",
                 "CNI_IFNAME": "eth0", "CNI_PATH": str(bin_dir), "CNI_ARGS": f"K8S_POD_NAMESPACE=d;K8S_POD_NAME={cid}"})
        assert added.returncode == 0, added.stdout + added.stderr
    plugged = {link for link in node.host_links() if re.fullmatch(r"sl[0-9a-f]{12}", link)}
    assert len(plugged) == 2, node.host_links()
    node.kill_agent()  # uninstalling: the DaemonSet's pods are gone first

    cleaned = node_cli("cleanup", "--", *flags)
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    print("\n" + cleaned.stdout)
    db = Ovsdb(node.ovs.db_endpoint)
    try:
        assert node.bridge not in db.bridges()
    finally:
        db.close()
    assert not plugged & node.host_links(), node.host_links()
    assert not (conf_dir / "10-sanderling.conflist").exists() and not (bin_dir / "sanderling-cni").exists()
    assert not (bin_dir / "sanderling-cni-py").exists()
    assert not node.cni_socket.exists() and not (node.dir / "state").exists()
    again = node_cli("cleanup", "--", *flags)
    assert again.returncode == 0 and "0 things removed" in again.stdout, again.stdout
