"""A tiny TCP/UDP echo server and client, run inside pod namespaces by the demo, lab and tests.

`python -m sanderling.probe serve --name a --tcp 8080 --udp 8081` answers every connection or
datagram with the server's name; `python -m sanderling.probe connect tcp 10.244.1.11 8080`
prints the answer and exits 0, or exits 1 after the timeout. Standard library only.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading


def _bound(kind: int, port: int) -> socket.socket:
    """A socket on `port` of every address, IPv4 and IPv6 (IPv4 alone where IPv6 is off)."""
    try:
        srv = socket.socket(socket.AF_INET6, kind)
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        address: tuple[str, int] = ("::", port)
    except OSError:
        srv = socket.socket(socket.AF_INET, kind)
        address = ("0.0.0.0", port)
    if kind == socket.SOCK_STREAM:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(address)
    return srv


def _tcp_listener(port: int) -> socket.socket:
    srv = _bound(socket.SOCK_STREAM, port)
    srv.listen(128)
    return srv


def _udp_socket(port: int) -> socket.socket:
    return _bound(socket.SOCK_DGRAM, port)


def _peer_text(address: str) -> str:
    """An IPv4 peer of a dual-stack socket is shown as IPv4 (not ::ffff:a.b.c.d)."""
    return address.removeprefix("::ffff:") if "." in address else address


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _serve_tcp(srv: socket.socket, name: bytes) -> None:
    while True:
        conn, _ = srv.accept()
        try:
            conn.settimeout(2)
            conn.sendall(name + b"\n")
        except OSError:
            pass
        finally:
            conn.close()


def _serve_udp(srv: socket.socket, name: bytes) -> None:
    while True:
        data, peer = srv.recvfrom(2048)
        if data.startswith(b"whoami"):  # who the server sees: shows whether the source was translated
            srv.sendto(name + b" " + _peer_text(peer[0]).encode() + b"\n", peer)
        else:
            srv.sendto(name + b"\n", peer)


def serve(name: str, tcp: list[int], udp: list[int]) -> None:
    """Bind every port first, then say "ready": whoever waits for that line may probe at once."""
    tcp_socks = [_tcp_listener(p) for p in tcp]
    udp_socks = [_udp_socket(p) for p in udp]
    threads = [threading.Thread(target=_serve_tcp, args=(s, name.encode()), daemon=True) for s in tcp_socks]
    threads += [threading.Thread(target=_serve_udp, args=(s, name.encode()), daemon=True) for s in udp_socks]
    for t in threads:
        t.start()
    print("ready", flush=True)
    for t in threads:
        t.join()


def _bind_in(sock: socket.socket, ports: tuple[int, int] | None) -> None:
    """Bind to a random free source port in `ports` (the kernel picks when None)."""
    if ports is None:
        return
    import random

    # a chosen port may still have a TIME_WAIT socket of an earlier connection to another peer
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    for _ in range(50):
        try:
            sock.bind(("::" if sock.family == socket.AF_INET6 else "0.0.0.0", random.randint(*ports)))
            return
        except OSError:
            continue
    raise OSError(f"no free source port in {ports[0]}-{ports[1]}")


def connect(proto: str, host: str, port: int, timeout: float, send: bytes = b"probe\n",
            source_ports: tuple[int, int] | None = None) -> str:
    if proto == "tcp":
        with socket.socket(_family(host), socket.SOCK_STREAM) as s:
            _bind_in(s, source_ports)
            s.settimeout(timeout)
            s.connect((host, port))
            return s.recv(256).decode().strip()
    with socket.socket(_family(host), socket.SOCK_DGRAM) as s:
        _bind_in(s, source_ports)
        s.settimeout(timeout)
        s.connect((host, port))  # as DNS clients do: an answer from any other address is dropped
        s.send(send)
        return s.recv(256).decode().strip()


def spread(proto: str, host: str, port: int, count: int, timeout: float) -> dict[str, int]:
    """`count` new connections one after another: how many each server answered (and failures)."""
    import time

    counts: dict[str, int] = {}
    slowest = 0.0
    for _ in range(count):
        started = time.monotonic()
        try:
            name = connect(proto, host, port, timeout)
        except OSError as exc:
            name = f"error: {exc.__class__.__name__}"
        slowest = max(slowest, time.monotonic() - started)
        counts[name] = counts.get(name, 0) + 1
    counts["_slowest_ms"] = int(slowest * 1000)
    return counts


def multi(targets: list[str], timeout: float, source_ports: tuple[int, int] | None = None) -> dict[str, bool]:
    """Every `proto:host:port` (host IPv4 or IPv6) probed at once (threads): {target: answered}."""
    from concurrent.futures import ThreadPoolExecutor

    def one(item: tuple[int, str]) -> bool:
        index, target = item
        proto, _, rest = target.partition(":")
        host, _, port = rest.rpartition(":")  # an IPv6 host holds colons itself
        host = host.strip("[]")
        # with a range: target i uses source port FIRST+i (callers hand out fresh ranges, so a 5-tuple
        # never repeats while conntrack still remembers it)
        ports = (source_ports[0] + index, source_ports[0] + index) if source_ports else None
        try:
            connect(proto, host, int(port), timeout, source_ports=ports)
            return True
        except OSError:
            return False

    with ThreadPoolExecutor(max(1, min(64, len(targets)))) as pool:
        return dict(zip(targets, pool.map(one, enumerate(targets)), strict=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sanderling.probe")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--name", required=True)
    s.add_argument("--tcp", type=int, action="append", default=[])
    s.add_argument("--udp", type=int, action="append", default=[])
    c = sub.add_parser("connect")
    c.add_argument("proto", choices=["tcp", "udp"])
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--timeout", type=float, default=1.0)
    c.add_argument("--whoami", action="store_true", help="udp: the server answers with the source it sees")
    c.add_argument("--source-port", type=int, default=0, help="bind this source port (default: the kernel picks)")
    sp = sub.add_parser("spread", help="N connections; print JSON {server name: count}")
    sp.add_argument("proto", choices=["tcp", "udp"])
    sp.add_argument("host")
    sp.add_argument("port", type=int)
    sp.add_argument("--count", type=int, default=100)
    sp.add_argument("--timeout", type=float, default=1.0)
    mu = sub.add_parser("multi", help="probe proto:host:port targets at once; print JSON {target: true|false}")
    mu.add_argument("targets", nargs="+")
    mu.add_argument("--timeout", type=float, default=1.0)
    mu.add_argument("--source-ports", default="", help="FIRST-LAST: target i binds source port FIRST+i")
    args = p.parse_args(argv)
    if args.cmd == "multi":
        import json

        ports = tuple(int(x) for x in args.source_ports.split("-")) if args.source_ports else None
        print(json.dumps(multi(args.targets, args.timeout, ports)))  # type: ignore[arg-type]
        return 0
    if args.cmd == "spread":
        import json

        print(json.dumps(spread(args.proto, args.host, args.port, args.count, args.timeout)))
        return 0
    if args.cmd == "serve":
        serve(args.name, args.tcp, args.udp)
        return 0
    try:
        send = b"whoami\n" if args.whoami else b"probe\n"
        ports = (args.source_port, args.source_port) if args.source_port else None
        print(connect(args.proto, args.host, args.port, args.timeout, send, ports))
        return 0
    except OSError as exc:
        print(f"{args.proto} {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
