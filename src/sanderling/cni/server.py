"""The agent's CNI endpoint: newline-delimited JSON over a root-only unix socket (0600)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

from sanderling.cni.handler import CniHandler

log = logging.getLogger(__name__)
MAX_REQUEST = 1 << 20
READ_TIMEOUT_S = 10.0  # the shim writes its request at once; a silent client must not hold a connection


class CniServer:
    def __init__(self, handler: CniHandler, path: Path) -> None:
        self.handler = handler
        self.path = path
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_REQUEST)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        log.info("CNI server listening on %s", self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reply: dict[str, Any]
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)
            except TimeoutError:
                log.warning("CNI connection sent no request within %.0f s: closed", READ_TIMEOUT_S)
                return
            except ValueError:  # longer than MAX_REQUEST without a newline
                reply = {"error": {"code": 6, "msg": f"request from the CNI shim longer than {MAX_REQUEST} bytes"}}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
                return
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("request is not a JSON object")
            except ValueError as exc:
                reply = {"error": {"code": 6, "msg": f"cannot decode request from the CNI shim: {exc}"}}
            else:
                reply = await self.handler.handle(request)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            log.warning("CNI connection dropped: %s", exc)
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.path.unlink(missing_ok=True)
