"""``sfxflow view``: draw one frame assembled in lab coordinates, with optional spot overlays."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sfxflow.cli.options import number
from sfxflow.errors import InputError

if TYPE_CHECKING:
    from sfxflow.models import Frame

HELP = "draw one frame in lab coordinates as a PNG (panels in place, spot overlays)"
DESCRIPTION = HELP + """

The frame is resampled onto the lab plane at the detector distance, so the panels appear where
they are (CSPAD quadrants, module gaps). Gaps are white, masked pixels grey, the beam a green +.
Spot tables (Parquet with columns panel, fs_px, ss_px, and optionally source_url or file and
frame_index to pick this frame's rows) are drawn as circles.

Predicted against observed: with --cell and --space-group the frame is processed as `process`
would (spots, every lattice indexed, prediction, integration; --set as for process) and its found
spots are drawn as circles, the predicted positions of its integrated reflections with
I/sigma >= --min-i-over-sigma as squares (one colour per crystal). --reflections draws the
predictions of a run's reflections shard instead.

Examples:
  sfxflow view sim/run_0000.cxi --geometry sim/geometry.geom --frame 3 --out frame3.png \\
      --truth sim/truth_reflections.parquet
  sfxflow view ../shared/data/lcls-cspad-thermolysin/*.cbf --out cbf.png
  sfxflow view run.cxi --geometry g.geom --spots run/spots.parquet --out spots.png
  sfxflow view ../shared/data/lcls-cspad-thermolysin/idx-20130301060858601.cbf \
      --cell "93 93 130.5 90 90 120" --space-group P6122 --set spots.gain_adu_per_photon=9 \
      --set spots.min_snr=6 --out predicted-vs-observed.png
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="image file (CBF, or CXI/HDF5 with --geometry)")
    parser.add_argument("--geometry", metavar="G",
                        help="CrystFEL .geom (default for a CXI file: the one .geom beside it)")
    number(parser, "--frame", kind=int, default=0, ge=0, le=2**62,
           help="frame index in the file (default 0)")
    parser.add_argument("--out", required=True, metavar="PNG", help="output PNG path")
    parser.add_argument("--spots", metavar="SPOTS.parquet", help="found spots to overlay")
    parser.add_argument("--truth", metavar="TRUTH.parquet",
                        help="simulated truth reflections to overlay (truth_reflections.parquet)")
    number(parser, "--min-snr", default=0.0, ge=0, le=1e6,
           help="with --truth: only reflections with snr_true >= this (default 0)")
    parser.add_argument("--scale", choices=("log", "linear"), default="log",
                        help="intensity scaling (default log)")
    parser.add_argument("--cell", metavar='"a b c al be ga"',
                        help="process the frame against this cell and draw predicted (squares) "
                             "and found (circles) positions")
    parser.add_argument("--space-group", metavar="SG", help="space group, with --cell")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="processing setting, as for process")
    number(parser, "--min-i-over-sigma", default=3.0, ge=-1e6, le=1e6,
           help="with --cell or --reflections: draw predictions of reflections "
                             "with I/sigma >= this (default 3)")
    parser.add_argument("--reflections", metavar="REFLECTIONS.parquet",
                        help="a run's reflections shard: its predicted positions as squares")


def run(args: argparse.Namespace) -> int:
    from sfxflow.io.geometry import read_geom
    from sfxflow.io.nearby import geometry_beside
    from sfxflow.io.sources import open_source
    from sfxflow.report.picture import read_spot_overlay, render_frame_png

    geometry_path = args.geometry or geometry_beside([args.file])
    geometry = read_geom(geometry_path) if geometry_path else None
    with open_source(args.file, geometry) as source:
        if args.frame >= source.n_frames:
            raise InputError(
                f"{args.file}: --frame {args.frame} is out of range (the file has "
                f"{source.n_frames} frames, 0 to {source.n_frames - 1})"
            )
        frame = source.read_frame(args.frame)
    overlays = {}
    if args.spots:
        overlays["spots"] = read_spot_overlay(args.spots, frame.detector, args.file, args.frame)
    if args.truth:
        truth = read_spot_overlay(args.truth, frame.detector, args.file, args.frame,
                                  min_snr=args.min_snr)
        overlays["truth" if args.min_snr <= 0 else f"truth SNR>={args.min_snr:g}"] = truth
    predicted = None
    if args.cell or args.space_group:
        found, predicted = _process_overlay(frame, args)
        overlays.update(found)
    if args.reflections:
        predicted = _reflections_overlay(args.reflections, frame, args)
    out = render_frame_png(frame, Path(args.out), spots=overlays or None, predicted=predicted,
                           scaling=args.scale)
    if predicted is not None:
        overlays["predicted"] = predicted
    counts = ", ".join(f"{k}: {len(v['panel'])}" for k, v in overlays.items())
    print(f"wrote {out}" + (f" ({counts})" if counts else ""))
    return 0


def _strong(table: dict, min_i_over_sigma: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(table["intensity"]) / np.asarray(table["sigma"]) >= min_i_over_sigma


def _process_overlay(frame: Frame, args: argparse.Namespace) -> tuple[dict, dict]:
    """Found spots and the strong integrated reflections' predicted positions of one frame."""
    from sfxflow.pipeline.config import load_config
    from sfxflow.pipeline.frame import process_frame

    if not (args.cell and args.space_group):
        raise InputError("--cell and --space-group go together (to draw predictions both are "
                         "needed)")
    cell = ", ".join(args.cell.replace(",", " ").split())
    config = load_config(overrides=[f"target.cell=[{cell}]",
                                    f"target.space_group='{args.space_group}'",
                                    *args.overrides])
    result = process_frame(frame, config)
    spots = result.spots
    found = {}
    if spots is not None and len(spots):
        found[f"found spots ({result.status.value})"] = {
            "panel": spots.panel, "fs_px": spots.fs_px, "ss_px": spots.ss_px}
    parts = []
    for c in result.crystals:
        if c.reflections is not None and len(c.reflections):
            t = c.reflections
            sel = _strong(t.columns, args.min_i_over_sigma)
            parts.append((t["panel"][sel], t["fs_px"][sel], t["ss_px"][sel]))
        print(f"crystal: {c.n_indexed} spots indexed, rmsd {c.rmsd_px:.2f} px, "
              f"{c.n_integrated} reflections integrated, {c.status} {c.reason}".rstrip())
    if not result.crystals:
        print(f"not indexed: {result.reason or result.status.value}")
    predicted = {name: np.concatenate([p[i] for p in parts]) if parts else np.zeros(0)
                 for i, name in enumerate(("panel", "fs_px", "ss_px"))}
    predicted["panel"] = predicted["panel"].astype(np.int64)
    return found, predicted


def _reflections_overlay(path: str, frame: Frame, args: argparse.Namespace) -> dict:
    import pyarrow.parquet as pq

    from sfxflow.report.picture import read_spot_overlay

    rows = read_spot_overlay(path, frame.detector, frame.source_url, frame.index)
    try:
        table = pq.read_table(path, columns=["intensity", "sigma", "frame_index"]).to_pydict()
    except (OSError, ValueError, KeyError):
        return rows  # not a reflections table: every row
    keep = _strong(table, args.min_i_over_sigma)[np.asarray(table["frame_index"]) == frame.index]
    if keep.shape[0] != len(rows["panel"]):
        return rows
    return {k: np.asarray(v)[keep] for k, v in rows.items()}
