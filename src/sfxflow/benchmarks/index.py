"""``sfxflow bench index``: ms per frame (one core, median) and indexing rate on simulated hits.

The hits are spot lists, not images: reflections of a random crystal predicted on the CSPAD
layout with :func:`~sfxflow.algorithms.predict.predict_spots`, a random subset kept, centroids
jittered, and false spots added at random pixels (:func:`simulated_hit`). This isolates the
indexer from the spot finder.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from sfxflow.algorithms.geometry import miller_indices, pixels_to_q
from sfxflow.algorithms.index import (
    IndexParams,
    TargetCell,
    further_lattice_params,
    index_lattices,
    index_spots,
    misorientation_deg,
    spots_left_after,
    target_table,
)
from sfxflow.algorithms.predict import predict_spots
from sfxflow.models import Beam, Crystal, Detector, SpotTable, as_space_group, as_unit_cell
from sfxflow.options import number

HELP = "indexing speed (ms/frame/core, median) and rate on simulated hits with 15/30/60 spots"
DESCRIPTION = HELP + """

Each frame: a random orientation of the target cell, N spots of which ~15% are false (random
pixels), centroids jittered by 0.3 px, reflections within 4e-4 1/A of the Ewald sphere (about
1.5 times the profile radius CrystFEL reports in the real 5-HT2B test stream, 2.6e-4 1/A), CSPAD layout at 130 mm, 1.3 A. Prints per space group
and spot count the median and 90th percentile time per frame, the indexing rate and the median
misorientation to the truth (modulo the point-group rotations). With --multi, also the median
and the largest time per hit of every-lattice indexing (index_lattices, as the pipeline runs it)
with the default max_crystals and with 1 on the same hits (the cost of searching the spots the
crystal leaves unexplained for another lattice), and the two-lattice recovery: each hit with a
second crystal's N/3 spots added (no false ones), how often both crystals are found (within
0.1 deg of the truth) with the default max_crystals; then the same cost on frames not
simulated here, with their spots as the pipeline finds them (the 16 independent stills and
the 2 real CSPAD CBFs in ../shared/data), and how many searches for a further lattice each
set made. With --further-min-indexed N, every lattice after the first must index N spots
(fewer left: no further search): what that saves and what it loses, side by side with a run
without it. Before timing, every candidate table a search on the detector can ask for is
built, as a long run has them cached.

Examples:
  sfxflow bench index
  sfxflow bench index --frames 100 --spots 30
  sfxflow bench index --spots 30 60 --multi
  sfxflow bench index --spots 30 60 --multi --further-min-indexed 10
"""

#: (name, cell, space group) of the benchmark targets.
TARGETS: tuple[tuple[str, str, str], ...] = (
    ("thermolysin", "93 93 130.5 90 90 120", "P 61 2 2"),
    ("lysozyme-like", "79.1 79.1 38.0 90 90 90", "P 43 21 2"),
    ("orthorhombic", "51.2 98.7 53.4 90 90 90", "P 21 21 21"),
    ("5-HT2B", "61.4 122.6 168.0 90 90 90", "C 2 2 21"),
    ("triclinic", "45.2 51.7 66.3 79.5 87.2 71.4", "P 1"),
)


@dataclass(frozen=True)
class SimulatedHit:
    """One simulated hit: its spots, the truth and which spots are false."""

    spots: SpotTable
    truth: Crystal
    is_false: np.ndarray
    true_hkl: np.ndarray


def simulated_hit(
    target: TargetCell,
    detector: Detector,
    beam: Beam,
    n_spots: int,
    rng: np.random.Generator,
    *,
    noise_px: float = 0.3,
    false_fraction: float = 0.15,
    max_excitation_inv_a: float = 0.0004,
    d_min_a: float = 2.0,
    b_factor_a2: float = 25.0,
) -> SimulatedHit:
    """Spot list of a random crystal: ``n_spots`` spots, ``false_fraction`` of them false.

    True spots are a random subset of the reflections predicted within
    ``max_excitation_inv_a`` of the Ewald sphere to ``d_min_a``, drawn with probability
    proportional to the Wilson fall-off ``exp(-B / (2 d²))`` (the strong, low-resolution
    spots are the ones a spot finder sees first); their centroids get Gaussian noise of
    ``noise_px`` in fs and ss. False spots are uniform over the detector's pixels.
    """
    hkl_all = miller_indices(target.cell, target.space_group, d_min_a)
    n_false = round(false_fraction * n_spots)
    n_true = n_spots - n_false
    for _ in range(100):
        u = Rotation.random(random_state=rng).as_matrix()
        truth = Crystal.from_u(target.cell, target.space_group, u)
        pred = predict_spots(truth, beam, detector, hkl_all, max_excitation_inv_a)
        if len(pred.panel) >= n_true:
            break
    else:  # pragma: no cover - the geometry cannot hold that many spots
        raise ValueError(f"cannot predict {n_true} spots for {target.key} on this detector")
    weight = np.exp(-b_factor_a2 / (2.0 * pred.d_a**2))
    pick = rng.choice(len(pred.panel), size=n_true, replace=False, p=weight / weight.sum())
    panel = pred.panel[pick]
    fs = pred.fs_px[pick] + rng.normal(0.0, noise_px, n_true)
    ss = pred.ss_px[pick] + rng.normal(0.0, noise_px, n_true)
    fp = rng.integers(0, len(detector), n_false)
    shapes = np.array([detector[int(p)].shape for p in fp]).reshape(-1, 2)
    ffs = rng.uniform(0, 1, n_false) * shapes[:, 1]
    fss = rng.uniform(0, 1, n_false) * shapes[:, 0]
    panel = np.concatenate([panel, fp])
    fs = np.concatenate([fs, ffs])
    ss = np.concatenate([ss, fss])
    is_false = np.concatenate([np.zeros(n_true, bool), np.ones(n_false, bool)])
    true_hkl = np.concatenate([pred.hkl[pick], np.zeros((n_false, 3), np.int32)])
    order = rng.permutation(n_spots)
    zeros = np.zeros(n_spots)
    spots = SpotTable(panel[order], fs[order], ss[order], zeros, zeros, zeros,
                      np.ones(n_spots, np.int32), zeros)
    return SimulatedHit(spots, truth, is_false[order], true_hkl[order])


def with_second_crystal(hit: SimulatedHit, target: TargetCell, detector: Detector, beam: Beam,
                        n_spots: int, rng: np.random.Generator) -> tuple[SpotTable, Crystal]:
    """``hit``'s spots and ``n_spots`` true spots of a second, randomly oriented crystal (the
    spots of a frame with two crystals), and the second crystal."""
    second = simulated_hit(target, detector, beam, n_spots, rng, false_fraction=0.0)
    spots = SpotTable(**{k: np.concatenate([v, getattr(second.spots, k)])
                         for k, v in hit.spots.to_dict().items()})
    return spots, second.truth


def warm_tables(target: TargetCell, detector: Detector, beam: Beam, params: IndexParams) -> None:
    """Build every candidate table (:func:`~sfxflow.algorithms.index.target_table`) a search on
    ``detector`` can ask for, as a long run has them all cached: a hit's first search takes
    its table from its low-resolution spots, the search for a further lattice from the false
    spots left over, anywhere on the detector, which need finer tables (30-90 ms each to
    build, once per process: without this they made the largest every-lattice times)."""
    corners = [(p, fs, ss) for p in range(len(detector))
               for fs in (0.0, float(detector[p].shape[1]))
               for ss in (0.0, float(detector[p].shape[0]))]
    panel, fs, ss = (np.array(c) for c in zip(*corners, strict=True))
    q_max = float(np.linalg.norm(pixels_to_q(detector, beam, panel, fs, ss), axis=1).max())
    d_a = 1.0 / (q_max * (1 + params.q_tolerance_rel) + params.q_tolerance_abs_inv_a)
    while d_a < 20.0:  # every step of the tables' grid (2^(1/4)) from there
        target_table(target, d_a)
        d_a *= 2.0**0.25


def add_arguments(parser: argparse.ArgumentParser) -> None:
    number(parser, "--frames", kind=int, default=40, ge=1, le=100_000,
           help="frames per case (default 40)")
    number(parser, "--spots", kind=int, nargs="+", default=[15, 30, 60], ge=3, le=10_000,
           help="spot counts per frame (default 15 30 60)")
    parser.add_argument("--targets", nargs="+", default=[t[0] for t in TARGETS],
                        choices=[t[0] for t in TARGETS], help="which targets (default all)")
    number(parser, "--seed", kind=int, default=1, ge=0, le=2**63 - 1, help="random seed")
    parser.add_argument("--multi", action="store_true",
                        help="also time index_lattices with the default max_crystals and with 1")
    number(parser, "--further-min-indexed", kind=int, default=None, ge=3, le=100_000,
           help="least spots a lattice after the first must index (default: min_indexed)")


def run(args: argparse.Namespace) -> int:
    from sfxflow.algorithms.layouts import cspad

    if args.frames < 1:
        from sfxflow.errors import InputError

        raise InputError(f"--frames must be >= 1, got {args.frames}")
    detector = cspad(distance_mm=130.0)
    beam = Beam(wavelength_a=1.3)
    params = IndexParams(further_min_indexed=args.further_min_indexed)
    rng = np.random.default_rng(args.seed)
    # the second crystals of --multi from their own stream: the hits are the same with or without
    second_rng = np.random.default_rng([args.seed, 2])
    print(f"sfxflow bench index: {args.frames} simulated hits per case, CSPAD 130 mm, 1.3 A, "
          "15% false spots, 0.3 px noise; one core, CPU time")
    print(f"{'target':<14} {'space group':<11} {'spots':>5} {'median ms':>9} {'p90 ms':>7} "
          f"{'indexed':>8} {'rate':>6} {'median misor deg':>16}")
    all_times: list[float] = []
    for name, cell, sg in TARGETS:
        if name not in args.targets:
            continue
        target = TargetCell(as_unit_cell(cell), as_space_group(sg))
        # warm the per-target cache (as a long run would be) before timing
        warm = simulated_hit(target, detector, beam, 30, rng)
        index_spots(warm.spots, detector, beam, target, params)
        warm_tables(target, detector, beam, params)
        for n in args.spots:
            hits = [simulated_hit(target, detector, beam, n, rng) for _ in range(args.frames)]
            times, mis, ok = [], [], 0
            for hit in hits:
                t0 = time.thread_time()  # CPU time: robust to other processes
                res = index_spots(hit.spots, detector, beam, target, params)
                times.append((time.thread_time() - t0) * 1e3)
                if res.success and res.crystal is not None:
                    ok += 1
                    mis.append(misorientation_deg(res.crystal, hit.truth))
            all_times.extend(times)
            p90 = float(np.percentile(times, 90))
            med_mis = statistics.median(mis) if mis else float("nan")
            print(f"{name:<14} {sg:<11} {n:>5} {statistics.median(times):>9.2f} {p90:>7.2f} "
                  f"{ok:>4}/{len(hits):<3} {100 * ok / len(hits):>5.1f}% {med_mis:>16.4f}")
            if args.multi:
                _print_multi_cost(hits, detector, beam, target, params, second_rng)
    if all_times:
        print(f"overall median {statistics.median(all_times):.2f} ms/frame/core "
              f"({1e3 / statistics.median(all_times):.0f} frames/s/core)")
    if args.multi:
        _print_multi_cost_real(params)
    return 0


def _real_frames() -> list[tuple[str, list[tuple[Any, SpotTable]], TargetCell]]:
    """The frames not simulated here, with their spots as the pipeline finds them: the 16
    independent stills (pattern_sim) and the 2 real LCLS CSPAD CBFs (``CSPAD_CBF_SETTINGS``),
    each set with its target; the sets ``../shared`` lacks are left out."""
    from sfxflow.algorithms.spots import (
        CSPAD_CBF_GAIN_ADU_PER_PHOTON,
        CSPAD_CBF_SETTINGS,
        SpotParams,
        find_spots,
    )
    from sfxflow.benchmarks.shared import shared_path
    from sfxflow.benchmarks.stills import load_stills, read_still, stills_config, stills_dir

    sets = []
    d = stills_dir()
    if d is not None:
        files, geometry, _ = load_stills(d)
        cfg = stills_config()
        frames = [read_still(p, geometry) for p in files]
        sets.append((f"{len(frames)} independent stills", [
            (f, find_spots(f, cfg.spots, gain_adu_per_photon=cfg.detector.gain_adu_per_photon))
            for f in frames], cfg.target_cell()))
    cbf_dir = shared_path("data/lcls-cspad-thermolysin")
    cbfs = sorted(cbf_dir.glob("*.cbf")) if cbf_dir else []
    if cbfs:
        from sfxflow.io.sources import open_source

        spot_params = replace(SpotParams(), **CSPAD_CBF_SETTINGS)
        thermolysin = TargetCell(as_unit_cell("93 93 130.5 90 90 120"),
                                 as_space_group("P 61 2 2"))
        for path in cbfs:
            with open_source(str(path)) as src:
                frame = src.read_frame(0)
            spots = find_spots(frame, spot_params,
                               gain_adu_per_photon=CSPAD_CBF_GAIN_ADU_PER_PHOTON)
            sets.append((f"CSPAD CBF {path.stem}", [(frame, spots)], thermolysin))
    return sets


def _print_multi_cost_real(params: IndexParams, repeats: int = 7) -> None:
    """:func:`_print_multi_cost` on frames not simulated here: CPU ms per frame of
    :func:`index_lattices` with ``params.max_crystals`` and with 1 (alternating, median of
    ``repeats`` passes), the searches for a further lattice made (those that found none
    included) and the lattices found."""
    sets = _real_frames()
    if not sets:
        print("(no independent stills or real CBFs under ../shared: real-frame cost skipped)")
        return
    one = replace(params, max_crystals=1)
    print(f"every lattice{_further_note(params)} on frames not simulated here (max_crystals "
          f"{params.max_crystals} against 1, CPU ms per frame, median of {repeats} passes):")
    for label, frames, target in sets:
        times: dict[int, list[float]] = {params.max_crystals: [], 1: []}
        lattices = searches = 0
        for rep in range(repeats + 1):
            for frame, spots in frames:
                for p in (params, one):
                    t0 = time.thread_time()
                    found = index_lattices(spots, frame.detector, frame.beam, target, p)
                    if rep:  # the first pass compiles and fills the caches
                        times[p.max_crystals].append((time.thread_time() - t0) * 1e3)
                    elif p is params:
                        lattices += sum(r.success for r in found)
                        searches += _further_searches(found, spots, frame, p)
        many, single = times[params.max_crystals], times[1]
        print(f"  {label:<34} {statistics.median(many):7.2f} against {statistics.median(single):7.2f}"
              f" ms (+{statistics.median(many) - statistics.median(single):.2f}); "
              f"{lattices} lattices, {searches} searches for a further one")


def _further_note(params: IndexParams) -> str:
    """What the every-lattice lines say of ``further_min_indexed`` (nothing when unset)."""
    if params.further_min_indexed is None:
        return ""
    return f" (further lattices must index {params.further_min_indexed} spots)"


def _further_searches(found: list[Any], spots: SpotTable, frame: Any,
                      params: IndexParams) -> int:
    """How many times :func:`index_lattices` searched for a further lattice on the frame whose
    lattices it returned as ``found``: its steps replayed with its own rule
    (:func:`~sfxflow.algorithms.index.spots_left_after`), a search after each lattice while
    spots are left and ``max_crystals`` not reached (those that found none included)."""
    remaining = np.arange(len(spots))
    further = further_lattice_params(params)
    searches = 0
    for k, res in enumerate(r for r in found if r.success):
        sub = spots.select(remaining)
        on_sub = replace(res, indexed_mask=res.indexed_mask[remaining])
        remaining = spots_left_after(on_sub, sub, remaining, frame.detector, frame.beam, further)
        if remaining.size == 0 or k + 1 >= params.max_crystals:
            break
        searches += 1
    return searches


def _print_multi_cost(hits: list[SimulatedHit], detector: Detector, beam: Beam,
                      target: TargetCell, params: IndexParams, rng: np.random.Generator) -> None:
    """Median and largest CPU ms per hit of :func:`index_lattices` with ``params.max_crystals``
    and with 1, alternating per hit so that both see the same load; then how often both
    crystals of a two-crystal hit are found."""
    one = replace(params, max_crystals=1)
    times: dict[int, list[float]] = {params.max_crystals: [], 1: []}
    n_extra = 0
    for hit in hits:
        for p in (params, one):
            t0 = time.thread_time()
            found = index_lattices(hit.spots, detector, beam, target, p)
            times[p.max_crystals].append((time.thread_time() - t0) * 1e3)
            if p is params:
                n_extra += sum(r.success for r in found[1:])
    many, single = times[params.max_crystals], times[1]
    print(f"{'':<14} {'':<11} {'':>5} every lattice{_further_note(params)}: max_crystals "
          f"{params.max_crystals} {statistics.median(many):.2f} ms (max {max(many):.1f}), "
          f"max_crystals 1 "
          f"{statistics.median(single):.2f} ms (max {max(single):.1f}); "
          f"{n_extra} further lattices found")
    n_second = max(params.min_indexed, len(hits[0].spots) // 3)
    both = 0
    for hit in hits:
        spots, second = with_second_crystal(hit, target, detector, beam, n_second, rng)
        crystals = [r.crystal for r in index_lattices(spots, detector, beam, target, params)
                    if r.success and r.crystal is not None]
        both += all(any(misorientation_deg(c, truth) < 0.1 for c in crystals)
                    for truth in (hit.truth, second))
    print(f"{'':<14} {'':<11} {'':>5} two lattices (a second crystal's {n_second} spots added): "
          f"both found {both}/{len(hits)}")
