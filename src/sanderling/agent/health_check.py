"""healthCheckNodePort: what an external load balancer asks to learn whether to send traffic here.

For a LoadBalancer Service with externalTrafficPolicy Local, kube-proxy answers HTTP on the
Service's healthCheckNodePort: 200 when this node has a local endpoint, 503 when it has none,
with a small JSON body. The agent does the same, one listener per port, opened and closed as
Services come and go.
"""

from __future__ import annotations

import json
import logging

from aiohttp import web

log = logging.getLogger(__name__)


class HealthChecks:
    def __init__(self, node: str, host: str = "0.0.0.0") -> None:
        self.node = node
        self.host = host
        self.state: dict[int, tuple[str, int]] = {}  # port -> (service key, local endpoints)
        self._runners: dict[int, web.AppRunner] = {}

    async def update(self, wanted: dict[int, tuple[str, int]]) -> None:
        self.state = dict(wanted)
        for port in sorted(self._runners.keys() - wanted.keys()):
            await self._runners.pop(port).cleanup()
            log.info("health check port %d closed", port)
        for port in sorted(wanted.keys() - self._runners.keys()):
            app = web.Application()
            app.router.add_get("/{tail:.*}", self._handler(port))
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            try:
                await web.TCPSite(runner, self.host, port).start()
            except OSError as exc:
                log.error("health check port %d for service %s: cannot listen: %s", port, wanted[port][0], exc)
                await runner.cleanup()
                continue
            self._runners[port] = runner
            log.info("health check port %d for service %s", port, wanted[port][0])

    def _handler(self, port: int):  # type: ignore[no-untyped-def]
        async def handle(_request: web.Request) -> web.Response:
            key, local = self.state.get(port, ("", 0))
            namespace, _, name = key.partition("/")
            body = {"service": {"namespace": namespace, "name": name}, "localEndpoints": local,
                    "serviceProxyHealthy": True}
            return web.Response(status=200 if local else 503, text=json.dumps(body),
                                content_type="application/json")
        return handle

    async def close(self) -> None:
        await self.update({})
