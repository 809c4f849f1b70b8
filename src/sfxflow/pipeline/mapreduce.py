"""One map/reduce over shards, the same code in this process and on a Dask cluster.

The numerics never see the distribution (as dask's ``Bag.reduction`` keeps them unaware): a task
is a plain function of a shard and some shared values that returns either a summable value
(per-reflection sums, whose ``+`` combines shards) or a pair (summable, per-shard value).
:class:`MapReduce` runs the tasks in this process when there is no client (``--scheduler
synchronous``), or submits them to the cluster, keeps their results on the workers as futures,
adds the summable parts in a tree of tasks there and brings back only the total and the small
per-shard values, which ride up the same tree (no task per shard to take them out).
"""

from __future__ import annotations

import logging
import math
import operator
import resource
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["MapReduce", "cpu_s", "memory_mb", "peak_rss_mb", "rss_mb", "tree_sum"]


def _identity(value: Any) -> Any:
    return value


def _summable(value: Any) -> Any:
    """The summable part of a map result: the first of a (summable, per-item value) pair."""
    return value[0] if isinstance(value, tuple) else value


def _add(a: Any, b: Any) -> Any:
    """``a + b`` of two map results or partial sums (pairs give their first element: the
    first level of the tree reads the map's results directly, no task splits them)."""
    return _summable(a) + _summable(b)


class _Carried:
    """A partial sum of (summable, per-item value) map results and the per-item values of the
    items it sums, in order: the per-item values go up the addition tree with the sums, so
    that the root brings back both and no task per item takes its value out of its result."""

    __slots__ = ("total", "values")

    def __init__(self, total: Any, values: list) -> None:
        self.total, self.values = total, values


def _carried(value: Any) -> _Carried:
    return value if isinstance(value, _Carried) else _Carried(value[0], [value[1]])


def _add_carrying(a: Any, b: Any) -> _Carried:
    """``a + b`` of two (summable, per-item value) map results or :class:`_Carried` sums."""
    a, b = _carried(a), _carried(b)
    return _Carried(a.total + b.total, a.values + b.values)


def _pairwise(results: list, add: Callable[[Any, Any], Any]) -> list:
    """One level of the addition tree: neighbours added in pairs, an odd last one kept."""
    return [add(results[i], results[i + 1]) for i in range(0, len(results) - 1, 2)
            ] + results[len(results) - len(results) % 2:]


def tree_sum(values: Iterable, add: Callable[[Any, Any], Any] = operator.add) -> Any:
    """The sum of ``values`` (at least one) added in the order of :class:`MapReduce`'s tree
    (neighbours in pairs, level by level), holding one partial sum per level only.

    The order fixes the rounding: summing each of the aligned blocks of 2**k values of a list
    with this, and then the blocks' sums with the tree, gives the tree's sum of the whole
    list to the bit (every level's odd last value is the block at the list's end).

    >>> tree_sum(["a", "b", "c", "d", "e"], lambda x, y: f"({x}+{y})")
    '(((a+b)+(c+d))+e)'
    """
    levels: list[tuple[int, Any]] = []  # (level, partial sum of 2**level values)
    for value in values:
        level = 0
        while levels and levels[-1][0] == level:
            value, level = add(levels.pop()[1], value), level + 1
        levels.append((level, value))
    total = levels.pop()[1]
    while levels:  # the blocks left at the end: the odd last ones of the tree's levels
        total = add(levels.pop()[1], total)
    return total


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_s() -> float:
    """This process's CPU time, all threads (s)."""
    return time.process_time()


def rss_mb() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**20


_STATUS_FIELDS = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}


def memory_mb() -> dict[str, float]:
    """This process's resident memory (MB): ``rss`` in all, of which ``anon`` is its own (heap,
    stacks: only swap could free it) and ``file`` the pages of mapped files (libraries, the
    merge's memory-mapped scratch files: the kernel drops these under pressure and reads them
    again when touched). From Linux's /proc/self/status; elsewhere ``rss`` only (the parts
    NaN)."""
    out = {"rss": math.nan, "anon": math.nan, "file": math.nan}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                name, *value = line.split()
                if name in _STATUS_FIELDS:
                    out[_STATUS_FIELDS[name]] = int(value[0]) / 1024.0  # kB
    except OSError:
        out["rss"] = rss_mb()
    return out


class MapReduce:
    """The one map/reduce of the merge, in this process (``client`` None: ``--scheduler
    synchronous``) or on a Dask cluster, where each task's result stays on its worker as a
    future until a reduce or a gather asks for it (a lost worker's results are recomputed)."""

    def __init__(self, client: Any, kind: str = "synchronous",
                 t_start: float | None = None) -> None:
        self.client, self.kind = client, kind
        self.t_start = time.perf_counter() if t_start is None else t_start
        workers = {} if client is None else client.scheduler_info().get("workers", {})
        self.n_cores = max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))
        #: the workers items without a placed input are dealt out to, in turn
        self.n_workers = max(1, len(workers))
        #: the most resident memory seen (:func:`memory_mb`'s parts), of each worker
        self.worker_peaks_mb: dict[str, dict[str, float]] = {}
        self.client_peak_mb = memory_mb()

    def put(self, value: Any) -> Any:
        """A value every task of the next maps reads (on a cluster: a task holding it, not
        scattered data, so that a lost worker's copy is recomputed)."""
        return value if self.client is None else self.client.submit(_identity, value,
                                                                     pure=False)

    def map(self, fn: Callable, items: Sequence[tuple], *shared: Any) -> list:
        """``fn(*item, *shared)`` for each item; the results stay where they were computed.
        On a cluster, a task whose item starts with the result of an earlier map (a shard) runs
        on the worker holding that result; the others (reading the shards) are dealt out to the
        workers in turn, so that each holds as many shards (dask's own choice followed the
        speed of the first reads: on a shared machine 2 to 1, and every cycle after that
        waited for the worker with two thirds of the shards)."""
        if self.client is None:
            return [fn(*item, *shared) for item in items]
        holders = self._holders([item[0] for item in items if item])
        workers = sorted(self.client.scheduler_info().get("workers", {}))
        out = []
        for n, item in enumerate(items):
            key = getattr(item[0], "key", None) if item else None
            where = holders.get(key) if key is not None else workers[n % len(workers):][:1]
            place = {"workers": where, "allow_other_workers": True} if where else {}
            out.append(self.client.submit(fn, *item, *shared, pure=False, **place))
        return out

    def _holders(self, values: list) -> dict[Any, list[str]]:
        """The workers holding each of ``values`` that is a finished result (by key).

        Dask places a task by the time its inputs would take to move against how busy each
        worker is; a shard of tens of MB moves in milliseconds here, so nearly every task went
        to the idlest worker with a copy of its shard, which stayed in that worker's memory
        (not memory-mapped) and cost a serialisation each way. Naming the holder keeps the
        shard where it is; ``allow_other_workers`` lets the task run elsewhere when the holder
        is gone (its shard is then recomputed)."""
        from distributed import Future

        futures = [v for v in values if isinstance(v, Future) and v.status == "finished"]
        if not futures:
            return {}
        return {k: list(w) for k, w in self.client.who_has(futures).items() if w}

    def gather(self, results: list) -> list:
        return results if self.client is None else self.client.gather(results)

    def reduce_sum(self, results: list) -> Any:
        """The sum of the results (of pairs: of their first elements): on a cluster a tree of
        additions, only the total comes back."""
        return self.gather([self._total(results)])[0]

    def _total(self, results: list, add: Callable[[Any, Any], Any] = _add,
               last: Callable[[Any], Any] = _summable) -> Any:
        """The sum of the results as one future (in this process: the sum), ``last`` of the
        root. The additions go before the maps still queued (dask's priority), so that each
        worker holds the partial sums of the few maps it ran last, not one per map: a
        worker's memory does not grow with the number of shards."""
        if self.client is None:
            return last(tree_sum(results, add))
        while len(results) > 1:
            results = _pairwise(results, partial(self.client.submit, add, pure=False,
                                                 priority=1))
        return self.client.submit(last, results[0], pure=False, priority=1)

    def map_reduce(self, fn: Callable, items: Sequence[tuple], *shared: Any
                   ) -> tuple[Any, list]:
        """``fn`` returns (a summable, a per-item value): the sum of the first over the items
        and the list of the second (carried up the addition tree with the sums); then a
        memory sample."""
        total = self._total(self.map(fn, items, *shared), _add_carrying, _carried)
        got = self.gather([total])[0]
        self.sample_memory()
        return got.total, got.values

    def everywhere(self, fn: Callable, *args: Any) -> None:
        """``fn(*args)`` in this process and on every worker (``Client.run``): housekeeping
        such as removing scratch files, also after a failure, so a failure here (a cluster
        already gone) is logged, not raised over the error that ended the run."""
        try:
            fn(*args)
            if self.client is not None:
                self.client.run(fn, *args, on_error="return")
        except Exception as exc:  # see the docstring
            log.warning("%s on the workers failed: %s", getattr(fn, "__name__", fn), exc)

    def cpu_mark(self) -> dict[str, float]:
        """CPU time used so far by this process and by each worker (s), for
        :meth:`cpu_since`."""
        workers = {} if self.client is None else self.client.run(cpu_s, on_error="ignore")
        return {"": cpu_s(), **workers}

    def cpu_since(self, mark: dict[str, float]) -> float:
        """CPU seconds used by this process and the workers since ``mark``: a step's work
        without the time other programs took the cores for (a worker lost or started in
        between counts only while it was there at both ends)."""
        now = self.cpu_mark()
        return float(sum(now[k] - mark[k] for k in now if k in mark))

    def sample_memory(self) -> None:
        """Note the resident memory of this process and of each worker (the peaks reported by
        :meth:`performance`)."""
        # resident memory sampled between steps: a worker's ru_maxrss would include what a
        # forked worker inherited from its parent
        self.client_peak_mb = _peaks(self.client_peak_mb, memory_mb())
        if self.client is not None:
            for worker, mb in self.client.run(memory_mb, on_error="ignore").items():
                self.worker_peaks_mb[worker] = _peaks(self.worker_peaks_mb.get(worker, mb), mb)

    def performance(self, n_items: int, cycle_seconds: list[float],
                    cycle_cpu_seconds: list[float] | None = None) -> dict[str, Any]:
        """Wall time since ``t_start``, throughput (``n_items`` per second per core per cycle,
        median of the cycles: from the wall time times the cores, and from the CPU time the
        cycles used, which a machine shared with other programs does not inflate) and memory
        of the maps so far."""
        self.sample_memory()
        per_s = n_items / (float(np.median(cycle_seconds)) * self.n_cores)
        per_cpu_s = (n_items / float(np.median(cycle_cpu_seconds)) if cycle_cpu_seconds
                     else float("nan"))
        return {"cluster": self.kind, "seconds": time.perf_counter() - self.t_start,
                "cores": self.n_cores, "observations_per_second_per_core_per_cycle": per_s,
                "observations_per_cpu_second_per_cycle": per_cpu_s,
                "client_peak_mb": self.client_peak_mb["rss"],
                "client_peak_anon_mb": self.client_peak_mb["anon"],
                "client_peak_file_mb": self.client_peak_mb["file"],
                "client_max_rss_mb": peak_rss_mb(),
                **{f"worker_peak{part}_mb": [w[key] for w in self.worker_peaks_mb.values()]
                   for part, key in (("", "rss"), ("_anon", "anon"), ("_file", "file"))}}


def _peaks(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """The larger of each part of two :func:`memory_mb` samples (NaN where unknown)."""
    return {k: max(a[k], b[k]) if not math.isnan(a[k]) else b[k] for k in a}
