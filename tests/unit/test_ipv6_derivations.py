"""How IPv4-written expectations become IPv6 ones: the netpol runner's placeholders on an
IPv6-only lab, and the lab check's probe plan per family a pair of pods shares."""

from __future__ import annotations

import ipaddress

from sanderling.conformance.netpol import Runner
from sanderling.lab.check import Target, targets


def substituted(ip: str, text: str) -> str:
    runner = Runner.__new__(Runner)  # only its address book is needed
    runner.network = None
    runner.pods = {"y/b": {"ip": ip}}
    return runner.substitute({"cidr": text})["cidr"]


def test_placeholders_keep_their_meaning_over_ipv6():
    assert substituted("10.244.1.7", "${IP:y/b}/32") == "10.244.1.7/32"
    assert substituted("10.244.1.7", "${CIDR4:y/b}") == "0.0.0.0/4"
    # one host stays one host; a block that holds every pod of the lab stays one
    assert substituted("fd00:10:244:1::7", "${IP:y/b}/32") == "fd00:10:244:1::7/128"
    assert substituted("fd00:10:244:1::7", "${IP:y/b}/24") == "fd00:10:244:1::7/120"
    assert substituted("fd00:10:244:1::7", "${IP:y/b}") == "fd00:10:244:1::7"
    block = ipaddress.IPv6Network(substituted("fd00:10:244:1::7", "${CIDR4:y/b}"))
    assert str(block) == "fd00::/8" and ipaddress.IPv6Network("fd00:10:244::/56").subnet_of(block)


def pod(name: str, *ips: str) -> dict:
    return {"metadata": {"namespace": "demo", "name": name},
            "spec": {"nodeName": "node1", "containers": [{"ports": [{"containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips]}}


def test_lab_check_probes_each_family_both_pods_have_once():
    found = targets([pod("v4", "10.244.0.2"), pod("dual", "10.244.0.3", "fd00:10:244::3"),
                     pod("v6", "fd00:10:244::4")], {"node1": "lab-node1"})
    v4, dual, v6 = found
    assert (v6.ip, v6.ip6) == ("", "fd00:10:244::4")  # an IPv6-only pod is not probed twice
    assert v4.families(dual) == ["10.244.0.3"]
    assert dual.families(v6) == ["fd00:10:244::4"]
    assert v4.families(v6) == []
    assert Target("a", "", "s", (), "fd00::1").families(Target("b", "", "s", (), "fd00::2")) == ["fd00::2"]
