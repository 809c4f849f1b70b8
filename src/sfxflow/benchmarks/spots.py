"""``sfxflow bench spots``: spot-finding speed on one core (and, with --accuracy, its accuracy)."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit

from sfxflow.options import number

HELP = "spot finding: ms/frame on one core vs a memory-bound floor; --accuracy vs simulated truth"
DESCRIPTION = HELP + """

Speed: times find_spots (default SpotParams) on simulated CSPAD (2.3 Mpixel) and Jungfrau 4M
frames (hits and blanks), and on the two real LCLS CSPAD CBF frames when ../shared/data is
present (with the default SpotParams and with CSPAD_CBF_SETTINGS, the settings for those
files) and on the 16 independent stills rendered by CrystFEL's pattern_sim (when present); one
numba thread, CPU time, median over frames x repeats after a warm-up call. In the same run it
times one plain streaming pass over the same frames (a compiled sum) and prints the ratio to that
memory-bound floor.

Accuracy (--accuracy): simulates frames with ground truth (mixed hits and blanks) and prints the
recall of truth reflections with true SNR >= 5, the precision (found spots within 2 px of any
truth reflection), the median centroid error of matched spots and the hit classification
accuracy (default HitParams).

Examples:
  sfxflow bench spots
  sfxflow bench spots --frames 10 --repeats 5 --method radial
  sfxflow bench spots --accuracy --accuracy-frames 300
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    number(parser, "--frames", kind=int, default=6, ge=1, le=100_000,
           help="simulated frames per detector")
    number(parser, "--repeats", kind=int, default=5, ge=1, le=1000,
           help="timed passes over the frames")
    parser.add_argument("--method", choices=("dispersion", "radial"), default="dispersion")
    parser.add_argument("--noise-model", choices=("auto", "poisson", "local"), default="auto")
    number(parser, "--window-px", "--window", kind=int, ge=3, le=63,
           help="local window (default 9)")
    number(parser, "--min-snr", ge=0, le=1000,
           help="SpotParams.min_snr (default: SpotParams' default)")
    number(parser, "--seed", kind=int, default=1, ge=0, le=2**63 - 1,
           help="simulation seed (default 1)")
    parser.add_argument("--no-real", action="store_true", help="skip the real CBF frames")
    parser.add_argument("--accuracy", action="store_true",
                        help="also measure accuracy against simulated truth")
    number(parser, "--accuracy-frames", kind=int, default=300, ge=1, le=100_000,
           help="frames simulated for --accuracy (default 300)")


@dataclass(frozen=True)
class AccuracyReport:
    """Accuracy of spot and hit finding against simulated truth."""

    frames: int
    hits_true: int
    reflections_snr5: int
    recall: float
    found: int
    precision: float
    median_centroid_error_px: float
    hit_accuracy: float
    misses_as_hits: int
    hits_as_misses: int


def match_spots(spots: Any, truth: dict[str, np.ndarray], radius_px: float = 2.0,
                min_snr: float = 5.0) -> tuple[int, int, int, list[float]]:
    """Match found spots with truth reflections on the same panel within ``radius_px``.

    Returns ``(n_truth_snr, n_truth_snr_found, n_found_matched, centroid_errors_px)``: truth
    reflections with ``snr_true >= min_snr``, how many of them have a found spot within the
    radius, how many found spots lie within the radius of any truth reflection, and the distance
    of each matched found spot to its nearest truth reflection.
    """
    from scipy.spatial import cKDTree

    strong = truth["snr_true"] >= min_snr
    n_found_matched = 0
    n_truth_found = 0
    errors: list[float] = []
    for p in np.unique(spots.panel):
        ti = np.flatnonzero(truth["panel"] == p)
        fi = np.flatnonzero(spots.panel == p)
        if len(ti) == 0:
            continue
        t_xy = np.c_[truth["fs_px"][ti], truth["ss_px"][ti]]
        f_xy = np.c_[spots.fs_px[fi], spots.ss_px[fi]]
        dist, _ = cKDTree(t_xy).query(f_xy, distance_upper_bound=radius_px)
        ok = np.isfinite(dist)
        n_found_matched += int(ok.sum())
        errors.extend(dist[ok].tolist())
        dist_t, _ = cKDTree(f_xy).query(t_xy, distance_upper_bound=radius_px)
        n_truth_found += int((np.isfinite(dist_t) & strong[ti]).sum())
    return int(strong.sum()), n_truth_found, n_found_matched, errors


def measure_accuracy(n_frames: int, seed: int, spot_params: Any = None,
                     hit_params: Any = None) -> AccuracyReport:
    """Simulate ``n_frames`` CSPAD frames (default SimulationParams) and score find_spots."""
    from sfxflow.algorithms.layouts import cspad
    from sfxflow.algorithms.simulate import SimulationParams, iter_frames
    from sfxflow.algorithms.spots import HitParams, SpotParams, find_spots, is_hit
    from sfxflow.models import Detector, Frame

    spot_params = spot_params or SpotParams()
    hit_params = hit_params or HitParams()
    sim = SimulationParams()
    detector = cspad().with_gain(sim.adu_per_photon)
    n_truth = n_truth_found = n_found = n_matched = 0
    errors: list[float] = []
    correct = hits_true = fp_hits = fn_hits = 0
    for ft, image, truth in iter_frames(detector, sim, n_frames, seed=seed):
        spots = find_spots(Frame(image, detector, ft.beam), spot_params)
        hit = is_hit(spots, hit_params)
        hits_true += ft.is_hit
        correct += hit == ft.is_hit
        fp_hits += hit and not ft.is_hit
        fn_hits += ft.is_hit and not hit
        a, b, c, errs = match_spots(spots, truth)
        n_truth += a
        n_truth_found += b
        n_matched += c
        n_found += len(spots)
        errors.extend(errs)
    assert isinstance(detector, Detector)
    return AccuracyReport(
        frames=n_frames, hits_true=hits_true, reflections_snr5=n_truth,
        recall=n_truth_found / n_truth if n_truth else float("nan"), found=n_found,
        precision=n_matched / n_found if n_found else float("nan"),
        median_centroid_error_px=float(np.median(errors)) if errors else float("nan"),
        hit_accuracy=correct / n_frames if n_frames else float("nan"),
        misses_as_hits=fp_hits, hits_as_misses=fn_hits,
    )


@njit(cache=True, nogil=True, fastmath=True)
def _sum_kernel(a):  # pragma: no cover - compiled
    # indexed loop: LLVM vectorises it (``for x in a`` compiled to a scalar add chain, 4x
    # slower than reading the frame, which made the floor look 4x higher than it is)
    acc = 0.0
    for i in range(a.shape[0]):
        acc += np.float64(a[i])
    return acc


def _stream_sum(data: np.ndarray) -> float:
    """One plain streaming pass over the frame (the memory-bound floor of any per-pixel work):
    a vectorised sum, as fast as the frame can be read."""
    return float(_sum_kernel(data.reshape(-1)))


def _time_per_frame(fn: Callable[[Any], Any], items: list[Any], repeats: int) -> list[float]:
    """CPU seconds of this thread per call (robust to other processes on a shared machine)."""
    out = []
    for _ in range(repeats):
        for it in items:
            t0 = time.thread_time()
            fn(it)
            out.append(time.thread_time() - t0)
    return out


def _report(label: str, frames: list[Any], params: Any, repeats: int,
            gain_adu_per_photon: float | None = None) -> None:
    from functools import partial

    from sfxflow.algorithms.spots import find_spots as find

    find_spots = partial(find, gain_adu_per_photon=gain_adu_per_photon)

    n_px = frames[0].detector.n_pixels
    t0 = time.perf_counter()
    first = find_spots(frames[0], params)
    first_s = time.perf_counter() - t0
    _stream_sum(frames[0].data)
    spots_t = _time_per_frame(lambda f: find_spots(f, params), frames, repeats)
    floor_t = _time_per_frame(lambda f: _stream_sum(f.data), frames, repeats)
    counts = [len(find_spots(f, params)) for f in frames]
    med, flo = statistics.median(spots_t), statistics.median(floor_t)
    mb = frames[0].data.nbytes / 1e6
    print(f"{label}: {len(frames)} frames x {repeats} repeats, {n_px / 1e6:.2f} Mpixel "
          f"({mb:.1f} MB {frames[0].data.dtype}), spots/frame median "
          f"{statistics.median(counts):.0f} (first call {first_s * 1e3:.0f} ms, "
          f"{len(first)} spots)")
    print(f"  find_spots    median {med * 1e3:7.2f} ms/frame  ({n_px / med / 1e6:6.0f} Mpixel/s, "
          f"{med * 1e3 / (n_px / 1e6):.2f} ms/Mpixel)"
          f"  p90 {np.percentile(spots_t, 90) * 1e3:.2f} ms")
    print(f"  streaming sum median {flo * 1e3:7.2f} ms/frame  ({mb / flo / 1e3:6.1f} GB/s)"
          f"  -> find_spots = {med / flo:.1f} x the memory-bound floor")


def run(args: argparse.Namespace) -> int:
    import numba

    from sfxflow.algorithms.layouts import cspad, jungfrau4m
    from sfxflow.algorithms.simulate import SimulationParams, iter_frames
    from sfxflow.algorithms.spots import SpotParams
    from sfxflow.errors import InputError
    from sfxflow.models import Frame

    if args.frames < 1 or args.repeats < 1 or args.accuracy_frames < 1:
        raise InputError(f"--frames {args.frames} / --repeats {args.repeats} / --accuracy-frames "
                         f"{args.accuracy_frames}: expected >= 1")
    numba.set_num_threads(1)
    kw: dict[str, Any] = {"method": args.method, "noise_model": args.noise_model}
    if args.window_px is not None:
        kw["window_px"] = args.window_px
    if args.min_snr is not None:
        kw["min_snr"] = args.min_snr
    params = SpotParams(**kw)
    print(f"sfxflow bench spots: {params.method}, noise model {params.noise_model}, window "
          f"{params.window_px}, min SNR {params.min_snr:g}, 1 numba thread")
    sim = SimulationParams()
    for name, layout in (("CSPAD (simulated)", cspad()), ("Jungfrau 4M (simulated)",
                                                           jungfrau4m())):
        detector = layout.with_gain(sim.adu_per_photon)
        frames = [Frame(img, detector, ft.beam, "sim", ft.index)
                  for ft, img, _ in iter_frames(detector, sim, args.frames, seed=args.seed)]
        _report(name, frames, params, args.repeats)
    from sfxflow.benchmarks.stills import load_stills, read_still, stills_dir

    d = stills_dir()
    if d is not None and not args.no_real:
        files, geometry, _ = load_stills(d)
        _report(f"independent stills ({len(files)} lysozyme frames by pattern_sim)",
                [read_still(p, geometry) for p in files], params, args.repeats)
    data_dir = Path(__file__).resolve().parents[3].parent / "shared" / "data"
    cbfs = sorted((data_dir / "lcls-cspad-thermolysin").glob("*.cbf"))
    if cbfs and not args.no_real:
        from sfxflow.io.sources import open_source

        real = []
        for path in cbfs:
            with open_source(str(path)) as src:
                real.append(src.read_frame(0))
        _report(f"CSPAD real CBF ({len(real)} LCLS thermolysin frames)", real, params,
                max(args.repeats, 10))
        from sfxflow.algorithms.spots import CSPAD_CBF_GAIN_ADU_PER_PHOTON, CSPAD_CBF_SETTINGS

        _report(f"CSPAD real CBF with CSPAD_CBF_SETTINGS {CSPAD_CBF_SETTINGS} and gain "
                f"{CSPAD_CBF_GAIN_ADU_PER_PHOTON:g} ADU/photon", real,
                replace(params, **CSPAD_CBF_SETTINGS), max(args.repeats, 10),
                CSPAD_CBF_GAIN_ADU_PER_PHOTON)
    elif not args.no_real:
        print(f"(real CBF frames not found under {data_dir}: skipped)")
    if args.accuracy:
        t0 = time.perf_counter()
        rep = measure_accuracy(args.accuracy_frames, args.seed, params)
        print(f"accuracy on {rep.frames} simulated CSPAD frames ({rep.hits_true} hits, "
              f"{time.perf_counter() - t0:.0f} s):")
        print(f"  recall of {rep.reflections_snr5} truth reflections with SNR >= 5: "
              f"{100 * rep.recall:.1f}%")
        print(f"  precision of {rep.found} found spots (within 2 px of a truth reflection): "
              f"{100 * rep.precision:.1f}%")
        print(f"  median centroid error of matched spots: {rep.median_centroid_error_px:.3f} px")
        print(f"  hit classification: {100 * rep.hit_accuracy:.1f}% "
              f"({rep.misses_as_hits} blanks called hits, {rep.hits_as_misses} hits missed)")
    return 0
