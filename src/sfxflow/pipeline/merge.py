"""The distributed merge, the client's side: ``_run`` is the list of steps.

Each step is a map over work units of shards on the workers
(:class:`~sfxflow.pipeline.mapreduce.MapReduce`; the tasks are :mod:`.merge_tasks`) and a small
reduce here; the numbers are decided in :mod:`sfxflow.algorithms.merge`. Steps: read and prepare
each unit's shards (they stay on the unit's worker as a future: a lost worker's units are
recomputed from their files); the space group, cell and asymmetric unit; the first reference (a
Wilson curve, and with an indexing ambiguity a Brehm-Diederichs-resolved subset of crystals);
``iterations`` scaling cycles against the broadcast reference; the final merge, which writes each
shard's scaled observations; then the statistics, MTZ, CrystFEL .hkl, crystals.parquet and
stats.json. The client holds per-reflection arrays and per-crystal results, never the
observations.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import dask.config
import gemmi
import numpy as np
import pyarrow as pa

from sfxflow.algorithms import merge as alg
from sfxflow.algorithms.simulate_physical import TrueIntensities
from sfxflow.io.merged import crystals_table, write_merge_outputs
from sfxflow.io.observations import (
    ShardSpec,
    discover_shards,
    refuse_merge_output,
    remove_stale_scaled,
)
from sfxflow.io.results import RunDir
from sfxflow.pipeline.cluster import open_cluster
from sfxflow.pipeline.config import ClusterConfig
from sfxflow.pipeline.mapreduce import MapReduce
from sfxflow.pipeline.merge_tasks import (
    WORKER_SETTINGS,
    concatenated,
    final_pass_unit,
    grouped,
    prepare_unit,
    read_unit,
    remove_worker_scratch,
    scale_cycle_unit,
    summarise_unit,
    summed,
    unit_shards,
    with_delta_cc_half_unit,
)

__all__ = ["MergeResult", "run_merge"]


@dataclass
class MergeResult:
    """What :func:`run_merge` produced."""

    out_url: str
    stats: dict
    table: str
    crystals: pa.Table = field(repr=False)
    reports: list[str] = field(default_factory=list)  #: the report pages written


@dataclass(frozen=True)
class _Job:
    """What one merge was asked to do (the arguments of :func:`run_merge`)."""

    specs: list[ShardSpec]
    out: RunDir
    params: alg.MergeParams
    cell: Any  # given: override what the inputs say
    space_group: Any
    point_group: str | None
    truth: TrueIntensities | None
    storage_options: Mapping[str, Any] | None
    echo: Callable[[str], None]
    on_cycle: Callable[[int], None]
    scratch: str  # the name of this merge's scratch folder in each process's (scratch_root)


@dataclass(frozen=True)
class _Setup:
    """What the inputs' summaries decide before any scaling."""

    uc: gemmi.UnitCell
    sg: gemmi.SpaceGroup
    wavelength: float
    index: alg.AsuIndex
    operators: list[np.ndarray]


def _setup(job: _Job, summaries: list[dict], n_input: int, unit_shards: int) -> _Setup:
    # the cell and space group are decided per input (run directory or stream), not per shard
    per_input: dict[str, dict[str, Any]] = {}
    for spec, x in zip(job.specs, summaries, strict=True):
        got = per_input.setdefault(spec.input_label, {"sg": spec.space_group, "cells": [],
                                                      "lattice": " ".join(spec.lattice[:2]),
                                                      "lattices": Counter()})
        got["cells"].append(np.asarray(x["cells"], dtype=float).reshape(-1, 6))
        got["lattices"].update(x["lattices"])
    uc, sg = alg.merge_target(
        [alg.InputSymmetry(label, x["sg"], x["lattice"], x["lattices"], np.concatenate(x["cells"]))
         for label, x in per_input.items()],
        space_group=job.space_group, point_group=job.point_group, cell=job.cell,
        length_tolerance=job.params.cell_tolerance_fraction,
        angle_tolerance_deg=job.params.cell_tolerance_deg)
    wl = np.concatenate([s["wavelengths"] for s in summaries])
    d_min = job.params.d_min_a or (  # 0: every observation
        1.0 / math.sqrt(max(s["inv_d2_max"] for s in summaries)) * (1 - 1e-6))
    index = alg.AsuIndex.build(uc, sg, d_min)
    operators = (alg.ambiguity_operators(uc, sg) if job.params.resolve_ambiguity
                 else [np.eye(3, dtype=int)])
    n_units = math.ceil(len(job.specs) / unit_shards)
    job.echo(f"{len(job.specs)} shard(s) in {n_units} work unit(s), {n_input} crystal(s); "
             f"{sg.xhm()}, cell "
             f"{' '.join(f'{x:.2f}' for x in uc.parameters)}, {len(index)} unique reflections "
             f"to {d_min:.2f} A; {len(operators) - 1} ambiguity operator(s)")
    return _Setup(uc, sg, float(np.median(wl)) if wl.size else math.nan, index, operators)


def _first_reference(ex: MapReduce, units: list, setup: _Setup, params: alg.MergeParams,
                     n_crystals: int) -> tuple[alg.Reference, dict[str, Any]]:
    edges = alg.WilsonCurve.edges_to(setup.index.d_min_a)
    wilson = alg.WilsonCurve.from_sums(edges, ex.reduce_sum(
        ex.map(partial(summed, alg.WilsonCurve.sums), [(u,) for u in units], edges)))
    ambiguity: dict[str, Any] = {"n_operators": len(setup.operators)}
    if len(setup.operators) == 1:
        return alg.first_reference(setup.index, wilson), ambiguity
    frac = min(1.0, params.ambiguity_max_crystals / max(n_crystals, 1))
    picked = [v for part in ex.gather(ex.map(partial(concatenated, alg.ambiguity_vectors),
                                             [(u,) for u in units], wilson, frac, params.seed))
              for v in part]
    settings = alg.resolve_ambiguity([v for _, v in picked],
                                     alg.operator_products(setup.index, setup.operators),
                                     np.random.default_rng(params.seed),
                                     params.ambiguity_partners)
    ambiguity["n_crystals_resolved"] = len(picked)
    return alg.first_reference(setup.index, wilson, picked, settings), ambiguity


def _scale(ex: MapReduce, job: _Job, setup: _Setup, units: list, size: int,
           reference: alg.Reference
           ) -> tuple[alg.Reference, list[alg.CrystalFits], list[np.ndarray | None], list[dict]]:
    """The scaling cycles: fits against the broadcast reference, sums reduced, the next
    reference and error model, crystals rejected on every crystal's fit. ``units`` of
    ``size`` shards; the fits and acceptances are kept per shard."""
    params, history = job.params, []
    accepted: list[Any] = [None] * len(job.specs)  # None: all that their own fit accepts
    dropped: Any = None  # crystals rejected for good (delta CC1/2)
    for it in range(params.iterations):
        t0, cpu0 = time.perf_counter(), ex.cpu_mark()
        ref_f = ex.put(reference)
        sums, unit_fits = ex.map_reduce(
            scale_cycle_unit, list(zip(units, grouped(accepted, size), strict=True)),
            ref_f, params, 2 * len(setup.index), it == 0)
        if params.rejects_on_delta_cc_half() or it == params.iterations - 1:  # and reported
            unit_fits = ex.gather(ex.map(
                with_delta_cc_half_unit, list(zip(units, unit_fits, grouped(accepted, size),
                                              strict=True)),
                ref_f, params, ex.put(alg.HalfSums.of(sums))))
        fits = [f for part in unit_fits for f in part]
        n_good = int(sum(np.sum(f.status == alg.ACCEPTED) for f in fits))
        accepted, dropped = alg.reject_globally(fits, dropped, params, against_merge=it > 0)
        merged, reference, rms = alg.next_reference(sums, params.min_measurements, setup.index.d_a)
        em, dt = reference.error_model, time.perf_counter() - t0
        entry = {"cycle": it + 1, "cc_half": alg.pearson(merged.i_half_a, merged.i_half_b),
                 "n_accepted": n_good, "normalised_deviation_rms": rms, "sdfac": em.sdfac,
                 "sdadd": em.sdadd, "seconds": dt, "cpu_seconds": ex.cpu_since(cpu0)}
        truth = ""
        if job.truth is not None:
            entry["cc_truth"] = alg.pearson(merged.imean, alg.truth_on(setup.index, job.truth))
            truth = f", CC to truth {entry['cc_truth']:.4f}"
        history.append(entry)
        job.echo(f"cycle {it + 1}/{params.iterations}: {n_good} crystals, CC1/2 "
                 f"{entry['cc_half']:.4f}{truth}, normalised deviations rms {rms:.2f} ({dt:.1f} s)")
        job.on_cycle(it + 1)
    return reference, fits, accepted, history


def run_merge(inputs: Sequence[str], out_url: str, params: alg.MergeParams,
              cluster: ClusterConfig, *, cell: Any = None, space_group: Any = None,
              truth: TrueIntensities | None = None,
              storage_options: Mapping[str, Any] | None = None,
              echo: Callable[[str], None] | None = None,
              on_cycle: Callable[[int], None] | None = None,
              point_group: str | None = None) -> MergeResult:
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
    on_cycle : called with the number of each scaling cycle done (tests kill a worker there).
    """
    refuse_merge_output(out_url, inputs, storage_options)
    specs = discover_shards(inputs, storage_options)
    out = RunDir(out_url, storage_options)
    t_start = time.perf_counter()  # the performance figures count the cluster's start
    # workers started here skip dask's statistical profiler (a stack sample every 10 ms of
    # every cycle: about 3% of the merge's CPU time, and no one reads it); a scheduler started
    # here does not steal: a stolen task takes a copy of its shard (tens of MB, memory-mapped
    # where it was made) into the thief's own memory, where it stays, so that a worker's
    # memory grew with the observations again (a joined scheduler keeps its own setting)
    with dask.config.set({"distributed.worker.profile.enabled": False,
                          "distributed.scheduler.work-stealing": False,
                          **WORKER_SETTINGS}), \
            open_cluster(cluster) as (client, info):
        job = _Job(specs, out, params, cell, space_group, point_group, truth, storage_options,
                   echo or (lambda s: None), on_cycle or (lambda i: None),
                   f"sfxflow-merge-{uuid.uuid4().hex[:12]}")
        ex = MapReduce(client, info.kind, t_start)
        try:
            result = _run(job, ex)
        finally:  # the shards' scratch files, however the merge ended
            ex.everywhere(remove_worker_scratch, job.scratch)
    # a merge into an earlier merge's folder: its scaled/ shards beyond ours would mix in
    remove_stale_scaled(out.url, [s.number for s in specs], storage_options)
    return result


def _run(job: _Job, ex: MapReduce) -> MergeResult:
    params = job.params
    size = unit_shards(len(job.specs), ex.n_workers, ex.n_cores)
    data = ex.map(read_unit, [(specs, job.storage_options, job.scratch)
                          for specs in grouped(job.specs, size)])
    summaries = [x for part in ex.gather(ex.map(summarise_unit, [(d,) for d in data]))
                 for x in part]
    rejected: Counter[str] = sum((Counter(s["rejected"]) for s in summaries), Counter())
    n_crystals = sum(s["n_crystals"] for s in summaries)
    n_input, n_obs = n_crystals + sum(rejected.values()), sum(s["n_obs"] for s in summaries)
    setup = _setup(job, summaries, n_input, size)
    job.out.makedirs()  # only now: a refused input leaves no half-written merge folder
    index = setup.index  # the asymmetric unit every per-reflection array is indexed by
    halves = alg.balanced_halves([s["n_crystals"] for s in summaries], params.seed)
    units = ex.map(prepare_unit, list(zip(data, grouped(halves, size), strict=True)), index,
                   setup.operators, params, job.scratch)
    del data
    reference, ambiguity = _first_reference(ex, units, setup, params, n_crystals)
    ex.sample_memory()  # every shard read and prepared
    reference, fits_all, accepted, history = _scale(ex, job, setup, units, size, reference)

    # the merge itself: the last fits with the error model fitted on them, and half-sets that
    # split the merged crystals evenly (seeded)
    t0 = time.perf_counter()
    halves, n_half = alg.halves_of_accepted(
        [f.status == alg.ACCEPTED if a is None else a
         for f, a in zip(fits_all, accepted, strict=True)], params.seed)

    def final_pass(reference: alg.Reference) -> alg.ShardSums:
        return ex.reduce_sum(ex.map(
            final_pass_unit, list(zip(units, *(grouped(v, size) for v in (
                fits_all, accepted, [s.number for s in job.specs], halves)), strict=True)),
            ex.put(reference), params, 2 * len(index), index, job.out.url, job.storage_options))

    sums = final_pass(reference)
    merged, settled, final_rms = alg.next_reference(sums, params.min_measurements, index.d_a)
    # the last error model was fitted on deviations from the reference before; where that
    # was still improving (unity) they overstate the final pass's (x4wide stills: sdfac 4.3
    # where the final deviations ask 2.0, their rms 0.54): once more with the final one
    if not settled.error_model.close_to(reference.error_model):
        reference = dataclasses.replace(reference, error_model=settled.error_model)
        sums = final_pass(reference)
        merged, _, final_rms = alg.next_reference(sums, params.min_measurements, index.d_a)
    job.echo(f"merged with the error model sdfac {reference.error_model.sdfac:.2f}, sdadd "
             f"{reference.error_model.sdadd:.3f}: normalised deviations rms {final_rms:.2f} "
             f"({time.perf_counter() - t0:.1f} s)")
    final = alg.CrystalFits.concat(fits_all)
    truth_asu = None
    if job.truth is not None:
        truth_asu, ccs, best = alg.truth_in_best_setting(index, job.truth, setup.operators,
                                                         merged.imean)
        if len(setup.operators) > 1:
            ambiguity["cc_truth_by_operator"] = ccs
            ambiguity["truth_operator"] = best
    overall, shells = alg.shell_statistics(index, merged, params.n_shells, truth_asu)
    estimate = alg.estimate_resolution(shells)
    rejected.update(alg.reasons_counted(final.status))
    if ambiguity["n_operators"] > 1:
        ambiguity["fraction_reindexed"] = float(np.mean(final.operator != 0))
    stats = {
        "space_group": setup.sg.hm, "cell": list(setup.uc.parameters),
        "wavelength_a": setup.wavelength, "model": params.model,
        "n_crystals_input": n_input,
        "n_crystals_merged": int(np.sum(final.status == alg.ACCEPTED)),
        "rejected": dict(rejected), "overall": overall, "shells": shells,
        "wilson": alg.wilson_b(index, merged.imean),
        "resolution_estimate": estimate,
        "half_sets": {"n_crystals": n_half, "seed": params.seed},
        "n_observations": n_obs, "n_outliers": sums.n_outliers,
        "n_low_partiality": sums.n_low_partiality,
        "normalised_deviation_rms": final_rms,
        "error_model": {"sdfac": reference.error_model.sdfac,
                        "sdadd": reference.error_model.sdadd},
        "ambiguity": ambiguity, "cycles": history, "params": params.as_dict(),
        "performance": ex.performance(n_obs, [h["seconds"] for h in history],
                                      [h["cpu_seconds"] for h in history]),
    }
    crystals = crystals_table(final.table_columns(), [x["meta"] for x in summaries])
    write_merge_outputs(job.out, index.hkl, merged, setup.uc, setup.sg, setup.wavelength, stats,
                        crystals)
    table = alg.format_table(overall, shells) + "\n" + alg.format_estimate(estimate)
    return MergeResult(job.out.url, stats, table, crystals)
