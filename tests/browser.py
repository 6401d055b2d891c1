"""Headless Chromium driven over the DevTools protocol (a websocket, with aiohttp): open a page at a given width,
wait for its load, run script in it, take a screenshot. For the report's tests and its screenshots."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def chromium() -> str | None:
    return shutil.which("chromium")


class Tab:
    """One page target of the browser."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self.ids)
        await self.ws.send_json({"id": ident, "method": method, "params": params})
        while True:
            message = json.loads((await self.ws.receive(timeout=60)).data)
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            self.events.append(message)

    async def wait_event(self, name: str, within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        while not any(e.get("method") == name for e in self.events):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(name)
            self.events.append(json.loads((await self.ws.receive(timeout=left)).data))
        self.events = [e for e in self.events if e.get("method") != name]

    async def open(self, url: str, *, width: int = 1280, height: int = 900, mobile: bool = False) -> float:
        """Open ``url`` at this size; return the seconds from navigation to the load event."""
        await self.send("Page.enable")
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=2 if mobile else 1,
            mobile=mobile,
        )
        started = time.monotonic()
        await self.send("Page.navigate", url=url)
        await self.wait_event("Page.loadEventFired")
        return time.monotonic() - started

    async def eval(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def screenshot(self, path: Path, *, full: bool = False) -> None:
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=full)
        await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))


@contextlib.asynccontextmanager
async def browser() -> AsyncIterator[Tab]:
    """A fresh headless Chromium with its own profile, and one tab of it."""
    exe = chromium()
    if exe is None:
        raise RuntimeError("chromium is not installed")
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(  # noqa: ASYNC220 - once per test; its output is read on a thread
            [exe, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stderr is not None
            url = None
            deadline = time.monotonic() + 30
            while url is None and time.monotonic() < deadline:
                line = await asyncio.to_thread(proc.stderr.readline)
                found = re.search(r"ws://[^\s]+", line)
                url = found.group(0) if found else None
            assert url is not None, "chromium did not start"
            port = re.search(r":(\d+)/", url).group(1)  # type: ignore[union-attr]
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/json/list") as answer:
                    pages = [t for t in await answer.json(content_type=None) if t["type"] == "page"]
                async with session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    yield Tab(ws)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
