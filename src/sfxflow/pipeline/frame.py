"""The per-frame pipeline: spots -> hit? -> index (every lattice) -> predict + integrate, one
:class:`ImageResult` per frame, always.

Like CrystFEL's indexamajig, every stage is labelled: a frame that fails says in which stage and
why, and processing goes on with the next frame.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np

from sfxflow.algorithms.index import IndexResult, index_lattices
from sfxflow.algorithms.integrate import (
    integrate_reflections,
    peak_occupancy,
    resolution_limit_a,
)
from sfxflow.algorithms.predict import (
    Prediction,
    excitation_errors,
    predict_reflections,
    refine_profile,
)
from sfxflow.algorithms.spots import find_spots, is_hit
from sfxflow.errors import failure_reason, raise_interrupt_behind
from sfxflow.models import CrystalResult, Frame, FrameStatus, ImageResult
from sfxflow.pipeline.config import ProcessConfig

__all__ = ["integrate_lattices", "process_frame"]

logger = logging.getLogger(__name__)

_reported: set[tuple[str, str]] = set()


def _failure(frame: Frame, stage: str, exc: Exception, config: ProcessConfig,
             timings: dict[str, float], n_spots: int = 0) -> ImageResult:
    raise_interrupt_behind(exc)
    if config.run.strict:
        raise exc
    reason = failure_reason(exc)
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
    """Find spots, decide hit or miss, index every lattice of a hit and integrate each.

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
        ``hit``, ``index`` and ``integrate`` seconds; ``crystals`` one record per lattice.

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
        spots = find_spots(frame, config.spots,
                           gain_adu_per_photon=config.detector.gain_adu_per_photon)
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
        lattices = index_lattices(spots, frame.detector, frame.beam, target, config.index)
    except Exception as exc:
        timings["index"] = time.perf_counter() - t2
        failed = _failure(frame, "index", exc, config, timings, n_spots)
        return ImageResult(**{**failed.__dict__, "spots": spots})
    t3 = time.perf_counter()
    timings["index"] = t3 - t2
    first = lattices[0]
    if not first.success:
        return ImageResult(status=FrameStatus.HIT, stage="index", reason=first.reason,
                           **common)  # type: ignore[arg-type]
    crystals = integrate_lattices(frame, lattices, config)
    timings["integrate"] = time.perf_counter() - t3
    hkl = np.zeros((n_spots, 3), np.int32)
    for lat in reversed(lattices):  # the first lattice wins a spot two lattices claim
        hkl[lat.indexed_mask] = lat.miller_indices[lat.indexed_mask]
    return ImageResult(status=FrameStatus.INDEXED, crystal=first.crystal,
                       miller_indices=hkl, n_indexed=int(first.n_indexed),
                       rmsd_px=float(first.rmsd_px), crystals=tuple(crystals),
                       **common)  # type: ignore[arg-type]


def _crystal_record(lat: IndexResult) -> CrystalResult:
    assert lat.crystal is not None
    return CrystalResult(crystal=lat.crystal, indexed_mask=lat.indexed_mask,
                         miller_indices=lat.miller_indices, n_indexed=int(lat.n_indexed),
                         rmsd_px=float(lat.rmsd_px),
                         detector_shift_mm=tuple(lat.detector_shift_mm))  # type: ignore[arg-type]


def integrate_lattices(frame: Frame, lattices: list[IndexResult],
                       config: ProcessConfig) -> list[CrystalResult]:
    """Profile model, prediction and summation integration of every lattice on a frame.

    A lattice whose stage fails (nothing predicted on the detector, every peak masked, an
    error) is kept with ``status='failed'`` and the reason; the frame's other lattices are not
    affected. Predicted peaks of every lattice are kept out of each other's backgrounds.
    """
    records = [_crystal_record(lat) for lat in lattices]
    if config.integrate.method == "none":
        return records
    predictions: list[Prediction | None] = []
    for i, lat in enumerate(lattices):
        rec = records[i]
        try:
            exc, q_len = excitation_errors(rec.crystal, lat.miller_indices[lat.indexed_mask],
                                           frame.beam)
            profile = refine_profile(exc, q_len, frame.beam, config.predict)
            pred = predict_reflections(rec.crystal, frame.beam, frame.detector, profile,
                                       config.predict, rec.detector_shift_mm)
        except Exception as exc_:
            predictions.append(None)
            records[i] = replace(rec, status="failed", reason=_stage_error(frame, exc_, config))
            continue
        predictions.append(pred)
        records[i] = replace(rec, profile_radius_inv_a=profile.radius_inv_a,
                             n_predicted=len(pred))
    try:
        occupancy = peak_occupancy(frame.data, frame.detector,
                                   [p for p in predictions if p is not None], config.integrate)
    except Exception as exc_:
        reason = _stage_error(frame, exc_, config)
        return [r if r.status == "failed" else replace(r, status="failed", reason=reason)
                for r in records]
    gain = config.detector.gain_adu_per_photon
    for i, maybe in enumerate(predictions):
        rec = records[i]
        if maybe is None:
            continue
        pred = maybe
        if len(pred) == 0:
            records[i] = replace(rec, status="failed", reason=(
                f"no predicted reflection lands on the detector ({pred.n_off_detector} "
                "fall in gaps or beyond the panels)"))
            continue
        try:
            refl = integrate_reflections(frame.data, frame.detector, pred, config.integrate,
                                         gain, occupancy)
        except Exception as exc_:
            records[i] = replace(rec, status="failed", reason=_stage_error(frame, exc_, config))
            continue
        if len(refl) == 0:
            records[i] = replace(rec, status="failed", reflections=refl, reason=(
                f"none of {len(pred)} predicted reflections could be integrated (peaks masked, "
                "off the panels or without background)"))
            continue
        limit = resolution_limit_a(refl)
        if not np.isfinite(limit):  # too few strong reflections: how far its spots reach
            _, q_len = excitation_errors(rec.crystal, rec.miller_indices[rec.indexed_mask],
                                         frame.beam)
            limit = 1.0 / float(q_len.max()) if q_len.size else float("nan")
        records[i] = replace(rec, status="integrated", reflections=refl,
                             resolution_limit_a=limit)
    return records


def _stage_error(frame: Frame, exc: Exception, config: ProcessConfig) -> str:
    raise_interrupt_behind(exc)
    if config.run.strict:
        raise exc
    reason = failure_reason(exc)
    key = ("integrate", type(exc).__name__)
    if key not in _reported:
        _reported.add(key)
        logger.warning("%s: stage integrate failed for a crystal: %s", frame.frame_id, reason,
                       exc_info=exc)
    else:
        logger.warning("%s: stage integrate failed for a crystal: %s", frame.frame_id, reason)
    return reason

