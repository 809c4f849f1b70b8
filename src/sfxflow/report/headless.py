"""Open a local HTML page in headless Chromium and report what the browser saw.

Talks the Chrome DevTools protocol over ``--remote-debugging-pipe`` (JSON messages separated by
NUL bytes on file descriptors 3 and 4 of the browser), so nothing listens on a network port and
no client library is needed. The browser records every request the page makes (``Network``
domain), every console message and uncaught exception (``Runtime``) and the browser's own error
log entries (``Log``: failed loads, blocked content); :func:`render_page` returns them with an
optional full-page screenshot.

The browser is found as ``$SFXFLOW_CHROMIUM`` or ``chromium`` / ``chromium-browser`` /
``google-chrome`` on the PATH (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import base64
import fcntl
import json
import math
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sfxflow.errors import SfxflowError

__all__ = ["BrowserError", "PageResult", "find_chromium", "render_page"]

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: URL schemes that stay inside the page and this machine.
LOCAL_SCHEMES = ("file:", "data:", "about:", "blob:")


class BrowserError(SfxflowError):
    """No browser, or the browser did not answer as expected."""


@dataclass
class PageResult:
    """What the browser saw while loading a page.

    ``requests`` lists every URL the page asked for (the page itself included);
    ``console_errors`` holds console errors, uncaught exceptions and browser error log entries.
    """

    url: str
    requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    screenshot_png: bytes | None = None
    width_px: int = 0
    height_px: int = 0
    evaluated: Any = None

    @property
    def external_requests(self) -> list[str]:
        """Requests that would leave this machine (anything not file:, data:, about:, blob:)."""
        return [u for u in self.requests if not u.startswith(LOCAL_SCHEMES)]

    def problems(self) -> list[str]:
        return ([f"console error: {m}" for m in self.console_errors]
                + [f"external request: {u}" for u in self.external_requests])


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable, or ``None``."""
    env = os.environ.get("SFXFLOW_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else shutil.which(env)
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _high_fd(fd: int) -> int:
    """A copy of ``fd`` numbered 10 or above (so that moving it to 3 or 4 clobbers nothing)."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class _Pipe:
    """The browser's DevTools pipe: numbered commands out, results and events back."""

    def __init__(self, read_fd: int, write_fd: int, deadline: float) -> None:
        self.read_fd, self.write_fd = read_fd, write_fd
        self.deadline = deadline
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None) -> int:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self.write_fd, data):]
        return self.next_id

    def _read_one(self, timeout_s: float) -> dict[str, Any] | None:
        while b"\0" not in self.buffer:
            left = min(timeout_s, self.deadline - time.monotonic())
            if left <= 0:
                return None
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise BrowserError("the browser closed its DevTools pipe")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        message: dict[str, Any] = json.loads(raw)
        return message

    def call(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None) -> dict[str, Any]:
        """Send a command and wait for its result (events met on the way are kept)."""
        wanted = self.send(method, params, session)
        while True:
            message = self._read_one(self.deadline - time.monotonic())
            if message is None:
                raise BrowserError(f"no answer to {method} in time")
            if message.get("id") == wanted:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error'].get('message')}")
                result: dict[str, Any] = message.get("result", {})
                return result
            if "method" in message:
                self.events.append(message)

    def wait_event(self, method: str, session: str, timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        seen = len(self.events)
        while True:
            for e in self.events[seen:]:
                if e.get("method") == method and e.get("sessionId") == session:
                    return True
            seen = len(self.events)
            left = end - time.monotonic()
            if left <= 0:
                return False
            message = self._read_one(left)
            if message is not None and "method" in message:
                self.events.append(message)

    def drain(self, quiet_s: float) -> None:
        """Keep reading events until none has come for ``quiet_s`` seconds."""
        while True:
            message = self._read_one(quiet_s)
            if message is None:
                return
            if "method" in message:
                self.events.append(message)


def _console_text(params: dict[str, Any]) -> str:
    parts = []
    for arg in params.get("args", []):
        parts.append(str(arg.get("value", arg.get("description", arg.get("type", "")))))
    return " ".join(parts)


def _chromium_args(exe: str, profile: str) -> list[str]:
    """The command line of a headless Chromium driven over ``--remote-debugging-pipe``."""
    return [exe, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
            "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--disable-background-networking", "--disable-sync",
            "--disable-component-update", "--hide-scrollbars", "--mute-audio",
            f"--user-data-dir={profile}", "about:blank"]


def _open_page(pipe: _Pipe, url: str, width_px: int, timeout_s: float) -> str:
    """Open ``url`` in a new tab, wait for its load event and return the tab's session id."""
    target = pipe.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
        "sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        pipe.call(f"{domain}.enable", session=session)
    pipe.call("Emulation.setDeviceMetricsOverride",
              {"width": width_px, "height": 900, "deviceScaleFactor": 1, "mobile": False},
              session=session)
    pipe.call("Page.navigate", {"url": url}, session=session)
    if not pipe.wait_event("Page.loadEventFired", session, pipe.deadline - time.monotonic()):
        raise BrowserError(f"{url}: the page did not finish loading in {timeout_s:g} s")
    return session


def _capture_full_page(pipe: _Pipe, session: str, width_px: int,
                       result: PageResult) -> None:
    """Grow the viewport to the page's height and store its PNG screenshot in ``result``."""
    metrics = pipe.call("Page.getLayoutMetrics", session=session)
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    height = math.ceil(size["height"])
    pipe.call("Emulation.setDeviceMetricsOverride",
              {"width": width_px, "height": height, "deviceScaleFactor": 1,
               "mobile": False}, session=session)
    shot = pipe.call("Page.captureScreenshot",
                     {"format": "png", "captureBeyondViewport": True}, session=session)
    result.screenshot_png = base64.b64decode(shot["data"])
    result.width_px, result.height_px = width_px, height


def _collect_events(events: list[dict[str, Any]], result: PageResult) -> None:
    """Record the requests and the console errors among the browser's ``events``."""
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Network.requestWillBeSent":
            result.requests.append(params["request"]["url"])
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            result.console_errors.append(_console_text(params))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            result.console_errors.append(
                str(details.get("exception", {}).get("description") or details.get("text")))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            result.console_errors.append(f"{entry.get('text')} {entry.get('url', '')}".strip())


def render_page(path: str | Path, *, screenshot: bool = False, width_px: int = 1100,
                evaluate: str | None = None, timeout_s: float = 60.0,
                settle_s: float = 0.5) -> PageResult:
    """Load the local file ``path`` in headless Chromium and report requests and errors.

    Parameters
    ----------
    path : the HTML file.
    screenshot : also capture the full page as PNG (``width_px`` wide, as tall as the page).
    width_px : viewport width in CSS pixels.
    evaluate : a JavaScript expression evaluated after loading; its JSON value is returned in
        ``evaluated`` (the page itself needs no script for this).
    timeout_s : give up (and stop the browser) after this long.
    settle_s : after the load event, wait until no event has come for this long.

    Raises
    ------
    BrowserError
        When no browser is found or it does not load the page in time.
    """
    exe = find_chromium()
    if exe is None:
        raise BrowserError("no Chromium found: install it (Debian: apt-get install chromium) "
                           "or set SFXFLOW_CHROMIUM")
    url = Path(path).resolve().as_uri()
    deadline = time.monotonic() + timeout_s
    to_browser_r, to_browser_w = (_high_fd(fd) for fd in os.pipe())
    from_browser_r, from_browser_w = (_high_fd(fd) for fd in os.pipe())
    profile = tempfile.mkdtemp(prefix="sfxflow-chromium-")
    args = _chromium_args(exe, profile)
    # the browser reads commands on fd 3 and writes answers on fd 4
    redirect = (f'exec "$@" 3<&{to_browser_r} 4>&{from_browser_w} '
                f"{to_browser_r}<&- {from_browser_w}>&-")
    stderr = tempfile.TemporaryFile()
    proc = subprocess.Popen(["bash", "-c", redirect, "chromium", *args],
                            pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=stderr)
    os.close(to_browser_r)
    os.close(from_browser_w)
    pipe = _Pipe(from_browser_r, to_browser_w, deadline)
    result = PageResult(url=url)
    try:
        session = _open_page(pipe, url, width_px, timeout_s)
        pipe.drain(settle_s)
        if evaluate is not None:
            value = pipe.call("Runtime.evaluate", {"expression": evaluate, "returnByValue": True},
                              session=session)
            result.evaluated = value.get("result", {}).get("value")
        if screenshot:
            _capture_full_page(pipe, session, width_px, result)
        pipe.drain(0.1)
        try:
            pipe.send("Browser.close")
        except OSError:
            pass
    except BrowserError as exc:
        stderr.seek(0)
        tail = stderr.read()[-600:].decode(errors="replace").strip()
        raise BrowserError(f"{exc}" + (f" (browser said: {tail})" if tail else "")) from None
    finally:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(from_browser_r)
        os.close(to_browser_w)
        stderr.close()
        shutil.rmtree(profile, ignore_errors=True)
    _collect_events(pipe.events, result)
    return result
