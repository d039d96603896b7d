"""MultiNetworkPolicy on a VLAN provider bridge of a real OVS (dummy datapath): the node's
SecondaryBridges render the classifier, the spoof guard and the policy flows the MultiPolicyAgents
compile, replace-flows installs them, and ofproto/trace gives the verdicts, per network."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from sanderling.agent.multi_policy import MultiPolicyAgents
from sanderling.model.attachments import ANNOTATION_STATUS
from sanderling.ovs import ovsdb
from sanderling.ovs.ovsdb import Ovsdb, PortChange
from sanderling.ovs.runtime import OvsRuntime
from sanderling.ovs.secondary import SecondaryBridges, provider_bridge

PHYSNET = "pnpol"
UPLINK = "pnpol-up"
# name: (network, VLAN, ofport, address, node, labels)
PODS = {
    "server": ("ns1/red", 100, 1, "10.1.0.2", "n1", {"app": "server"}),
    "client": ("ns1/red", 100, 2, "10.1.0.3", "n1", {"app": "client"}),
    "other": ("ns1/red", 100, 3, "10.1.0.4", "n1", {"app": "other"}),
    # the same address on another network (VLAN 200): red's policy must not touch it
    "twin": ("ns1/blue", 200, 4, "10.1.0.2", "n1", {"app": "server"}),
    "peer": ("ns1/blue", 200, 5, "10.1.0.5", "n1", {"app": "client"}),
    "remote-client": ("ns1/red", 100, 0, "10.1.0.20", "n2", {"app": "client"}),
}
UPLINK_OFPORT = 9


def nad(name: str, vlan: int) -> dict:
    return {"metadata": {"namespace": "ns1", "name": name}, "spec": {"config": json.dumps(
        {"cniVersion": "1.0.0", "type": "sanderling", "topology": "vlan", "vlanID": vlan,
         "physicalNetwork": PHYSNET, "subnet": "10.1.0.0/24"})}}


def pod(name: str) -> dict:
    network, _vlan, _ofport, ip, node, labels = PODS[name]
    status = [{"name": "ns1/pods", "ips": ["10.244.1.9"], "default": True},
              {"name": network, "interface": "net1", "ips": [ip], "mac": mac(ip, network), "default": False}]
    return {"metadata": {"namespace": "ns1", "name": name, "labels": labels,
                         "annotations": {ANNOTATION_STATUS: json.dumps(status)}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [{"containerPort": 80}]}]},
            "status": {"podIP": "10.244.1.9"}}


def mac(ip: str, network: str) -> str:
    return ("02:00:" if network == "ns1/red" else "02:01:") + ":".join(f"{int(b):02x}" for b in ip.split("."))


POLICY = {"apiVersion": "k8s.cni.cncf.io/v1beta1", "kind": "MultiNetworkPolicy",
          "metadata": {"namespace": "ns1", "name": "server-from-clients",
                       "annotations": {"k8s.v1.cni.cncf.io/policy-for": "red"}},
          "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                                "ports": [{"protocol": "TCP", "port": 80}]}]}}


@pytest.fixture
def bridges(dummy_ovs: OvsRuntime, dummy_db: Ovsdb) -> Iterator[SecondaryBridges]:
    sb = SecondaryBridges(dummy_db, dummy_ovs, None, {PHYSNET: UPLINK}, datapath="dummy")
    dummy_db.ensure_bridge(provider_bridge(PHYSNET), "dummy")
    dummy_db.add_port(provider_bridge(PHYSNET), UPLINK, ofport_request=UPLINK_OFPORT, iface_type="dummy",
                      external_ids={"sanderling.io/uplink": PHYSNET})
    changes = []
    for name, (network, vlan, ofport, ip, node, _labels) in PODS.items():
        if node != "n1":
            continue
        ext = {ovsdb.EXT_POD_NAMESPACE: "ns1", ovsdb.EXT_POD_NAME: name, ovsdb.EXT_CONTAINER_ID: f"c-{name}",
               ovsdb.EXT_INTERFACE: "net1", ovsdb.EXT_NETWORK: network, ovsdb.EXT_MAC: mac(ip, network),
               ovsdb.EXT_IP: ip}
        changes.append(PortChange(f"pnpol-{name}", external_ids=tuple(sorted(ext.items())), ofport_request=ofport,
                                  iface_type="dummy", tag=vlan))
    dummy_db.apply_port_changes(provider_bridge(PHYSNET), changes)
    sb.sync_flows(provider_bridge(PHYSNET))
    yield sb
    dummy_db.delete_bridge(provider_bridge(PHYSNET))


def verdict(runtime: OvsRuntime, in_port: int, src: str, dst: str, src_mac: str, dport: int, vlan: int = 0) -> str:
    vlan_part = f"dl_vlan={vlan}," if vlan else ""
    out = runtime.appctl("ofproto/trace", *(["--ct-next", "trk,new"] * 3), provider_bridge(PHYSNET),
                         f"in_port={in_port},{vlan_part}dl_src={src_mac},dl_dst=02:ff:00:00:00:01,tcp,"
                         f"nw_src={src},nw_dst={dst},tcp_src=40000,tcp_dst={dport}")
    final = [line for line in out.splitlines() if line.startswith("Datapath actions:")][-1]
    return "drop" if final.endswith(" drop") else "pass"


def local(runtime: OvsRuntime, src: str, dst: str, dport: int) -> str:
    network, _vlan, ofport, ip, _node, _labels = PODS[src]
    return verdict(runtime, ofport, ip, PODS[dst][3], mac(ip, network), dport)


def test_multi_network_policy_isolates_on_its_network_only(bridges: SecondaryBridges, dummy_ovs: OvsRuntime):
    installs = []
    agents = MultiPolicyAgents("n1", lambda: installs.append(1))
    agents.attach(bridges)
    for name, vlan in (("red", 100), ("blue", 200)):
        agents.nad_changed(f"ns1/{name}", nad(name, vlan))
    agents.namespace_changed("ns1", {"metadata": {"name": "ns1"}})
    for name in PODS:
        agents.pod_changed(f"ns1/{name}", pod(name))
    # before any policy: everything passes
    assert local(dummy_ovs, "other", "server", 80) == "pass"
    agents.policy_changed("ns1/server-from-clients", POLICY)
    assert installs, "the policy asked for no install"
    bridges.flush_policy()
    assert bridges.policy_flow_count(provider_bridge(PHYSNET)) > 0
    assert local(dummy_ovs, "client", "server", 80) == "pass"
    assert local(dummy_ovs, "client", "server", 81) == "drop"      # port not allowed
    assert local(dummy_ovs, "other", "server", 80) == "drop"       # not a client
    assert local(dummy_ovs, "server", "other", 80) == "pass"       # egress is not isolated
    # blue: the same address, the same labels, another network: untouched
    assert local(dummy_ovs, "peer", "twin", 81) == "pass"
    # from the VLAN (another node): a client's address on red passes, a stranger's does not
    assert verdict(dummy_ovs, UPLINK_OFPORT, "10.1.0.20", "10.1.0.2", "02:00:0a:01:00:14", 80, 100) == "pass"
    assert verdict(dummy_ovs, UPLINK_OFPORT, "10.1.0.21", "10.1.0.2", "02:00:0a:01:00:15", 80, 100) == "drop"
    # a spoofed source (other claims client's address) is dropped by the guard before policy
    assert verdict(dummy_ovs, 3, "10.1.0.3", "10.1.0.2", mac("10.1.0.4", "ns1/red"), 80) == "drop"
    # the policy's label changes: the client is no longer one
    agents.pod_changed("ns1/client", {**pod("client"), "metadata": {**pod("client")["metadata"],
                                                                     "labels": {"app": "gone"}}})
    bridges.flush_policy()
    assert local(dummy_ovs, "client", "server", 80) == "drop"
    # the policy deleted: open again, and no policy flow is left
    agents.policy_changed("ns1/server-from-clients", None)
    bridges.flush_policy()
    assert local(dummy_ovs, "other", "server", 80) == "pass"
    # the network's static policy flows, IPv4 and IPv6: established, related, an invalid SYN,
    # invalid of an allowed connection, other invalid, commit (tests/unit/test_policy_state.py)
    assert bridges.policy_flow_count(provider_bridge(PHYSNET)) == 12


def test_logged_multi_network_policy_reports_each_connection_with_its_network(
        bridges: SecondaryBridges, dummy_ovs: OvsRuntime, caplog: pytest.LogCaptureFixture):
    """A real packet (netdev-dummy/receive on the client's port) through the logged policy: the
    meter the bridges installed, the packet-in on the listener's connection, one log line that
    names the MultiNetworkPolicy, the rule, both pods and the network."""
    import asyncio
    import logging

    from sanderling.agent.multi_policy import listen_packet_ins

    agents = MultiPolicyAgents("n1", lambda: None)
    agents.attach(bridges)
    for name, vlan in (("red", 100), ("blue", 200)):
        agents.nad_changed(f"ns1/{name}", nad(name, vlan))
    # the namespace logs what is denied to its pods, the policy what it allows
    agents.namespace_changed("ns1", {"metadata": {"name": "ns1", "annotations": {"policy.sanderling.io/log": "true"}}})
    for name in PODS:
        agents.pod_changed(f"ns1/{name}", pod(name))
    logged = json.loads(json.dumps(POLICY))
    logged["metadata"]["annotations"]["policy.sanderling.io/log"] = "true"
    agents.policy_changed("ns1/server-from-clients", logged)
    bridges.flush_policy()
    assert "meter_id=1" in dummy_ovs.ofctl(provider_bridge(PHYSNET), "dump-flows")

    def send(src: str, dport: int) -> None:
        network, _vlan, _ofport, ip, _node, _labels = PODS[src]
        server = PODS["server"]
        dummy_ovs.appctl("netdev-dummy/receive", f"pnpol-{src}",
                         f"eth(src={mac(ip, network)},dst={mac(server[3], network)}),eth_type(0x0800),"
                         f"ipv4(src={ip},dst={server[3]},proto=6,tos=0,ttl=64,frag=no),tcp(src=40000,dst={dport}),"
                         "tcp_flags(syn)")

    async def go() -> None:
        stop = asyncio.Event()
        resynced = asyncio.Event()
        task = asyncio.create_task(listen_packet_ins(dummy_ovs.mgmt_target(provider_bridge(PHYSNET)), agents, stop,
                                                     resynced.set))
        await asyncio.wait_for(resynced.wait(), 10)
        with caplog.at_level(logging.INFO, logger="sanderling.agent.policy_agent"):
            for src, port in (("client", 80), ("other", 80)):
                await asyncio.to_thread(send, src, port)
            deadline = asyncio.get_running_loop().time() + 10
            while sum("policy-log" in r.getMessage() for r in caplog.records) < 2:
                assert asyncio.get_running_loop().time() < deadline, [r.getMessage() for r in caplog.records]
                await asyncio.sleep(0.05)
        stop.set()
        await task

    asyncio.run(go())
    lines = sorted(r.getMessage() for r in caplog.records if "policy-log" in r.getMessage())
    assert lines == [
        "policy-log verdict=allow multinetworkpolicy=ns1/server-from-clients rule=ingress/0/ports "
        "src=ns1/client(10.1.0.3) dst=ns1/server(10.1.0.2) proto=TCP port=80 network=ns1/red",
        "policy-log verdict=deny multinetworkpolicy=- rule=default-deny src=ns1/other(10.1.0.4) "
        "dst=ns1/server(10.1.0.2) proto=TCP port=80 network=ns1/red",
    ], lines
