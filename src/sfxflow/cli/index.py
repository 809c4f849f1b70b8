"""``sfxflow index``: index spot lists (Parquet from ``find-spots``, or CrystFEL streams)."""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sfxflow.algorithms.index import (
    IndexResult,
    TargetCell,
    index_spots,
    misorientation_deg,
    reason_kind,
)
from sfxflow.cli.options import add_settings, number, print_config, settings_from
from sfxflow.errors import InputError
from sfxflow.models import (
    SPOT_COLUMNS,
    Beam,
    Crystal,
    Detector,
    SpotTable,
    a_matrix_columns,
    as_space_group,
    wavelength_a_to_photon_energy_ev,
)
from sfxflow.pipeline.config import IndexConfig
from sfxflow.pipeline.summary import FEW_VALUES, format_times_ms

log = logging.getLogger(__name__)

HELP = "index spot lists against a known unit cell (Parquet spot tables or CrystFEL streams)"
DESCRIPTION = HELP + """

Inputs are spot tables written by 'sfxflow find-spots' (Parquet with columns source_url,
frame_index, panel, fs_px, ss_px, ...) or CrystFEL streams (.stream: the peak lists and the
geometry, wavelength and camera length of every chunk are taken from the stream; a stream's
own indexing solutions are compared with ours, angle modulo the point-group rotations).
For Parquet spot tables the geometry comes from --geometry (CrystFEL .geom) or, for CBF
sources, from each source file's header.

The target cell: --cell "a b c al be ga" with --space-group, or --cell-file (CrystFEL .cell or
PDB CRYST1; space group from --space-group, else the lattice's lowest-symmetry group), or for a
stream the target cell recorded in it.

Examples:
  sfxflow index ../shared/data/crystfel/test.stream --space-group "C 2 2 21"
  sfxflow index spots.parquet --cell "93 93 130.5 90 90 120" --space-group P6122 -o idx.parquet
  sfxflow index spots.parquet --cell-file lyso.cell --geometry cspad.geom --refine-distance

Every indexing setting is a flag named as in `process` (index.min_indexed as
--index-min-indexed, index.refine.* as --refine-*: --refine-detector-shift, --no-refine-cell);
see --print-config. The names without "index-" (--min-indexed) still work, with a note.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="SPOTS",
                        help="spot tables (.parquet) or CrystFEL streams (.stream), or lists of "
                             "them (.lst, @FILE)")
    parser.add_argument("--cell", help='target cell "a b c alpha beta gamma" (Å, degrees)')
    parser.add_argument("--space-group", help="space group symbol or number (e.g. P6122, 19)")
    parser.add_argument("--cell-file", help="CrystFEL unit-cell file (or PDB with CRYST1)")
    parser.add_argument("-g", "--geometry", help="CrystFEL .geom for Parquet spot tables")
    number(parser, "--wavelength-a", ge=0.05, le=20,
           help="wavelength (Å) when the geometry does not give one")
    parser.add_argument("-o", "--out", help="write per-frame results to this Parquet file")
    parser.add_argument("--quiet-frames", action="store_true", help="print only the totals")
    # flags as in process (--index-max-crystals); the old --max-crystals etc. stay as aliases
    add_settings(parser, IndexConfig, aliases={"--min-fraction": "index.min_fraction_indexed",
                                               "--refine-shift": "index.refine.refine_detector_shift"},
                 renamed={"index": ("index-", "")},
                 essential=("index.max_crystals", "index.min_indexed"))


@dataclass(frozen=True)
class _Job:
    source: str
    frame_index: int
    event: str
    spots: SpotTable
    detector: Detector
    beam: Beam
    reference: Crystal | None = None


def _target(args: argparse.Namespace, stream_cell=None) -> TargetCell:
    from sfxflow.io.cellfile import read_cell_file

    if args.cell and args.cell_file:
        raise InputError(f"give --cell ({args.cell!r}) or --cell-file ({args.cell_file}), not both")
    try:
        if args.cell:
            if not args.space_group:
                raise InputError(f"--cell {args.cell!r} needs --space-group (e.g. P6122)")
            return TargetCell(args.cell, args.space_group)
        source = None
        if args.cell_file:
            source = read_cell_file(args.cell_file)
        elif stream_cell is not None:
            source = stream_cell
        if source is None:
            raise InputError("no target cell: give --cell and --space-group, or --cell-file "
                             "(or a stream that records its target cell)")
        where = f"--cell-file {args.cell_file}" if args.cell_file else "the stream's target cell"
        return TargetCell(source.cell, as_space_group(source.indexing_space_group(
            args.space_group, where)))
    except ValueError as exc:
        raise InputError(f"bad target cell or space group ({args.cell or args.cell_file}, "
                         f"{args.space_group}): {exc}") from exc


def _stream_jobs(path: str, target_sg) -> tuple[Iterator[_Job], object]:
    from sfxflow.io.stream import read_stream

    stream = read_stream(path)

    def gen() -> Iterator[_Job]:
        for k, chunk in enumerate(stream.chunks):
            detector, beam = stream.resolve(chunk)
            if beam is None:
                raise InputError(f"{path}: chunk {k} ({chunk.filename} {chunk.event}) has no "
                                 "photon energy (expected photon_energy_eV)")
            ref = chunk.crystals[0].to_crystal(target_sg()) if chunk.crystals else None
            idx = chunk.frame_index if chunk.frame_index is not None else k
            yield _Job(chunk.filename, idx, chunk.event, chunk.peaks, detector, beam, ref)

    return gen(), stream.target_cell


def _parquet_jobs(path: str, args: argparse.Namespace) -> Iterator[_Job]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read Parquet spot table ({exc})") from exc
    need = {"source_url", "frame_index", "panel", "fs_px", "ss_px"}
    missing = sorted(need - set(table.column_names))
    if missing:
        raise InputError(f"{path}: spot table lacks columns {missing} "
                         f"(expected at least {sorted(need)})")
    cols = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    n = table.num_rows
    geometry = None
    if args.geometry:
        from sfxflow.io.geometry import read_geom

        geometry = read_geom(args.geometry)
    keys = list(zip(cols["source_url"], cols["frame_index"], strict=True))
    order = sorted(range(n), key=lambda i: (str(keys[i][0]), int(keys[i][1])))
    groups: dict[tuple[str, int], list[int]] = {}
    for i in order:
        groups.setdefault((str(keys[i][0]), int(keys[i][1])), []).append(i)
    cbf_cache: dict[str, tuple[Detector, Beam]] = {}
    for (url, frame), rows in groups.items():
        rows_a = np.asarray(rows)
        data = {}
        for name, dtype in SPOT_COLUMNS.items():
            if name in cols:
                data[name] = np.asarray(cols[name][rows_a], dtype=dtype)
            else:
                data[name] = np.zeros(rows_a.size, dtype=dtype)
        spots = SpotTable(**data)
        detector, beam = _geometry_for(url, geometry, args, cbf_cache, path)
        if len(spots) and int(spots.panel.max()) >= len(detector):
            raise InputError(f"{path}: spot panel index {int(spots.panel.max())} for {url} but "
                             f"the geometry has {len(detector)} panels")
        yield _Job(url, frame, "", spots, detector, beam)


def _geometry_for(url, geometry, args, cache, path) -> tuple[Detector, Beam]:
    if geometry is not None:
        values = {}
        if args.wavelength_a:
            values["photon_energy"] = wavelength_a_to_photon_energy_ev(args.wavelength_a)
        detector, beam = geometry.resolve(values or None)
        if args.wavelength_a:
            beam = Beam(wavelength_a=args.wavelength_a)
        if beam is None:
            raise InputError(f"{args.geometry}: no wavelength or photon energy in the geometry "
                             "(value None); give --wavelength-a")
        return detector, beam
    if url not in cache:
        from sfxflow.io.cbf import cbf_geometry
        from sfxflow.io.storage import open_url

        if not url.lower().endswith(".cbf"):
            raise InputError(f"{path}: spots of {url} need --geometry (only CBF sources carry "
                             "their own geometry)")
        with open_url(url) as fh:
            cache[url] = cbf_geometry(fh.read(), url)
    detector, beam = cache[url]
    if args.wavelength_a:
        beam = Beam(wavelength_a=args.wavelength_a)
    return detector, beam


def _row(job: _Job, res: IndexResult, seconds: float, angle: float) -> dict:
    row = {
        "source_url": job.source, "frame_index": job.frame_index, "event": job.event,
        "indexed": res.success, "reason": res.reason, "n_spots": res.n_spots,
        "n_indexed": res.n_indexed, "fraction_indexed": res.fraction_indexed,
        "rmsd_px": res.rmsd_px, "rmsd_inv_a": res.rmsd_inv_a, "wavelength_a": job.beam.wavelength_a,
        "index_s": seconds, "reference_angle_deg": angle,
        "log10_false_probability": res.log10_false_probability,
        "det_shift_x_mm": res.detector_shift_mm[0], "det_shift_y_mm": res.detector_shift_mm[1],
    }
    row.update(a_matrix_columns(res.crystal.a_matrix if res.crystal is not None else None))
    cell = res.crystal.cell.parameters if res.crystal is not None else (math.nan,) * 6
    for name, v in zip(("cell_a", "cell_b", "cell_c", "cell_alpha", "cell_beta", "cell_gamma"),
                       cell, strict=True):
        row[name] = float(v)
    return row


def _write(rows: list[dict], out: str, target: TargetCell) -> None:
    import pyarrow as pa

    from sfxflow.io.results import parquet_bytes
    from sfxflow.io.storage import open_url

    table = pa.Table.from_pylist(rows)
    meta = {"sfxflow.target_cell": " ".join(f"{x:g}" for x in target.cell.parameters),
            "sfxflow.space_group": target.space_group.hm}
    data = parquet_bytes(table, meta)
    try:
        with open_url(out, "wb") as fh:
            fh.write(data)
    except OSError as exc:
        raise InputError(f"{out}: cannot write results ({exc})") from exc


def run(args: argparse.Namespace) -> int:
    config = settings_from(args, IndexConfig)
    if args.print_config:
        return print_config(config)
    params = config.index
    rows: list[dict] = []
    target: TargetCell | None = None
    times: list[float] = []
    angles: list[float] = []
    reasons: Counter[str] = Counter()
    n_ref = n_both = n_ok = 0
    if not args.quiet_frames:
        print(f"{'frame':<48} {'spots':>5} {'idx':>4} {'frac':>5} {'rmsd px':>7} "
              f"{'cell':<34} {'vs ref deg':>10}  reason")
    from sfxflow.io.lists import expand_lists

    for path in [entry.url for entry in expand_lists(args.inputs)]:  # lists: .lst, @FILE
        if not Path(path).exists() and "://" not in path:
            raise InputError(f"{path}: no such file (expected a .parquet spot table or .stream)")
        if path.endswith(".stream"):
            holder: dict[str, TargetCell] = {}
            jobs, stream_cell = _stream_jobs(path, lambda h=holder: h["t"].space_group)
            holder["t"] = _target(args, stream_cell)
            this_target = holder["t"]
        else:
            this_target = _target(args)
            jobs = _parquet_jobs(path, args)
        if target is not None and target.key != this_target.key:
            raise InputError(f"{path}: target cell {this_target.key} differs from the first "
                             f"input's {target.key}; index them separately")
        target = this_target
        for job in jobs:
            t0 = time.perf_counter()
            res = index_spots(job.spots, job.detector, job.beam, target, params)
            dt = time.perf_counter() - t0
            times.append(dt)
            angle = math.nan
            if job.reference is not None:
                n_ref += 1
                if res.success and res.crystal is not None:
                    n_both += 1
                    angle = misorientation_deg(res.crystal, job.reference, target.space_group)
                    angles.append(angle)
            n_ok += res.success
            if not res.success:
                reasons[reason_kind(res.reason)] += 1
            rows.append(_row(job, res, dt, angle))
            if not args.quiet_frames:
                name = f"{job.source} {job.event}".strip()
                name = name if len(name) <= 48 else "..." + name[-45:]
                cell = (" ".join(f"{x:.1f}" for x in res.crystal.cell.parameters)
                        if res.crystal is not None else "-")
                print(f"{name:<48} {res.n_spots:>5} {res.n_indexed:>4} "
                      f"{res.fraction_indexed:>5.2f} {res.rmsd_px:>7.2f} {cell:<34} "
                      f"{angle:>10.3f}  {res.reason}")
    n = len(rows)
    print(f"frames {n}, indexed {n_ok} ({100.0 * n_ok / max(n, 1):.1f}%), "
          f"{format_times_ms(times)}")
    if reasons:
        print("not indexed: " + ", ".join(f"{k}: {v}" for k, v in reasons.most_common()))
    if n_ref:
        if len(angles) >= FEW_VALUES:
            shown = (f"angle to reference median {statistics.median(angles):.3f} deg, max "
                     f"{max(angles):.3f} deg")
        else:  # no median of two values
            shown = ("angles to reference " + ", ".join(f"{a:.3f}" for a in angles) + " deg"
                     if angles else "no angle to compare")
        print(f"reference solutions in the input: {n_ref}; indexed by both: {n_both}; "
              f"{shown} (modulo point-group rotations)")
    if args.out and target is not None:
        _write(rows, args.out, target)
        print(f"results: {args.out}")
    return 0
