"""A few rtnetlink requests, packed by hand, for the CNI ADD's hot path.

pyroute2 costs milliseconds of Python per request (and more to open a handle); under twenty
concurrent ADDs that CPU time, all under the GIL, was most of the plumbing step. A fresh pod
needs five requests, each a few dozen bytes: the veth pair created with its peer already in
the pod's namespace, named, addressed (MAC, MTU) and up (one request), then in the pod's
namespace the loopback up, the address, and the routes. Anything unusual (a pod plumbed
before, an error to converge from) goes back to the pyroute2 path in `veth`.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sanderling.netlink.netns import inside

NETLINK_ROUTE = 0
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_GETLINK, RTM_NEWADDR, RTM_NEWROUTE = 16, 18, 20, 24
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_NET_NS_FD = 1, 3, 4, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFLA_AF_SPEC, AF_INET6, IFLA_INET6_ADDR_GEN_MODE, IN6_ADDR_GEN_MODE_NONE = 26, 10, 8, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFA_F_NODAD = 0x02  # an IPv6 address usable at once: the node's IPAM already made it unique
RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 4, 5
IFF_UP = 0x1
RT_TABLE_MAIN, RTPROT_BOOT, RTN_UNICAST = 254, 3, 1
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253

_HDR = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")
_IFADDR = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_seq = iter(range(1, 1 << 31))
_seq_lock = threading.Lock()


class RtnlError(OSError):
    """The kernel refused a request; errno is the kernel's."""


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _name(kind: int, name: str) -> bytes:
    return _attr(kind, name.encode() + b"\0")


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("=I", value))


def _mac(kind: int, mac: str) -> bytes:
    return _attr(kind, bytes.fromhex(mac.replace(":", "")))


def random_mac() -> str:
    """A locally administered unicast MAC (what the kernel would pick for a veth)."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


class Rtnl:
    """One NETLINK_ROUTE socket, bound to the namespace it was opened in."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self.sock.bind((0, 0))

    def close(self) -> None:
        self.sock.close()

    def request(self, msg_type: int, flags: int, body: bytes) -> list[tuple[int, bytes]]:
        """Send one request with an ACK asked for; (type, payload) of every reply message before it."""
        with _seq_lock:
            seq = next(_seq)
        self.sock.send(_HDR.pack(_HDR.size + len(body), msg_type, flags | NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body)
        replies: list[tuple[int, bytes]] = []
        while True:
            data = self.sock.recv(65536)
            offset = 0
            while offset + _HDR.size <= len(data):
                length, kind, _flags, rseq, _pid = _HDR.unpack_from(data, offset)
                payload = data[offset + _HDR.size: offset + length]
                offset += (length + 3) & ~3
                if rseq != seq:
                    continue
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise RtnlError(code, os.strerror(code))
                    return replies
                if kind == NLMSG_DONE:
                    return replies
                replies.append((kind, payload))

    def link_index(self, ifname: str) -> int | None:
        """The interface's index, None when there is no such interface."""
        try:
            replies = self.request(RTM_GETLINK, 0, _IFINFO.pack(0, 0, 0, 0, 0) + _name(IFLA_IFNAME, ifname))
        except RtnlError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        for kind, payload in replies:
            if kind == RTM_NEWLINK:
                return int(_IFINFO.unpack_from(payload)[2])
        return None

    def set_up(self, ifname: str, mac: str = "") -> None:
        """Bring the interface up, with this MAC first when given (one request: the kernel sets the
        address before the flags, so an IPv6 link-local address comes from the new MAC)."""
        self.request(RTM_NEWLINK, 0, _IFINFO.pack(0, 0, 0, IFF_UP, IFF_UP) + _name(IFLA_IFNAME, ifname)
                     + (_mac(IFLA_ADDRESS, mac) if mac else b""))

    def add_veth(self, host: str, host_mac: str, peer: str, peer_mac: str, peer_netns_fd: int, mtu: int) -> None:
        """Both ends: `host` here, `peer` already in the pod's namespace (still down: the kernel
        refuses to bring a peer up in the request that creates it, ENOTCONN). The host end comes
        up without IPv6 addresses: OVS reads it below IP, and a link-local address on it would
        only have the node's kernel send duplicate-address probes, MLD reports and router
        solicitations out of it, straight into the pod."""
        peer_info = (_IFINFO.pack(0, 0, 0, 0, 0) + _name(IFLA_IFNAME, peer)
                     + (_mac(IFLA_ADDRESS, peer_mac) if peer_mac else b"")
                     + _u32(IFLA_MTU, mtu) + _u32(IFLA_NET_NS_FD, peer_netns_fd))
        linkinfo = _attr(IFLA_LINKINFO, _name(IFLA_INFO_KIND, "veth")
                         + _attr(IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer_info)))
        body = (_IFINFO.pack(0, 0, 0, 0, 0) + _name(IFLA_IFNAME, host) + _mac(IFLA_ADDRESS, host_mac)
                + _u32(IFLA_MTU, mtu) + linkinfo)
        self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)
        # (the address generation mode cannot be given with the creation: EAFNOSUPPORT)
        no_ipv6 = _attr(IFLA_AF_SPEC, _attr(AF_INET6, _attr(IFLA_INET6_ADDR_GEN_MODE, bytes([IN6_ADDR_GEN_MODE_NONE]))))
        self.request(RTM_NEWLINK, 0, _IFINFO.pack(0, 0, 0, IFF_UP, IFF_UP) + _name(IFLA_IFNAME, host) + no_ipv6)

    def add_address(self, index: int, cidr: str) -> None:
        iface = ipaddress.ip_interface(cidr)
        packed = iface.ip.packed
        if iface.version == 4:
            head = _IFADDR.pack(socket.AF_INET, iface.network.prefixlen, 0, RT_SCOPE_UNIVERSE, index)
        else:
            head = _IFADDR.pack(socket.AF_INET6, iface.network.prefixlen, IFA_F_NODAD, RT_SCOPE_UNIVERSE, index)
        body = head + _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed)
        try:
            self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body)
        except RtnlError as exc:
            if exc.errno != errno.EEXIST:
                raise

    def replace_route(self, dst: str, index: int, gateway: str | None = None) -> None:
        """dst (a CIDR) through `index`, via `gateway` when given, on-link otherwise."""
        net = ipaddress.ip_network(dst)
        family = socket.AF_INET if net.version == 4 else socket.AF_INET6
        scope = RT_SCOPE_UNIVERSE if gateway or net.version == 6 else RT_SCOPE_LINK
        body = _RTMSG.pack(family, net.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope, RTN_UNICAST, 0)
        if net.prefixlen:
            body += _attr(RTA_DST, net.network_address.packed)
        if gateway:
            body += _attr(RTA_GATEWAY, ipaddress.ip_address(gateway).packed)
        body += _u32(RTA_OIF, index)
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body)


@contextmanager
def rtnl(ns: str | None = None) -> Iterator[Rtnl]:
    """A socket in namespace `ns` (a name or a path; None: this thread's own)."""
    if ns is None:
        handle = Rtnl()
    else:
        with inside(ns):
            handle = Rtnl()
    try:
        yield handle
    finally:
        handle.close()
