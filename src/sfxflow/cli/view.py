"""``sfxflow view``: draw one frame assembled in lab coordinates, with optional spot overlays."""

from __future__ import annotations

import argparse
from pathlib import Path

from sfxflow.cli.options import number
from sfxflow.errors import InputError

HELP = "draw one frame in lab coordinates as a PNG (panels in place, spot overlays)"
DESCRIPTION = HELP + """

The frame is resampled onto the lab plane at the detector distance, so the panels appear where
they are (CSPAD quadrants, module gaps). Gaps are white, masked pixels grey, the beam a green +.
Spot tables (Parquet with columns panel, fs_px, ss_px, and optionally source_url or file and
frame_index to pick this frame's rows) are drawn as circles.

Examples:
  sfxflow view sim/run_0000.cxi --geometry sim/geometry.geom --frame 3 --out frame3.png \\
      --truth sim/truth_reflections.parquet
  sfxflow view ../shared/data/lcls-cspad-thermolysin/*.cbf --out cbf.png
  sfxflow view run.cxi --geometry g.geom --spots run/spots.parquet --out spots.png
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


def run(args: argparse.Namespace) -> int:
    from sfxflow.io.geometry import read_geom
    from sfxflow.io.nearby import geometry_beside
    from sfxflow.io.picture import read_spot_overlay, render_frame_png
    from sfxflow.io.sources import open_source

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
    out = render_frame_png(frame, Path(args.out), spots=overlays or None, scaling=args.scale)
    counts = ", ".join(f"{k}: {len(v['panel'])}" for k, v in overlays.items())
    print(f"wrote {out}" + (f" ({counts})" if counts else ""))
    return 0
