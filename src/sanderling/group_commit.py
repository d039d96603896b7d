"""Group commit: requests that arrive while a batch is being written go out together next.

A burst of CNI ADDs each wanting one small write (an address allocation) would queue behind the
single writer one commit at a time, each commit a thread hop and a lock hand-over under the GIL;
batched, the burst costs one or two commits. The (async) write gets the whole batch and returns
one result per request, an exception instance for a request that failed alone; an exception it
raises fails the whole batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Req = TypeVar("Req")
Res = TypeVar("Res")


class GroupCommit(Generic[Req, Res]):
    def __init__(self, write: Callable[[list[Req]], Awaitable[Sequence[Res | BaseException]]]) -> None:
        self.write = write
        self._queue: list[tuple[Req, asyncio.Future[Res]]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0

    async def submit(self, request: Req) -> Res:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        done: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        self._queue.append((request, done))
        self._wakeup.set()
        return await done

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch, self._queue = self._queue, []
            if not batch:
                continue
            self.batches += 1
            try:
                results = await self.write([request for request, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"group commit: {len(results)} results for {len(batch)} requests")
            except Exception as exc:  # the whole batch failed: every waiter learns why
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for (_, done), result in zip(batch, results, strict=True):
                if done.done():
                    continue
                if isinstance(result, BaseException):
                    done.set_exception(result)
                else:
                    done.set_result(result)
