"""ipBlock minus excepts (issue 20: bounded work per object)."""

from __future__ import annotations

import ipaddress
import time

from hypothesis import given
from hypothesis import strategies as st

from sanderling.compiler.policy import _nets
from sanderling.model.policy import Peer


def covered(nets) -> set[int]:
    return {int(a) for n in nets for a in n}


@given(st.integers(20, 28), st.lists(st.tuples(st.integers(0, 255), st.integers(22, 32)), max_size=8))
def test_exactly_the_block_minus_its_excepts(prefix, holes):
    cidr = ipaddress.IPv4Network(f"10.0.0.0/{prefix}")
    excepts = tuple(ipaddress.IPv4Network(f"10.0.0.{last}/{plen}", strict=False) for last, plen in holes)
    nets = _nets(Peer(cidr=cidr, excepts=excepts))
    want = {int(a) for a in cidr} - {int(a) for e in excepts for a in e}
    assert covered(nets) == want
    assert sum(n.num_addresses for n in nets) == len(want)  # disjoint


def test_two_thousand_excepts_in_well_under_a_second():
    cidr = ipaddress.IPv4Network("10.0.0.0/8")
    excepts = tuple(ipaddress.IPv4Network(f"10.{i // 250}.{i % 250}.0/25") for i in range(2000))
    started = time.process_time()  # this process's CPU: other work on the machine does not count
    nets = _nets(Peer(cidr=cidr, excepts=excepts))
    elapsed = time.process_time() - started
    assert elapsed < 1.0, f"{elapsed:.2f} s of CPU: a quadratic cut of the block?"
    assert sum(n.num_addresses for n in nets) == cidr.num_addresses - 2000 * 128
