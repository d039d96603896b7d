"""`python -m sanderling.lab.apiserver --db PATH --port N [--kubeconfig OUT]`: run the lab API."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from sanderling.lab.apiserver.server import listen, serve
from sanderling.lab.apiserver.store import Store
from sanderling.process import until_signalled


def write_kubeconfig(path: Path, server: str, name: str = "sanderling-lab") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: {name}
  cluster:
    server: {server}
users:
- name: {name}
  user: {{}}
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
    runner = await serve(store, [listen(args.host, args.port)], args.bookmark_interval)
    if args.kubeconfig:
        write_kubeconfig(args.kubeconfig, f"http://{args.host}:{args.port}")
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
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
