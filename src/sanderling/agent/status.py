"""The agent's own HTTP endpoint: liveness, readiness, and what it has installed per object.

- `/healthz`: 200 while the sync loop holds its OpenFlow session, else 503 (a probe restarts an
  agent that cannot reach its switch);
- `/readyz`: 200 once the node's flows are complete: OpenFlow connected, every informer listed
  and watching (a broken watch makes the agent unready until it watches again: its flows stand
  but may be behind the cluster), the previous generation swept, nothing pending; else 503.
  The JSON body says which part is missing, so `kubectl describe` of a failing probe reads like
  a diagnosis;
- `/metrics`: Prometheus metrics (agent/metrics.py);
- `/owners`: cookie -> the pod, Service, NetworkPolicy rule or isolated pod owning those flows
  (agent/owners.py);
- `/trace?pod=NS/NAME&src=IP&dst=IP&proto=tcp&port=N` (or `arrival=underlay` instead of `pod`):
  this node's half of a trace (agent/trace.py), asked by `sanderling trace` (tracer.py);
- `/objects?prefix=service/`: each desired object's state (installed, pending, refused with the
  switch's reason) and its flow, group and bucket counts. Tests wait on this instead of sleeping,
  and an operator can see what a Service or policy turned into on this node.

Plain HTTP on an address of the agent's choosing (default loopback of the node's namespace).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from sanderling.agent.sync import SyncLoop

log = logging.getLogger(__name__)
DEFAULT_ADDRESS = "127.0.0.1:9465"


class AgentStatus:
    def __init__(self, sync: SyncLoop, informers: Callable[[], list[Any]], metrics: Any = None,
                 tracer: Any = None) -> None:
        self.tracer = tracer  # agent.trace.NodeTracer, or None
        self.sync = sync
        self.informers = informers  # every informer the node's flows depend on (may grow at start)
        self.metrics = metrics  # agent.metrics.AgentMetrics, or None

    def readiness(self) -> dict[str, Any]:
        realizer = self.sync.realizer
        listed = {i.name: i.synced.is_set() for i in self.informers()}
        pending = len(realizer.pending)
        body = {"node": self.sync.name, "generation": realizer.generation,
                "openflow": self.sync.conn is not None, "informers": listed,
                "swept": self.sync.swept, "pending": pending, "refused": dict(sorted(realizer.errors.items()))}
        missing = []
        if not body["openflow"]:
            missing.append(f"no OpenFlow session to {self.sync.target}")
        unlisted = sorted(name for name, ok in listed.items() if not ok)
        if unlisted:
            missing.append("informers not listed yet: " + ", ".join(unlisted))
        now = time.monotonic()
        lost = {i.name: now - i.lost_at for i in self.informers()
                if i.synced.is_set() and getattr(i, "lost_at", None) is not None}
        body["watching"] = {i.name: bool(getattr(i, "watching", False)) for i in self.informers()}
        if lost:  # the flows stand, but the cluster may have moved on since: not ready until caught up
            missing.append("informers not watching the API: " + ", ".join(
                f"{name} (for {seconds:.0f} s)" for name, seconds in sorted(lost.items())))
        if not self.sync.swept:
            missing.append("desired state not complete (previous generation not swept yet)")
        if pending:
            missing.append(f"{pending} object(s) not sent yet")
        body["ready"] = not missing
        body["missing"] = missing
        return body

    def objects(self, prefix: str) -> dict[str, Any]:
        realizer = self.sync.realizer
        desired, installed, pending = realizer.desired_state(), realizer.installed_state(), realizer.pending
        out = {}
        known = desired.keys() | installed.keys() | realizer.errors.keys()
        for key in sorted(k for k in known if k.startswith(prefix)):
            state = installed.get(key)
            out[key] = {"installed": key in installed and key not in pending and key not in realizer.errors,
                        "pending": key in pending, "refused": realizer.errors.get(key),
                        "flows": len(state.flows) if state else 0, "groups": len(state.groups) if state else 0,
                        "buckets": sum(len(g.buckets) for g in state.groups.values()) if state else 0,
                        "digest": _digest(state) if state else ""}
        return out

    # ---- HTTP ----------------------------------------------------------------------------------

    async def _healthz(self, _request: Any) -> Any:
        from aiohttp import web

        ok = self.sync.conn is not None
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else f"no OpenFlow session to "
                                                                             f"{self.sync.target}\n")

    async def _readyz(self, _request: Any) -> Any:
        from aiohttp import web

        body = self.readiness()
        return web.Response(status=200 if body["ready"] else 503, text=json.dumps(body, indent=1) + "\n",
                            content_type="application/json")

    async def _objects(self, request: Any) -> Any:
        from aiohttp import web

        return web.Response(text=json.dumps(self.objects(request.query.get("prefix", "")), indent=1) + "\n",
                            content_type="application/json")

    async def _owners(self, _request: Any) -> Any:
        from aiohttp import web

        from sanderling.agent.owners import owners

        policy = self.metrics.sources.policy if self.metrics is not None else None
        known = owners(self.sync.realizer.keys(), policy)
        return web.Response(text=json.dumps({f"{c:#x}": o for c, o in sorted(known.items())}, indent=1) + "\n",
                            content_type="application/json")

    async def _trace(self, request: Any) -> Any:
        from aiohttp import web

        from sanderling.agent.trace import BadTrace

        def answer(status: int, body: dict[str, Any]) -> Any:
            return web.Response(status=status, text=json.dumps(body, indent=1) + "\n",
                                content_type="application/json")

        if self.tracer is None:
            return answer(404, {"error": "this agent does not trace"})
        try:
            return answer(200, await self.tracer.handle(dict(request.query)))
        except BadTrace as exc:
            return answer(400, {"error": str(exc)})
        except Exception as exc:  # ovs-appctl failed, ...: say so, keep serving
            log.warning("trace %s failed: %s", dict(request.query), exc)
            return answer(500, {"error": f"trace failed: {exc}"})

    async def _metrics(self, request: Any) -> Any:
        from aiohttp import web

        if self.metrics is None:
            return web.Response(status=404, text="metrics are off\n")
        response = web.StreamResponse(headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
        await response.prepare(request)
        async for chunk in self.metrics.render_chunks():  # the endpoints' 14 MB at 10,000 Services: streamed
            await response.write(chunk)
        await response.write_eof()
        return response

    async def start(self, host: str, port: int) -> Any:
        from aiohttp import web  # only here: the agent starts faster without it (restarts under traffic)
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/objects", self._objects)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/owners", self._owners)
        app.router.add_get("/trace", self._trace)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port, reuse_address=True).start()
        log.info("node %s: status on http://%s:%d (/healthz, /readyz, /objects, /metrics)", self.sync.name, host,
                 port)
        return runner


def _digest(state: Any) -> str:
    """Changes whenever the object's installed flows or groups change (tests wait on it)."""
    texts = sorted(f.text() for f in state.flows.values()) + sorted(g.text() for g in state.groups.values())
    return hashlib.blake2b("\n".join(texts).encode(), digest_size=8).hexdigest()
