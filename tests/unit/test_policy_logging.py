"""policy.sanderling.io/log: allowed connections of an annotated policy and denied ones of an
annotated namespace reach the agent (rate-limited by a meter) and become structured log lines."""

from __future__ import annotations

import logging
import socket
import struct

from sanderling.agent.policy_agent import PolicyAgent
from sanderling.compiler.policy import LOG_METER
from sanderling.openflow import cookies, ir
from sanderling.openflow.pipeline import PIPELINE
from sanderling.openflow.realizer import Realizer


def pod(ns, name, ip, labels):
    return {"metadata": {"namespace": ns, "name": name, "labels": labels}, "spec": {"nodeName": "n1"},
            "status": {"podIP": ip}}


def frame(src: str, dst: str, sport: int, dport: int) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, socket.inet_aton(src), socket.inet_aton(dst))
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 2, 1000, 0, 0)
    return b"\x0a" * 6 + b"\x0b" * 6 + b"\x08\x00" + ip + tcp


def agent_with(annotated_policy: bool, annotated_namespace: bool) -> tuple[PolicyAgent, Realizer]:
    realizer = Realizer(1)
    agent = PolicyAgent("n1", realizer, lambda: None)
    agent.start()
    agent.namespace_changed("x", {"metadata": {"name": "x", "labels": {}, "annotations": {
        "policy.sanderling.io/log": "true"} if annotated_namespace else {}}})
    agent.pod_changed("x/server", pod("x", "server", "10.244.0.10", {"app": "server"}))
    agent.pod_changed("x/client", pod("x", "client", "10.244.0.11", {"app": "client"}))
    agent.policy_changed("x/allow-client", {
        "metadata": {"namespace": "x", "name": "allow-client",
                     "annotations": {"policy.sanderling.io/log": "true"} if annotated_policy else {}},
        "spec": {"podSelector": {"matchLabels": {"app": "server"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}]}})
    return agent, realizer


def logged(flows) -> list[ir.Flow]:
    return [f for f in flows if any(isinstance(a, ir.Controller) and a.meter_id == LOG_METER for a in f.actions)]


def test_annotations_turn_logging_on_with_the_meter():
    _, realizer = agent_with(False, False)
    assert not logged([f for s in realizer.desired_state().values() for f in s.flows.values()])
    _, realizer = agent_with(True, False)
    allow = logged(realizer.desired_state()["policy/x/allow-client"].flows.values())
    assert allow and all(f.table == PIPELINE["IngressRule"] for f in allow)
    _, realizer = agent_with(False, True)
    deny = logged(realizer.desired_state()["policy-pod/x/server"].flows.values())
    assert deny and all(not any(isinstance(a, ir.Goto) for a in f.actions) for f in deny)  # logged, then dropped


def test_packet_in_becomes_a_structured_line(caplog):
    agent, realizer = agent_with(True, True)
    allow = logged(realizer.desired_state()["policy/x/allow-client"].flows.values())[0]
    with caplog.at_level(logging.INFO, logger="sanderling.agent.policy_agent"):
        agent.packet_in(PIPELINE["IngressRule"], cookies.with_generation(allow.cookie, 3),
                        frame("10.244.0.11", "10.244.0.10", 40000, 80))
        deny = logged(realizer.desired_state()["policy-pod/x/server"].flows.values())[0]
        agent.packet_in(PIPELINE["IngressRule"], cookies.with_generation(deny.cookie, 3),
                        frame("10.244.0.99", "10.244.0.10", 40001, 81))
    lines = [r.getMessage() for r in caplog.records if "policy-log" in r.getMessage()]
    assert lines[0] == ("policy-log verdict=allow policy=x/allow-client rule=ingress/0/all src=x/client(10.244.0.11) "
                        "dst=x/server(10.244.0.10) proto=TCP port=80")
    assert "verdict=deny" in lines[1] and "src=-(10.244.0.99)" in lines[1] and "port=81" in lines[1]


def test_updates_that_change_no_flow_recompile_nothing():
    """Issue 17: a running pod's status updates (conditions, phase) and a namespace's unrelated
    annotations must not recompile every policy."""
    from sanderling.agent.policy_agent import PolicyAgent
    from sanderling.openflow.realizer import Realizer

    flushes = []
    agent = PolicyAgent("n1", Realizer(1), lambda: flushes.append(1))
    agent.start()
    pod = {"metadata": {"namespace": "a", "name": "p", "labels": {"app": "x"}}, "spec": {"nodeName": "n1"},
           "status": {"podIP": "10.244.1.5", "phase": "Running"}}
    ns = {"metadata": {"name": "a", "labels": {"team": "red"}}}
    agent.namespace_changed("a", ns)
    agent.pod_changed("a/p", pod)
    before = len(flushes)
    agent.pod_changed("a/p", {**pod, "status": {**pod["status"], "conditions": [{"type": "Ready"}]}})
    agent.namespace_changed("a", {"metadata": {**ns["metadata"], "annotations": {"unrelated": "1"}}})
    assert len(flushes) == before
    agent.pod_changed("a/p", {**pod, "metadata": {**pod["metadata"], "labels": {"app": "y"}}})
    agent.namespace_changed("a", {"metadata": {**ns["metadata"], "annotations": {"policy.sanderling.io/log": "true"}}})
    assert len(flushes) == before + 2


def frame6(src: str, dst: str, sport: int, dport: int) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 2, 1000, 0, 0)
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64, socket.inet_pton(socket.AF_INET6, src),
                      socket.inet_pton(socket.AF_INET6, dst))
    return b"\x0a" * 6 + b"\x0b" * 6 + b"\x86\xdd" + ip6 + tcp


def test_ipv6_only_pods_are_policed_and_their_packets_logged(caplog):
    """Pods whose only address is IPv6 (an IPv6-only node): isolated and allowed by their IPv6
    addresses, and a logged packet of theirs names both pods."""
    realizer = Realizer(1)
    agent = PolicyAgent("n1", realizer, lambda: None)
    agent.start()
    agent.namespace_changed("x", {"metadata": {"name": "x", "labels": {}}})
    for name, ip, app in (("server", "fd00:10:244::a", "server"), ("client", "fd00:10:244::b", "client")):
        agent.pod_changed(f"x/{name}", {"metadata": {"namespace": "x", "name": name, "labels": {"app": app}},
                                        "spec": {"nodeName": "n1"},
                                        "status": {"podIP": ip, "podIPs": [{"ip": ip}]}})
    agent.policy_changed("x/allow-client", {
        "metadata": {"namespace": "x", "name": "allow-client", "annotations": {"policy.sanderling.io/log": "true"}},
        "spec": {"podSelector": {"matchLabels": {"app": "server"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}]}})
    state = realizer.desired_state()
    isolation = [f.text(cookie=0) for f in state["policy-pod/x/server"].flows.values()]
    assert any("ipv6,ipv6_dst=fd00:10:244::a actions=drop" in t for t in isolation), isolation
    allow = logged(state["policy/x/allow-client"].flows.values())
    assert allow
    with caplog.at_level(logging.INFO, logger="sanderling.agent.policy_agent"):
        agent.packet_in(PIPELINE["IngressRule"], cookies.with_generation(allow[0].cookie, 3),
                        frame6("fd00:10:244::b", "fd00:10:244::a", 40000, 80))
    lines = [r.getMessage() for r in caplog.records if "policy-log" in r.getMessage()]
    assert lines == ["policy-log verdict=allow policy=x/allow-client rule=ingress/0/all "
                     "src=x/client(fd00:10:244::b) dst=x/server(fd00:10:244::a) proto=TCP port=80"]
