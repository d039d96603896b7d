"""The agent's CNI endpoint: newline-delimited JSON over a root-only unix socket (0600).

Two kinds of request: the Python shim's, already validated (`command`, `containerID`, ...,
answered with `result` or `error`), and the compiled front's `raw` (the CNI environment and
stdin as the runtime gave them, answered with the plugin's exit code and stdout): the agent
validates those with the shim's own code, so both fronts answer every request alike.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

from sanderling.cni import shim
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
                reply = await self._raw(request["raw"]) if "raw" in request else await self.handler.handle(request)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            log.warning("CNI connection dropped: %s", exc)
        finally:
            writer.close()

    async def _raw(self, raw: Any) -> dict[str, Any]:
        """A request of the compiled front: what the Python shim would have printed, and its exit code."""
        version = "1.1.0"
        try:
            if not isinstance(raw, dict) or not isinstance(raw.get("env"), dict) \
                    or not isinstance(raw.get("stdin"), str) \
                    or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw["env"].items()):
                raise shim.CniError(shim.E_DECODE, "malformed request from the compiled CNI front: "
                                                   "raw.env must map strings to strings, raw.stdin be a string")
            command, conf = shim.validate(raw["env"], raw["stdin"])
            version = shim.config_version(conf, version)
            code, out = shim.version_output(version) if command == "VERSION" else \
                shim.reply_output(await self.handler.handle(shim.request_for(command, raw["env"], conf)))
        except Exception as exc:  # the spec's error object, as the shim prints it
            code, out = shim.error_output(exc, version)
        return {"exit": code, "stdout": out}

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.path.unlink(missing_ok=True)
