"""``sfxflow view``: draw one frame assembled in lab coordinates, with optional spot overlays."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

Several files (a glob, a list: files.lst or @FILE): --frame counts the frames of all of them in
order (frame 0 is the first file's first frame); a list's //N event names one frame.

Predicted against observed: with --cell and --space-group the frame is processed as `process`
would (spots, every lattice indexed, prediction, integration; --preset and --set as for process).
Each crystal gets its own colour: the found spots it indexed as circles and the predicted
positions of its integrated reflections with I/sigma >= --min-i-over-sigma as squares; found
spots no crystal indexed are circles of one more colour (the legend counts add up to the spots
found). --reflections draws the predictions of a run's reflections shard instead.

Examples:
  sfxflow view sim/run_0000.cxi --geometry sim/geometry.geom --frame 3 --out frame3.png \\
      --truth sim/truth_reflections.parquet
  sfxflow view ../shared/data/lcls-cspad-thermolysin/*.cbf --frame 1 --out cbf.png
  sfxflow view run.cxi --geometry g.geom --spots run/spots.parquet --out spots.png
  sfxflow view ../shared/data/lcls-cspad-thermolysin/idx-20130301060858601.cbf \\
      --cell "93 93 130.5 90 90 120" --space-group P6122 --preset cspad-cbf \\
      --out predicted-vs-observed.png
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sfxflow.pipeline.config import preset_names

    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="image file(s) (CBF, or CXI/HDF5 with --geometry), globs or lists")
    parser.add_argument("--geometry", metavar="G",
                        help="CrystFEL .geom (default for a CXI file: the one .geom beside it)")
    number(parser, "--frame", kind=int, default=0, ge=0, le=2**62,
           help="frame index, counted over the files in order (default 0)")
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
    parser.add_argument("--preset", dest="presets", action="append", default=[],
                        choices=preset_names(), metavar="NAME",
                        help=f"processing settings for a detector, as for process: "
                             f"{', '.join(preset_names())}")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="processing setting, as for process")
    number(parser, "--min-i-over-sigma", default=3.0, ge=-1e6, le=1e6,
           help="with --cell or --reflections: draw predictions of reflections "
                             "with I/sigma >= this (default 3)")
    parser.add_argument("--reflections", metavar="REFLECTIONS.parquet",
                        help="a run's reflections shard: its predicted positions as squares")


def _pick(files: list[str], frame: int, geometry: Any) -> tuple[str, int]:
    """The file and the frame in it that ``--frame`` names, counting over ``files`` in order."""
    from sfxflow.io.lists import expand_lists
    from sfxflow.io.sources import _expand, open_source

    seen = 0
    for entry in expand_lists(files):
        for url in _expand(entry.url, None):
            if entry.event is not None:
                if seen == frame:
                    return url, entry.event
                seen += 1
                continue
            with open_source(url, geometry, metadata_only=True) as source:
                n = source.n_frames
            if frame < seen + n:
                return url, frame - seen
            seen += n
    raise InputError(f"--frame {frame} is out of range: {', '.join(files)} hold {seen} frame(s), "
                     f"expected 0 to {seen - 1}")


def run(args: argparse.Namespace) -> int:
    from sfxflow.io.geometry import read_geom
    from sfxflow.io.nearby import geometry_beside
    from sfxflow.io.sources import open_source
    from sfxflow.report.picture import read_spot_overlay, render_frame_png

    geometry_path = args.geometry or geometry_beside(args.files)
    geometry = read_geom(geometry_path) if geometry_path else None
    url, index = _pick(args.files, args.frame, geometry)
    with open_source(url, geometry) as source:
        if index >= source.n_frames:
            raise InputError(f"{url}: frame {index} is out of range (the file has "
                             f"{source.n_frames} frames, 0 to {source.n_frames - 1})")
        frame = source.read_frame(index)
    if len(args.files) > 1 or url != args.files[0]:
        print(f"frame {args.frame}: {url} frame {index}")
    overlays: dict[str, Any] = {}
    predicted: Any = None
    if args.cell or args.space_group:  # first: the crystals' colours pair circles and squares
        found, predicted = _process_overlay(frame, args)
        overlays.update(found)
    if args.spots:
        overlays["spots"] = read_spot_overlay(args.spots, frame.detector, url, index)
    if args.truth:
        truth = read_spot_overlay(args.truth, frame.detector, url, index, min_snr=args.min_snr)
        overlays["truth" if args.min_snr <= 0 else f"truth SNR>={args.min_snr:g}"] = truth
    if args.reflections:
        predicted = _reflections_overlay(args.reflections, frame, args)
    out = render_frame_png(frame, Path(args.out), spots=overlays or None, predicted=predicted,
                           scaling=args.scale)
    if isinstance(predicted, dict) and "panel" not in predicted:
        overlays.update(predicted)
    elif predicted is not None:
        overlays["predicted"] = predicted
    counts = ", ".join(f"{k}: {len(v['panel'])}" for k, v in overlays.items())
    print(f"wrote {out}" + (f" ({counts})" if counts else ""))
    return 0


def _strong(table: dict, min_i_over_sigma: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(table["intensity"]) / np.asarray(table["sigma"]) >= min_i_over_sigma


def _process_overlay(frame: Frame, args: argparse.Namespace) -> tuple[dict, dict]:
    """Found spots (per crystal that indexed them, then the rest) and the strong integrated
    reflections' predicted positions (per crystal) of one frame."""
    from sfxflow.pipeline.config import load_config
    from sfxflow.pipeline.frame import process_frame

    if not (args.cell and args.space_group):
        raise InputError("--cell and --space-group go together (to draw predictions both are "
                         "needed)")
    cell = ", ".join(args.cell.replace(",", " ").split())
    config = load_config(overrides=[f"target.cell=[{cell}]",
                                    f"target.space_group='{args.space_group}'",
                                    *args.overrides], presets=args.presets)
    result = process_frame(frame, config)
    spots = result.spots
    n_spots = 0 if spots is None else len(spots)
    found: dict[str, dict] = {}
    predicted: dict[str, dict] = {}
    explained = np.zeros(n_spots, dtype=bool)
    for k, c in enumerate(result.crystals, start=1):
        # each spot counted once: with the first crystal that indexes it (as miller_indices)
        mine = np.asarray(c.indexed_mask, dtype=bool)[:n_spots] & ~explained
        explained |= mine
        found[f"crystal {k}: spots indexed"] = _rows(spots, mine)
        t = c.reflections
        if t is not None and len(t):
            sel = _strong(t.columns, args.min_i_over_sigma)
            predicted[f"crystal {k}: predicted"] = {
                "panel": np.asarray(t["panel"][sel], dtype=np.int64),
                "fs_px": t["fs_px"][sel], "ss_px": t["ss_px"][sel]}
        else:
            predicted[f"crystal {k}: predicted"] = _rows(None, np.zeros(0, dtype=bool))
        shared = c.n_indexed - int(mine.sum())
        print(f"crystal {k}: {int(mine.sum())} spots indexed"
              + (f" (and {shared} an earlier crystal indexed)" if shared > 0 else "")
              + f", rmsd {c.rmsd_px:.2f} px, {c.n_integrated} reflections integrated, "
              f"{c.status} {c.reason}".rstrip())
    if n_spots:
        label = "spots not indexed" if result.crystals else f"found spots ({result.status.value})"
        found[label] = _rows(spots, ~explained)
    if not result.crystals:
        print(f"not indexed: {result.reason or result.status.value}")
    return found, predicted


def _rows(spots: Any, sel: np.ndarray) -> dict:
    if spots is None:
        return {"panel": np.zeros(0, np.int64), "fs_px": np.zeros(0), "ss_px": np.zeros(0)}
    return {"panel": np.asarray(spots.panel)[sel], "fs_px": np.asarray(spots.fs_px)[sel],
            "ss_px": np.asarray(spots.ss_px)[sel]}


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
