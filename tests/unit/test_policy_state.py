"""The policy verdicts by connection state, and where allowed connections are committed: golden
flows, printed with table names."""

from __future__ import annotations

import re

from sanderling.compiler.policy import static_flows
from sanderling.openflow import ir
from sanderling.openflow.pipeline import PIPELINE, SECONDARY_PIPELINE


def named(flow: ir.Flow, pipeline=PIPELINE) -> str:
    text = re.sub(r"goto_table:(\d+)", lambda m: f"goto:{pipeline.name_of(int(m.group(1)))}", flow.text(cookie=0))
    text = re.sub(r"([,(])table=(\d+)", lambda m: f"{m.group(1)}table={pipeline.name_of(int(m.group(2)))}", text)
    return re.sub(r"^table=(\d+)", lambda m: pipeline.name_of(int(m.group(1))), text)


def test_policy_state_and_commit_golden():
    assert [named(f) for f in static_flows() if ",ipv6," not in f.text() and "tcp6" not in f.text()] == [
        "PolicyState,priority=200,ip,ct_state=-new+est+trk actions=goto:ServiceMasq",
        "PolicyState,priority=200,ip,ct_state=+rel+trk actions=goto:ServiceMasq",
        # a SYN conntrack calls invalid: never passed on an older connection's verdict
        "PolicyState,priority=196,tcp,ct_state=+inv+trk,tcp_flags=+syn-ack actions=drop",
        # other invalid segments of a connection policy allowed pass (OVS's window after a
        # TIME_WAIT's challenge ACK); any other invalid packet is dropped
        "PolicyState,priority=195,ip,ct_state=+inv+trk,ct_mark=0x4/0x4 actions=goto:ServiceMasq",
        "PolicyState,priority=190,ip,ct_state=+inv+trk actions=drop",
        "PolicyCommit,priority=200,ip,ct_state=+new+trk actions=ct(commit,zone=65522,table=ServiceMasq,"
        "exec(load:0x1->NXM_NX_CT_MARK[2]))",
        # requests of service connections this node translated: their own zone
        "PolicyCommit,priority=201,ip,reg0=0x80/0x80,ct_state=+new+trk actions=ct(commit,zone=65524,table=ServiceMasq,"
        "exec(load:0x1->NXM_NX_CT_MARK[2]))",
    ]
    assert len(static_flows()) == 14  # the same for IPv6


def test_a_secondary_network_has_no_service_policy_zone():
    """Secondary networks translate their services in a zone of their own before policy: nothing
    there is marked TRANSLATED, so no second commit flow."""
    flows = [named(f, SECONDARY_PIPELINE) for f in static_flows(SECONDARY_PIPELINE, 0x8001, None)]
    assert [f for f in flows if f.startswith("PolicyCommit")] == [
        "PolicyCommit,priority=200,ip,ct_state=+new+trk actions=ct(commit,zone=32769,table=ServiceUnDNAT,"
        "exec(load:0x1->NXM_NX_CT_MARK[2]))",
        "PolicyCommit,priority=200,ipv6,ct_state=+new+trk actions=ct(commit,zone=32769,table=ServiceUnDNAT,"
        "exec(load:0x1->NXM_NX_CT_MARK[2]))"]
