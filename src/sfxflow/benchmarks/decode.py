"""``sfxflow bench decode``: frames/s decoded on one core, local files and a local S3 server."""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sfxflow.benchmarks.shared import shared_path
from sfxflow.options import number

HELP = "decode speed: frames/s per core for CBF and compressed CXI, local and from S3 (median)"
DESCRIPTION = HELP + """

Decodes, in this one process and thread, through the same path the pipeline uses
(discover -> plan_blocks -> read_block):
  * the real LCLS CSPAD CBFs in ../shared/data/lcls-cspad-thermolysin (multi-panel imgCIF),
  * simulated CSPAD (1480 x 1552) and Jungfrau 4M (4096 x 1024) stills written as
    bitshuffle-LZ4 CXI files (sfxflow.io.simulated) in a temporary folder,
  * the same Jungfrau frames as an LCLS-II XTC2 file (psana), a European XFEL run (extra-data)
    and a live karabo-bridge replay of that run (frames/s received and spooled; lost counted),
    where those packages are installed,
each from the local disk and from a local S3-protocol server (moto) that the benchmark starts on
127.0.0.1. Prints the median over --repeats runs of frames/s, and MB read per frame.

Examples:
  sfxflow bench decode
  sfxflow bench decode --frames 20 --repeats 7 --no-s3
"""

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    number(parser, "--frames", kind=int, default=10, ge=1, le=100_000,
           help="simulated frames per detector (default 10)")
    number(parser, "--repeats", kind=int, default=5, ge=1, le=1000, help="timed runs (default 5)")
    number(parser, "--frames-per-block", kind=int, default=10, ge=1, le=100_000,
           help="frames per block (default 10)")
    parser.add_argument("--cbf-dir", default=None,
                        help="folder of CBFs (default ../shared/data/lcls-cspad-thermolysin)")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 rows")
    parser.add_argument("--no-facility", action="store_true",
                        help="skip the XTC2, European XFEL and live karabo-bridge rows")


def _time_decode(urls: list[str], geometry: Any, opts: dict | None, fpb: int,
                 repeats: int) -> tuple[float, float, int]:
    """Median frames/s, bytes read per frame, frames; discover + plan are not timed."""
    from sfxflow.io.sources import discover, plan_blocks, read_block
    from sfxflow.io.storage import read_stats, reset_read_stats

    infos = discover(urls, geometry, opts)
    bad = [i for i in infos if i.error]
    if bad:
        raise RuntimeError(f"benchmark input unreadable: {bad[0].error}")
    blocks = plan_blocks(infos, fpb)
    n = sum(b.n_frames for b in blocks)
    read_block(blocks[0], geometry, opts)  # warm-up: imports, caches
    rates, per_frame = [], []
    for _ in range(repeats):
        reset_read_stats()
        t0 = time.perf_counter()
        for b in blocks:
            frames = read_block(b, geometry, opts)
            assert len(frames) == b.n_frames
            del frames
        dt = time.perf_counter() - t0
        rates.append(n / dt)
        per_frame.append(read_stats().bytes_read / n)
    return statistics.median(rates), statistics.median(per_frame), n


def run(args: argparse.Namespace) -> int:
    from sfxflow.errors import InputError

    cbf_dir = Path(args.cbf_dir) if args.cbf_dir else shared_path("data/lcls-cspad-thermolysin")
    if cbf_dir is not None and not cbf_dir.is_dir():
        raise InputError(f"--cbf-dir {cbf_dir}: not a folder")
    from sfxflow.algorithms import layouts
    from sfxflow.algorithms.simulate import SimulationParams
    from sfxflow.io.geometry import read_geom
    from sfxflow.io.simulated import write_simulated_dataset

    logging.getLogger("sfxflow.io.simulated").setLevel(logging.WARNING)
    cases: list[tuple[str, list[Path], Any]] = []
    with tempfile.TemporaryDirectory(prefix="sfxflow-bench-decode-") as tmp:
        if cbf_dir is not None:
            cbfs = sorted(cbf_dir.glob("*.cbf"))
            if cbfs:
                cases.append(("CSPAD CBF (real, 4 arrays, 64 ASICs)", cbfs, None))
        for name, det in (("CSPAD CXI bitshuffle-LZ4 (1480x1552)", layouts.cspad()),
                          ("Jungfrau4M CXI bitshuffle-LZ4 (4096x1024)", layouts.jungfrau4m())):
            out = Path(tmp) / name.split()[0]
            t0 = time.perf_counter()
            info = write_simulated_dataset(out, det, None, SimulationParams(), args.frames,
                                           n_files=1, seed=1, compression="bitshuffle-lz4")
            print(f"simulated {args.frames} {name.split()[0]} frames in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
            cases.append((name, list(info.files), read_geom(info.geometry_path)))

        rows = []
        for name, files, geom in cases:
            fps, bpf, n = _time_decode([str(f) for f in files], geom, None,
                                       args.frames_per_block, args.repeats)
            rows.append((name, "local", n, bpf, fps))
        if not args.no_facility:
            from sfxflow.benchmarks.facility import facility_rows

            jf_files, jf_geom_path = cases[-1][1], Path(tmp) / "Jungfrau4M" / "geometry.geom"
            rows += facility_rows(jf_files[0], jf_geom_path, SimulationParams().beam()
                                  .photon_energy_ev, Path(tmp), args.repeats,
                                  args.frames_per_block, _time_decode)
        if not args.no_s3:
            rows += _s3_rows(cases, args)

    print()
    print(f"decode, one process / one thread, median of {args.repeats} runs "
          f"(blocks of {args.frames_per_block} frames)")
    print(f"{'input':44s} {'from':6s} {'frames':>6s} {'MB/frame':>9s} {'frames/s':>9s} "
          f"{'MB/s':>8s}")
    for name, where, n, bpf, fps in rows:
        print(f"{name:44s} {where:6s} {n:6d} {bpf / 1e6:9.3f} {fps:9.1f} {bpf * fps / 1e6:8.1f}"
              .replace(" nan", "   -"))
    _against_libraries(cbf_dir, args.repeats)
    return 0


def _cpu_ms(fn: Any, items: list[Any], repeats: int) -> float:
    from sfxflow.benchmarks.spots import _time_per_frame

    fn(items[0])  # warm-up
    return 1e3 * statistics.median(_time_per_frame(fn, items, repeats))


def _against_libraries(cbf_dir: Path | None, repeats: int) -> None:
    """sfxflow's reads against the libraries' own: h5py reading the same gzip chunks of the
    independent stills, and CBFlib (pycbf: parse + decode every array) on the real CBFs."""
    import h5py

    from sfxflow.benchmarks.stills import load_stills, read_still, stills_dir

    print()
    print(f"against the libraries' own readers, CPU ms per frame, median of frames x {repeats}:")
    d = stills_dir()
    if d is not None:
        files, geometry, _ = load_stills(d)

        def h5py_read(path: Path) -> Any:
            with h5py.File(path, "r") as f:
                return f["/entry_1/data_1/data"][()]

        ours = _cpu_ms(lambda p: read_still(p, geometry), files, repeats)
        theirs = _cpu_ms(h5py_read, files, repeats)
        print(f"  independent stills (gzip uint16, 1.1 Mpixel): sfxflow {ours:.2f} (open, "
              f"geometry, float32 frame) vs h5py's own read {theirs:.2f} -> "
              f"{theirs / ours:.2f}x h5py's speed")
    cbfs = sorted(cbf_dir.glob("*.cbf")) if cbf_dir is not None else []
    if cbfs:
        from sfxflow.io.cbf import _decode_arrays, _open_handle
        from sfxflow.io.sources import open_source

        blobs = [p.read_bytes() for p in cbfs]

        def ours_cbf(k: int) -> Any:
            with open_source(str(cbfs[k])) as src:
                return src.read_frame(0)

        def cbflib(k: int) -> Any:
            return _decode_arrays(_open_handle(blobs[k], str(cbfs[k])), str(cbfs[k]))

        idx = list(range(len(cbfs)))
        ours = _cpu_ms(ours_cbf, idx, max(repeats, 5))
        theirs = _cpu_ms(cbflib, idx, max(repeats, 5))
        print(f"  real CSPAD CBF (x-CBF_PACKED, 4 arrays): sfxflow {ours:.1f} ({1e3 / ours:.1f} "
              f"frames/s; file read, header geometry, frame assembly) vs CBFlib (pycbf) parse + "
              f"decode alone {theirs:.1f} -> {ours / theirs:.2f}x CBFlib's time")


def _s3_rows(cases: list[tuple[str, list[Path], Any]],
             args: argparse.Namespace) -> list[tuple[str, str, int, float, float]]:
    import fsspec

    from sfxflow.benchmarks.local_s3 import local_s3

    rows: list[tuple[str, str, int, float, float]] = []
    with local_s3("bench-decode") as opts:
        if opts is None:
            return rows
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **opts)
        for k, (name, files, geom) in enumerate(cases):
            urls = []
            for f in files:
                key = f"bench-decode/case{k}/{f.name}"
                fs.put_file(str(f), key)
                urls.append(f"s3://{key}")
            fps, bpf, n = _time_decode(urls, geom, opts, args.frames_per_block, args.repeats)
            rows.append((name, "S3", n, bpf, fps))
    return rows
