"""Write the report pages: a run's ``RUN/report.html`` (refreshed while the run goes) and a merge
folder's own ``MERGE/report.html``.

The data comes from :mod:`sfxflow.pipeline.report`; the page from :mod:`sfxflow.report.html`.
Each page replaces the old one in one step (rename locally, a single put on object stores): a
browser never reads half of it.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import posixpath
import select
import signal
import sys
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from sfxflow.errors import InputError, RunDirError, SfxflowError
from sfxflow.io.results import RunDir
from sfxflow.pipeline.report import (
    REPORT_NAME,
    FramePicture,
    ReportCache,
    ReportData,
    build_merge_report,
    build_report,
)
from sfxflow.report.html import SECTION_KEYS, render_report_html, render_sections

__all__ = ["LiveReport", "write_merge_report", "write_report"]

logger = logging.getLogger(__name__)


def _write_to(out: str, page: bytes, storage_options: Mapping[str, Any] | None) -> str:
    """Write ``page`` to the file ``out`` (a path or URL); a place that cannot hold a file is a
    user error (one line, exit 2)."""
    folder, name = posixpath.split(out.rstrip("/")) if "://" in out else os.path.split(out)
    if not name:
        raise InputError(f"--out {out!r}: expected a file name such as report.html")
    if "://" not in out:
        folder = folder or "."
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise InputError(f"--out {out}: {folder} is not a folder")
        if os.path.isdir(out):
            raise InputError(f"--out {out}: is a folder; expected a file name such as "
                             "report.html")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise InputError(f"--out {out}: cannot create {folder} ({exc.strerror or exc})"
                             ) from None
    target = RunDir(folder or ".", storage_options)
    try:
        target.write_bytes(name, page)
    except (IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        raise InputError(f"{out}: cannot write the report ({exc.strerror or exc})") from None
    except RunDirError as exc:
        if "://" in out:
            raise
        raise InputError(f"--out {out}: cannot write the report ({exc})") from None
    return target.url_of(name)


#: how long the page waits for the sections drawn in a child (:class:`_DrawnAside`) before it
#: draws them itself: ~0.6 s on a CSPAD run on one core; the child only outlasts this if it
#: hangs (on a lock another thread held when it was forked)
ASIDE_TIMEOUT_S = 60.0
#: the sections the child draws: the frame picture (0.4-0.5 s on a CSPAD run) and the spots'
#: two plots (~0.2 s), against the other seven plots (0.5-0.6 s) and the data read here
ASIDE_SECTIONS = ("spots", "frame")


def _can_fork_aside() -> bool:
    """Whether sections drawn in a forked child run beside this process: on Linux (forking a
    process with threads is unsafe on macOS) with two cores or more for it."""
    if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return False
    try:
        return len(os.sched_getaffinity(0)) >= 2
    except (AttributeError, OSError):
        return (os.cpu_count() or 1) >= 2


class _DrawnAside:
    """Some of the page's sections drawn in a forked child while this process draws the rest.

    Why: the final page is drawn once the last block is in, on one core (0.4-0.5 s for the
    frame picture, 0.6-0.8 s for the nine plots on a CSPAD run) while the cluster's cores
    idle, and threads would share one core (matplotlib holds the GIL). The child is a copy of
    this process as it is (matplotlib imported, the data in memory): it starts in milliseconds
    and draws the same HTML (the same PNG, byte for byte). Any trouble in the child (an error,
    a crash, no answer within :data:`ASIDE_TIMEOUT_S`) and the sections are drawn here
    instead, as without it: what fails there fails here the same way.
    """

    def __init__(self, data: ReportData, keys: Sequence[str]) -> None:
        self.data, self.keys = data, list(keys)
        self.pid = 0
        self.fd = -1
        read_fd, write_fd = os.pipe()
        try:
            with warnings.catch_warnings():
                # Python 3.12+ warns of forking a process with threads; the child only draws
                # (no lock another thread holds), and the wait for it is bounded
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        except Exception as exc:
            os.close(read_fd)
            os.close(write_fd)
            logger.debug("report drawn in this process only: %s", exc)
            return
        if pid == 0:  # pragma: no cover - the child; coverage does not follow it
            self._child(read_fd, write_fd)
        os.close(write_fd)
        self.pid, self.fd = pid, read_fd

    def _child(self, read_fd: int, write_fd: int) -> None:  # pragma: no cover - in the child
        code = 1
        try:
            os.close(read_fd)
            # a stop (Ctrl-C, SIGTERM) ends the child at once; the parent handles it
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            view = memoryview(json.dumps(render_sections(self.data, self.keys)).encode())
            while view:
                view = view[os.write(write_fd, view):]
            code = 0
        except BaseException:  # the parent draws them itself and reports what fails
            pass
        finally:
            os._exit(code)

    def _collect(self) -> dict[str, str] | None:
        """The child's sections, or ``None`` where it gave none in time (it is then killed)."""
        chunks: list[bytes] = []
        deadline = time.monotonic() + ASIDE_TIMEOUT_S
        status = -1
        try:
            poller = select.poll()  # not select.select: a client with many sockets has fds > 1023
            poller.register(self.fd, select.POLLIN)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not poller.poll(left * 1000.0):
                    logger.debug("report child gave no answer in %.0f s", ASIDE_TIMEOUT_S)
                    return None
                chunk = os.read(self.fd, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
            status = os.waitpid(self.pid, 0)[1]
            self.pid = 0
        finally:
            self.close()  # a child that gave no answer, or this process stopped meanwhile
        if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
            return None
        drawn = json.loads(b"".join(chunks))
        return drawn if isinstance(drawn, dict) else None

    def sections(self) -> dict[str, str]:
        """The sections of ``keys``: from the child where it drew them, else drawn here."""
        drawn = None
        if self.fd >= 0:
            try:
                drawn = self._collect()
            except (OSError, ValueError) as exc:  # the sections are drawn here
                logger.debug("report child not read: %s", exc)
        return drawn if drawn is not None else render_sections(self.data, self.keys)

    def close(self) -> None:
        """End the child if its sections were not collected (an error drawing the others, no
        answer)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except OSError:
                pass
            self.pid = 0


def _render(data: ReportData, aside: bool) -> bytes:
    """The page of ``data``; ``aside``: its :data:`ASIDE_SECTIONS` drawn in a forked child
    meanwhile (:class:`_DrawnAside`) where that can run beside this process."""
    keys = [k for k in ASIDE_SECTIONS if k in SECTION_KEYS]
    if not (aside and isinstance(data.picture, FramePicture) and data.picture.png is None
            and _can_fork_aside()):
        return render_report_html(data).encode("utf-8")
    child = _DrawnAside(data, keys)
    try:
        mine = render_sections(data, [k for k in SECTION_KEYS if k not in keys])
        return render_report_html(data, {**mine, **child.sections()}).encode("utf-8")
    finally:
        child.close()


def write_report(run_url: str, out: str | None = None, *,
                 storage_options: Mapping[str, Any] | None = None, merge_url: str | None = None,
                 running: bool | None = None, with_picture: bool = True,
                 cache: ReportCache | None = None, cost: bool | None = None,
                 aside: bool = False) -> str:
    """Build the report of ``run_url`` and write it atomically; returns where it went.

    ``out`` defaults to ``RUN/report.html``; a local path or URL. ``cost``: show the run priced
    at cloud prices (``None``: only for a run on object storage). ``aside``: draw some sections
    (the frame picture) in a forked child while this process draws the others (the same page,
    on two cores; see :class:`_DrawnAside`).
    """
    data = build_report(run_url, storage_options=storage_options, merge_url=merge_url,
                        running=running, with_picture=with_picture, cache=cache, cost=cost)
    page = _render(data, aside)
    if out is None:
        run = RunDir(run_url, storage_options)
        run.write_bytes(REPORT_NAME, page)
        return run.url_of(REPORT_NAME)
    return _write_to(out, page, storage_options)


def _same_place(a: str, b: str) -> bool:
    a, b = a.rstrip("/"), b.rstrip("/")
    if a == b:
        return True
    return "://" not in a and "://" not in b and os.path.realpath(a) == os.path.realpath(b)


def write_merge_report(merge_url: str, inputs: Sequence[str], *,
                       storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Reports after ``sfxflow merge``: the merge's own ``MERGE/report.html`` and, when the merge
    went into a run's own ``RUN/merge``, that run's ``RUN/report.html`` (now with its merged
    data). Returns the pages written."""
    options = dict(storage_options or {})
    runs = [u.rstrip("/") for u in inputs if not u.endswith(".stream")]
    merge_url = merge_url.rstrip("/")
    if len(inputs) == 1 and len(runs) == 1 and _same_place(merge_url, f"{runs[0]}/merge"):
        merge_url = f"{runs[0]}/merge"  # the run's page links to it by this relative name
    page = render_report_html(build_merge_report(merge_url, list(inputs),
                                                 storage_options=options)).encode("utf-8")
    target = RunDir(merge_url, options)
    target.write_bytes(REPORT_NAME, page)
    written = [target.url_of(REPORT_NAME)]
    if len(inputs) == 1 and len(runs) == 1 and merge_url == f"{runs[0]}/merge":
        try:
            written.append(write_report(runs[0], storage_options=options))
        except InputError as exc:  # e.g. reflections shards without the rest of a run
            logger.info("%s: its report is not updated (%s)", runs[0], exc)
    return written


_DRAWING_MODULES = (
    "matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.backends.backend_svg",
    "matplotlib.colors", "matplotlib.patches", "matplotlib.ticker", "pyarrow.dataset",
    "sfxflow.io.geometry", "sfxflow.report.picture",
)


def _import_for_drawing() -> None:
    """Import what drawing the page needs and the run itself does not: matplotlib (with PIL,
    its fonts, the Agg and SVG backends), the picture's module, and what reads the shards and
    the geometry file (pyarrow.dataset, the geometry reader).

    Run in a background thread while a run goes: the page is drawn after the cluster closes,
    and these imports (0.6-1.6 s of one core) then added to the whole command's time. Pure
    imports: nothing here touches the run, Dask or matplotlib's global state beyond loading.
    """
    t0 = time.perf_counter()
    try:
        for name in _DRAWING_MODULES:
            importlib.import_module(name)
    except Exception as exc:  # drawing then imports them itself and reports what fails
        logger.debug("report modules not imported ahead: %s", exc)
    logger.debug("report modules imported ahead in %.2f s", time.perf_counter() - t0)


class LiveReport:
    """Refreshes ``RUN/report.html`` while a run goes, and once at the end (a
    :class:`~sfxflow.pipeline.report.Reporter` for ``run_process``).

    After a block, when at least ``interval_s`` seconds (and ten times the last build's time,
    so that drawing takes at most a tenth of the client's time) have passed since the last page
    (or since the start: a short run draws its page once, at the end), the page is rebuilt
    in a background thread: the client goes on collecting results and handing out blocks
    meanwhile (block finishing times in the manifest stay true). :meth:`finish` waits for it and
    writes the final page.

    Never raises: a report that cannot be written is logged and the run goes on.
    """

    def __init__(self, run_url: str, storage_options: Mapping[str, Any] | None = None,
                 interval_s: float = 30.0) -> None:
        self.run_url = run_url
        self.storage_options = dict(storage_options or {})
        self.interval_s = interval_s
        self.cache = ReportCache()
        # the first refresh comes interval_s after the start, not at the first block: a run
        # shorter than that draws its page once, at the end (drawing at the first block took
        # ~2 s of the client's CPU beside the workers', and was redrawn at the end anyway)
        self._last = time.perf_counter()
        self._build_s = 0.0
        self._thread: threading.Thread | None = None
        self.written = 0
        # matplotlib & co. are imported while the run goes, not after it (see
        # _import_for_drawing), from the first finished block on: by then the client's own
        # start-up (plan, cluster) is done and its thread mostly waits, so the imports do not
        # hold the GIL against it
        self._importer: threading.Thread | None = None

    def _write(self, running: bool) -> None:
        t0 = time.perf_counter()
        try:
            # the final page, drawn after the last block: its picture on the cores the
            # workers no longer use
            write_report(self.run_url, storage_options=self.storage_options, running=running,
                         cache=self.cache, aside=not running)
            self.written += 1
        except Exception as exc:  # the report must never stop a run
            # a full disk or a dead endpoint says all in one line; anything else is a bug
            logger.warning("%s: report not updated: %s", self.run_url, exc,
                           exc_info=not isinstance(exc, SfxflowError))
        self._build_s = time.perf_counter() - t0
        self._last = time.perf_counter()

    def block_done(self) -> None:
        """Call after each finished block."""
        if self._importer is None:
            self._importer = threading.Thread(target=_import_for_drawing, daemon=True,
                                              name="sfxflow-report-imports")
            self._importer.start()
        if self._thread is not None and self._thread.is_alive():
            return
        if time.perf_counter() - self._last >= max(self.interval_s, 10 * self._build_s):
            self._last = time.perf_counter()
            self._thread = threading.Thread(target=self._write, args=(True,), daemon=True,
                                            name="sfxflow-report")
            self._thread.start()

    def wait(self, timeout_s: float | None = None) -> None:
        """Wait for a refresh in progress."""
        if self._thread is not None:
            self._thread.join(timeout_s)

    def finish(self) -> None:
        """Call once the run has written its summary."""
        if self._importer is not None:
            self._importer.join()
        self.wait()
        self._write(running=False)
