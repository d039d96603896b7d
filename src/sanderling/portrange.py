"""Port ranges as aligned (value, mask) blocks: how OpenFlow and tc u32 both match a range."""

from __future__ import annotations


def port_blocks(first: int, last: int) -> list[tuple[int, int]]:
    """[first, last] as the fewest (value, mask) blocks covering exactly that range."""
    blocks = []
    port = first
    while port <= last:
        size = 1
        while port % (size * 2) == 0 and port + size * 2 - 1 <= last:
            size *= 2
        blocks.append((port, 0xFFFF & ~(size - 1)))
        port += size
    return blocks
