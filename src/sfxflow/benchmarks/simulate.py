"""``sfxflow bench simulate``: frames per second the simulator renders on one core (median)."""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from sfxflow.options import number

HELP = "simulator speed: frames/s on one core for a detector layout (median of runs)"
DESCRIPTION = HELP + """

Renders hits (a random thermolysin-like crystal each) and blank frames on a built-in layout with
the default SimulationParams, timing simulate_frame only (no file writing). The first call, which
compiles the numba kernels (or loads them from numba's cache) and builds the per-detector pixel
maps and the reflection list, is timed and reported separately. Runs on one numba thread.

Examples:
  sfxflow bench simulate
  sfxflow bench simulate --detector jungfrau4m --frames 10 --repeats 5
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--detector", default="cspad", help="cspad, jungfrau4m or simple")
    number(parser, "--frames", kind=int, default=10, ge=1, le=100_000,
           help="frames per run (default 10)")
    number(parser, "--repeats", kind=int, default=5, ge=1, le=1000, help="timed runs (default 5)")
    number(parser, "--seed", kind=int, default=0, ge=0, le=2**63 - 1,
           help="random seed (default 0)")


def run(args: argparse.Namespace) -> int:
    import numba

    from sfxflow.algorithms.layouts import by_name
    from sfxflow.algorithms.simulate import SimulationParams, random_crystal, simulate_frame

    numba.set_num_threads(1)
    detector = by_name(args.detector)
    params = SimulationParams()
    beam = params.beam()
    rng = np.random.default_rng(args.seed)
    cell, sg = params.unit_cell(), params.spacegroup()

    t0 = time.perf_counter()
    simulate_frame(detector, beam, random_crystal(cell, sg, rng), params, rng)
    first_s = time.perf_counter() - t0

    crystals = [random_crystal(cell, sg, rng) for _ in range(args.frames)]
    hit_runs, miss_runs, n_refl = [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for c in crystals:
            _, truth = simulate_frame(detector, beam, c, params, rng)
            n_refl.append(int(np.count_nonzero(truth["snr_true"] >= 5)))
        hit_runs.append((time.perf_counter() - t0) / args.frames)
        t0 = time.perf_counter()
        for _ in range(args.frames):
            simulate_frame(detector, beam, None, params, rng)
        miss_runs.append((time.perf_counter() - t0) / args.frames)
    hit_s, miss_s = statistics.median(hit_runs), statistics.median(miss_runs)
    print(f"simulate on {args.detector}: {len(detector)} panels, {detector.n_pixels / 1e6:.2f} "
          f"Mpixel, {args.repeats} runs x {args.frames} frames, 1 numba thread")
    print(f"  first call (numba compile/cache load + pixel maps + reflection list): "
          f"{first_s:.2f} s")
    print(f"  hit:   median {hit_s * 1e3:7.1f} ms/frame = {1 / hit_s:6.1f} frames/s "
          f"(median {statistics.median(n_refl):.0f} reflections with true SNR >= 5)")
    print(f"  blank: median {miss_s * 1e3:7.1f} ms/frame = {1 / miss_s:6.1f} frames/s")
    return 0
