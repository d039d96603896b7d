"""The lab kubelet's view of a DaemonSet pod: `$(VAR)` expansion, host paths of a node, the binds
of `lab.host_view`, what a failed readiness probe says (the running side: tests/netns/test_lab_daemonset.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sanderling.lab import host_view
from sanderling.lab.host_pods import NodeHost, _probe_message, expand

NODE = NodeHost("node1", "lab-node1", "172.30.0.11", Path("/run/lab/node1"))


def test_variable_references_expand_as_kubernetes_does():
    env = {"NODE_NAME": "node1", "A": "x"}
    assert expand("--node=$(NODE_NAME)", env) == "--node=node1"
    assert expand("$(MISSING) stays", env) == "$(MISSING) stays"
    assert expand("$$(A) is escaped, $(A) is not", env) == "$(A) is escaped, x is not"


def test_a_nodes_host_paths_are_its_own_directories():
    assert NODE.host_path("/var/run/openvswitch") == Path("/run/lab/node1/ovs")
    assert NODE.host_path("/opt/cni/bin/") == Path("/run/lab/node1/cni/bin")
    assert NODE.host_path("/run/sanderling/cni.sock") == Path("/run/lab/node1/cni.sock")
    assert NODE.host_path("/var/run/netns") == Path("/var/run/netns")  # every node's namespaces are the machine's
    assert NODE.host_path("/etc/other") == Path("/run/lab/node1/host/etc/other")
    view = NODE.view()
    assert view["/etc/cni/net.d"] == "/run/lab/node1/cni/net.d" and "/var/run/netns" not in view


def test_the_view_command_line_and_its_binds():
    argv = host_view.argv_for("lab-node1", {"/etc/cni/net.d": "/run/lab/node1/cni/net.d"}, ["prog", "--x"])
    assert argv[-4:] == ["/run/lab/node1/cni/net.d=/etc/cni/net.d", "--", "prog", "--x"]
    assert host_view.parse_binds(["/a=/b"]) == [("/a", "/b")]
    with pytest.raises(SystemExit, match="give SRC=DST"):
        host_view.parse_binds(["relative=/b"])


def test_a_failed_readiness_probe_says_what_the_agent_misses():
    body = b'{"ready": false, "missing": ["no OpenFlow session to unix:/x", "informers not listed yet: Pod"]}'
    assert _probe_message(503, body) == "HTTP 503: no OpenFlow session to unix:/x; informers not listed yet: Pod"
    assert _probe_message(500, b"boom\n") == "HTTP 500: boom"
