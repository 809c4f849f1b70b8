"""``summary.json``: counts, rates and throughput of a run (keys in docs/contracts.md).

Counts (``frames``, ``hits``, ...) cover every frame in the run directory, including blocks done
by an earlier invocation that this one resumed. Throughput figures (``frames_per_s``,
``core_seconds_per_frame``, worker busy/finish times, bytes read) cover the blocks processed by
this invocation (``frames_processed``), over its wall time.

``hits`` counts ``hit`` and ``indexed`` frames; ``hit_rate = hits / (frames - failed)``;
``indexing_rate = indexed / hits``. ``core_seconds_per_frame = n_cores * wall_s /
frames_processed`` (what a core-hour bill pays, overheads included) and
``busy_core_seconds_per_frame`` the same from the workers' busy time only.

A rerun that finds nothing left to do measures nothing: it keeps the throughput figures of the
run that did the work (:func:`keep_measured_figures`), with ``measured_by_run_at`` saying when
that was.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from sfxflow import __version__
from sfxflow.pipeline.blocks import BlockReport

__all__ = ["FEW_VALUES", "MEASURED_KEYS", "build_summary", "format_summary", "format_times_ms",
           "keep_measured_figures"]

#: Figures measured while processing: meaningless for an invocation that processed nothing.
MEASURED_KEYS = (
    "frames_processed", "wall_s", "n_cores", "frames_per_s", "frames_per_s_per_core",
    "core_seconds_per_frame", "busy_core_seconds_per_frame", "stage_seconds", "bytes_read",
    "bytes_per_frame", "read_mb_per_s", "fetch_s", "fetch_wait_s", "fetch_hidden_s", "workers",
    "finish_spread_s", "prefetch_depth", "cluster", "measured_by_run_at",
)


def build_summary(frames: pa.Table, reports: Sequence[BlockReport], *, wall_s: float,
                  n_cores: int, detector: Mapping[str, Any] | None = None,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Build the summary dictionary.

    Parameters
    ----------
    frames : the merged frames table of the whole run (schema ``FRAME_SCHEMA``).
    reports : block reports of this invocation (``received_at`` relative to its start).
    wall_s : wall time of this invocation.
    n_cores : worker threads used.
    detector : ``{"name": ..., "n_pixels": ...}``.
    extra : more keys (e.g. blocks skipped, prefetch figures) merged in.
    """
    status = Counter(frames.column("status").to_pylist()) if frames.num_rows else Counter()
    n = frames.num_rows
    failed = status.get("failed", 0)
    indexed = status.get("indexed", 0)
    hits = status.get("hit", 0) + indexed
    misses = status.get("miss", 0)
    judged = n - failed
    reasons: Counter[str] = Counter()
    if failed:
        failed_rows = frames.filter(pc.equal(frames.column("status"), "failed"))
        reasons.update(failed_rows.column("reason").to_pylist())
    stage_seconds: Counter[str] = Counter()
    for r in reports:
        stage_seconds.update(r.stage_seconds)
    processed = sum(r.n_frames for r in reports)
    bytes_read = sum(r.bytes_read for r in reports)
    workers: dict[str, dict[str, float]] = {}
    for r in reports:
        w = workers.setdefault(r.worker, {"busy_s": 0.0, "finish_s": 0.0, "frames": 0})
        w["busy_s"] += r.busy_s
        w["finish_s"] = max(w["finish_s"], r.received_at)
        w["frames"] += r.n_frames
    finishes = [w["finish_s"] for w in workers.values()]
    fetch_s = sum(r.fetch_s for r in reports)
    wait_s = sum(r.fetch_wait_s for r in reports)
    busy_total = sum(r.busy_s for r in reports)
    summary: dict[str, Any] = {
        "frames": n,
        "hits": hits,
        "indexed": indexed,
        "misses": misses,
        "failed": failed,
        "hit_rate": hits / judged if judged else 0.0,
        "indexing_rate": indexed / hits if hits else 0.0,
        "frames_processed": processed,
        "wall_s": wall_s,
        "n_cores": n_cores,
        "frames_per_s": processed / wall_s if wall_s > 0 else 0.0,
        "frames_per_s_per_core": processed / wall_s / n_cores if wall_s > 0 and n_cores else 0.0,
        "core_seconds_per_frame": n_cores * wall_s / processed if processed else None,
        "busy_core_seconds_per_frame": busy_total / processed if processed else None,
        "stage_seconds": {k: round(v, 6) for k, v in sorted(stage_seconds.items())},
        "bytes_read": bytes_read,
        "bytes_per_frame": bytes_read / processed if processed else None,
        "read_mb_per_s": bytes_read / 1e6 / wall_s if wall_s > 0 else 0.0,
        "fetch_s": fetch_s,
        "fetch_wait_s": wait_s,
        "fetch_hidden_s": max(fetch_s - wait_s, 0.0),
        "workers": {k: {**v, "frames": int(v["frames"])} for k, v in sorted(workers.items())},
        "finish_spread_s": (max(finishes) - min(finishes)) if finishes else 0.0,
        "failed_reasons": dict(reasons.most_common()),
        "detector": dict(detector or {}),
        "sfxflow_version": __version__,
        "measured_by_run_at": time.time() if processed else None,
    }
    if extra:
        summary.update(extra)
    return summary


def keep_measured_figures(summary: Mapping[str, Any], previous: Mapping[str, Any]) -> dict[str, Any]:
    """``summary`` of an invocation that processed nothing, with the throughput figures of the
    ``previous`` summary (the run that did the work); ``summary`` itself otherwise.

    >>> new = {"frames": 10, "frames_processed": 0, "core_seconds_per_frame": None, "workers": {}}
    >>> old = {"frames": 10, "frames_processed": 10, "core_seconds_per_frame": 0.5, "workers": {"w": {}}}
    >>> kept = keep_measured_figures(new, old)
    >>> kept["core_seconds_per_frame"], kept["workers"], kept["frames_processed"]
    (0.5, {'w': {}}, 10)
    """
    out = dict(summary)
    if out.get("frames_processed") or not previous.get("frames_processed"):
        return out
    for key in MEASURED_KEYS:
        if key in previous:
            out[key] = previous[key]
    return out


def format_summary(s: Mapping[str, Any]) -> str:
    """A few human lines for the terminal."""
    lines = [
        f"frames {s['frames']}: hits {s['hits']} ({100 * s['hit_rate']:.1f}%), indexed "
        f"{s['indexed']} ({100 * s['indexing_rate']:.1f}% of hits), misses {s['misses']}, "
        f"failed {s['failed']}",
        f"processed {s['frames_processed']} frames in {s['wall_s']:.1f} s on {s['n_cores']} "
        f"core(s): {s['frames_per_s']:.2f} frames/s, {s['frames_per_s_per_core']:.2f} "
        f"frames/s per core",
    ]
    if s.get("fetch_s"):
        lines.append(f"reading: {s['bytes_read'] / 1e6:.1f} MB, {s['fetch_s']:.1f} s fetching of "
                     f"which {s['fetch_hidden_s']:.1f} s hidden behind computing")
    if s.get("workers"):
        lines.append(f"workers: {len(s['workers'])}, finish spread {s['finish_spread_s']:.1f} s")
    for reason, count in list(s.get("failed_reasons", {}).items())[:5]:
        lines.append(f"  failed x{count}: {reason}")
    return "\n".join(lines)


#: fewer values than this are printed each, not as a median
FEW_VALUES = 5


def _ms(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def format_times_ms(times_s: Sequence[float], what: str = "per frame") -> str:
    """Timings for a summary line: each value when there are few, else the median and range.

    Three significant digits (never "0.0 ms" for a fast step).

    >>> format_times_ms([0.2753, 0.3112])
    '275 and 311 ms per frame'
    >>> format_times_ms([0.00004, 0.00003, 0.00005, 0.00004, 0.00006])
    'median 0.04 ms per frame (0.03 to 0.06 ms, 5 frames)'
    >>> format_times_ms([])
    'no timings'
    """
    if not times_s:
        return "no timings"
    ms = sorted(1e3 * t for t in times_s)
    if len(ms) < FEW_VALUES:
        shown = [_ms(1e3 * t) for t in times_s]
        listed = shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} and {shown[-1]}"
        return f"{listed} ms {what}"
    n = len(ms)
    median = ms[n // 2] if n % 2 else 0.5 * (ms[n // 2 - 1] + ms[n // 2])
    return f"median {_ms(median)} ms {what} ({_ms(ms[0])} to {_ms(ms[-1])} ms, {n} frames)"
