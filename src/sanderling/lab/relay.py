"""A TCP relay from the host's loopback into a lab namespace.

`python -m sanderling.lab.relay --listen 127.0.0.1:PORT --netns NS --to IP:PORT` binds the
listening socket in the host namespace, then enters NS, so every connection it accepts is carried
to IP:PORT inside the lab. Why: kube-apiserver serves only in the control-plane namespace, and the
CLI, kubectl and the tests on the host reach it through this, as they reach the embedded server
(which binds both sockets itself). Prints `ready` once it accepts.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from sanderling.netlink import netns
from sanderling.process import until_signalled


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def _relay(host: str, port: int, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
    try:
        server_r, server_w = await asyncio.open_connection(host, port)
    except OSError:
        client_w.close()
        return
    await asyncio.gather(_pipe(client_r, server_w), _pipe(server_r, client_w))


async def main_async(args: argparse.Namespace) -> int:
    import socket

    host, _, port = args.listen.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(128)
    netns.enter(args.netns)
    to_host, _, to_port = args.to.rpartition(":")
    server = await asyncio.start_server(lambda r, w: _relay(to_host, int(to_port), r, w), sock=sock)
    async with server:  # until_signalled prints `ready`
        await until_signalled()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sanderling.lab.relay")
    p.add_argument("--listen", required=True, help="HOST:PORT in the starting namespace")
    p.add_argument("--netns", required=True)
    p.add_argument("--to", required=True, help="IP:PORT inside --netns")
    return asyncio.run(main_async(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
