"""The lab API's reading of protobuf object metadata (what client-go users like Multus send)."""

from __future__ import annotations

import pytest

from sanderling.lab.apiserver.protobuf import MAGIC, ProtobufError, object_metadata


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return varint(number << 3 | 2) + varint(len(data)) + data


def entry(key: str, value: str) -> bytes:
    return field(1, key) + field(2, value)


def pod_bytes(annotations: dict[str, str]) -> bytes:
    meta = field(1, "m1") + field(3, "default") + field(6, "42") + field(11, entry("app", "x"))
    meta += b"".join(field(12, entry(k, v)) for k, v in annotations.items())
    meta += varint(7 << 3) + varint(3)  # generation: a varint field the reader skips
    pod = field(1, meta) + field(2, b"\x0a\x00") + field(3, field(1, "Running"))
    return MAGIC + field(1, field(1, "v1") + field(2, "Pod")) + field(2, pod) + field(4, "application/x")


def test_metadata_of_a_pod_status_update() -> None:
    status = '[{"name":"default/vlan100","interface":"net1"}]'
    type_meta, meta = object_metadata(pod_bytes({"k8s.v1.cni.cncf.io/network-status": status, "b": "2"}))
    assert type_meta == {"apiVersion": "v1", "kind": "Pod"}
    assert meta == {"name": "m1", "namespace": "default", "resourceVersion": "42", "labels": {"app": "x"},
                    "annotations": {"k8s.v1.cni.cncf.io/network-status": status, "b": "2"}}


@pytest.mark.parametrize("body, problem", [
    (b"{\"kind\": \"Pod\"}", "magic"),
    (MAGIC + field(2, b"\x0a\x7f"), "runs past"),
    (MAGIC + b"\x0b", "wire type 3"),
    (MAGIC + b"\x08\xff", "truncated varint"),
])
def test_unreadable_bodies_are_refused(body: bytes, problem: str) -> None:
    with pytest.raises(ProtobufError, match=problem):
        object_metadata(body)
