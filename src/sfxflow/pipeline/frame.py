"""The per-frame pipeline: spots -> hit? -> index, one :class:`ImageResult` per frame, always.

Like CrystFEL's indexamajig, every stage is labelled: a frame that fails says in which stage and
why, and processing goes on with the next frame.
"""

from __future__ import annotations

import logging
import time

from sfxflow.algorithms.index import index_spots
from sfxflow.algorithms.spots import find_spots, is_hit
from sfxflow.models import Frame, FrameStatus, ImageResult
from sfxflow.pipeline.config import ProcessConfig

__all__ = ["process_frame"]

logger = logging.getLogger(__name__)

_reported: set[tuple[str, str]] = set()


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _failure(frame: Frame, stage: str, exc: Exception, config: ProcessConfig,
             timings: dict[str, float], n_spots: int = 0) -> ImageResult:
    if config.run.strict:
        raise exc
    reason = _reason(exc)
    key = (stage, type(exc).__name__)
    if key not in _reported:  # the traceback once per kind of failure, then one-line warnings
        _reported.add(key)
        logger.warning("%s: stage %s failed: %s", frame.frame_id, stage, reason, exc_info=exc)
    else:
        logger.warning("%s: stage %s failed: %s", frame.frame_id, stage, reason)
    return ImageResult(source_url=frame.source_url, frame_index=frame.index,
                       status=FrameStatus.FAILED, event_id=frame.event_id, stage=stage,
                       reason=reason, n_spots=n_spots, timings_s=timings)


def process_frame(frame: Frame, config: ProcessConfig) -> ImageResult:
    """Find spots, decide hit or miss, and index hits against the target cell.

    Parameters
    ----------
    frame : one still image with its geometry.
    config : the run configuration (``spots``, ``hit``, ``index``, ``target`` sections).

    Returns
    -------
    ImageResult
        ``miss``; ``hit`` (not indexed: ``stage='index'`` and the indexer's ``reason``, or no
        target cell configured); ``indexed`` (crystal, Miller indices, RMSD); or ``failed`` with
        the stage (``spots``, ``index``) and the exception's type and message. Never raises for
        bad data (``config.run.strict`` re-raises, for debugging). ``timings_s`` has ``spots``,
        ``hit`` and ``index`` seconds.

    Examples
    --------
    >>> import numpy as np
    >>> from sfxflow.models import Beam, Detector, Panel
    >>> panel = Panel("p0", (-10.0, -10.0, 100.0), (1, 0, 0), (0, 1, 0), 0.1, (100, 100))
    >>> frame = Frame(np.ones((100, 100), np.float32), Detector((panel,)), Beam(1.0), "x.h5", 0)
    >>> r = process_frame(frame, ProcessConfig())
    >>> r.status.value, r.n_spots
    ('miss', 0)
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        spots = find_spots(frame, config.spots)
    except Exception as exc:
        timings["spots"] = time.perf_counter() - t0
        return _failure(frame, "spots", exc, config, timings)
    t1 = time.perf_counter()
    timings["spots"] = t1 - t0
    n_spots = len(spots)
    hit = is_hit(spots, config.hit)
    t2 = time.perf_counter()
    timings["hit"] = t2 - t1
    common = {"source_url": frame.source_url, "frame_index": frame.index,
              "event_id": frame.event_id, "n_spots": n_spots, "spots": spots, "timings_s": timings}
    if not hit:
        return ImageResult(status=FrameStatus.MISS, **common)  # type: ignore[arg-type]
    target = config.target_cell()
    if target is None:
        return ImageResult(status=FrameStatus.HIT, stage="index", reason="no target cell",
                           **common)  # type: ignore[arg-type]
    try:
        result = index_spots(spots, frame.detector, frame.beam, target, config.index)
    except Exception as exc:
        timings["index"] = time.perf_counter() - t2
        failed = _failure(frame, "index", exc, config, timings, n_spots)
        return ImageResult(**{**failed.__dict__, "spots": spots})
    timings["index"] = time.perf_counter() - t2
    if not result.success:
        return ImageResult(status=FrameStatus.HIT, stage="index", reason=result.reason,
                           **common)  # type: ignore[arg-type]
    return ImageResult(status=FrameStatus.INDEXED, crystal=result.crystal,
                       miller_indices=result.miller_indices, n_indexed=int(result.n_indexed),
                       rmsd_px=float(result.rmsd_px), **common)  # type: ignore[arg-type]
