"""Services and endpoints as the proxy sees them, and the compiler's choices on top."""

from __future__ import annotations

import ipaddress

import pytest

from sanderling.compiler import services as compiler
from sanderling.model.errors import ModelError
from sanderling.model.services import ServicePort, endpoints_by_port, endpoints_from, service_from, usable

SLICE = {"addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
         "endpoints": [
             {"addresses": ["10.0.0.1"], "conditions": {"ready": True}, "nodeName": "n1"},
             {"addresses": ["10.0.0.2"], "conditions": {"ready": False, "serving": True, "terminating": True},
              "nodeName": "n2"},
             {"addresses": ["10.0.0.3"], "conditions": {"ready": False, "serving": False}, "nodeName": "n1"}]}
HTTP = ServicePort("http", "TCP", 80)
CFG = compiler.ProxyConfig("n1", (ipaddress.IPv4Address("192.168.0.2"),), (ipaddress.IPv4Address("192.168.0.2"),),
                           ipaddress.IPv4Network("10.0.0.0/8"), ipaddress.IPv4Address("192.168.0.2"))


def test_ready_first_then_serving_terminating_fallback():
    eps = endpoints_from([SLICE], HTTP)
    assert [str(e.ip) for e in usable(eps)] == ["10.0.0.1"]
    draining = [e for e in eps if str(e.ip) != "10.0.0.1"]
    assert [str(e.ip) for e in usable(draining)] == ["10.0.0.2"]
    assert endpoints_from([SLICE], ServicePort("http", "UDP", 80)) == ()  # ports match name and protocol


def test_service_conversion_and_errors():
    svc = service_from({"metadata": {"namespace": "a", "name": "s"},
                        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.5", "externalTrafficPolicy": "Local",
                                 "ports": [{"port": 80, "nodePort": 30001}]},
                        "status": {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"},
                                                                {"ip": "5.6.7.8", "ipMode": "Proxy"}]}}})
    assert svc is not None and svc.external_local and [str(i) for i in svc.lb_ips] == ["1.2.3.4"]
    assert service_from({"metadata": {}, "spec": {"type": "ExternalName"}}) is None
    with pytest.raises(ModelError, match="spec.ports\\[0\\].protocol"):
        service_from({"metadata": {"namespace": "a", "name": "s"}, "spec": {"ports": [{"port": 1, "protocol": "X"}]}})


def test_flows_are_deterministic_and_only_go_forward():
    svc = service_from({"metadata": {"namespace": "a", "name": "s"},
                        "spec": {"clusterIP": "10.96.0.5", "ports": [{"name": "http", "port": 80}]}})
    assert svc is not None
    ids: dict[str, int] = {}
    eps = {HTTP: endpoints_from([SLICE], HTTP)}
    first = compiler.service_flows(CFG, svc, eps, lambda k: ids.setdefault(k, len(ids) + 1))
    second = compiler.service_flows(CFG, svc, eps, lambda k: ids.setdefault(k, len(ids) + 1))
    assert first == second
    from sanderling.openflow.pipeline import PIPELINE

    for flow in first[0] + compiler.static_flows(CFG):
        PIPELINE.check_flow(flow)


def test_affinity_longer_than_openflow_holds_is_clamped_and_encodes():
    """timeoutSeconds 86400 (the API's maximum) is learned for 65535 idle seconds, and every flow of
    the service encodes (it once raised struct.error and stalled every agent)."""
    from sanderling.openflow import encoder, ir

    svc = service_from({"metadata": {"namespace": "a", "name": "s"},
                        "spec": {"clusterIP": "10.96.0.5", "sessionAffinity": "ClientIP",
                                 "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86400}},
                                 "ports": [{"name": "http", "port": 80}]}})
    assert svc is not None and svc.affinity_timeout == 86400
    ids: dict[str, int] = {}
    flows, groups = compiler.service_flows(CFG, svc, {HTTP: endpoints_from([SLICE], HTTP)},
                                           lambda k: ids.setdefault(k, len(ids) + 1))
    learns = [a for f in flows for a in f.actions if isinstance(a, ir.Learn)]
    assert learns and {a.idle_timeout for a in learns} == {compiler.MAX_AFFINITY_TIMEOUT}
    for i, flow in enumerate(flows):
        encoder.flow_mod(flow, i, flow.cookie)
    for group in groups:
        encoder.group_mod(group, 1)


def test_every_packet_in_of_the_service_pipeline_is_metered():
    """Refusals go to the agent as packet-ins: all of them through the reject meter, so a pod
    flooding an unserved port cannot saturate the agent (issue 20)."""
    from sanderling.openflow import ir

    svc = service_from({"metadata": {"namespace": "a", "name": "s"},
                        "spec": {"clusterIP": "10.96.0.5", "ports": [{"name": "http", "port": 80}]}})
    assert svc is not None
    flows, _ = compiler.service_flows(CFG, svc, {}, lambda k: 1)
    controllers = [a for f in [*compiler.static_flows(CFG), *flows] for a in f.actions if isinstance(a, ir.Controller)]
    assert controllers and all(a.meter_id == compiler.REJECT_METER for a in controllers)


def test_external_ips_only_from_the_allow_list():
    """externalIPs are off unless allowed (CVE-2020-8554): without --external-ip-cidrs a Service's
    externalIP gets no flow and one Event; inside the allow-list it is served."""
    import dataclasses

    from sanderling.agent.service_proxy import ServiceProxy
    from sanderling.openflow.realizer import Realizer

    raw = {"metadata": {"namespace": "a", "name": "s"},
           "spec": {"clusterIP": "10.96.0.5", "externalIPs": ["203.0.113.7"], "ports": [{"name": "http", "port": 80}]}}

    def flows_for(cfg):
        realizer, reports = Realizer(1), []
        proxy = ServiceProxy(cfg, realizer, lambda: None, lambda *a: reports.append(a))
        proxy.service_changed("a/s", raw)
        proxy.service_changed("a/s", raw)  # a relist: reported once
        texts = [f.text() for f in realizer.desired_state()["service/a/s"].flows.values()]
        return [t for t in texts if "203.0.113.7" in t], reports

    refused, reports = flows_for(CFG)
    assert refused == [] and len(reports) == 1 and "203.0.113.7" in reports[0][2]
    allowed, reports = flows_for(dataclasses.replace(
        CFG, external_ip_cidrs=(ipaddress.IPv4Network("203.0.113.0/24"),)))
    assert allowed and reports == []


def test_a_service_with_many_ports_compiles_in_linear_time_up_to_the_cap():
    """Issue 20: endpoints are matched to ports through one index per slice (was ports x slice
    ports); past MAX_SERVICE_PORTS the Service is refused with a clear error."""
    import time

    from sanderling.model.services import MAX_SERVICE_PORTS, endpoints_by_port

    n = MAX_SERVICE_PORTS
    raw = {"metadata": {"namespace": "a", "name": "s"},
           "spec": {"clusterIP": "10.96.0.5", "ports": [{"name": f"p{i}", "port": i + 1} for i in range(n)]}}
    sl = {"addressType": "IPv4", "ports": [{"name": f"p{i}", "port": i + 1, "protocol": "TCP"} for i in range(n)],
          "endpoints": [{"addresses": [f"10.244.1.{j}"], "nodeName": "n2"} for j in range(1, 11)]}
    svc = service_from(raw)
    assert svc is not None
    started = time.perf_counter()
    eps = endpoints_by_port([sl], svc.ports)
    flows, groups = compiler.service_flows(CFG, svc, eps, lambda k, ids={}: ids.setdefault(k, len(ids) + 1))
    assert time.perf_counter() - started < 2.0  # about 0.3 s here; quadratic matching took seconds
    assert len(groups) == n and all(len(e) == 10 for e in eps.values())
    assert eps[svc.ports[7]][0].port == 8
    raw["spec"]["ports"].append({"name": "one-too-many", "port": 65000})
    with pytest.raises(ModelError, match=f"at most {n} per Service"):
        service_from(raw)


def test_lb_source_ranges_let_the_lb_address_itself_in():
    """As kube-proxy: a request from the load-balancer IP itself (a node holding it loops it back)
    is accepted even when loadBalancerSourceRanges leave it out; other sources outside are dropped."""
    svc = service_from({"metadata": {"namespace": "a", "name": "lb"},
                        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.5",
                                 "loadBalancerSourceRanges": ["198.51.100.0/24"],
                                 "ports": [{"name": "http", "port": 80, "nodePort": 30001}]},
                        "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}}})
    assert svc is not None
    flows, _ = compiler.service_flows(CFG, svc, {svc.ports[0]: endpoints_from([SLICE], HTTP)},
                                      lambda k, ids={}: ids.setdefault(k, len(ids) + 1))
    to_lb = [f.text() for f in flows if "nw_dst=203.0.113.10" in f.text() and "ct_state=+new" in f.text()]
    accepted = [t for t in to_lb if f"priority={compiler.PRIO_RANGE}," in t]
    assert any("nw_src=198.51.100.0/24" in t for t in accepted)
    assert any("nw_src=203.0.113.10," in t for t in accepted), accepted
    assert any(f"priority={compiler.PRIO_RANGE_DROP}," in t for t in to_lb)  # everyone else


def test_reject_answers_ipv6_with_a_reset_or_a_port_unreachable():
    """The agent's refusal of an IPv6 connection: a TCP RST (ACK of the SYN) or ICMPv6 destination
    unreachable / port unreachable quoting the packet, checksums right (summing to zero)."""
    import socket
    import struct

    from sanderling.agent.reject import _checksum, reject_reply

    src, dst = socket.inet_pton(socket.AF_INET6, "fd00::5"), socket.inet_pton(socket.AF_INET6, "fd00:96::a")

    def frame(proto: int, l4: bytes) -> bytes:
        return (b"\x02" * 6 + b"\x04" * 6 + b"\x86\xdd" + struct.pack("!IHBB", 6 << 28, len(l4), proto, 64) + src
                + dst + l4)

    syn = struct.pack("!HHIIBBHHH", 40000, 80, 1000, 0, 5 << 4, 0x02, 65535, 0, 0)
    rst = reject_reply(frame(6, syn))
    assert rst is not None and rst[:12] == b"\x04" * 6 + b"\x02" * 6
    ip, tcp = rst[14:54], rst[54:]
    assert ip[6] == 6 and ip[8:24] == dst and ip[24:40] == src
    sport, dport, _seq, ack, _off, flags = struct.unpack("!HHIIBB", tcp[:14])
    assert (sport, dport, ack, flags) == (80, 40000, 1001, 0x14)  # RST+ACK of the SYN
    assert _checksum(dst + src + struct.pack("!IxxxB", len(tcp), 6) + tcp) == 0
    udp = struct.pack("!HHHH", 40000, 53, 12, 0) + b"abcd"
    unreachable = reject_reply(frame(17, udp))
    assert unreachable is not None
    icmp = unreachable[54:]
    assert unreachable[14 + 6] == 58 and icmp[:2] == b"\x01\x04" and icmp[8:] == frame(17, udp)[14:]
    assert _checksum(dst + src + struct.pack("!IxxxB", len(icmp), 58) + icmp) == 0
    assert reject_reply(frame(58, b"\x80\x00\x00\x00")) is None  # no ICMPv6 error about ICMPv6


def test_an_ipv6_only_node_serves_ipv6_services_with_affinity_and_nothing_ipv4():
    """No IPv4 masquerade address (an IPv6-only node): no IPv4 static flow, a single-stack IPv4
    Service compiles to nothing, an IPv6 one with ClientIP affinity names its endpoints in the
    four ENDPOINT_IP6 registers (what the metrics read back as "[addr]:port")."""
    cfg = compiler.ProxyConfig("n1", (), (), ipaddress.IPv4Network("10.0.0.0/8"), None,
                               masq_ip6=ipaddress.IPv6Address("fd00:10:244::fffe"),
                               local_cidr6=ipaddress.IPv6Network("fd00:10:244::/56"))
    static = [f.text(cookie=0) for f in compiler.static_flows(cfg)]
    assert not [t for t in static if "nw_" in t or "arp" in t], static
    ids: dict[str, int] = {}
    v4 = service_from({"metadata": {"namespace": "a", "name": "v4"},
                       "spec": {"clusterIP": "10.96.0.5", "ports": [{"name": "http", "port": 80}]}})
    assert v4 is not None
    assert compiler.service_flows(cfg, v4, {HTTP: endpoints_from([SLICE], HTTP)},
                                  lambda k: ids.setdefault(k, len(ids) + 1)) == ([], [])
    v6 = service_from({"metadata": {"namespace": "a", "name": "v6"},
                       "spec": {"clusterIP": "fd00:10:96::5", "clusterIPs": ["fd00:10:96::5"], "ipFamilies": ["IPv6"],
                                "sessionAffinity": "ClientIP", "ports": [{"name": "http", "port": 80}]}})
    assert v6 is not None
    slice6 = {"addressType": "IPv6", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
              "endpoints": [{"addresses": [f"fd00:10:244:1::{i}"], "conditions": {"ready": True}, "nodeName": "n2"}
                            for i in (5, 6)]}
    flows, groups = compiler.service_flows(cfg, v6, endpoints_by_port([slice6], [HTTP], family=6),
                                           lambda k: ids.setdefault(k, len(ids) + 1))
    assert [compiler.bucket_endpoints(g) for g in groups] == [["[fd00:10:244:1::5]:8080", "[fd00:10:244:1::6]:8080"]]
    texts = [f.text(cookie=0) for f in flows]
    assert any("learn(" in t and "NXM_NX_IPV6_SRC[]" in t and "reg8=0xfd000010,reg9=0x2440001,reg10=0x0,reg11=0x5" in t
               for t in texts), texts
