"""The object metadata of a Kubernetes protobuf request body, for clients that only speak it.

client-go users such as Multus send `application/vnd.kubernetes.protobuf` bodies (they accept
JSON answers). The lab API stores JSON, so it reads what such writes change in practice, the
object's metadata (name, namespace, resourceVersion, labels, annotations: Multus writes the
network-status annotation through pods/status), from the wire format directly: the `k8s\\0`
magic, the runtime.Unknown envelope (field 2: the object), the object's field 1 (ObjectMeta).
A spec or status inside such a body is not decoded: the lab keeps the stored one and says so in
its log; any other protobuf request is refused with 415.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

MAGIC = b"k8s\x00"
CONTENT_TYPE = "application/vnd.kubernetes.protobuf"

_META_STRINGS = {1: "name", 2: "generateName", 3: "namespace", 5: "uid", 6: "resourceVersion"}
_META_MAPS = {11: "labels", 12: "annotations"}


class ProtobufError(ValueError):
    """Not a Kubernetes protobuf object this decoder can read."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ProtobufError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def fields(data: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one message; length-delimited values as bytes."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ProtobufError(f"field {number}: length {length} runs past the message")
            value, pos = data[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ProtobufError(f"field {number}: wire type {wire} is not used by Kubernetes objects")
        yield number, wire, value


def _text(value: Any) -> str:
    try:
        return bytes(value).decode()
    except UnicodeDecodeError:
        raise ProtobufError("a string field is not UTF-8") from None


def object_metadata(body: bytes) -> tuple[dict[str, str], dict[str, Any]]:
    """(typeMeta {apiVersion, kind}, metadata) of a protobuf-encoded Kubernetes object."""
    if not body.startswith(MAGIC):
        raise ProtobufError("missing the k8s\\0 magic prefix")
    type_meta: dict[str, str] = {}
    raw = b""
    for number, wire, value in fields(body[len(MAGIC):]):
        if number == 1 and wire == 2:
            type_meta = {("apiVersion" if n == 1 else "kind"): _text(v) for n, w, v in fields(value)
                         if n in (1, 2) and w == 2}
        elif number == 2 and wire == 2:
            raw = value
    meta: dict[str, Any] = {}
    for number, wire, value in fields(raw):
        if number != 1 or wire != 2:
            continue
        for n, w, v in fields(value):
            if w != 2:
                continue
            if n in _META_STRINGS:
                meta[_META_STRINGS[n]] = _text(v)
            elif n in _META_MAPS:
                entry = {k: _text(x) for k, kw, x in fields(v) if k in (1, 2) and kw == 2}
                meta.setdefault(_META_MAPS[n], {})[entry.get(1, "")] = entry.get(2, "")
    return type_meta, meta
