"""Answers for rejected service connections: a TCP RST or an ICMP port unreachable, built here.

OVS has no reject action, so the Reject table sends the first packet of a connection to a
service without endpoints to the agent (packet-in), and the agent sends the refusal back out of
the port it came from (packet-out): the client sees "connection refused" at once instead of a
timeout, as with kube-proxy's REJECT rules.
"""

from __future__ import annotations

import struct

ETH_IP = 0x0800
ETH_IPV6 = 0x86DD
ICMPV6 = 58
TCP, UDP = 6, 17
TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ip_header(src: bytes, dst: bytes, proto: int, payload_len: int) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, 0, 0x4000, 64, proto, 0, src, dst)
    return header[:10] + struct.pack("!H", _checksum(header)) + header[12:]


def _tcp_reset(l4: bytes, pseudo: bytes) -> bytes | None:
    """The RST answering TCP segment `l4` (None for a RST); `pseudo` is the answer's pseudo
    header less its length and protocol (source and destination addresses)."""
    sport, dport, seq, ack = struct.unpack("!HHII", l4[:12])
    flags = l4[13]
    if flags & TCP_RST:
        return None
    data_len = len(l4) - (l4[12] >> 4) * 4
    if flags & TCP_ACK:
        out_seq, out_ack, out_flags = ack, 0, TCP_RST
    else:
        out_seq = 0
        out_ack = (seq + data_len + (1 if flags & TCP_SYN else 0) + (1 if flags & TCP_FIN else 0)) & 0xFFFFFFFF
        out_flags = TCP_RST | TCP_ACK
    tcp = struct.pack("!HHIIBBHHH", dport, sport, out_seq, out_ack, 5 << 4, out_flags, 0, 0, 0)
    length = struct.pack("!BBH", 0, TCP, len(tcp)) if len(pseudo) == 8 else struct.pack("!IxxxB", len(tcp), TCP)
    csum = _checksum(pseudo + length + tcp)
    return tcp[:16] + struct.pack("!H", csum) + tcp[18:]


def _reject_reply6(frame: bytes) -> bytes | None:
    """IPv6: a TCP RST, or ICMPv6 destination unreachable (port unreachable) quoting the packet."""
    if len(frame) < 54:
        return None
    ip = frame[14:]
    next_header, src_ip, dst_ip = ip[6], ip[8:24], ip[24:40]
    payload_len = struct.unpack("!H", ip[4:6])[0]
    l4 = ip[40:40 + payload_len]
    eth = frame[6:12] + frame[0:6] + struct.pack("!H", ETH_IPV6)

    def header(proto: int, length: int) -> bytes:
        return struct.pack("!IHBB", 6 << 28, length, proto, 64) + dst_ip + src_ip

    if next_header == TCP and len(l4) >= 20:
        tcp = _tcp_reset(l4, dst_ip + src_ip)
        return None if tcp is None else eth + header(TCP, len(tcp)) + tcp
    if next_header == ICMPV6:
        return None  # never answer ICMPv6 with ICMPv6
    quoted = ip[:min(len(ip), 1232)]  # as much as fits the minimum IPv6 MTU
    icmp = struct.pack("!BBHI", 1, 4, 0, 0) + quoted
    pseudo = dst_ip + src_ip + struct.pack("!IxxxB", len(icmp), ICMPV6)
    icmp = icmp[:2] + struct.pack("!H", _checksum(pseudo + icmp)) + icmp[4:]
    return eth + header(ICMPV6, len(icmp)) + icmp


def reject_reply(frame: bytes) -> bytes | None:
    """The refusal for `frame` (Ethernet + IPv4 or IPv6), or None for what cannot be answered."""
    if len(frame) >= 14 and struct.unpack("!H", frame[12:14])[0] == ETH_IPV6:
        return _reject_reply6(frame)
    if len(frame) < 34 or struct.unpack("!H", frame[12:14])[0] != ETH_IP:
        return None
    dst_mac, src_mac = frame[0:6], frame[6:12]
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    total_len = struct.unpack("!H", ip[2:4])[0]
    proto = ip[9]
    src_ip, dst_ip = ip[12:16], ip[16:20]
    l4 = ip[ihl:total_len] if total_len <= len(ip) else ip[ihl:]
    eth = src_mac + dst_mac + struct.pack("!H", ETH_IP)
    if proto == TCP and len(l4) >= 20:
        tcp = _tcp_reset(l4, dst_ip + src_ip)
        return None if tcp is None else eth + _ip_header(dst_ip, src_ip, TCP, len(tcp)) + tcp
    # UDP, SCTP and the rest: ICMP destination unreachable, port unreachable, quoting the header + 8 bytes
    quoted = ip[:ihl + 8]
    icmp = struct.pack("!BBHI", 3, 3, 0, 0) + quoted
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    return eth + _ip_header(dst_ip, src_ip, 1, len(icmp)) + icmp
