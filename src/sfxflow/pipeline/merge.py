"""The distributed merge: map over reflection shards, reduce per-reflection sums, iterate.

``_run`` is the list of steps, each a map over work units of shards on the workers
(:class:`~sfxflow.pipeline.mapreduce.MapReduce`) and a small reduce on the client; the numbers
are decided in :mod:`sfxflow.algorithms.merge`, one shard at a time: read and prepare each
unit's shards (they stay on the unit's worker as a future: a lost worker's units are
recomputed from their files; a shard's per-observation
arrays are written once to the worker's scratch folder and memory-mapped, so that a worker's
own memory does not grow with the observations); the space group,
cell and asymmetric unit; the first reference (a Wilson curve, and with an indexing ambiguity a
Brehm-Diederichs-resolved subset of crystals); ``iterations`` scaling cycles against the
broadcast reference; the final merge, which writes each shard's scaled observations; then the
statistics, MTZ, CrystFEL .hkl, crystals.parquet and stats.json. The client holds
per-reflection arrays and per-crystal results, never the observations.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import dask.config
import gemmi
import numpy as np
import pyarrow as pa
from dask.sizeof import sizeof

from sfxflow.algorithms import merge as alg
from sfxflow.algorithms.simulate_physical import TrueIntensities
from sfxflow.io.merged import crystals_table, write_merge_outputs
from sfxflow.io.observations import (
    ShardData,
    ShardSpec,
    discover_shards,
    read_shard,
    refuse_merge_output,
    remove_stale_scaled,
)
from sfxflow.io.results import RunDir, parquet_bytes
from sfxflow.io.scratch import mapped_arrays, remove_scratch
from sfxflow.pipeline.cluster import open_cluster
from sfxflow.pipeline.config import ClusterConfig
from sfxflow.pipeline.mapreduce import MapReduce, tree_sum

__all__ = ["MergeResult", "run_merge"]


@dataclass
class MergeResult:
    """What :func:`run_merge` produced."""

    out_url: str
    stats: dict
    table: str
    crystals: pa.Table = field(repr=False)
    reports: list[str] = field(default_factory=list)  #: the report pages written


#: the per-observation arrays of a read shard and of a prepared one: memory-mapped scratch files
_DATA_ARRAYS = ("obs_crystal", "hkl", "intensity", "sigma", "polarisation")
_PREPARED_ARRAYS = ("hkl", "codes", "intensity", "sigma", "inv_d2", "eps")


@sizeof.register(ShardData)
@sizeof.register(alg.PreparedShard)
def _shard_bytes(shard: Any) -> int:
    """A shard's arrays (memory-mapped or not): what moving it to another worker would send,
    for the scheduler's choice of worker. Dask's default (an object's own few bytes) made
    every placement look free: a cycle's tasks went to whichever worker was idle, each taking
    a copy of its shard into that worker's own memory and serialising it on the way."""
    return sum(v.nbytes for v in vars(shard).values() if isinstance(v, np.ndarray))


def _scratch_root(dask_worker: Any = None) -> Path:
    """Where this process keeps a merge's scratch files: a Dask worker's local directory
    (Dask's ``temporary-directory`` setting or ``dask worker --local-directory``; Dask removes
    it with the worker), else Dask's ``temporary-directory``, else the system's temporary
    folder (``TMPDIR``)."""
    # a worker has imported distributed; importing it here (a serial merge) would add its
    # defaults inside run_merge's dask.config.set, which takes them away again on leaving
    if dask_worker is None and "distributed" in sys.modules:
        try:
            dask_worker = sys.modules["distributed"].get_worker()
        except ValueError:  # not in a task on a worker
            pass
    if dask_worker is not None:
        return Path(dask_worker.local_directory)
    return Path(dask.config.get("temporary-directory", None) or tempfile.gettempdir())


def _mapped(value: Any, names: Sequence[str], scratch: str) -> Any:
    """``value`` (a dataclass) with its arrays ``names`` written to this process's folder
    ``scratch`` and memory-mapped read-only (:func:`sfxflow.io.scratch.mapped_arrays`)."""
    arrays = mapped_arrays({n: getattr(value, n) for n in names}, _scratch_root() / scratch)
    return dataclasses.replace(value, **arrays)


def _remove_scratch(scratch: str, dask_worker: Any = None) -> bool:
    """Remove this process's folder ``scratch`` (on a worker through ``Client.run``, which
    passes ``dask_worker``)."""
    return remove_scratch(_scratch_root(dask_worker) / scratch)


#: the most shards in a work unit (a power of two: see :func:`_unit_shards`)
_UNIT_SHARDS_MAX = 8


def _unit_shards(n_shards: int, n_workers: int, n_cores: int) -> int:
    """How many consecutive shards make a work unit: one task each step, however many shards.

    Every task costs the client, the scheduler and the worker about the same whatever its
    size (about 5 ms in all on Dask per task of a 200,000-observation shard: a fifth of a
    cycle's CPU time at four tasks per shard), so a unit of up to ``_UNIT_SHARDS_MAX`` shards
    pays it once. A unit works through its shards one at a time (memory as for one shard).
    Units are blocks of a power of two aligned on the shard list, whose sums are added in the
    order of the tree over shards (:func:`~sfxflow.pipeline.mapreduce.tree_sum`): the merge
    is the same to the bit however the shards are grouped. The largest such size for which
    units dealt out to the workers in turn load the busiest worker with at most 10% more
    shards than single shards would, and give every core a unit."""
    def busiest(size: int) -> int:
        units = [min(size, n_shards - i) for i in range(0, n_shards, size)]
        return max(sum(units[w::n_workers]) for w in range(n_workers))

    size = _UNIT_SHARDS_MAX
    while size > 1 and (size >= 2 * n_shards or math.ceil(n_shards / size) < min(n_cores, n_shards)
                        or busiest(size) > 1.1 * busiest(1)):
        size //= 2
    return size


def _grouped(values: Sequence, size: int) -> list[list]:
    """``values`` (one per shard) in work units of ``size`` consecutive shards."""
    return [list(values[i:i + size]) for i in range(0, len(values), size)]


def _read(specs: list[ShardSpec], storage_options: Mapping[str, Any] | None, scratch: str
          ) -> list[ShardData]:
    return [_mapped(read_shard(spec, storage_options), _DATA_ARRAYS, scratch) for spec in specs]


def _summarise(unit: list[ShardData]) -> list[dict]:
    return [_summary(data) for data in unit]


def _summary(data: ShardData) -> dict:
    return {"n_crystals": data.n_crystals, "n_obs": int(data.hkl.shape[0]),
            "cells": data.cells, "wavelengths": data.wavelengths_a, "rejected": data.rejected,
            "inv_d2_max": alg.max_inv_d2(data.a_matrices, data.obs_crystal, data.hkl),
            "lattices": data.lattices,
            "meta": pa.table({"source_url": pa.array(list(data.source_url), pa.string()),
                              "frame_index": data.frame_index, "crystal": data.crystal})}


def _prepare(unit: list[ShardData], halves: list[np.ndarray], index: alg.AsuIndex,
             operators: list[np.ndarray], params: alg.MergeParams, scratch: str
             ) -> list[alg.PreparedShard]:
    return [_prepare_shard(data, half, index, operators, params, scratch)
            for data, half in zip(unit, halves, strict=True)]


def _prepare_shard(data: ShardData, half: np.ndarray, index: alg.AsuIndex,
                   operators: list[np.ndarray], params: alg.MergeParams, scratch: str
                   ) -> alg.PreparedShard:
    shard = alg.prepare_shard(data.crystal_ids, data.a_matrices, data.wavelengths_a,
                              data.obs_crystal, data.hkl, data.intensity, data.sigma,
                              data.polarisation, index, operators, params)
    shard = dataclasses.replace(shard, half=half)  # a balanced split over every shard's crystals
    return _mapped(shard, _PREPARED_ARRAYS, scratch)


def _summed(fn: Callable[..., Any], unit: list[alg.PreparedShard], *shared: Any) -> Any:
    """The sum of ``fn(shard, *shared)`` over a unit's shards (in the tree's order)."""
    return tree_sum(fn(shard, *shared) for shard in unit)


def _concatenated(fn: Callable[..., list], unit: list[alg.PreparedShard], *shared: Any) -> list:
    """The lists ``fn(shard, *shared)`` of a unit's shards, one after the other."""
    return [v for shard in unit for v in fn(shard, *shared)]


def _scale_cycle(unit: list[alg.PreparedShard], accepted: list[np.ndarray | None],
                 reference: alg.Reference, params: alg.MergeParams, n_codes: int,
                 unity_first: bool) -> tuple[alg.ShardSums, list[alg.CrystalFits]]:
    """:func:`~sfxflow.algorithms.merge.scale_cycle` over a unit's shards: their sums added
    (in the tree's order) and their fits."""
    fits: list[alg.CrystalFits] = []

    def each() -> Any:
        for shard, ok in zip(unit, accepted, strict=True):
            sums, shard_fits = alg.scale_cycle(shard, ok, reference, params, n_codes,
                                               unity_first)
            fits.append(shard_fits)
            yield sums

    return tree_sum(each()), fits


def _with_delta_cc_half(unit: list[alg.PreparedShard], fits: list[alg.CrystalFits],
                        accepted: list[np.ndarray | None], reference: alg.Reference,
                        params: alg.MergeParams, halves: alg.HalfSums
                        ) -> list[alg.CrystalFits]:
    return [alg.with_delta_cc_half(shard, f, a, reference, params, halves)
            for shard, f, a in zip(unit, fits, accepted, strict=True)]


def _final_pass(unit: list[alg.PreparedShard], fits: list[alg.CrystalFits],
                accepted: list[np.ndarray | None], numbers: list[int], halves: list[np.ndarray],
                reference: alg.Reference, params: alg.MergeParams, n_codes: int,
                index: alg.AsuIndex, out_url: str, storage_options: Mapping[str, Any] | None
                ) -> alg.ShardSums:
    """:func:`_final_shard` over a unit's shards: their sums added (in the tree's order)."""
    return tree_sum(_final_shard(*shard_args, reference, params, n_codes, index, out_url,
                                 storage_options)
                    for shard_args in zip(unit, fits, accepted, numbers, halves, strict=True))


def _final_shard(shard: alg.PreparedShard, fits: alg.CrystalFits, accepted: np.ndarray | None,
                 number: int, half: np.ndarray, reference: alg.Reference,
                 params: alg.MergeParams, n_codes: int, index: alg.AsuIndex, out_url: str,
                 storage_options: Mapping[str, Any] | None) -> alg.ShardSums:
    """The merge with the last cycle's fits and the error model fitted on that cycle: the
    per-reflection sums (half-sets ``half``: the merged crystals split evenly), and the shard's
    scaled observations written to ``scaled/``."""
    shard = dataclasses.replace(shard, half=half)
    sums, obs = alg.final_merge(shard, fits, accepted, reference, params, n_codes)
    table = pa.table(alg.scaled_columns(shard, obs, index))
    RunDir(out_url, storage_options).write_bytes(f"scaled/{number:05d}.parquet",
                                                 parquet_bytes(table))
    return sums


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
    scratch: str  # the name of this merge's scratch folder in each process's (_scratch_root)


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
        ex.map(partial(_summed, alg.WilsonCurve.sums), [(u,) for u in units], edges)))
    ambiguity: dict[str, Any] = {"n_operators": len(setup.operators)}
    if len(setup.operators) == 1:
        return alg.first_reference(setup.index, wilson), ambiguity
    frac = min(1.0, params.ambiguity_max_crystals / max(n_crystals, 1))
    picked = [v for part in ex.gather(ex.map(partial(_concatenated, alg.ambiguity_vectors),
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
            _scale_cycle, list(zip(units, _grouped(accepted, size), strict=True)),
            ref_f, params, 2 * len(setup.index), it == 0)
        if params.rejects_on_delta_cc_half() or it == params.iterations - 1:  # and reported
            unit_fits = ex.gather(ex.map(
                _with_delta_cc_half, list(zip(units, unit_fits, _grouped(accepted, size),
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


# glibc's malloc in workers started here: Dask's MALLOC_TRIM_THRESHOLD_ of 64 kB (which turns
# off glibc's adaptive thresholds) gave every temporary array of a cycle (a shard's worth, a few
# MB each) back to the system when freed and took it again, zeroed, page by page when next
# made: about 120,000 page faults and 0.2 s of system time per cycle per 3 million
# observations, a fifth of the workers' CPU time. Arrays below 32 MB (glibc's largest mmap
# threshold) now come from the heap, which keeps up to 64 MB free: one task's temporaries,
# the same however many observations a worker holds.
_MALLOC_ENVIRON = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in
                   (("MALLOC_MMAP_THRESHOLD_", 32 * 2**20),
                    ("MALLOC_TRIM_THRESHOLD_", 64 * 2**20))}

# Dask's housekeeping in the processes started here, at rates for a merge that runs a few
# dozen tasks a cycle and keeps its memory flat: every process's event loop measured its own
# latency every 20 ms, sampled its CPU and memory every 0.5 s and each worker and nanny
# checked its memory every 0.1 s. Idle, that cost 3.3% of a core in the client (with the
# scheduler) and 2% in each worker, 0.07 CPU-s per second of a cycle in all, about a tenth of
# a 10^7-observation cycle's CPU on a loaded 2-core machine; 0.014 at these rates. Memory is
# still checked every second (pausing, terminating a worker past its limit).
_HOUSEKEEPING = {"distributed.admin.tick.interval": "1s",
                 "distributed.admin.system-monitor.interval": "5s",
                 "distributed.worker.memory.monitor-interval": "1s"}


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
                          **_MALLOC_ENVIRON, **_HOUSEKEEPING}), \
            open_cluster(cluster) as (client, info):
        job = _Job(specs, out, params, cell, space_group, point_group, truth, storage_options,
                   echo or (lambda s: None), on_cycle or (lambda i: None),
                   f"sfxflow-merge-{uuid.uuid4().hex[:12]}")
        ex = MapReduce(client, info.kind, t_start)
        try:
            result = _run(job, ex)
        finally:  # the shards' scratch files, however the merge ended
            ex.everywhere(_remove_scratch, job.scratch)
    # a merge into an earlier merge's folder: its scaled/ shards beyond ours would mix in
    remove_stale_scaled(out.url, [s.number for s in specs], storage_options)
    return result


def _run(job: _Job, ex: MapReduce) -> MergeResult:
    params = job.params
    size = _unit_shards(len(job.specs), ex.n_workers, ex.n_cores)
    data = ex.map(_read, [(specs, job.storage_options, job.scratch)
                          for specs in _grouped(job.specs, size)])
    summaries = [x for part in ex.gather(ex.map(_summarise, [(d,) for d in data]))
                 for x in part]
    rejected: Counter[str] = sum((Counter(s["rejected"]) for s in summaries), Counter())
    n_crystals = sum(s["n_crystals"] for s in summaries)
    n_input, n_obs = n_crystals + sum(rejected.values()), sum(s["n_obs"] for s in summaries)
    setup = _setup(job, summaries, n_input, size)
    job.out.makedirs()  # only now: a refused input leaves no half-written merge folder
    index = setup.index  # the asymmetric unit every per-reflection array is indexed by
    halves = alg.balanced_halves([s["n_crystals"] for s in summaries], params.seed)
    units = ex.map(_prepare, list(zip(data, _grouped(halves, size), strict=True)), index,
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
            _final_pass, list(zip(units, *(_grouped(v, size) for v in (
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
