"""The agent's informer against the lab API server: list+watch, bookmarks, 410 relist, server restart."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

from lightkube import AsyncClient, KubeConfig
from lightkube.resources.core_v1 import Pod

from sanderling.kube.client import KubeApi
from sanderling.kube.informer import Informer
from sanderling.lab.apiserver.store import Store


def start_api(tmp_path, port):
    proc = subprocess.Popen([sys.executable, "-m", "sanderling.lab.apiserver", "--db", str(tmp_path / "db"),
                             "--port", str(port), "--kubeconfig", str(tmp_path / "kc"), "--log-level", "WARNING",
                             "--bookmark-interval", "0.2"], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    return proc


def pod(name, labels=None):
    return Pod.from_dict({"metadata": {"name": name, "namespace": "default", "labels": labels or {}},
                          "spec": {"nodeName": "n1", "containers": [{"name": "c"}]}})


async def until(cond, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def test_list_watch_bookmarks_gone_and_restart(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_api(tmp_path, port)
    sync = KubeApi(tmp_path / "kc").client
    sync.create(pod("before"))
    changes: list[tuple[str, bool]] = []

    async def scenario():
        nonlocal proc
        client = AsyncClient(KubeConfig.from_file(str(tmp_path / "kc")))
        informer = Informer(client, Pod, lambda key, obj: changes.append((key, obj is not None)), max_backoff=0.3)
        task = asyncio.create_task(informer.run())
        await asyncio.wait_for(informer.synced.wait(), 10)
        assert changes == [("default/before", True)]
        await asyncio.to_thread(sync.create, pod("during"))
        await until(lambda: ("default/during", True) in changes)
        await until(lambda: informer.bookmarks >= 1)
        await asyncio.to_thread(sync.delete, Pod, "during", namespace="default")
        await until(lambda: ("default/during", False) in changes)

        # the API server goes away; meanwhile objects change and the event history is compacted
        proc.terminate()
        proc.wait(10)
        changes.clear()
        store = Store(tmp_path / "db")
        store.create("/pods", "default", pod("while-away").to_dict())
        store.delete("/pods", "default", "before")
        for i in range(3):
            store.create("/pods", "default", pod(f"filler-{i}").to_dict())
        store.compact()
        store.close()
        proc = start_api(tmp_path, port)
        await until(lambda: ("default/while-away", True) in changes and ("default/before", False) in changes)
        assert set(informer.objects) == {"default/while-away", "default/filler-0", "default/filler-1",
                                         "default/filler-2"}
        assert informer.lists == 2  # the 410 after compaction made it relist once
        # unchanged objects were not reported again: consumers keep what they installed
        assert sum(1 for k, _ in changes if k == "default/while-away") == 1
        task.cancel()
        await client.close()

    try:
        asyncio.run(scenario())
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_bookmark_never_runs_ahead_of_events_still_queued(tmp_path):
    """A watch bookmark names the last version that stream has sent or skipped: a client cut off
    right after a bookmark resumes from it, so an event behind it that was never sent is lost for
    good. Writes land in the server's own loop while bookmarks fall due every millisecond."""
    import json

    import aiohttp

    from sanderling.lab.apiserver.server import listen, serve

    async def main():
        store = Store(tmp_path / "db")
        sock = listen("127.0.0.1", 0)
        port = sock.getsockname()[1]
        runner = await serve(store, [sock], bookmark_interval=0.001)
        received: list[int] = []
        violations: list[str] = []
        written: list[int] = []
        try:
            async with aiohttp.ClientSession() as session:
                url = (f"http://127.0.0.1:{port}/api/v1/pods?watch=true&allowWatchBookmarks=true"
                       f"&resourceVersion={store.rv}")
                async with session.get(url) as resp:
                    async def write():
                        for i in range(300):
                            # a write to another resource first: it moves the store's version too
                            store.create("/namespaces", "", {"metadata": {"name": f"ns{i}"}})
                            written.append(int(store.create("/pods", "default", {
                                "metadata": {"name": f"p{i}"},
                                "spec": {"containers": [{"name": "c", "image": "x"}]}})["metadata"]
                                ["resourceVersion"]))
                            await asyncio.sleep(0.0005 * (i % 3))

                    writer = asyncio.ensure_future(write())
                    while len(received) < 300:
                        line = await asyncio.wait_for(resp.content.readline(), 10)
                        event = json.loads(line)
                        rv = int(event["object"]["metadata"]["resourceVersion"])
                        if event["type"] == "BOOKMARK":
                            behind = [w for w in written if w <= rv and w not in received]
                            if behind:
                                violations.append(f"bookmark {rv} sent before events {behind[:3]}")
                        else:
                            received.append(rv)
                    await writer
        finally:
            await runner.cleanup()
            store.close()
        return received, violations

    received, violations = asyncio.run(main())
    assert received == sorted(received) and len(received) == 300
    assert violations == []
