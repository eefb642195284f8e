"""Headless Chromium (Debian's ``chromium``) driven over the DevTools protocol, for the page tests.

Chosen over Selenium and Playwright: the only Python dependency is ``websocket-client``, nothing is
downloaded at run time (Playwright wants its own browser build, Selenium a matching chromedriver),
and the protocol's few calls used here (navigate, evaluate, set a file input, mouse events, screenshot) are stable.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    return os.environ.get("CHROMIUM") or next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)


class Chromium:
    """One headless browser with one page of ``width`` x ``height`` CSS pixels; ``evaluate`` runs JavaScript in it
    and returns the value."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 1000, timeout: float = 30.0):
        import websocket

        executable = chromium_path()
        if executable is None:
            raise RuntimeError("no chromium on PATH (apt-get install chromium; .ci/run installs it)")
        profile.mkdir(parents=True, exist_ok=True)
        (profile / "DevToolsActivePort").unlink(missing_ok=True)  # a previous browser's port
        self.timeout = timeout
        self.process = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-proxy-server",
             "--disable-extensions", "--disable-background-networking", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port = self._debugging_port(profile / "DevToolsActivePort")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as answer:
                page = next(t for t in json.load(answer) if t["type"] == "page")
            self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=timeout,
                                                      suppress_origin=True)
        except BaseException:
            self.process.kill()
            self.process.wait()
            raise
        self._next_id = 0
        self.call("Page.enable")
        self.call("Runtime.enable")
        # the page's viewport is exactly width x height (the window's own frame would take some of --window-size)
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _debugging_port(self, active_port: Path) -> int:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with code {self.process.returncode}")
            if active_port.is_file() and active_port.read_text().strip():
                return int(active_port.read_text().split()[0])
            time.sleep(0.1)
        raise RuntimeError(f"chromium did not open its debugging port in {self.timeout} s")

    def call(self, method: str, **params: Any) -> dict:
        """Send one protocol command and return its result (events that arrive meanwhile are dropped)."""
        self._next_id += 1
        self.socket.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails'].get('exception', result)}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait_for(self, expression: str, timeout: float | None = None) -> Any:
        """Poll ``expression`` until it is truthy; its value, or an AssertionError naming it after ``timeout``."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):  # the page may still be loading (no document.body yet)
                value = self.evaluate(expression)
                if value:
                    return value
            time.sleep(0.1)
        status = self.evaluate("document.getElementById('status')?.textContent")
        raise AssertionError(f"page never satisfied {expression!r}; status: {status!r}")

    def set_file(self, selector: str, path: Path) -> None:
        """Choose ``path`` in a file input, as a person picking it in the dialog would (fires ``change``)."""
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.call("DOM.setFileInputFiles", nodeId=node, files=[str(path)])

    def mouse(self, kind: str, x: float, y: float) -> None:
        """A real pointer event at window coordinates (x, y): ``move`` or ``click`` (left button down and up)."""
        if kind == "move":
            self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
            return
        for event in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=event, x=x, y=y, button="left", clickCount=1)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.socket.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
