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
~9 ADU and their background has bright isolated pixels, so use --cspad (= --gain 9 --min-snr 6).

Examples:
  sfxflow find-spots ../shared/data/lcls-cspad-thermolysin/*.cbf --cspad --out spots.parquet
  sfxflow find-spots sim/run_0000.cxi --geometry sim/geometry.geom --frames 0:20 --min-spots 15
  sfxflow find-spots run.cxi --geometry g.geom --d-min 2.0 --ice-rings --png-dir overlays/
"""


def _frame_range(text: str | None, n_frames: int, url: str) -> range:
    """Parse ``a:b`` (either side optional, Python slice semantics without negatives)."""
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
        raise InputError(f"--frames {text!r}: expected a:b, a: or :b with frame indices") from None
    if start < 0 or stop < start:
        raise InputError(f"--frames {text!r}: expected 0 <= a <= b")
    if start >= n_frames and n_frames > 0:
        log.warning("%s: --frames %s starts past its %d frames", url, text, n_frames)
    return range(start, min(stop, n_frames))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or URLs")
    parser.add_argument("--geometry", metavar="G", help="CrystFEL .geom (needed for CXI files)")
    parser.add_argument("--out", metavar="SPOTS.parquet", help="write the spots here (Parquet)")
    parser.add_argument("--frames", metavar="A:B", help="frame range in every input (default all)")
    parser.add_argument("--png-dir", metavar="DIR",
                        help="also write an overlay PNG of every frame with its spots here")
    g = parser.add_argument_group("spot finding (see sfxflow.algorithms.spots.SpotParams)")
    g.add_argument("--method", choices=("dispersion", "radial"), default="dispersion")
    g.add_argument("--noise-model", choices=("auto", "poisson", "local"), default="auto")
    g.add_argument("--window", type=int, default=9, metavar="PX", help="local window (odd, 9)")
    g.add_argument("--sigma-strong", type=float, default=3.0)
    g.add_argument("--sigma-background", type=float, default=4.5)
    g.add_argument("--gain", type=float, metavar="ADU", help="ADU per photon for every panel")
    g.add_argument("--global-threshold", type=float, default=0.0, metavar="PHOTONS")
    g.add_argument("--min-spot-pixels", type=int, default=2)
    g.add_argument("--max-spot-pixels", type=int, default=500)
    g.add_argument("--min-snr", type=float, default=None,
                   help="drop spots with a lower integrated SNR (default 3; 6 for CSPAD CBFs)")
    g.add_argument("--border", type=int, default=1, metavar="PX",
                   help="ignore pixels this close to a panel (ASIC) edge (default 1)")
    g.add_argument("--cspad", action="store_true",
                   help="LCLS CSPAD CBF settings (--gain 9 --min-snr 6 unless given)")
    g.add_argument("--d-min", type=float, metavar="A", help="drop spots at d < this (Å)")
    g.add_argument("--d-max", type=float, metavar="A", help="drop spots at d > this (Å)")
    g.add_argument("--ice-rings", action="store_true", help="drop spots on ice rings")
    g.add_argument("--radial-snr", type=float, default=5.0, help="--method radial threshold")
    h = parser.add_argument_group("hit finding (HitParams)")
    h.add_argument("--min-spots", type=int, default=10, help="spots on a hit (default 10)")
    h.add_argument("--min-spots-beyond-d", type=int, default=0, metavar="N",
                   help="also need N spots at d <= --hit-d (default 0: off)")
    h.add_argument("--hit-d", type=float, default=4.0, metavar="A", help="default 4.0 Å")


def params_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(SpotParams, HitParams)`` from the parsed options (ConfigError on a bad value)."""
    from sfxflow.algorithms.spots import CSPAD_CBF_SETTINGS, HitParams, SpotParams

    defaults: dict[str, Any] = dict(CSPAD_CBF_SETTINGS) if args.cspad else {}
    gain = args.gain if args.gain is not None else defaults.get("gain_adu_per_photon")
    min_snr = args.min_snr if args.min_snr is not None else defaults.get(
        "min_snr", SpotParams.min_snr)
    spot = SpotParams(
        method=args.method, noise_model=args.noise_model, window_px=args.window,
        sigma_strong=args.sigma_strong, sigma_background=args.sigma_background,
        gain_adu_per_photon=gain, global_threshold_photons=args.global_threshold,
        min_spot_pixels=args.min_spot_pixels, max_spot_pixels=args.max_spot_pixels,
        min_snr=min_snr, border_px=args.border,
        d_min_a=args.d_min, d_max_a=args.d_max, filter_ice_rings=args.ice_rings,
        radial_snr=args.radial_snr,
    )
    hit = HitParams(min_spots=args.min_spots, min_spots_beyond_d_a=args.min_spots_beyond_d,
                    d_a=args.hit_d)
    return spot, hit


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import pyarrow.parquet as pq

    from sfxflow.algorithms.spots import find_spots, is_hit
    from sfxflow.io.results import spots_table
    from sfxflow.io.sources import open_source
    from sfxflow.models import FrameStatus, ImageResult

    spot_params, hit_params = params_from_args(args)
    geometry = None
    if args.geometry:
        from sfxflow.io.geometry import read_geom

        geometry = read_geom(args.geometry)
    render: Any = None
    if args.png_dir:
        from sfxflow.io.picture import render_frame_png as render

    results: list[ImageResult] = []
    n_hits = 0
    times_ms: list[float] = []
    for url in args.inputs:
        with open_source(url, geometry) as source:
            for i in _frame_range(args.frames, source.n_frames, url):
                frame = source.read_frame(i)
                t0 = time.perf_counter()
                spots = find_spots(frame, spot_params)
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
        times_ms.sort()
        print(f"{n} frames, {n_hits} hits ({100.0 * n_hits / n:.1f}%), {total} spots; "
              f"spot finding median {times_ms[n // 2]:.1f} ms/frame")
    else:
        print("no frames selected")
    if args.out:
        from sfxflow.io.storage import open_url

        table = spots_table(results)
        with open_url(args.out, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
        print(f"wrote {table.num_rows} spots to {args.out}")
    return 0
