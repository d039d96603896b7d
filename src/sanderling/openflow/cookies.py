"""Flow cookies: generation | category | object id.

Bits 63..48 hold the agent generation (bumped at every agent start, never 0), 47..40 the
category (which compiler module owns the flow) and 39..0 a stable id of the owning object.
One cookie/mask delete removes a single object's flows, or everything a previous agent
generation left behind.
"""

from __future__ import annotations

import hashlib
from enum import IntEnum

GENERATION_SHIFT = 48
CATEGORY_SHIFT = 40
GENERATION_MASK = 0xFFFF << GENERATION_SHIFT
CATEGORY_MASK = 0xFF << CATEGORY_SHIFT
OBJECT_MASK = (1 << CATEGORY_SHIFT) - 1


class Category(IntEnum):
    """Who owns a flow; new compiler modules add a member here."""

    PIPELINE = 1  # table-miss and other static flows
    POD = 2
    NODE = 3
    SERVICE = 4
    POLICY = 5
    BENCH = 15


def object_id(key: str) -> int:
    """A stable 40-bit id for an object key (e.g. 'pod/default/web-1')."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=5).digest(), "big")


def cookie(category: Category, key: str) -> int:
    return (int(category) << CATEGORY_SHIFT) | object_id(key)


def with_generation(cookie_value: int, generation: int) -> int:
    return (cookie_value & ~GENERATION_MASK) | ((generation & 0xFFFF) << GENERATION_SHIFT)


def generation_of(cookie_value: int) -> int:
    return (cookie_value >> GENERATION_SHIFT) & 0xFFFF


def category_of(cookie_value: int) -> int:
    return (cookie_value >> CATEGORY_SHIFT) & 0xFF


def next_generation(previous: int) -> int:
    """Generations run 1..65535 and wrap, skipping 0 (0 marks flows not written by an agent)."""
    nxt = (previous + 1) & 0xFFFF
    return nxt or 1
