"""``sfxflow bench merge``: merged data quality against a known truth, and merging at scale.

1. **CC to the truth against the number of crystals.** Crystals are simulated from the real
   merged intensities of ``x4wide-P41212-merged.mtz`` with the physical model of
   :mod:`sfxflow.algorithms.simulate_physical` (SASE spikes, mosaic blocks, crystal sizes over two
   orders of magnitude, per-crystal B, non-isomorphism, beam jitter, indexing errors) and written
   both as sfxflow run directories and as CrystFEL streams. For each size: ``sfxflow merge``
   with ``--model unity`` and ``--model partiality``, and CrystFEL 0.12 partialator
   (``--model=unity`` and ``--model=xsphere``) on the same crystals; CC to the truth, CC1/2 and
   CC* of each. Then the check the issue asks for: partiality at N against unity at 2N.
   With ``--images N`` (default 300) also N whole stills simulated with the same physics
   (``sfxflow simulate --intensities``), processed by sfxflow (spots, indexing, integration) and
   merged the same way (both models, partialator on the run's stream): all the crystals, and
   nested random subsets of them for each size of ``--sizes`` there are crystals for.
2. **Indexing ambiguity.** A P6_3 set (synthetic Wilson intensities: no real P6_3 reference is in
   the data) with every crystal in a random setting: merged without resolution, with it, and the
   same crystals unambiguously indexed; the fraction of crystals re-indexed correctly.
3. **Scale.** At least ``--scale-observations`` observations (copies of simulated crystals with
   fresh scales and noise: cheap) merged on a LocalCluster: observations per second per core per
   scaling cycle (median of the cycles), client and worker peak resident memory (and of it
   anonymous and file-backed), wall time.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sfxflow.benchmarks.shared import shared_path
from sfxflow.errors import InputError
from sfxflow.io.stream import BEGIN_CHUNK, BEGIN_CRYSTAL, END_CHUNK, END_CRYSTAL
from sfxflow.options import number

HELP = "merged CC to the truth vs crystals (ours and partialator), ambiguity, scale"
DESCRIPTION = HELP + """

Examples:
  sfxflow bench merge
  sfxflow bench merge --sizes 250 500 --no-scale --no-ambiguity
  sfxflow bench merge --sizes 100 --scale-observations 2000000 --keep /tmp/bench-merge
"""

logger = logging.getLogger(__name__)



def add_arguments(parser: argparse.ArgumentParser) -> None:
    number(parser, "--sizes", kind=int, nargs="+", default=[250, 500, 1000, 2000], ge=10,
           le=1_000_000, help="numbers of crystals to merge (default 250 500 1000 2000)")
    number(parser, "--d-min-a", kind=float, default=1.6, gt=0.5, le=10.0,
           help="resolution of the simulation and the merge (default 1.6 A)")
    number(parser, "--iterations", kind=int, default=4, ge=1, le=50,
           help="scaling cycles of sfxflow merge (default 4)")
    number(parser, "--seed", kind=int, default=1, ge=0, le=2**31 - 1, help="simulation seed")
    number(parser, "--scale-observations", kind=float, default=1.0e7, ge=1e4, le=1e10,
           help="observations in the scale test (default 1e7)")
    number(parser, "--workers", kind=int, default=2, ge=1, le=1024,
           help="local Dask workers of the scale test (default 2)")
    number(parser, "--ambiguity-crystals", kind=int, default=500, ge=20, le=100_000,
           help="crystals of the P6_3 set (default 500)")
    number(parser, "--xsphere-max-crystals", kind=int, default=500, ge=0, le=1_000_000,
           help="run partialator --model=xsphere only up to this many crystals (it takes about "
                "a second per crystal per cycle on one shared core; default 500)")
    number(parser, "--xsphere-iterations", kind=int, default=1, ge=1, le=20,
           help="partialator --iterations for xsphere (default 1)")
    number(parser, "--images", kind=int, default=300, ge=0, le=1_000_000,
           help="also simulate this many whole stills from x4wide (--intensities physics), "
                "process them with sfxflow (spots, indexing, integration) and merge them, "
                "all and random subsets of each size of --sizes (default 300; 0 skips)")
    parser.add_argument("--no-partialator", action="store_true", help="skip CrystFEL partialator")
    parser.add_argument("--no-ambiguity", action="store_true", help="skip the P6_3 test")
    parser.add_argument("--no-scale", action="store_true", help="skip the scale test")
    parser.add_argument("--keep", metavar="DIR", help="keep the simulated data and results here")


def _truth_mtz() -> Path:
    mtz = shared_path("data/reference/x4wide-P41212-merged.mtz")
    if mtz is None:
        raise InputError("x4wide-P41212-merged.mtz not found (value: ../shared/data/reference); "
                         "set SFXFLOW_SHARED_DATA to the shared data folder")
    return mtz


def _partialator() -> Path | None:
    return shared_path("peers/crystfel-0.12/bin/partialator")


def _cc(x: np.ndarray, y: np.ndarray) -> float:
    from sfxflow.algorithms.merge.statistics import pearson

    return pearson(np.asarray(x, float), np.asarray(y, float))


def _cc_star(cc: float) -> float:
    from sfxflow.algorithms.merge.statistics import cc_star

    return cc_star(cc)


def _truth_of(truth: Any, hkl: np.ndarray) -> np.ndarray:
    plus, minus = truth.at(hkl), truth.at(-np.asarray(hkl, np.int64))
    return np.where(np.isfinite(minus), 0.5 * (plus + minus), plus)


def _hkl_figures(prefix: Path, truth: Any, d_min: float) -> dict[str, float]:
    """CC to the truth, CC1/2 and CC* of a partialator result (``.hkl``, ``.hkl1``, ``.hkl2``)."""
    from sfxflow.io.hkl import read_hkl

    _, hkl, i, _, n = read_hkl(prefix)
    d = 1.0 / np.linalg.norm(hkl @ np.asarray(truth.index.cell.frac.mat), axis=1)
    keep = (n >= 2) & (d >= d_min)
    cc_truth = _cc(i[keep], _truth_of(truth, hkl[keep]))
    halves = []
    for suffix in ("1", "2"):
        _, h, v, _, m = read_hkl(f"{prefix}{suffix}")
        halves.append({tuple(x): y for x, y, k in zip(h.tolist(), v, m, strict=True) if k >= 2})
    common = [k for k in halves[0] if k in halves[1]]
    cc_half = _cc(np.array([halves[0][k] for k in common]), np.array([halves[1][k] for k in common]))
    return {"cc_truth": cc_truth, "cc_half": cc_half, "cc_star": _cc_star(cc_half)}


def _run_partialator(exe: Path, stream: Path, out: Path, model: str, workdir: Path,
                     xsphere_iterations: int) -> float:
    iterations = "1" if model == "unity" else str(xsphere_iterations)
    t0 = time.perf_counter()
    proc = subprocess.run([str(exe), "-i", str(stream), "-o", str(out), "-y", "4/mmm",
                           f"--model={model}", f"--iterations={iterations}", "-j", "2"],
                          cwd=workdir, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"partialator failed: {proc.stderr[-500:]}")
    return time.perf_counter() - t0


def _subset_stream(blocks: list[Path], target: Path) -> Path:
    with open(target, "w", encoding="utf-8") as out:
        for k, block in enumerate(blocks):
            text = block.read_text(encoding="utf-8")
            if k:
                text = text[text.index("----- Begin chunk -----"):]
            out.write(text)
    return target


def _simulate_blocks(work: Path, truth: Any, n_max: int, d_min: float, seed: int,
                     reindex_ops: list | None = None, tag: str = "x4", block: int = 250
                     ) -> tuple[list[Path], list[Path]]:
    from sfxflow.algorithms.layouts import simple
    from sfxflow.algorithms.simulate_physical import PhysicalParams
    from sfxflow.io.observations import write_simulated_observations

    params = PhysicalParams(d_min_a=d_min)
    runs, streams = [], []
    for b in range(math.ceil(n_max / block)):
        run, stream = work / f"{tag}-run-{b:03d}", work / f"{tag}-{b:03d}.stream"
        n = min(block, n_max - b * block)
        write_simulated_observations(str(run), truth, simple(80.0, 0.1, 3000), params, n,
                                     seed * 1000 + b, stream_path=str(stream),
                                     reindex_ops=reindex_ops)
        runs.append(run)
        streams.append(stream)
    return runs, streams


def _common_cc(files: dict[str, Path], truth: Any, d_min: float) -> tuple[dict[str, float], int]:
    """CC to the truth of each merged ``.hkl`` on the reflections all of them hold (at least
    two observations, ``d >= d_min``): what one merge did better than another, not which one
    kept more reflections. Reflections are compared through the truth's asymmetric unit
    (Friedel mates together), so the programs' own conventions do not matter."""
    from sfxflow.io.hkl import read_hkl

    index = truth.index
    values: dict[str, dict[int, float]] = {}
    for name, path in files.items():
        _, hkl, i, _, n = read_hkl(path)
        code = index.lookup(np.asarray(hkl, np.int64))
        d = 1.0 / np.linalg.norm(hkl @ np.asarray(index.cell.frac.mat), axis=1)
        keep = (n >= 2) & (d >= d_min) & np.isfinite(i) & (code >= 0)
        values[name] = dict(zip((code[keep] // 2).tolist(), i[keep].tolist(), strict=True))
    common = sorted(set.intersection(*(set(v) for v in values.values()))) if values else []
    t = _truth_of(truth, index.hkl[np.asarray(common, np.int64)])
    ok = np.isfinite(t)
    return ({name: _cc(np.array([v[k] for k in common])[ok], t[ok])
             for name, v in values.items()}, int(ok.sum()))


def _ours(runs: list[Path], out: Path, truth: Any, model: str, iterations: int, d_min: float,
          **extra: Any) -> dict[str, Any]:
    from sfxflow.algorithms.merge.scale import MergeParams
    from sfxflow.pipeline.config import ClusterConfig
    from sfxflow.pipeline.merge import run_merge

    params = MergeParams(model=model, iterations=iterations, d_min_a=d_min, **extra)
    t0 = time.perf_counter()
    r = run_merge([str(p) for p in runs], str(out), params, ClusterConfig(kind="synchronous"),
                  truth=truth)
    o = r.stats["overall"]
    return {"cc_truth": o["cc_truth"], "cc_half": o["cc_half"], "cc_star": o["cc_star"],
            "seconds": time.perf_counter() - t0, "stats": r.stats}


def _quality(work: Path, args: argparse.Namespace, truth: Any) -> list[dict]:
    sizes = sorted(set(args.sizes))
    block = math.gcd(*sizes)  # every size is a whole number of blocks
    t0 = time.perf_counter()
    runs, streams = _simulate_blocks(work, truth, max(sizes), args.d_min_a, args.seed,
                                     block=block)
    print(f"simulated {max(sizes)} crystals from x4wide-P41212 to {args.d_min_a} A in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    exe = None if args.no_partialator else _partialator()
    if exe is None and not args.no_partialator:
        print("partialator not found (../shared/peers/crystfel-0.12): skipping it")
    rows = []
    for n in sizes:
        k = n // block
        stream = None if exe is None else _subset_stream(streams[:k],
                                                         work / f"subset-{n}.stream")
        rows.append(_merge_size(n, runs[:k], stream, work, "", args, truth, exe))
    return rows


def _merge_size(n: int, runs: list[Path], stream: Path | None, work: Path, tag: str,
                args: argparse.Namespace, truth: Any, exe: Path | None) -> dict[str, Any]:
    """One row of the table: our two models on ``runs`` and partialator (where ``exe``) on
    ``stream``, the same ``n`` crystals; printed as it comes."""
    row: dict[str, Any] = {"n": n}
    files = {}
    for model in ("unity", "partiality"):
        row[f"sfxflow-{model}"] = _ours(runs, work / f"{tag}merge-{model}-{n}", truth, model,
                                        args.iterations, args.d_min_a)
        row[f"sfxflow-{model}"].pop("stats")
        files[f"sfxflow-{model}"] = work / f"{tag}merge-{model}-{n}" / "merged.hkl"
    if exe is not None and stream is not None:
        for model in ("unity", "xsphere"):
            if model == "xsphere" and n > args.xsphere_max_crystals:
                continue  # about a second per crystal and cycle here: see the option
            out = work / f"{tag}partialator-{model}-{n}.hkl"
            seconds = _run_partialator(exe, stream, out, model, work, args.xsphere_iterations)
            row[f"partialator-{model}"] = {**_hkl_figures(out, truth, args.d_min_a),
                                           "seconds": seconds}
            files[f"partialator-{model}"] = out
    common, row["n_common"] = _common_cc(files, truth, args.d_min_a)
    for name, cc in common.items():
        row[name]["cc_truth_common"] = cc
    _print_quality_row(row)
    return row


def _print_quality_row(row: dict) -> None:
    cols = [k for k in row if k not in ("n", "n_common")]
    print(f"N = {row['n']} (CC truth common: on the {row['n_common']} reflections all share):")
    for c in cols:
        v = row[c]
        print(f"  {c:22s} CC truth {v['cc_truth']:.4f}   common {v['cc_truth_common']:.4f}   "
              f"CC1/2 {v['cc_half']:.4f}   CC* {v['cc_star']:.4f}   ({v['seconds']:.1f} s)",
              flush=True)


def _summary(rows: list[dict], title: str = "") -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r if k not in ("n", "n_common")))
    for key, what in (("cc_truth", "overall, to the resolution limit"),
                      ("cc_truth_common", "on the reflections every method produced")):
        print(f"\nCC to the truth ({what}){': ' + title if title else ''}:")
        print(f"{'N':>6} " + " ".join(f"{c:>22s}" for c in cols))
        for r in rows:
            print(f"{r['n']:>6d} " + " ".join(f"{r[c][key]:>22.4f}" if c in r else
                                              f"{'-':>22s}" for c in cols))
    by_n = {r["n"]: r for r in rows}
    print("\npartiality vs unity:")
    for n, r in by_n.items():
        p, u = r["sfxflow-partiality"]["cc_truth_common"], r["sfxflow-unity"]["cc_truth_common"]
        line = f"  N={n}: partiality {p:.4f} vs unity {u:.4f}: {'beats' if p > u else 'LOSES'}"
        for factor in (2, 4):
            if n * factor in by_n:
                u2 = by_n[n * factor]["sfxflow-unity"]["cc_truth_common"]
                line += f"; unity at {factor}N {u2:.4f} ({'reached' if p >= u2 else 'not reached'})"
        if "partialator-unity" in r:
            best = max((k for k in ("partialator-unity", "partialator-xsphere") if k in r),
                       key=lambda k: r[k]["cc_truth_common"])
            cc = r[best]["cc_truth_common"]
            line += f"; best {best} {cc:.4f} ({'beaten' if p > cc else 'NOT beaten'})"
        print(line)


def _images(work: Path, args: argparse.Namespace, truth: Any) -> dict:
    """Whole stills with physical partiality, processed by sfxflow, then merged: all of them and
    nested random subsets of the crystals (each size of ``--sizes`` there are crystals for)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from sfxflow.algorithms.layouts import simple
    from sfxflow.algorithms.simulate import SimulationParams
    from sfxflow.io.simulated import physical_model, write_simulated_dataset
    from sfxflow.pipeline.config import load_config
    from sfxflow.pipeline.run import run_process

    mtz = _truth_mtz()
    params, physics = physical_model(str(mtz), SimulationParams(hit_fraction=1.0,
                                                                d_min_a=args.d_min_a))
    t0 = time.perf_counter()
    info = write_simulated_dataset(work / "images", simple(80.0, 0.1, 2048), None, params,
                                   args.images, max(1, args.images // 50), args.seed,
                                   detector_name="simple", physics=physics)
    t_sim = time.perf_counter() - t0
    cell = list(params.cell)
    config = load_config(overrides=[f"io.geometry='{info.geometry_path}'", f"target.cell={cell}",
                                    f"target.space_group='{params.space_group}'",
                                    f"cluster.n_workers={args.workers}", "run.report=false"])
    run = work / "images-run"
    t0 = time.perf_counter()
    result = run_process([str(p) for p in info.files], str(run), config, force=True)
    t_proc = time.perf_counter() - t0
    crystals = pq.read_table(run / "crystals.parquet")
    crystals = crystals.filter(pc.equal(crystals.column("status"), "integrated"))
    n_all = crystals.num_rows
    print(f"\nimages: {args.images} stills simulated from x4wide ({t_sim:.0f} s), processed by "
          f"sfxflow ({t_proc:.0f} s): {result.summary.get('indexed', 0)} indexed, {n_all} "
          "crystals integrated", flush=True)
    exe = None if args.no_partialator else _partialator()
    subsets = nested_subsets(n_all, [*args.sizes, n_all], args.seed)
    rows = []
    for n, rows_taken in subsets.items():
        subset = work / f"images-subset-{n}"
        stream = _subset_processed(run, crystals.take(rows_taken), subset, exe is not None)
        rows.append(_merge_size(n, [subset], stream, work, "images-", args, truth, exe))
    _summary(rows, f"{n_all} crystals from {args.images} stills processed by sfxflow, merged in "
                   "nested random subsets")
    return {"frames": args.images, "indexed": result.summary.get("indexed", 0),
            "crystals": n_all, "rows": rows}


def nested_subsets(n_items: int, sizes: Sequence[int], seed: int) -> dict[int, np.ndarray]:
    """Nested random subsets of ``n_items`` things: for each size (those above ``n_items`` left
    out), in increasing order, the sorted indices of the first ``size`` of one seeded
    permutation, so that a larger subset holds every smaller one."""
    order = np.random.default_rng(seed).permutation(n_items)
    return {n: np.sort(order[:n]) for n in sorted(set(sizes)) if n <= n_items}


def _subset_processed(run: Path, crystals: Any, target: Path, with_stream: bool
                      ) -> Path | None:
    """A run directory (one shard) holding only ``crystals`` (rows of the run's
    crystals.parquet) and their reflections, and, ``with_stream``, the CrystFEL stream of the
    same crystals (returned)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def keys(table: Any, frame_column: str) -> list[tuple[str, Any, int]]:
        return list(zip(table.column("source_url").to_pylist(),
                        table.column(frame_column).to_pylist(),
                        table.column("crystal").to_pylist(), strict=True))

    (target / "shards").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "config.toml", target / "config.toml")
    wanted = set(keys(crystals, "frame_index"))
    shards = sorted((run / "shards").glob("*.reflections.parquet"))
    refl = pa.concat_tables(pq.read_table(p) for p in shards)
    mask = pa.array([k in wanted for k in keys(refl, "frame_index")])
    pq.write_table(refl.filter(mask), target / "shards" / "subset.reflections.parquet")
    pq.write_table(crystals, target / "shards" / "subset.crystals.parquet")
    if not with_stream:
        return None
    stream = target.with_suffix(".stream")
    by_event = set(keys(crystals, "event_id"))
    with open(stream, "w", encoding="utf-8") as out:
        for path in [run / "header.stream", *sorted((run / "shards").glob("*.stream"))]:
            out.writelines(filter_stream(path.read_text(encoding="utf-8"), by_event))
    found = stream.read_text(encoding="utf-8").count(BEGIN_CRYSTAL)
    if found != crystals.num_rows:  # the stream and the Parquet shards disagree: a bug
        raise RuntimeError(f"{stream}: {found} crystals, expected {crystals.num_rows}")
    return stream


def filter_stream(text: str, keep: set[tuple[str, str, int]]) -> Iterator[str]:
    """The lines of a CrystFEL stream (or a part of one) without the crystal blocks whose
    (image filename, event, number of the crystal in its chunk) is not in ``keep``, and
    without the chunks left with no crystal."""
    chunk: list[str] = []
    crystal: list[str] | None = None
    filename = event = ""
    n_crystals = n_kept = 0
    for line in text.splitlines(keepends=True):
        if line.startswith(BEGIN_CHUNK):
            chunk, filename, event, n_crystals, n_kept = [line], "", "", 0, 0
        elif not chunk:
            yield line  # the header
        elif crystal is not None:
            crystal.append(line)
            if line.startswith(END_CRYSTAL):
                if (filename, event, n_crystals) in keep:
                    chunk += crystal
                    n_kept += 1
                crystal, n_crystals = None, n_crystals + 1
        elif line.startswith(BEGIN_CRYSTAL):
            crystal = [line]
        else:
            chunk.append(line)
            if line.startswith("Image filename:"):
                filename = line.split(":", 1)[1].strip()
            elif line.startswith("Event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith(END_CHUNK):
                if n_kept:
                    yield from chunk
                chunk = []


def _ambiguity(work: Path, args: argparse.Namespace) -> dict:
    import gemmi
    import pyarrow.parquet as pq

    from sfxflow.algorithms.merge.reflections import ambiguity_operators
    from sfxflow.algorithms.simulate_physical import TrueIntensities

    uc, sg = gemmi.UnitCell(60.0, 60.0, 90.0, 90, 90, 120), gemmi.SpaceGroup("P 63")
    d_min = max(args.d_min_a, 3.0)  # a multiplicity worth merging with a few hundred crystals
    hkl = np.asarray(gemmi.make_miller_array(uc, sg, d_min, 0, True))
    rng = np.random.default_rng(args.seed)
    d = 1.0 / np.linalg.norm(hkl @ np.asarray(uc.frac.mat), axis=1)
    i = rng.exponential(400.0, len(hkl)) * np.exp(-20.0 / (2 * d * d))
    truth = TrueIntensities.from_arrays(uc, sg, hkl, i)
    ops = ambiguity_operators(uc, sg)
    n = args.ambiguity_crystals
    amb, _ = _simulate_blocks(work, truth, n, d_min, args.seed + 7, ops, tag="p63")
    plain, _ = _simulate_blocks(work, truth, n, d_min, args.seed + 7, None, tag="p63u")
    out: dict[str, dict[str, Any]] = {}
    fraction_correct = math.nan
    for name, runs, resolve in (("ambiguous, not resolved", amb, False),
                                ("ambiguous, resolved", amb, True),
                                ("unambiguous", plain, False)):
        r = _ours(runs, work / f"amb-{name.replace(' ', '').replace(',', '-')}", truth,
                  "partiality", args.iterations, d_min, resolve_ambiguity=resolve)
        out[name] = r
        if resolve:
            found = pq.read_table(work / f"amb-{name.replace(' ', '').replace(',', '-')}"
                                  / "crystals.parquet").column("operator").to_numpy()
            true_ops = np.concatenate([pq.read_table(p / "shards" / "sim-00000.crystals.parquet")
                                       .column("true_reindex_op").to_numpy() for p in runs])
            agree = float(np.mean(found == true_ops))
            fraction_correct = max(agree, 1.0 - agree)
    print(f"\nP6_3 (60 60 90 A, to {d_min} A), {n} crystals, each in a random one of {len(ops)} "
          "settings:")
    for name in ("ambiguous, not resolved", "ambiguous, resolved", "unambiguous"):
        v = out[name]
        print(f"  {name:26s} CC truth {v['cc_truth']:.4f}   CC1/2 {v['cc_half']:.4f}")
    print(f"  crystals re-indexed correctly (up to the overall setting): "
          f"{100 * fraction_correct:.1f}%", flush=True)
    summary: dict[str, Any] = {k: {x: y for x, y in v.items() if x != "stats"}
                               for k, v in out.items()}
    summary["fraction_correct"] = fraction_correct
    return summary


def _scale(work: Path, args: argparse.Namespace, truth: Any) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sfxflow.algorithms.merge.scale import MergeParams
    from sfxflow.pipeline.config import ClusterConfig
    from sfxflow.pipeline.merge import run_merge

    pool_runs, _ = _simulate_blocks(work, truth, 250, args.d_min_a, args.seed + 99,
                                    tag="pool")
    refl = pq.read_table(pool_runs[0] / "shards" / "sim-00000.reflections.parquet")
    crys = pq.read_table(pool_runs[0] / "shards" / "sim-00000.crystals.parquet")
    per_copy = refl.num_rows
    copies = math.ceil(args.scale_observations / per_copy)
    big = work / "scale-run"
    (big / "shards").mkdir(parents=True, exist_ok=True)
    (big / "config.toml").write_text((pool_runs[0] / "config.toml").read_text())
    rng = np.random.default_rng(args.seed)
    frame = refl.column("frame_index").to_numpy()
    inten, sigma = refl.column("intensity").to_numpy(), refl.column("sigma").to_numpy()
    copies_per_shard = max(1, math.ceil(200_000 / per_copy))
    t0 = time.perf_counter()
    for s in range(math.ceil(copies / copies_per_shard)):
        tables, ctables = [], []
        for c in range(s * copies_per_shard, min(copies, (s + 1) * copies_per_shard)):
            # a copy of the pool: new crystal identities, scales and noise
            k = np.exp(rng.uniform(-1.0, 1.0, crys.num_rows))[frame]
            cols = {n: refl.column(n) for n in refl.column_names}
            cols["frame_index"] = pa.array(frame + c * 1000)
            cols["intensity"] = pa.array(k * inten + rng.normal(0, 0.3, len(k)) * k * sigma)
            cols["sigma"] = pa.array(k * sigma)
            tables.append(pa.table(cols))
            ccols = {n: crys.column(n) for n in crys.column_names}
            ccols["frame_index"] = pa.array(crys.column("frame_index").to_numpy() + c * 1000)
            ctables.append(pa.table(ccols))
        pq.write_table(pa.concat_tables(tables), big / "shards" / f"s{s:05d}.reflections.parquet")
        pq.write_table(pa.concat_tables(ctables), big / "shards" / f"s{s:05d}.crystals.parquet")
    n_obs = copies * per_copy
    print(f"\nscale: wrote {n_obs:,} observations ({copies * crys.num_rows:,} crystals, "
          f"{s + 1} shards) in {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    r = run_merge([str(big)], str(work / "scale-merge"),
                  MergeParams(model="partiality", iterations=args.iterations, d_min_a=args.d_min_a),
                  ClusterConfig(kind="local", n_workers=args.workers), truth=truth)
    wall = time.perf_counter() - t0
    perf = r.stats["performance"]
    cycles = [c["seconds"] for c in r.stats["cycles"]]
    print(f"  merged {r.stats['n_observations']:,} observations on {perf['cores']} worker cores "
          f"in {wall:.0f} s; cycle times {', '.join(f'{c:.1f}' for c in cycles)} s (median "
          f"{statistics.median(cycles):.1f} s)")
    cpu = [c["cpu_seconds"] for c in r.stats["cycles"]]
    print(f"  {perf['observations_per_second_per_core_per_cycle']:,.0f} observations per second "
          f"per core per scaling cycle (wall time x cores, median of the cycles); "
          f"{perf['observations_per_cpu_second_per_cycle']:,.0f} per CPU second (cycle CPU "
          f"times of the workers and the client {', '.join(f'{c:.1f}' for c in cpu)} s: what "
          f"other programs on the machine do not change)")
    def mb(values: list[float]) -> str:
        return ", ".join(f"{m:.0f}" for m in values)

    print(f"  peak resident memory: client {perf['client_peak_mb']:.0f} MB, workers "
          f"{mb(perf['worker_peak_mb'])} MB; of it anonymous (the process's own) client "
          f"{perf['client_peak_anon_mb']:.0f}, workers {mb(perf['worker_peak_anon_mb'])} MB, "
          f"file-backed (libraries, memory-mapped shards: the kernel drops them under "
          f"pressure) client {perf['client_peak_file_mb']:.0f}, workers "
          f"{mb(perf['worker_peak_file_mb'])} MB; CC to truth "
          f"{r.stats['overall']['cc_truth']:.4f}", flush=True)
    return {"n_observations": r.stats["n_observations"], "wall_s": wall, "cycle_s": cycles,
            "cycle_cpu_s": cpu,
            **perf}


def run(args: argparse.Namespace) -> int:
    from sfxflow.algorithms.simulate_physical import TrueIntensities
    from sfxflow.io.mtz import read_intensity_columns

    truth = TrueIntensities.from_arrays(*read_intensity_columns(
        _truth_mtz()))
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sfxflow-bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    try:
        results["quality"] = _quality(work, args, truth)
        _summary(results["quality"])
        if args.images:
            results["images"] = _images(work, args, truth)
        if not args.no_ambiguity:
            results["ambiguity"] = _ambiguity(work, args)
        if not args.no_scale:
            results["scale"] = _scale(work, args, truth)
        (work / "bench-merge.json").write_text(json.dumps(results, indent=1, default=str))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    sys.stdout.flush()
    return 0
