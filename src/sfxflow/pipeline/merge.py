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

import dataclasses
import json
import logging
import math
import operator
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
from sfxflow.algorithms.merge.cell import InputSymmetry, merge_target
from sfxflow.algorithms.merge.reflections import (
    AsuIndex,
    ambiguity_operators,
    operator_products,
)
from sfxflow.algorithms.merge.scale import (
    ACCEPTED,
    REASONS,
    REJECT_SCALE,
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
    balanced_halves,
    estimate_resolution,
    format_estimate,
    format_table,
    halves_of_accepted,
    merge_sums,
    pearson,
    shell_statistics,
    wilson_b,
)
from sfxflow.algorithms.simulate_physical import TrueIntensities
from sfxflow.io.hkl import write_half_hkls, write_hkl
from sfxflow.io.mtz import MergedColumns, write_merged_mtz
from sfxflow.io.observations import (
    ShardSpec,
    discover_shards,
    read_shard,
    refuse_merge_output,
    remove_stale_scaled,
)
from sfxflow.io.results import RunDir, parquet_bytes
from sfxflow.pipeline.cluster import open_cluster
from sfxflow.pipeline.config import ClusterConfig

__all__ = ["MergeResult", "run_merge"]

log = logging.getLogger(__name__)

_N_WILSON_BINS = 40


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
            "inv_d2_max": inv_d2_max, "lattices": data.lattices}


def _prepare(data: Any, index: AsuIndex, operators: list[np.ndarray], params: MergeParams,
             half: np.ndarray | None = None) -> PreparedShard:
    extra = {"crystal_source": np.asarray(data.source_url, dtype=object),
             "crystal_frame": data.frame_index, "crystal_number": data.crystal}
    shard = prepare_shard(data.crystal_ids, data.a_matrices, data.wavelengths_a,
                          data.obs_crystal, data.hkl, data.intensity, data.sigma,
                          data.polarisation, index, operators, params)
    # per-crystal metadata rides along (not per observation)
    shard.extra.update(extra)
    if half is not None:  # a balanced split over every shard's crystals
        shard = dataclasses.replace(shard, half=half)
    return shard


def _load_and_prepare(spec: ShardSpec, storage_options: Mapping[str, Any] | None,
                      index: AsuIndex, operators: list[np.ndarray], params: MergeParams
                      ) -> PreparedShard:
    return _prepare(read_shard(spec, storage_options), index, operators, params)


def _wilson_sums(shard: PreparedShard, edges: np.ndarray) -> np.ndarray:
    ok = shard.codes[0] >= 0
    b = np.clip(np.searchsorted(edges, shard.inv_d2[ok]) - 1, 0, len(edges) - 2)
    return np.stack([np.bincount(b, weights=shard.intensity[ok], minlength=len(edges) - 1),
                     np.bincount(b, minlength=len(edges) - 1).astype(float)])


def _wilson_at(curve: np.ndarray, edges: np.ndarray, inv_d2: np.ndarray) -> np.ndarray:
    centres = 0.5 * (edges[:-1] + edges[1:])
    good = np.isfinite(curve) & (curve > 0)
    if not good.any():
        return np.ones_like(inv_d2)
    return np.exp(np.interp(inv_d2, centres[good], np.log(curve[good])))


def _ambiguity_vectors(shard: PreparedShard, curve: np.ndarray, edges: np.ndarray,
                       fraction: float, seed: int) -> list[tuple[int, list]]:
    first = int(shard.crystal_ids[0]) if shard.n_crystals else 0
    pick = np.random.default_rng([seed, first]).random(shard.n_crystals) < fraction
    norm = shard.intensity / _wilson_at(curve, edges, shard.inv_d2)
    out = []
    for c in np.flatnonzero(pick):
        lo, hi = shard.offsets[c], shard.offsets[c + 1]
        per_op = []
        for o in range(shard.codes.shape[0]):
            code = shard.codes[o, lo:hi]
            ok = code >= 0
            idx, inv = np.unique(code[ok] // 2, return_inverse=True)
            val = np.bincount(inv, weights=norm[lo:hi][ok]) / np.bincount(inv)
            per_op.append((idx, val))
        out.append((int(shard.crystal_ids[c]), per_op))
    return out


def _cycle(shard: PreparedShard, reference: Reference, params: MergeParams,
           accepted: np.ndarray | None, n_codes: int, unity_first: bool,
           fixed_ops: np.ndarray | None, reject_outliers: bool = False
           ) -> tuple[CrystalFits, ShardSums]:
    ops = choose_operators(shard, reference.intensity, fixed_ops)
    fits = fit_crystals(shard, reference.intensity, params, ops, unity_first=unity_first)
    ok = fits.status == ACCEPTED
    if accepted is not None:
        ok &= accepted
    return fits, accumulate(shard, fits, reference, params, ok, n_codes, reject_outliers)


def _final_pass(shard: PreparedShard, fits: CrystalFits, reference: Reference,
                params: MergeParams, accepted: np.ndarray | None, n_codes: int,
                index: AsuIndex, out_url: str, storage_options: Mapping[str, Any] | None,
                number: int, half: np.ndarray | None = None) -> tuple[ShardSums, pa.Table]:
    """The merge with the last cycle's fits and the error model fitted on that cycle: the
    per-reflection sums, and the shard's scaled observations written to ``scaled/``.
    ``half``: the crystals' half-sets for the statistics (default: the shard's own)."""
    if half is not None:
        shard = dataclasses.replace(shard, half=half)
    ok = fits.status == ACCEPTED
    if accepted is not None:
        ok &= accepted
    reject = params.iterations > 1
    sums = accumulate(shard, fits, reference, params, ok, n_codes, reject)
    obs = scaled_observations(shard, fits, reference, params, ok, reject)
    code = obs["code"]
    asu = np.where(code[:, None] >= 0, index.hkl[np.maximum(code, 0) // 2], 0)
    counts = np.diff(shard.offsets)
    table = pa.table({
        "crystal_id": np.repeat(shard.crystal_ids, counts),
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


def _identity(value: Any) -> Any:
    return value


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mb() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**20


# ----------------------------------------------------------------------------- executors


class _Serial:
    """Runs the tasks in this process (``--scheduler synchronous``)."""

    n_cores = 1

    def submit(self, fn: Callable, *args: Any) -> Any:
        return fn(*args)

    def gather(self, items: Any) -> Any:
        return items

    def scatter(self, value: Any) -> Any:
        return value

    def reduce_sum(self, items: list) -> Any:
        total = items[0]
        for x in items[1:]:
            total = total + x
        return total

    def sample_memory(self) -> None:
        pass

    def worker_peak_mb(self) -> list[float]:
        return []


class _Dask:
    def __init__(self, client: Any) -> None:
        self.client = client
        workers = client.scheduler_info().get("workers", {})
        self.n_cores = max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))
        self.peaks: dict[str, float] = {}

    def submit(self, fn: Callable, *args: Any) -> Any:
        return self.client.submit(fn, *args, pure=False)

    def gather(self, items: Any) -> Any:
        return self.client.gather(items)

    def scatter(self, value: Any) -> Any:
        # a task holding the value, not scattered data: a lost worker's copy is recomputed
        return self.client.submit(_identity, value, pure=False)

    def reduce_sum(self, items: list) -> Any:
        # a tree on the cluster: only the total comes back
        while len(items) > 1:
            nxt = [self.client.submit(operator.add, items[i], items[i + 1], pure=False)
                   for i in range(0, len(items) - 1, 2)]
            if len(items) % 2:
                nxt.append(items[-1])
            items = nxt
        return self.client.gather(items[0])

    def sample_memory(self) -> None:
        # resident memory sampled between steps: a worker's ru_maxrss would include what a
        # forked worker inherited from its parent
        for worker, mb in self.client.run(_rss_mb).items():
            self.peaks[worker] = max(self.peaks.get(worker, 0.0), mb)

    def worker_peak_mb(self) -> list[float]:
        self.sample_memory()
        return list(self.peaks.values())


# ----------------------------------------------------------------------------- the run


def _consensus(specs: Sequence[ShardSpec], summaries: list[dict], cell: Any, space_group: Any,
               point_group: Any = None) -> tuple[gemmi.UnitCell, gemmi.SpaceGroup, float]:
    """The merge's cell and space group (:func:`~sfxflow.algorithms.merge.cell.merge_target`,
    per input, not per shard), and the median wavelength."""
    per_input: dict[str, dict[str, Any]] = {}
    for spec, s in zip(specs, summaries, strict=True):
        x = per_input.setdefault(spec.input_label, {"sg": spec.space_group, "cells": [],
                                                    "lattice": " ".join(spec.lattice[:2]),
                                                    "lattices": Counter()})
        x["cells"].append(np.asarray(s["cells"], dtype=float).reshape(-1, 6))
        x["lattices"].update(s["lattices"])
    uc, sg = merge_target([InputSymmetry(label, x["sg"], x["lattice"], x["lattices"],
                                         np.concatenate(x["cells"]))
                           for label, x in per_input.items()],
                          space_group=space_group, point_group=point_group, cell=cell)
    wl = np.concatenate([s["wavelengths"] for s in summaries])
    return uc, sg, float(np.median(wl)) if wl.size else math.nan


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
    point_group: str | None = None,
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
    point_group : merge in this point group's symmorphic space group on the inputs' lattice
        (``622``, ``6/mmm``) when no space group is given or recorded.
    truth : true intensities (simulated inputs), for CC to the truth.
    echo : progress lines (e.g. ``print``).
    on_cycle : called with the cycle number after each scaling cycle (tests use it to kill a
        worker mid-merge).
    """
    refuse_merge_output(out_url, inputs, storage_options)
    specs = discover_shards(inputs, storage_options)
    out = RunDir(out_url, storage_options)
    t_start = time.perf_counter()
    with open_cluster(cluster) as (client, info):
        ex: Any = _Serial() if client is None else _Dask(client)
        result = _run(specs, out, ex, params, cell, (space_group, point_group), truth,
                      storage_options, echo or (lambda s: None), t_start, info.kind, on_cycle)
    # a merge into an earlier merge's folder: its scaled/ shards beyond ours would mix in
    remove_stale_scaled(out.url, [s.number for s in specs], storage_options)
    return result


def _run(specs: list[ShardSpec], out: RunDir, ex: Any, params: MergeParams, cell: Any,
         symmetry: tuple[Any, str | None], truth: TrueIntensities | None,
         storage_options: Mapping[str, Any] | None, echo: Callable[[str], None],
         t_start: float, cluster_kind: str,
         on_cycle: Callable[[int], None] | None) -> MergeResult:
    data = [ex.submit(read_shard, s, storage_options) for s in specs]
    summaries = ex.gather([ex.submit(_summarise, d) for d in data])
    uc, sg, wavelength = _consensus(specs, summaries, cell, *symmetry)  # (space, point group)
    out.makedirs()  # only now: a refused input leaves no half-written merge folder
    n_input = sum(s["n_crystals"] for s in summaries)
    rejected: Counter[str] = Counter()
    for s in summaries:
        rejected.update(s["rejected"])
        n_input += sum(s["rejected"].values())
    d_min = params.d_min_a
    if not d_min:  # every observation
        d_min = 1.0 / math.sqrt(max(s["inv_d2_max"] for s in summaries)) * (1 - 1e-6)
    index = AsuIndex.build(uc, sg, d_min)
    operators = ambiguity_operators(uc, sg) if params.resolve_ambiguity else [np.eye(3, dtype=int)]
    echo(f"{len(specs)} shard(s), {n_input} crystal(s); {sg.xhm()}, cell "
         f"{' '.join(f'{x:.2f}' for x in uc.parameters)}, {len(index)} unique reflections to "
         f"{d_min:.2f} A; {len(operators) - 1} ambiguity operator(s)")
    halves = balanced_halves([s["n_crystals"] for s in summaries], params.seed)
    prepared = [ex.submit(_prepare, d, index, operators, params, h)
                for d, h in zip(data, halves, strict=True)]
    del data
    n_codes = 2 * len(index)

    # the first reference: a Wilson curve (and, with an ambiguity, a resolved subset)
    edges = np.linspace(0.0, 1.0 / d_min**2 * 1.0001, _N_WILSON_BINS + 1)
    w = ex.reduce_sum([ex.submit(_wilson_sums, p, edges) for p in prepared])
    with np.errstate(invalid="ignore", divide="ignore"):
        curve = w[0] / w[1]
    inv_d2_asu = 1.0 / index.d_a**2
    ref_i = _wilson_at(curve, edges, inv_d2_asu)
    ambiguity: dict[str, Any] = {"n_operators": len(operators)}
    if len(operators) > 1:
        n_total = sum(s["n_crystals"] for s in summaries)
        frac = min(1.0, params.ambiguity_max_crystals / max(n_total, 1))
        picked = [v for part in ex.gather([ex.submit(_ambiguity_vectors, p, curve, edges, frac,
                                                     params.seed) for p in prepared])
                  for v in part]
        products = operator_products(index, operators)
        ops = resolve_ambiguity([v for _, v in picked], products,
                                np.random.default_rng(params.seed), params.ambiguity_partners)
        s_val = np.zeros(len(index))
        s_n = np.zeros(len(index))
        for (_, vecs), o in zip(picked, ops, strict=True):
            idx, val = vecs[int(o)]
            s_val[idx] += val
            s_n[idx] += 1
        with np.errstate(invalid="ignore", divide="ignore"):
            ref_i = np.where(s_n > 0, s_val / s_n * ref_i, np.nan)
        ambiguity["n_crystals_resolved"] = len(picked)
    reference = Reference(ref_i, np.full(len(index), np.nan), np.zeros(len(index), np.int64),
                          level=_wilson_at(curve, edges, inv_d2_asu))

    accepted: list[np.ndarray | None] = [None] * len(prepared)
    history = []
    fits_all: list[CrystalFits] = []
    sums = ShardSums.zeros(n_codes)
    metas: list[pa.Table] = []
    n_obs_total = sum(s["n_obs"] for s in summaries)
    cycle_seconds = []
    client_peak = _rss_mb()
    for it in range(params.iterations):
        t0 = time.perf_counter()
        ref_f = ex.scatter(reference)
        # outliers are rejected only in the final merge, against the settled reference
        tasks = [ex.submit(_cycle, p, ref_f, params, accepted[i], n_codes, it == 0, None)
                 for i, p in enumerate(prepared)]
        fits_all = ex.gather([ex.submit(operator.itemgetter(0), t) for t in tasks])
        sums = ex.reduce_sum([ex.submit(operator.itemgetter(1), t) for t in tasks])
        ex.sample_memory()
        client_peak = max(client_peak, _rss_mb())
        del tasks
        # crystals with absurd scales: far from the median of the accepted ones
        all_fits = CrystalFits.concat(fits_all)
        good = all_fits.status == ACCEPTED
        med = float(np.median(all_fits.scale[good])) if good.any() else math.nan
        for i, f in enumerate(fits_all):
            absurd = (f.status == ACCEPTED) & ~(np.abs(np.log(f.scale / med))
                                                <= math.log(params.max_scale_ratio))
            f.status[absurd] = REJECT_SCALE
            accepted[i] = f.status == ACCEPTED
        merged = merge_sums(sums, params.min_measurements)
        em = ErrorModel.fit(sums.error_sums)
        reference = merged.reference(em, index.d_a)
        dev = sums.deviation_sums
        rms = math.sqrt(dev[1] / dev[0]) if dev[0] else math.nan
        cc_half = pearson(merged.i_half_a, merged.i_half_b)
        dt = time.perf_counter() - t0
        cycle_seconds.append(dt)
        entry = {"cycle": it + 1, "cc_half": cc_half, "n_accepted": int(good.sum()),
                 "normalised_deviation_rms": rms, "sdfac": em.sdfac, "sdadd": em.sdadd,
                 "seconds": dt}
        if truth is not None:
            entry["cc_truth"] = pearson(merged.imean, _truth_on(index, truth))
        history.append(entry)
        echo(f"cycle {it + 1}/{params.iterations}: {int(good.sum())} crystals, CC1/2 "
             f"{cc_half:.4f}" + (f", CC to truth {entry['cc_truth']:.4f}" if truth else "")
             + f", normalised deviations rms {rms:.2f} ({dt:.1f} s)")
        if on_cycle is not None:
            on_cycle(it + 1)

    # the merge itself: the last fits with the error model fitted on them, and half-sets that
    # split the merged crystals evenly (seeded)
    t0 = time.perf_counter()
    ref_f = ex.scatter(reference)
    halves, n_half = halves_of_accepted(accepted, params.seed)
    tasks = [ex.submit(_final_pass, p, fits_all[i], ref_f, params, accepted[i], n_codes, index,
                       out.url, storage_options, specs[i].number, halves[i])
             for i, p in enumerate(prepared)]
    sums = ex.reduce_sum([ex.submit(operator.itemgetter(0), t) for t in tasks])
    metas = ex.gather([ex.submit(operator.itemgetter(1), t) for t in tasks])
    ex.sample_memory()
    client_peak = max(client_peak, _rss_mb())
    del tasks
    merged = merge_sums(sums, params.min_measurements)
    dev = sums.deviation_sums
    final_rms = math.sqrt(dev[1] / dev[0]) if dev[0] else math.nan
    echo(f"merged with the error model sdfac {reference.error_model.sdfac:.2f}, sdadd "
         f"{reference.error_model.sdadd:.3f}: normalised deviations rms {final_rms:.2f} "
         f"({time.perf_counter() - t0:.1f} s)")
    final = CrystalFits.concat(fits_all)
    truth_asu = None
    if truth is not None:
        # with an ambiguity the merged setting is arbitrary: compare in the truth's best one
        by_op = [_truth_on(index, truth, r) for r in operators]
        ccs = [pearson(merged.imean, t) for t in by_op]
        best = int(np.nanargmax(ccs)) if np.isfinite(ccs).any() else 0
        truth_asu = by_op[best]
        if len(operators) > 1:
            ambiguity["cc_truth_by_operator"] = ccs
            ambiguity["truth_operator"] = best
    overall, shells = shell_statistics(index, merged, params.n_shells, truth_asu)
    estimate = estimate_resolution(shells)
    for code, reason in REASONS.items():
        n = int(np.sum(final.status == code))
        if n:
            rejected[reason] += n
    if ambiguity["n_operators"] > 1:
        ambiguity["fraction_reindexed"] = float(np.mean(final.operator != 0))
    stats = {
        "space_group": sg.hm, "cell": list(uc.parameters), "wavelength_a": wavelength,
        "model": params.model, "n_crystals_input": n_input,
        "n_crystals_merged": int(np.sum(final.status == ACCEPTED)),
        "rejected": dict(rejected), "overall": overall, "shells": shells,
        "wilson": wilson_b(index, merged.imean),
        "resolution_estimate": estimate,
        "half_sets": {"n_crystals": n_half, "seed": params.seed},
        "n_observations": n_obs_total, "n_outliers": sums.n_outliers,
        "n_low_partiality": sums.n_low_partiality,
        "normalised_deviation_rms": final_rms,
        "error_model": {"sdfac": reference.error_model.sdfac,
                        "sdadd": reference.error_model.sdadd},
        "ambiguity": ambiguity, "cycles": history, "params": _jsonable(params.as_dict()),
        "performance": {
            "cluster": cluster_kind, "cores": ex.n_cores, "seconds": time.perf_counter() - t_start,
            "observations_per_second_per_core_per_cycle":
                n_obs_total / (float(np.median(cycle_seconds)) * ex.n_cores),
            "client_peak_mb": client_peak, "client_max_rss_mb": _peak_rss_mb(),
            "worker_peak_mb": ex.worker_peak_mb(),
        },
    }
    crystals = _crystals_table(final, metas)
    _write_outputs(out, index, merged, uc, sg, wavelength, stats, crystals)
    table = format_table(overall, shells) + "\n" + format_estimate(estimate)
    return MergeResult(out.url, stats, table, crystals)


def _truth_on(index: AsuIndex, truth: TrueIntensities,
              reindex: np.ndarray | None = None) -> np.ndarray:
    hkl = index.hkl.astype(np.int64)
    if reindex is not None:
        hkl = hkl @ np.asarray(reindex, dtype=np.int64)
    plus = truth.at(hkl)
    minus = truth.at(-hkl)
    with np.errstate(invalid="ignore"):
        both = np.where(np.isfinite(minus), 0.5 * (plus + minus), plus)
    return both


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
        # the two half-data sets behind CC1/2, named as partialator names them
        for half in write_half_hkls(Path(tmp) / "merged", sg, index.hkl, merged):
            out.write_bytes(half.name, half.read_bytes())
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
