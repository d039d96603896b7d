"""Fixtures for tests with real network namespaces, veths and a userspace-datapath OVS (root)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from sanderling.lab.node import LocalNode, teardown_prefix

from ..conftest import require_ovs


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("network-namespace tests need root (they create netns, veths and OVS ports)")


@pytest.fixture
def node(tmp_path) -> Iterator[LocalNode]:
    require_root()
    require_ovs()
    teardown_prefix("sltest-n1")
    n = LocalNode("n1", "10.244.5.0/24", tmp_path, prefix="sltest")
    n.start()
    yield n
    n.teardown()
