"""A headless Chromium (Debian's ``chromium``) driven over its DevTools protocol, for the viewer's tests.

Only what the tests need: open a page, evaluate JavaScript, wait for a condition, take a screenshot.
The protocol travels over aiohttp's WebSocket client (already a dependency of the viewer).
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--remote-debugging-port=0",
)


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError(
        "chromium is not installed: the viewer's browser test needs Debian's chromium "
        "(`make system-deps`, or apt-get install chromium)"
    )


class Browser:
    """One Chromium process with a fresh profile; ``page()`` connects to its first tab."""

    def __init__(self, profile_dir: Path, width: int = 1400, height: int = 900) -> None:
        self.profile_dir = profile_dir
        self.width, self.height = width, height
        self.log = (profile_dir.parent / "chromium.log").open("w")
        self.process = subprocess.Popen(
            [
                chromium_binary(),
                *FLAGS,
                f"--user-data-dir={profile_dir}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.port = self._devtools_port()

    def _devtools_port(self, timeout_s: float = 30.0) -> int:
        marker = self.profile_dir / "DevToolsActivePort"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if marker.is_file() and marker.read_text().strip():
                return int(marker.read_text().splitlines()[0])
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"chromium did not open its DevTools port; see {self.log.name}")

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


class Page:
    def __init__(self, browser: Browser, session: aiohttp.ClientSession) -> None:
        self.browser = browser
        self.session = session
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._next_id = 0

    async def connect(self) -> Page:
        async with self.session.get(f"http://127.0.0.1:{self.browser.port}/json/list") as response:
            targets = json.loads(await response.text())
        page = next(t for t in targets if t["type"] == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=self.browser.width,
            height=self.browser.height,
            deviceScaleFactor=1,
            mobile=False,
        )
        return self

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        assert self.ws is not None
        self._next_id += 1
        ident = self._next_id
        await self.ws.send_json({"id": ident, "method": method, "params": params})
        while True:
            message = await asyncio.wait_for(self.ws.receive(), timeout=60)
            if message.type != aiohttp.WSMsgType.TEXT:
                raise AssertionError(f"DevTools connection closed: {message.type}")
            body = json.loads(message.data)
            if body.get("id") == ident:
                if "error" in body:
                    raise AssertionError(f"{method}: {body['error']}")
                result: dict[str, Any] = body["result"]
                return result

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"JavaScript failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def wait_for(self, expression: str, timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                value = await self.evaluate(expression)
            except AssertionError:
                value = None
            if value:
                return value
            await asyncio.sleep(0.2)
        text = await self.evaluate("document.body ? document.body.innerText.slice(0, 2000) : ''")
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; page says:\n{text}")

    async def next_frames(self, frames: int = 2) -> None:
        for _ in range(frames):
            await self.evaluate("new Promise((done) => requestAnimationFrame(() => done(true)))")

    async def screenshot(self, path: Path) -> Path:
        shot = await self.send("Page.captureScreenshot", format="png")
        await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))
        return path
