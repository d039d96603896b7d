"""Answers for rejected service connections: a TCP RST or an ICMP port unreachable, built here.

OVS has no reject action, so the Reject table sends the first packet of a connection to a
service without endpoints to the agent (packet-in), and the agent sends the refusal back out of
the port it came from (packet-out): the client sees "connection refused" at once instead of a
timeout, as with kube-proxy's REJECT rules.
"""

from __future__ import annotations

import struct

ETH_IP = 0x0800
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


def reject_reply(frame: bytes) -> bytes | None:
    """The refusal for `frame` (Ethernet + IPv4), or None for what cannot be answered."""
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
        csum = _checksum(dst_ip + src_ip + struct.pack("!BBH", 0, TCP, len(tcp)) + tcp)  # pseudo header
        tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
        return eth + _ip_header(dst_ip, src_ip, TCP, len(tcp)) + tcp
    # UDP, SCTP and the rest: ICMP destination unreachable, port unreachable, quoting the header + 8 bytes
    quoted = ip[:ihl + 8]
    icmp = struct.pack("!BBHI", 3, 3, 0, 0) + quoted
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    return eth + _ip_header(dst_ip, src_ip, 1, len(icmp)) + icmp
