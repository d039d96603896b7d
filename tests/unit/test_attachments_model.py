"""The networks annotation, NADs and network-status: what is accepted, what is refused and how."""

from __future__ import annotations

import json

import pytest

from sanderling.model.attachments import default_vni, parse_nad, parse_selections, status_entry
from sanderling.model.errors import ModelError

POD = "pod/ns1/p"


def nad(config: object, name: str = "net", namespace: str = "ns1", annotations: dict | None = None) -> dict:
    text = config if isinstance(config, str) else json.dumps(config)
    return {"metadata": {"namespace": namespace, "name": name, "annotations": annotations or {}},
            "spec": {"config": text}}


def test_short_form_names_interfaces_in_order() -> None:
    sels = parse_selections("a, other/b@data0 ,c", "ns1", POD)
    assert [(s.network, s.interface) for s in sels] == [("ns1/a", "net1"), ("other/b", "data0"), ("ns1/c", "net3")]


def test_json_form_with_every_supported_key() -> None:
    sels = parse_selections(json.dumps([{"name": "v100", "interface": "up0", "ips": ["10.10.0.5/24"],
                                         "mac": "02:00:00:00:00:05", "default-route": ["10.10.0.1"],
                                         "cni-args": {"x": 1}}]), "ns1", POD)
    assert sels[0].ips == ("10.10.0.5/24",) and sels[0].mac == "02:00:00:00:00:05"
    assert sels[0].default_route == ("10.10.0.1",) and sels[0].cni_args == (("x", 1),)


@pytest.mark.parametrize("value, problem", [
    ("[{\"name\": \"a\"", "not valid JSON"),
    ("{\"name\": \"a\"}", "must be a list"),
    ("a,,b", "entry 2"),
    ("a/b/c", "entry 1"),
    ("[{\"name\": \"a\", \"bogus\": 1}]", "unsupported key(s) bogus"),
    ("[{\"name\": \"Bad_Name\"}]", "is not a valid object name"),
    ("a@eth0", "used twice"),
    ("a@x1,b@x1", "used twice"),
    ("a@averyveryverylongname", "1 to 15 characters"),
    ("[{\"name\": \"a\", \"mac\": \"01:00:00:00:00:01\"}]", "multicast"),
    ("[{\"name\": \"a\", \"ips\": [\"300.1.1.1\"]}]", "not an IP address"),
    ("[{\"name\": \"a\", \"default-route\": \"10.0.0.1\"}]", "default-route must be a list"),
    ("[{\"name\": \"a\", \"default-route\": [\"10.0.0.1\"]}, {\"name\": \"b\", \"default-route\": [\"10.1.0.1\"]}]",
     "more than one network"),
    ("[3]", "must be an object"),
])
def test_bad_annotations_are_refused_naming_the_problem(value: str, problem: str) -> None:
    with pytest.raises(ModelError) as err:
        parse_selections(value, "ns1", POD)
    assert problem in str(err.value) and POD in str(err.value)


def test_vlan_access_and_trunk_networks() -> None:
    access = parse_nad(nad({"cniVersion": "1.0.0", "type": "sanderling", "topology": "vlan", "vlanID": 100,
                            "subnet": "10.10.0.0/24", "gateway": "10.10.0.1"}))
    assert access.vlan == 100 and access.physical_network == "physnet1" and str(access.subnet) == "10.10.0.0/24"
    assert any(str(e) == "10.10.0.1/32" for e in access.excludes)
    trunk = parse_nad(nad({"type": "sanderling", "topology": "vlan", "trunk": [{"id": 42}, {"minID": 100,
                                                                                          "maxID": 102}]}))
    assert trunk.trunk_ids() == [42, 100, 101, 102]


@pytest.mark.parametrize("config, problem", [
    ("{not json", "not valid JSON"),
    ("", "is empty"),
    ({"type": "sanderling", "topology": "vlan", "vlanID": 4095}, "4095 is not a VLAN ID"),
    ({"type": "sanderling", "topology": "vlan", "vlanID": 0}, "0 is not a VLAN ID"),
    ({"type": "sanderling", "topology": "vlan", "trunk": [{"minID": 10, "maxID": 20}, {"id": 15}]}, "overlap"),
    ({"type": "sanderling", "topology": "vlan", "trunk": [{"minID": 20, "maxID": 10}]}, "above maxID"),
    ({"type": "sanderling", "topology": "vlan", "vlanID": 5, "trunk": [{"id": 6}]}, "exactly one of"),
    ({"type": "sanderling", "topology": "mesh"}, "want one of vlan, layer2"),
    ({"type": "sanderling", "topology": "layer2", "vni": 1 << 24}, "VXLAN network identifier"),
    ({"type": "sanderling", "topology": "layer2", "vlanID": 3}, "only for topology vlan"),
    ({"type": "sanderling", "topology": "layer2", "subnet": "10.0.0.0/33"}, "subnet"),
    ({"type": "sanderling", "topology": "layer2", "subnet": "10.0.0.0/24", "gateway": "10.1.0.1"}, "inside subnet"),
    ({"type": "sanderling", "topology": "layer2", "colour": "red"}, "unknown key(s) colour"),
    ({"type": "sanderling", "topology": "vlan", "trunk": [{"id": 6}], "subnet": "10.0.0.0/24"}, "trunk port"),
    ({"plugins": []}, "non-empty list"),
    ({"type": "../../bin/sh"}, "not a plugin name"),
])
def test_bad_nads_are_refused_naming_the_field(config: object, problem: str) -> None:
    with pytest.raises(ModelError) as err:
        parse_nad(nad(config))
    assert problem in str(err.value) and "NetworkAttachmentDefinition/ns1/net" in str(err.value)


def test_delegates_keep_their_config_and_resource_name() -> None:
    conf = {"cniVersion": "0.4.0", "plugins": [{"type": "macvlan", "master": "eth1"}, {"type": "tuning"}]}
    net = parse_nad(nad(conf, annotations={"k8s.v1.cni.cncf.io/resourceName": "intel.com/sriov"}))
    assert not net.sanderling and [p["type"] for p in net.plugins] == ["macvlan", "tuning"]
    assert net.resource_name == "intel.com/sriov"


def test_layer2_vni_is_stable_and_overridable() -> None:
    a = parse_nad(nad({"type": "sanderling", "topology": "layer2"}, name="a"))
    assert a.vni == default_vni("ns1", "a") == parse_nad(nad({"type": "sanderling", "topology": "layer2"},
                                                             name="a")).vni
    assert parse_nad(nad({"type": "sanderling", "topology": "layer2", "vni": 7})).vni == 7


def test_status_entry_drops_prefixes() -> None:
    assert status_entry("ns1/a", "net1", ["10.0.0.5/24"], "02:00:00:00:00:01", False) == {
        "name": "ns1/a", "interface": "net1", "ips": ["10.0.0.5"], "mac": "02:00:00:00:00:01", "default": False,
        "dns": {}}
