"""``sfxflow simulate``: write a simulated SFX data set (CXI files, geometry, Parquet truth)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

from sfxflow.errors import InputError

HELP = "simulate SFX stills with ground truth: CXI files + geometry.geom + truth Parquet"
DESCRIPTION = HELP + """

Writes OUT_DIR/run_XXXX.cxi (frames x ss x fs float32, per-frame photon energy),
OUT_DIR/geometry.geom, truth_frames.parquet, truth_reflections.parquet and simulation.json.
The default crystal is thermolysin-like (P 61 2 2, a = b = 93, c = 130.5 A) at 9.5 keV.

Examples:
  sfxflow simulate sim/ --frames 100 --files 4 --detector cspad --seed 1
  sfxflow simulate sim/ --frames 20 --detector jungfrau4m --compression bitshuffle-lz4
  sfxflow simulate sim/ --frames 10 --cell "79 79 38 90 90 90" --space-group P43212
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the data set into")
    parser.add_argument("--frames", type=int, default=100, help="number of frames (default 100)")
    parser.add_argument("--files", type=int, default=1, help="number of CXI files (default 1)")
    parser.add_argument("--detector", default="cspad",
                        help="built-in layout: cspad, jungfrau4m or simple (default cspad)")
    parser.add_argument("--geometry", metavar="FILE.geom",
                        help="CrystFEL geometry to simulate on instead of a built-in layout")
    parser.add_argument("--cell", help='unit cell "a b c alpha beta gamma" (A, degrees)')
    parser.add_argument("--space-group", help="space group symbol or number (e.g. P6122)")
    parser.add_argument("--hit-fraction", type=float, help="fraction of frames with a crystal")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--compression", default="none", choices=("none", "bitshuffle-lz4"),
                        help="HDF5 compression (default none)")
    parser.add_argument("--distance-mm", type=float, help="detector distance in mm")
    parser.add_argument("--wavelength-a", type=float, help="X-ray wavelength in A")
    parser.add_argument("--d-min-a", type=float, help="highest resolution simulated, A")


def _positive(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise InputError(f"{name} {value!r}: expected a positive number")


def build_params(args: argparse.Namespace):
    """SimulationParams from the command-line options (user errors raise InputError)."""
    from sfxflow.algorithms.simulate import SimulationParams
    from sfxflow.models import as_space_group, as_unit_cell

    changes: dict = {}
    if args.cell is not None:
        try:
            cell = as_unit_cell(args.cell)
        except ValueError as exc:
            raise InputError(f"--cell {args.cell!r}: {exc}") from exc
        changes["cell"] = tuple(cell.parameters)
    if args.space_group is not None:
        try:
            changes["space_group"] = as_space_group(args.space_group).xhm()
        except ValueError as exc:
            raise InputError(f"--space-group {args.space_group!r}: not a known space group "
                             "(expected e.g. P6122, 'P 61 2 2' or 178)") from exc
    if args.hit_fraction is not None:
        if not (math.isfinite(args.hit_fraction) and 0 <= args.hit_fraction <= 1):
            raise InputError(f"--hit-fraction {args.hit_fraction!r}: expected a number from 0 to 1")
        changes["hit_fraction"] = args.hit_fraction
    _positive("--wavelength-a", args.wavelength_a)
    if args.wavelength_a is not None:
        if not 0.1 <= args.wavelength_a <= 10:
            raise InputError(f"--wavelength-a {args.wavelength_a!r}: expected 0.1 to 10 A")
        changes["wavelength_a"] = args.wavelength_a
    _positive("--d-min-a", args.d_min_a)
    if args.d_min_a is not None:
        changes["d_min_a"] = args.d_min_a
    base = SimulationParams()
    return dataclasses.replace(base, **changes)


def build_detector(args: argparse.Namespace, params):
    """The detector from --geometry or --detector (+ --distance-mm)."""
    from sfxflow.algorithms.layouts import by_name

    _positive("--distance-mm", args.distance_mm)
    if args.geometry:
        from sfxflow.io.geometry import read_geom

        geom = read_geom(args.geometry)
        values: dict[str, float] = {}
        for key in geom.references:
            if key.endswith("photon_energy"):
                values[key] = params.beam().photon_energy_ev  # the simulated beam's energy
            elif args.distance_mm is None:
                raise InputError(
                    f"{args.geometry}: '{key}' is read per frame from the data files "
                    f"({geom.references[key]}); give --distance-mm to place the detector"
                )
            else:
                values[key] = 0.0  # replaced below: the panels are moved to --distance-mm
        det, _ = geom.resolve(values or None)
        if args.distance_mm is not None:
            shift = args.distance_mm - det.mean_distance_mm()
            det = type(det)(
                tuple(dataclasses.replace(p, origin_mm=(p.origin_mm[0], p.origin_mm[1],
                                                        p.origin_mm[2] + shift))
                      for p in det.panels),
                rigid_groups=dict(det.rigid_groups),
            )
        return det, Path(args.geometry).name
    return by_name(args.detector, distance_mm=args.distance_mm), args.detector.lower()


def run(args: argparse.Namespace) -> int:
    from sfxflow.io.simulated import write_simulated_dataset

    if args.frames < 1:
        raise InputError(f"--frames {args.frames}: expected at least 1")
    if not 1 <= args.files <= args.frames:
        raise InputError(f"--files {args.files}: expected 1 to --frames ({args.frames})")
    params = build_params(args)
    detector, name = build_detector(args, params)
    info = write_simulated_dataset(
        args.out_dir, detector, None, params, args.frames, args.files, args.seed,
        args.compression, detector_name=name,
    )
    print(
        f"wrote {info.n_frames} frames ({info.n_hits} hits, {info.n_strong} reflections with "
        f"true SNR >= 5) in {len(info.files)} file(s) to {info.out_dir}; geometry "
        f"{info.geometry_path.name}, truth {info.truth_frames_path.name}, "
        f"{info.truth_reflections_path.name}"
    )
    return 0
