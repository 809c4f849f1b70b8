"""``sfxflow find-spots``: find spots and decide hits on every frame of some image files."""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from sfxflow.errors import InputError

log = logging.getLogger(__name__)

HELP = "find Bragg spots and hits on frames; write one Parquet row per spot"
DESCRIPTION = HELP + """

Reads every frame of the inputs (CBF, or CXI/HDF5 with --geometry; local paths or fsspec URLs),
finds spots (DIALS-style dispersion threshold, or peakfinder8-style radial background with
--method radial), decides hit or miss, prints one line per frame (spots, hit, milliseconds) and
writes the spots, one row each with source_url, frame_index and the spot columns (panel, fs_px,
ss_px, intensity, background, snr, n_pixels, d_a), to --out.

LCLS CSPAD CBF files declare a placeholder gain of 1 ADU per photon; their one-photon peak is at
~9 ADU and their background has bright isolated pixels, so use --preset cspad-cbf (=
--gain-adu-per-photon 9 --spots-min-snr 6); a warning names the gain the first frame shows.
Every setting is a flag named as in `process` (spots.* as --spots-*, hit.* as --hit-*); see
--print-config. Lists (files.lst, @FILE) select frames with //N events, as in CrystFEL.

Examples:
  sfxflow find-spots ../shared/data/lcls-cspad-thermolysin/*.cbf --preset cspad-cbf --out spots.parquet
  sfxflow find-spots sim/run_0000.cxi --geometry sim/geometry.geom --frame-range 0:20 --hit-min-spots 15
  sfxflow find-spots run.cxi --spots-d-min-a 2.0 --spots-filter-ice-rings --png-dir overlays/
"""


def _frame_range(text: str | None, n_frames: int, url: str) -> range:
    """Parse ``A:B`` (either side optional, Python slice semantics without negatives)."""
    if text is None:
        return range(n_frames)
    parts = text.split(":")
    try:
        if len(parts) == 1:
            start = int(parts[0])
            stop = start + 1
        elif len(parts) == 2:
            start = int(parts[0]) if parts[0] else 0
            stop = int(parts[1]) if parts[1] else n_frames
        else:
            raise ValueError(text)
    except ValueError:
        raise InputError(f"--frame-range {text!r}: expected A:B, A:, :B or A with frame "
                         "indices") from None
    if start < 0 or stop < start:
        raise InputError(f"--frame-range {text!r}: expected 0 <= A <= B")
    if start >= n_frames and n_frames > 0:
        log.warning("%s: --frame-range %s starts past its %d frames", url, text, n_frames)
    return range(start, min(stop, n_frames))


def _inputs(inputs: list[str]) -> list[tuple[str, list[int]]]:
    """Each file once, with the frames a list's ``//N`` events name (empty: all, or
    --frame-range); lists (``.lst``, ``@FILE``) are read."""
    from sfxflow.io.lists import expand_lists

    out: dict[str, list[int]] = {}
    for entry in expand_lists(inputs):
        events = out.setdefault(entry.url, [])
        if entry.event is not None and entry.event not in events:
            events.append(entry.event)
    return list(out.items())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sfxflow.cli.options import add_settings, deprecated
    from sfxflow.pipeline.config import FindSpotsConfig

    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="image files or URLs, or lists (files.lst, @FILE: one file per line, "
                             "optional //N event; -i LIST as for indexamajig)")
    parser.add_argument("-i", "--input", dest="more_inputs", action="append", default=[],
                        metavar="LIST", help=argparse.SUPPRESS)  # indexamajig's habit
    parser.add_argument("-g", "--geometry", metavar="G",
                        help="CrystFEL .geom (default for a CXI file: the one .geom beside it)")
    parser.add_argument("-o", "--out", metavar="SPOTS.parquet",
                        help="write the spots here (Parquet)")
    parser.add_argument("--frame-range", metavar="A:B",
                        help="frames A to B-1 of every input (A:, :B or A; default all)")
    deprecated(parser, "--frames", "frame_range", "--frame-range")
    parser.add_argument("--png-dir", metavar="DIR",
                        help="also write an overlay PNG of every frame with its spots here")
    add_settings(parser, FindSpotsConfig, aliases={
        "--window": "spots.window_px", "--border": "spots.border_px",
        "--gain": "detector.gain_adu_per_photon",
        "--global-threshold": "spots.global_threshold_photons",
        "--d-min": "spots.d_min_a", "--d-max": "spots.d_max_a",
        "--ice-rings": "spots.filter_ice_rings", "--min-spots": "hit.min_spots",
        "--min-spots-beyond-d": "hit.min_spots_beyond_d_a", "--hit-d": "hit.d_a",
        "--cspad": "preset:cspad-cbf"}, renamed={"spots": ("spots-", "")},
        essential=("detector.gain_adu_per_photon", "spots.method", "spots.min_snr",
                   "hit.min_spots"))


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import pyarrow.parquet as pq

    from sfxflow.algorithms.gain import gain_warning
    from sfxflow.algorithms.spots import find_spots, is_hit
    from sfxflow.cli.options import print_config, settings_from
    from sfxflow.io.geometry import read_geom
    from sfxflow.io.nearby import geometry_beside
    from sfxflow.io.results import spots_table
    from sfxflow.io.sources import open_source
    from sfxflow.models import FrameStatus, ImageResult
    from sfxflow.pipeline.config import FindSpotsConfig
    from sfxflow.pipeline.summary import format_times_ms

    config = settings_from(args, FindSpotsConfig)
    if args.print_config:
        return print_config(config)
    args.inputs = [*args.inputs, *args.more_inputs]
    if not args.inputs:
        raise InputError("no INPUT given: name image files, URLs or a list (.lst, -i LIST)")
    spot_params, hit_params = config.spots, config.hit
    gain = config.detector.gain_adu_per_photon
    geometry_path = args.geometry or geometry_beside([u for u, _ in _inputs(args.inputs)])
    geometry = read_geom(geometry_path) if geometry_path else None
    render: Any = None
    if args.png_dir:
        from sfxflow.report.picture import render_frame_png as render

    results: list[ImageResult] = []
    n_hits = 0
    times_ms: list[float] = []
    gain_checked = False
    for url, events in _inputs(args.inputs):
        with open_source(url, geometry) as source:
            for i in events or _frame_range(args.frame_range, source.n_frames, url):
                frame = source.read_frame(i)
                if not gain_checked:  # once: the first frame tells the detector's gain
                    gain_checked = True
                    note = gain_warning(frame, gain, option="--gain-adu-per-photon")
                    if note:
                        log.warning("%s", note)
                t0 = time.perf_counter()
                spots = find_spots(frame, spot_params, gain_adu_per_photon=gain)
                hit = is_hit(spots, hit_params)
                dt = time.perf_counter() - t0
                times_ms.append(dt * 1e3)
                n_hits += hit
                results.append(ImageResult(
                    source_url=frame.source_url or url, frame_index=i,
                    status=FrameStatus.HIT if hit else FrameStatus.MISS,
                    event_id=frame.event_id, n_spots=len(spots), spots=spots,
                    timings_s={"spots": dt},
                ))
                print(f"{url} frame {i}: {len(spots):5d} spots  "
                      f"{'hit ' if hit else 'miss'}  {dt * 1e3:7.1f} ms")
                if render is not None:
                    stem = Path(url).name.rsplit(".", 1)[0]
                    png = render(frame, Path(args.png_dir) / f"{stem}_{i:05d}.png",
                                 {"found": spots})
                    print(f"  overlay: {png}")
    n = len(results)
    total = sum(r.n_spots for r in results)
    if n:
        print(f"{n} frames, {n_hits} hits ({100.0 * n_hits / n:.1f}%), {total} spots; "
              f"spot finding {format_times_ms([t / 1e3 for t in times_ms])}")
    else:
        print("no frames selected")
    if args.out:
        from sfxflow.io.storage import open_url

        table = spots_table(results)
        with open_url(args.out, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
        print(f"wrote {table.num_rows} spots to {args.out}")
    return 0
