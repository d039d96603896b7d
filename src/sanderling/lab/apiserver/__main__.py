"""`python -m sanderling.lab.apiserver --db PATH --port N [--kubeconfig OUT] [--tls-cert C --tls-key K
--ca-cert CA] [--token-file T]`: run the lab API (the lab itself runs it inside its control plane)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from sanderling.lab.apiserver.server import listen, serve
from sanderling.lab.apiserver.store import Store
from sanderling.process import until_signalled


def write_kubeconfig(path: Path, server: str, name: str = "sanderling-lab", ca_cert: Path | None = None,
                     token: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ca = f"\n    certificate-authority: {ca_cert}" if ca_cert else ""
    user = f"{{token: {token}}}" if token else "{}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it may hold a token
    os.close(fd)
    path.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: {name}
  cluster:
    server: {server}{ca}
users:
- name: {name}
  user: {user}
contexts:
- name: {name}
  context:
    cluster: {name}
    user: {name}
    namespace: default
current-context: {name}
""")


async def main_async(args: argparse.Namespace) -> int:
    store = Store(args.db)
    tls = None
    if args.tls_cert:
        import ssl

        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    token = args.token_file.read_text().strip() if args.token_file else None
    runner = await serve(store, [listen(args.host, args.port)], args.bookmark_interval, token=token, ssl_context=tls)
    if args.kubeconfig:
        write_kubeconfig(args.kubeconfig, f"{'https' if tls else 'http'}://{args.host}:{args.port}",
                         ca_cert=args.ca_cert, token=token)
    await until_signalled()
    await runner.cleanup()
    store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sanderling.lab.apiserver")
    p.add_argument("--db", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=6443)
    p.add_argument("--kubeconfig", type=Path)
    p.add_argument("--bookmark-interval", type=float, default=5.0, help="seconds between watch bookmarks")
    p.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (and --tls-key)")
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--ca-cert", type=Path, help="the CA the kubeconfig trusts")
    p.add_argument("--token-file", type=Path, help="every client must send this bearer token")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
