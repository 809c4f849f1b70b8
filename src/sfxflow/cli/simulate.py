"""``sfxflow simulate``: write a simulated SFX data set (CXI files, geometry, Parquet truth)."""

from __future__ import annotations

import argparse
import dataclasses
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
  sfxflow simulate sim/ --frames 10 --background-photons 3 --mosaicity-deg 0.1
  sfxflow simulate sim/ --frames 200 --intensities x4wide-P41212-merged.mtz --detector simple

Every SimulationParams setting is a flag named as its key; see --print-config.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sfxflow.cli.options import add_settings, number
    from sfxflow.pipeline.config import SimulateConfig

    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the data set into")
    number(parser, "--frames", kind=int, default=100, ge=1, le=10_000_000,
           help="number of frames (default 100)")
    number(parser, "--files", kind=int, default=1, ge=1, le=100_000,
           help="number of CXI files (default 1)")
    parser.add_argument("--detector", default="cspad",
                        help="built-in layout: cspad, jungfrau4m or simple (default cspad)")
    parser.add_argument("--geometry", metavar="FILE.geom",
                        help="CrystFEL geometry to simulate on instead of a built-in layout")
    number(parser, "--seed", kind=int, default=0, ge=0, le=2**63 - 1,
           help="random seed (default 0)")
    parser.add_argument("--compression", default="none", choices=("none", "bitshuffle-lz4"),
                        help="HDF5 compression (default none)")
    number(parser, "--distance-mm", gt=0, le=100_000, help="detector distance in mm")
    parser.add_argument("--intensities", metavar="REF.mtz",
                        help="true intensities from a merged data set (its cell and space group "
                             "replace --cell/--space-group), with physically modelled partiality: "
                             "per-shot SASE spectra, mosaic blocks, crystal sizes over two orders "
                             "of magnitude, per-crystal B (default: the fast closed-form model "
                             "with random Wilson intensities)")
    # every SimulationParams field: --wavelength-a, --cell, --space-group, --hit-fraction ...
    add_settings(parser, SimulateConfig)


def build_detector(args: argparse.Namespace, params):
    """The detector from --geometry or --detector (+ --distance-mm)."""
    from sfxflow.algorithms.layouts import by_name

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
    from sfxflow.cli.options import print_config, settings_from
    from sfxflow.io.simulated import physical_model, write_simulated_dataset
    from sfxflow.pipeline.config import SimulateConfig

    config = settings_from(args, SimulateConfig)
    if args.print_config:
        return print_config(config)
    if not 1 <= args.files <= args.frames:
        raise InputError(f"--files {args.files}: expected 1 to --frames ({args.frames})")
    params = config.simulation
    physics = None
    if args.intensities:
        params, physics = physical_model(args.intensities, params)
    detector, name = build_detector(args, params)
    info = write_simulated_dataset(
        args.out_dir, detector, None, params, args.frames, args.files, args.seed,
        args.compression, detector_name=name, physics=physics,
    )
    print(
        f"wrote {info.n_frames} frames ({info.n_hits} hits, {info.n_strong} reflections with "
        f"true SNR >= 5) in {len(info.files)} file(s) to {info.out_dir}; geometry "
        f"{info.geometry_path.name}, truth {info.truth_frames_path.name}, "
        f"{info.truth_reflections_path.name}"
    )
    return 0
