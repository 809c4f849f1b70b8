"""The merge's tasks: what a worker does for one work unit of consecutive reflection shards,
and how many shards make a unit.

Each task works through its unit's shards one at a time, with the numerics of
:mod:`sfxflow.algorithms.merge`: read a shard (its per-observation arrays written once to this
process's scratch folder and memory-mapped, so that a worker's own memory does not grow with
the observations), summarise and prepare it, run a scaling cycle, ΔCC1/2 and the final pass
(which writes the shard's scaled observations). Sums over a unit are added in the order of the
tree over shards, so the merge is the same to the bit however shards are grouped. The client's
side, the list of steps, is :mod:`sfxflow.pipeline.merge`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dask.config
import numpy as np
import pyarrow as pa
from dask.sizeof import sizeof

from sfxflow.algorithms import merge as alg
from sfxflow.io.observations import ShardData, ShardSpec, read_shard
from sfxflow.io.results import RunDir, parquet_bytes
from sfxflow.io.scratch import mapped_arrays, remove_scratch
from sfxflow.pipeline.mapreduce import tree_sum

__all__ = ["UNIT_SHARDS_MAX", "WORKER_SETTINGS", "concatenated", "final_pass_unit", "grouped", "prepare_unit",
           "read_unit", "remove_worker_scratch", "scale_cycle_unit", "scratch_root", "summarise_unit",
           "summed", "unit_shards", "with_delta_cc_half_unit"]


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


def scratch_root(dask_worker: Any = None) -> Path:
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
    arrays = mapped_arrays({n: getattr(value, n) for n in names}, scratch_root() / scratch)
    return dataclasses.replace(value, **arrays)


def remove_worker_scratch(scratch: str, dask_worker: Any = None) -> bool:
    """Remove this process's folder ``scratch`` (on a worker through ``Client.run``, which
    passes ``dask_worker``)."""
    return remove_scratch(scratch_root(dask_worker) / scratch)


#: the most shards in a work unit (a power of two: see :func:`unit_shards`)
UNIT_SHARDS_MAX = 8


def unit_shards(n_shards: int, n_workers: int, n_cores: int) -> int:
    """How many consecutive shards make a work unit: one task each step, however many shards.

    Every task costs the client, the scheduler and the worker about the same whatever its
    size (about 5 ms in all on Dask per task of a 200,000-observation shard: a fifth of a
    cycle's CPU time at four tasks per shard), so a unit of up to ``UNIT_SHARDS_MAX`` shards
    pays it once. A unit works through its shards one at a time (memory as for one shard).
    Units are blocks of a power of two aligned on the shard list, whose sums are added in the
    order of the tree over shards (:func:`~sfxflow.pipeline.mapreduce.tree_sum`): the merge
    is the same to the bit however the shards are grouped. The largest such size for which
    units dealt out to the workers in turn load the busiest worker with at most 10% more
    shards than single shards would, and give every core a unit."""
    def busiest(size: int) -> int:
        units = [min(size, n_shards - i) for i in range(0, n_shards, size)]
        return max(sum(units[w::n_workers]) for w in range(n_workers))

    size = UNIT_SHARDS_MAX
    while size > 1 and (size >= 2 * n_shards or math.ceil(n_shards / size) < min(n_cores, n_shards)
                        or busiest(size) > 1.1 * busiest(1)):
        size //= 2
    return size


def grouped(values: Sequence, size: int) -> list[list]:
    """``values`` (one per shard) in work units of ``size`` consecutive shards."""
    return [list(values[i:i + size]) for i in range(0, len(values), size)]


def read_unit(specs: list[ShardSpec], storage_options: Mapping[str, Any] | None, scratch: str
          ) -> list[ShardData]:
    return [_mapped(read_shard(spec, storage_options), _DATA_ARRAYS, scratch) for spec in specs]


def summarise_unit(unit: list[ShardData]) -> list[dict]:
    return [_summary(data) for data in unit]


def _summary(data: ShardData) -> dict:
    return {"n_crystals": data.n_crystals, "n_obs": int(data.hkl.shape[0]),
            "cells": data.cells, "wavelengths": data.wavelengths_a, "rejected": data.rejected,
            "inv_d2_max": alg.max_inv_d2(data.a_matrices, data.obs_crystal, data.hkl),
            "lattices": data.lattices,
            "meta": pa.table({"source_url": pa.array(list(data.source_url), pa.string()),
                              "frame_index": data.frame_index, "crystal": data.crystal})}


def prepare_unit(unit: list[ShardData], halves: list[np.ndarray], index: alg.AsuIndex,
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


def summed(fn: Callable[..., Any], unit: list[alg.PreparedShard], *shared: Any) -> Any:
    """The sum of ``fn(shard, *shared)`` over a unit's shards (in the tree's order)."""
    return tree_sum(fn(shard, *shared) for shard in unit)


def concatenated(fn: Callable[..., list], unit: list[alg.PreparedShard], *shared: Any) -> list:
    """The lists ``fn(shard, *shared)`` of a unit's shards, one after the other."""
    return [v for shard in unit for v in fn(shard, *shared)]


def scale_cycle_unit(unit: list[alg.PreparedShard], accepted: list[np.ndarray | None],
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


def with_delta_cc_half_unit(unit: list[alg.PreparedShard], fits: list[alg.CrystalFits],
                        accepted: list[np.ndarray | None], reference: alg.Reference,
                        params: alg.MergeParams, halves: alg.HalfSums
                        ) -> list[alg.CrystalFits]:
    return [alg.with_delta_cc_half(shard, f, a, reference, params, halves)
            for shard, f, a in zip(unit, fits, accepted, strict=True)]


def final_pass_unit(unit: list[alg.PreparedShard], fits: list[alg.CrystalFits],
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


# glibc's malloc in the workers a merge starts: Dask's MALLOC_TRIM_THRESHOLD_ of 64 kB (which turns
# off glibc's adaptive thresholds) gave every temporary array of a cycle (a shard's worth, a few
# MB each) back to the system when freed and took it again, zeroed, page by page when next
# made: about 120,000 page faults and 0.2 s of system time per cycle per 3 million
# observations, a fifth of the workers' CPU time. Arrays below 32 MB (glibc's largest mmap
# threshold) now come from the heap, which keeps up to 64 MB free: one task's temporaries,
# the same however many observations a worker holds.
_MALLOC_ENVIRON = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in
                   (("MALLOC_MMAP_THRESHOLD_", 32 * 2**20),
                    ("MALLOC_TRIM_THRESHOLD_", 64 * 2**20))}

# Dask's housekeeping in the processes a merge starts, at rates for a merge that runs a few
# dozen tasks a cycle and keeps its memory flat: every process's event loop measured its own
# latency every 20 ms, sampled its CPU and memory every 0.5 s and each worker and nanny
# checked its memory every 0.1 s. Idle, that cost 3.3% of a core in the client (with the
# scheduler) and 2% in each worker, 0.07 CPU-s per second of a cycle in all, about a tenth of
# a 10^7-observation cycle's CPU on a loaded 2-core machine; 0.014 at these rates. Memory is
# still checked every second (pausing, terminating a worker past its limit).
_HOUSEKEEPING = {"distributed.admin.tick.interval": "1s",
                 "distributed.admin.system-monitor.interval": "5s",
                 "distributed.worker.memory.monitor-interval": "1s"}

#: the Dask settings of a cluster the merge starts itself (a joined one keeps its own)
WORKER_SETTINGS = {**_MALLOC_ENVIRON, **_HOUSEKEEPING}
