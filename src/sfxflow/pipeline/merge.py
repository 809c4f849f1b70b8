"""The distributed merge: map over reflection shards, reduce per-reflection sums, iterate.

Plan of a run (every step a map over shards on the workers and a small reduce on the client):

1. read and prepare each shard on a worker (asymmetric-unit codes under every ambiguity operator,
   excitation errors); the prepared shard stays in the worker's memory as a Dask future, so a
   lost worker's shards are simply recomputed from their files;
2. a Wilson curve (mean intensity per resolution bin) for the first reference;
3. where the lattice allows an indexing ambiguity: normalised intensity vectors of a bounded
   random subset of crystals go to the client, which resolves their settings (Brehm-Diederichs)
   and builds the first reference from them;
4. ``iterations`` cycles: per crystal operator choice and scale / B / partiality fit against the
   broadcast reference, then per-reflection sums reduced in a tree on the cluster; the client
   turns them into the next reference and error model, and rejects crystals with absurd scales;
   the last cycle also writes the scaled observations of each shard;
5. merged intensities, statistics, MTZ, CrystFEL .hkl, crystals.parquet and stats.json.

The client holds per-reflection arrays and per-crystal results, never the observations.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gemmi
import numpy as np
import pyarrow as pa

from sfxflow.algorithms.merge.ambiguity import resolve_ambiguity
from sfxflow.algorithms.merge.cell import consensus_cell
from sfxflow.algorithms.merge.reference import (
    WilsonCurve,
    ambiguity_vectors,
    first_reference,
    truth_on,
)
from sfxflow.algorithms.merge.reflections import (
    AsuIndex,
    ambiguity_operators,
    operator_products,
)
from sfxflow.algorithms.merge.rejection import reject_absurd_scales
from sfxflow.algorithms.merge.scale import (
    ACCEPTED,
    REASONS,
    CrystalFits,
    ErrorModel,
    MergeParams,
    PreparedShard,
    Reference,
    ShardSums,
    accumulate,
    choose_operators,
    fit_crystals,
    prepare_shard,
    scaled_observations,
)
from sfxflow.algorithms.merge.statistics import (
    format_table,
    merge_sums,
    pearson,
    shell_statistics,
    wilson_b,
)
from sfxflow.algorithms.simulate_physical import TrueIntensities
from sfxflow.errors import InputError
from sfxflow.io.hkl import write_hkl
from sfxflow.io.mtz import MergedColumns, write_merged_mtz
from sfxflow.io.observations import ShardSpec, discover_shards, read_shard
from sfxflow.io.results import RunDir, parquet_bytes
from sfxflow.models import as_space_group
from sfxflow.pipeline.cluster import open_cluster
from sfxflow.pipeline.config import ClusterConfig
from sfxflow.pipeline.mapreduce import MapReduce

__all__ = ["MergeResult", "run_merge"]

log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    """What :func:`run_merge` produced."""

    out_url: str
    stats: dict
    table: str
    crystals: pa.Table = field(repr=False)
    reports: list[str] = field(default_factory=list)  #: the report pages written


# ----------------------------------------------------------------------------- worker tasks


def _summarise(data: Any) -> dict:
    inv_d2_max = 0.0
    if data.hkl.shape[0]:
        q = np.einsum("nij,nj->ni", data.a_matrices[data.obs_crystal], data.hkl.astype(float))
        inv_d2_max = float(np.max(np.einsum("ni,ni->n", q, q)))
    return {"n_crystals": data.n_crystals, "n_obs": int(data.hkl.shape[0]),
            "cells": data.cells, "wavelengths": data.wavelengths_a, "rejected": data.rejected,
            "inv_d2_max": inv_d2_max, "lattice_space_group": data.lattice_space_group}


def _prepare(data: Any, index: AsuIndex, operators: list[np.ndarray], params: MergeParams
             ) -> PreparedShard:
    shard = prepare_shard(data.crystal_ids, data.a_matrices, data.wavelengths_a,
                          data.obs_crystal, data.hkl, data.intensity, data.sigma,
                          data.polarisation, index, operators, params)
    # per-crystal metadata rides along (not per observation)
    shard.extra.update({"crystal_source": np.asarray(data.source_url, dtype=object),
                        "crystal_frame": data.frame_index, "crystal_number": data.crystal})
    return shard


def _accepted(fits: CrystalFits, accepted: np.ndarray | None) -> np.ndarray:
    ok = fits.status == ACCEPTED
    return ok if accepted is None else ok & accepted


def _cycle(shard: PreparedShard, accepted: np.ndarray | None, reference: Reference,
           params: MergeParams, n_codes: int, unity_first: bool) -> tuple[ShardSums, CrystalFits]:
    ops = choose_operators(shard, reference.intensity)
    fits = fit_crystals(shard, reference.intensity, params, ops, unity_first=unity_first)
    # outliers are rejected only in the final merge, against the settled reference
    return accumulate(shard, fits, reference, params, _accepted(fits, accepted), n_codes,
                      False), fits


def _final_pass(shard: PreparedShard, fits: CrystalFits, accepted: np.ndarray | None,
                number: int, reference: Reference, params: MergeParams, n_codes: int,
                index: AsuIndex, out_url: str, storage_options: Mapping[str, Any] | None
                ) -> tuple[ShardSums, pa.Table]:
    """The merge with the last cycle's fits and the error model fitted on that cycle: the
    per-reflection sums, and the shard's scaled observations written to ``scaled/``."""
    ok = _accepted(fits, accepted)
    reject = params.iterations > 1
    sums = accumulate(shard, fits, reference, params, ok, n_codes, reject)
    obs = scaled_observations(shard, fits, reference, params, ok, reject)
    code = obs["code"]
    asu = np.where(code[:, None] >= 0, index.hkl[np.maximum(code, 0) // 2], 0)
    table = pa.table({
        "crystal_id": np.repeat(shard.crystal_ids, np.diff(shard.offsets)),
        "h": shard.hkl[:, 0], "k": shard.hkl[:, 1], "l": shard.hkl[:, 2],
        "h_asu": asu[:, 0].astype(np.int32), "k_asu": asu[:, 1].astype(np.int32),
        "l_asu": asu[:, 2].astype(np.int32), "minus": (code % 2 == 1) & (code >= 0),
        "d_a": 1.0 / np.sqrt(shard.inv_d2), "excitation_error_inv_a": shard.eps,
        "intensity": obs["intensity"], "sigma": obs["sigma"], "partiality": obs["partiality"],
        "used": obs["use"], "outlier": obs["outlier"],
    })
    RunDir(out_url, storage_options).write_bytes(f"scaled/{number:05d}.parquet",
                                                 parquet_bytes(table))
    meta = pa.table({"source_url": pa.array(list(shard.extra["crystal_source"]), pa.string()),
                     "frame_index": shard.extra["crystal_frame"],
                     "crystal": shard.extra["crystal_number"]})
    return sums, meta


# ----------------------------------------------------------------------------- the run


def _space_group(specs: Sequence[ShardSpec], summaries: list[dict], space_group: Any
                 ) -> gemmi.SpaceGroup:
    if space_group:
        return as_space_group(space_group)
    named = {s.space_group for s in specs if s.space_group}
    if not named:  # streams without a target cell: the crystals' lattice
        named = {x["lattice_space_group"] for x in summaries if x["lattice_space_group"]}
    if not named:
        raise InputError("no space group known for the inputs (value: none); give "
                         "--space-group (e.g. P43212)")
    groups = {as_space_group(n).xhm(): n for n in named}
    if len(groups) > 1:
        where = {as_space_group(s.space_group).xhm(): s.label for s in specs if s.space_group}
        raise InputError("inputs have different space groups: " + ", ".join(
            f"{g} ({where[g]})" for g in sorted(groups)) + "; expected one (merge them "
            "separately or give --space-group)")
    return as_space_group(next(iter(named)))


@dataclass(frozen=True)
class _Job:
    """What one merge was asked to do (the arguments of :func:`run_merge`)."""

    specs: list[ShardSpec]
    out: RunDir
    params: MergeParams
    cell: Any
    space_group: Any
    truth: TrueIntensities | None
    storage_options: Mapping[str, Any] | None
    echo: Callable[[str], None]
    on_cycle: Callable[[int], None] | None
    t_start: float
    cluster_kind: str


@dataclass
class _Setup:
    """What the inputs' summaries decide before any scaling."""

    uc: gemmi.UnitCell
    sg: gemmi.SpaceGroup
    wavelength: float
    d_min: float
    index: AsuIndex
    operators: list[np.ndarray]
    n_input: int
    n_obs: int
    rejected: Counter[str]


def _setup(job: _Job, summaries: list[dict]) -> _Setup:
    sg = _space_group(job.specs, summaries, job.space_group)
    with_crystals = [(s, x) for s, x in zip(job.specs, summaries, strict=True) if x["n_crystals"]]
    uc = consensus_cell([np.median(x["cells"], axis=0) for _, x in with_crystals],
                        [s.label for s, _ in with_crystals], job.cell,
                        job.params.cell_tolerance_fraction, job.params.cell_tolerance_deg)
    wl = np.concatenate([s["wavelengths"] for s in summaries])
    rejected: Counter[str] = Counter()
    for s in summaries:
        rejected.update(s["rejected"])
    n_input = sum(s["n_crystals"] for s in summaries) + sum(rejected.values())
    d_min = job.params.d_min_a or (  # 0: every observation
        1.0 / math.sqrt(max(s["inv_d2_max"] for s in summaries)) * (1 - 1e-6))
    index = AsuIndex.build(uc, sg, d_min)
    operators = (ambiguity_operators(uc, sg) if job.params.resolve_ambiguity
                 else [np.eye(3, dtype=int)])
    job.echo(f"{len(job.specs)} shard(s), {n_input} crystal(s); {sg.xhm()}, cell "
             f"{' '.join(f'{x:.2f}' for x in uc.parameters)}, {len(index)} unique reflections "
             f"to {d_min:.2f} A; {len(operators) - 1} ambiguity operator(s)")
    return _Setup(uc, sg, float(np.median(wl)) if wl.size else math.nan, d_min, index,
                  operators, n_input, sum(s["n_obs"] for s in summaries), rejected)


def _first_reference(ex: MapReduce, prepared: list, setup: _Setup, params: MergeParams,
                     n_crystals: int) -> tuple[Reference, dict[str, Any]]:
    edges = WilsonCurve.edges_to(setup.d_min)
    wilson = WilsonCurve.from_sums(edges, ex.reduce_sum(ex.map(WilsonCurve.sums,
                                                               [(p,) for p in prepared], edges)))
    ambiguity: dict[str, Any] = {"n_operators": len(setup.operators)}
    if len(setup.operators) == 1:
        return first_reference(setup.index, wilson), ambiguity
    frac = min(1.0, params.ambiguity_max_crystals / max(n_crystals, 1))
    picked = [v for part in ex.gather(ex.map(ambiguity_vectors, [(p,) for p in prepared],
                                             wilson, frac, params.seed)) for v in part]
    settings = resolve_ambiguity([v for _, v in picked],
                                 operator_products(setup.index, setup.operators),
                                 np.random.default_rng(params.seed), params.ambiguity_partners)
    ambiguity["n_crystals_resolved"] = len(picked)
    return first_reference(setup.index, wilson, picked, settings), ambiguity


def _scale(ex: MapReduce, job: _Job, setup: _Setup, prepared: list, reference: Reference
           ) -> tuple[Reference, list[CrystalFits], list[np.ndarray | None], list[dict]]:
    """The scaling cycles: fits against the broadcast reference, sums reduced, the next
    reference and error model, crystals rejected on every crystal's fit."""
    params, n_codes = job.params, 2 * len(setup.index)
    accepted: list[np.ndarray | None] = [None] * len(prepared)
    fits: list[CrystalFits] = []
    history = []
    for it in range(params.iterations):
        t0 = time.perf_counter()
        sums, fits = ex.map_reduce(_cycle, list(zip(prepared, accepted, strict=True)),
                                   ex.put(reference), params, n_codes, it == 0)
        n_good = int(sum(np.sum(f.status == ACCEPTED) for f in fits))
        reject_absurd_scales(fits, params.max_scale_ratio)
        accepted = [f.status == ACCEPTED for f in fits]
        merged = merge_sums(sums, params.min_measurements)
        em = ErrorModel.fit(sums.error_sums)
        reference = merged.reference(em, setup.index.d_a)
        dev = sums.deviation_sums
        rms = math.sqrt(dev[1] / dev[0]) if dev[0] else math.nan
        cc_half = pearson(merged.i_half_a, merged.i_half_b)
        dt = time.perf_counter() - t0
        entry = {"cycle": it + 1, "cc_half": cc_half, "n_accepted": n_good,
                 "normalised_deviation_rms": rms, "sdfac": em.sdfac, "sdadd": em.sdadd,
                 "seconds": dt}
        if job.truth is not None:
            entry["cc_truth"] = pearson(merged.imean, truth_on(setup.index, job.truth))
        history.append(entry)
        job.echo(f"cycle {it + 1}/{params.iterations}: {n_good} crystals, CC1/2 {cc_half:.4f}"
                 + (f", CC to truth {entry['cc_truth']:.4f}" if job.truth else "")
                 + f", normalised deviations rms {rms:.2f} ({dt:.1f} s)")
        if job.on_cycle is not None:
            job.on_cycle(it + 1)
    return reference, fits, accepted, history


def run_merge(
    inputs: Sequence[str],
    out_url: str,
    params: MergeParams,
    cluster: ClusterConfig,
    *,
    cell: Any = None,
    space_group: Any = None,
    truth: TrueIntensities | None = None,
    storage_options: Mapping[str, Any] | None = None,
    echo: Callable[[str], None] | None = None,
    on_cycle: Callable[[int], None] | None = None,
) -> MergeResult:
    """Merge integrated observations from run directories and streams into ``out_url``.

    Parameters
    ----------
    inputs : run directories (local or URL) and CrystFEL ``.stream`` files.
    out_url : the merge folder (``merged.mtz``, ``merged.hkl``, ``scaled/``,
        ``crystals.parquet``, ``stats.json``).
    params : the merge's parameters.
    cluster : where it runs (``synchronous``: in this process).
    cell, space_group : override what the inputs say.
    truth : true intensities (simulated inputs), for CC to the truth.
    echo : progress lines (e.g. ``print``).
    on_cycle : called with the cycle number after each scaling cycle (tests use it to kill a
        worker mid-merge).
    """
    specs = discover_shards(inputs, storage_options)
    out = RunDir(out_url, storage_options)
    out.makedirs()
    t_start = time.perf_counter()
    with open_cluster(cluster) as (client, info):
        job = _Job(specs, out, params, cell, space_group, truth, storage_options,
                   echo or (lambda s: None), on_cycle, t_start, info.kind)
        result = _run(job, MapReduce(client))
    from sfxflow.pipeline.report import write_merge_report

    result.reports = write_merge_report(out.url, list(inputs), storage_options=storage_options)
    return result


def _run(job: _Job, ex: MapReduce) -> MergeResult:
    params = job.params
    data = ex.map(read_shard, [(s, job.storage_options) for s in job.specs])
    summaries = ex.gather(ex.map(_summarise, [(d,) for d in data]))
    setup = _setup(job, summaries)
    prepared = ex.map(_prepare, [(d,) for d in data], setup.index, setup.operators, params)
    del data
    n_crystals = sum(s["n_crystals"] for s in summaries)
    reference, ambiguity = _first_reference(ex, prepared, setup, params, n_crystals)
    reference, fits_all, accepted, history = _scale(ex, job, setup, prepared, reference)

    # the merge itself: the last fits with the error model fitted on them
    t0 = time.perf_counter()
    sums, metas = ex.map_reduce(
        _final_pass, [(p, f, a, s.number) for p, f, a, s in
                      zip(prepared, fits_all, accepted, job.specs, strict=True)],
        ex.put(reference), params, 2 * len(setup.index), setup.index, job.out.url,
        job.storage_options)
    merged = merge_sums(sums, params.min_measurements)
    dev = sums.deviation_sums
    final_rms = math.sqrt(dev[1] / dev[0]) if dev[0] else math.nan
    job.echo(f"merged with the error model sdfac {reference.error_model.sdfac:.2f}, sdadd "
             f"{reference.error_model.sdadd:.3f}: normalised deviations rms {final_rms:.2f} "
             f"({time.perf_counter() - t0:.1f} s)")
    final = CrystalFits.concat(fits_all)
    index, rejected = setup.index, setup.rejected
    truth_asu = None
    if job.truth is not None:
        # with an ambiguity the merged setting is arbitrary: compare in the truth's best one
        by_op = [truth_on(index, job.truth, r) for r in setup.operators]
        ccs = [pearson(merged.imean, t) for t in by_op]
        best = int(np.nanargmax(ccs)) if np.isfinite(ccs).any() else 0
        truth_asu = by_op[best]
        if len(setup.operators) > 1:
            ambiguity["cc_truth_by_operator"] = ccs
            ambiguity["truth_operator"] = best
    overall, shells = shell_statistics(index, merged, params.n_shells, truth_asu)
    for code, reason in REASONS.items():
        n = int(np.sum(final.status == code))
        if n:
            rejected[reason] += n
    if ambiguity["n_operators"] > 1:
        ambiguity["fraction_reindexed"] = float(np.mean(final.operator != 0))
    cycle_s = float(np.median([h["seconds"] for h in history]))
    stats = {
        "space_group": setup.sg.hm, "cell": list(setup.uc.parameters),
        "wavelength_a": setup.wavelength, "model": params.model,
        "n_crystals_input": setup.n_input,
        "n_crystals_merged": int(np.sum(final.status == ACCEPTED)),
        "rejected": dict(rejected), "overall": overall, "shells": shells,
        "wilson": wilson_b(index, merged.imean),
        "n_observations": setup.n_obs, "n_outliers": sums.n_outliers,
        "n_low_partiality": sums.n_low_partiality,
        "normalised_deviation_rms": final_rms,
        "error_model": {"sdfac": reference.error_model.sdfac,
                        "sdadd": reference.error_model.sdadd},
        "ambiguity": ambiguity, "cycles": history, "params": _jsonable(params.as_dict()),
        "performance": {
            "cluster": job.cluster_kind, "cores": ex.n_cores,
            "seconds": time.perf_counter() - job.t_start,
            "observations_per_second_per_core_per_cycle": setup.n_obs / (cycle_s * ex.n_cores),
            "client_peak_mb": ex.client_peak_mb, "client_max_rss_mb": _peak_rss_mb(),
            "worker_peak_mb": list(ex.worker_peaks_mb.values()),
        },
    }
    crystals = _crystals_table(final, metas)
    _write_outputs(job.out, index, merged, setup.uc, setup.sg, setup.wavelength, stats,
                   crystals)
    table = format_table(overall, shells)
    return MergeResult(job.out.url, stats, table, crystals)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _crystals_table(fits: CrystalFits, metas: list[pa.Table]) -> pa.Table:
    meta = pa.concat_tables(metas) if metas else pa.table({})
    cols = {k: v for k, v in fits.as_columns().items() if k != "status"}
    reason = np.array([REASONS.get(int(s), "") for s in fits.status], dtype=object)
    table = pa.table({**{k: meta.column(k) for k in meta.column_names}, **cols,
                      "accepted": fits.status == ACCEPTED,
                      "reason": pa.array(list(reason), pa.string())})
    return table


def _write_outputs(out: RunDir, index: AsuIndex, merged: Any, uc: gemmi.UnitCell,
                   sg: gemmi.SpaceGroup, wavelength: float, stats: dict,
                   crystals: pa.Table) -> None:
    cols = MergedColumns(index.hkl, merged.imean, merged.sigimean, merged.i_plus,
                         merged.sigi_plus, merged.i_minus, merged.sigi_minus, merged.n)
    with tempfile.TemporaryDirectory() as tmp:
        mtz = Path(tmp) / "merged.mtz"
        write_merged_mtz(mtz, uc, sg, wavelength, cols)
        out.write_bytes("merged.mtz", mtz.read_bytes())
        hkl = Path(tmp) / "merged.hkl"
        write_hkl(hkl, sg, cols)
        out.write_bytes("merged.hkl", hkl.read_bytes())
    out.write_bytes("crystals.parquet", parquet_bytes(crystals))
    out.write_text("stats.json", json.dumps(_finite(stats), indent=1) + "\n")


def _finite(x: Any) -> Any:
    """JSON has no NaN: write null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, np.generic):
        return _finite(x.item())
    return x
