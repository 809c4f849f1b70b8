"""Run progress: a live line on a terminal, periodic log lines otherwise.

>>> import io
>>> out = io.StringIO()
>>> p = Progress(total_frames=100, stream=out, tty=False, log_every_s=0.0)
>>> p.update(frames=50, hits=20, indexed=10, failed=0)
>>> p.close()
>>> "50/100 frames" in p.line()
True
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

__all__ = ["LiveLine", "Progress", "format_duration"]

logger = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    """``75.0 -> '1m15s'``; ``'?'`` when unknown.

    >>> format_duration(3725)
    '1h02m05s'
    >>> format_duration(float("nan"))
    '?'
    """
    if not seconds == seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{sec:02d}s"
    if m:
        return f"{m}m{sec:02d}s"
    return f"{sec}s"


class LiveLine:
    """One status line: redrawn in place on a terminal, logged now and then otherwise.

    Parameters
    ----------
    stream : where a terminal line goes (``sys.stderr`` by default).
    tty : force terminal mode on/off; default: ``stream.isatty()``.
    log_every_s : minimum seconds between log lines when not on a terminal.
    min_redraw_s : minimum seconds between redraws on a terminal.
    """

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None,
                 log_every_s: float = 10.0, min_redraw_s: float = 0.25) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(self.stream.isatty()) if tty is None else tty
        self.log_every_s = log_every_s
        self.min_redraw_s = min_redraw_s
        self._last_draw = -1e9
        self._drawn = False

    def show(self, text: str, force: bool = False) -> None:
        """Draw (or log) ``text`` unless the last one is too recent and ``force`` is off."""
        now = time.perf_counter()
        if self.tty:
            if force or now - self._last_draw >= self.min_redraw_s:
                self.stream.write("\r\x1b[2K" + text)
                self.stream.flush()
                self._drawn = True
                self._last_draw = now
        elif force or now - self._last_draw >= self.log_every_s:
            logger.info("%s", text)
            self._last_draw = now

    def close(self) -> None:
        """End the terminal line (the next output starts on a fresh line)."""
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


class Progress(LiveLine):
    """Counts frames as blocks complete and shows rates and the time left.

    Parameters
    ----------
    total_frames : frames to process in this invocation (skipped blocks excluded).
    stream, tty, log_every_s, min_redraw_s : as for :class:`LiveLine`.
    """

    def __init__(self, total_frames: int, stream: TextIO | None = None, tty: bool | None = None,
                 log_every_s: float = 10.0, min_redraw_s: float = 0.25) -> None:
        super().__init__(stream, tty, log_every_s, min_redraw_s)
        self.total = int(total_frames)
        self.t0 = time.perf_counter()
        self.frames = self.hits = self.indexed = self.failed = 0

    def update(self, frames: int, hits: int = 0, indexed: int = 0, failed: int = 0) -> None:
        """Add one completed block's counts (``hits`` includes indexed frames)."""
        self.frames += frames
        self.hits += hits
        self.indexed += indexed
        self.failed += failed
        self.show(self.line(), force=self.frames >= self.total)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = self.frames / elapsed if elapsed > 0 else 0.0
        left = self.total - self.frames
        eta = left / rate if rate > 0 else float("nan")
        hit_pct = 100.0 * self.hits / self.frames if self.frames else 0.0
        idx_pct = 100.0 * self.indexed / self.hits if self.hits else 0.0
        text = (f"{self.frames}/{self.total} frames  {rate:.1f} frames/s  hits {hit_pct:.1f}%  "
                f"indexed {idx_pct:.1f}% of hits")
        if self.failed:
            text += f"  failed {self.failed}"
        return text + f"  elapsed {format_duration(elapsed)}  ETA {format_duration(eta)}"
