"""Executing blocks: serially in this process, or as tasks on a dask.distributed cluster.

Dask execution
--------------
Every block is one task (key ``sfxflow-<run token>-<block id>``); the scheduler hands them out
dynamically and, with its default ``worker-saturation`` (1.1), keeps one task *queued* on each
single-threaded worker besides the one running. A :class:`BlockRunner` worker plugin, registered
once per run (so workers that join or are restarted get it too), holds the run context and a
per-worker :class:`~sfxflow.io.prefetch.Prefetcher`: when a block task becomes ``ready`` on a worker, the plugin starts
reading it in a background thread while the current block computes. At most ``depth`` blocks per
worker thread are fetched ahead, so a worker holds at most ``1 + depth`` blocks per thread.

The per-worker prefetcher is keyed by the tasks the scheduler queues on that worker
(their order is only known as they arrive); the serial executor, whose order is fixed, reads
ahead with :func:`sfxflow.io.prefetch.prefetch`.

A worker that dies loses only its running and queued blocks; the scheduler reruns them elsewhere
(``allowed_failures`` deaths per block, a setting of the scheduler: set on one the run starts,
left as it is on a shared one). A task that raises is retried ``task_retries`` times;
after that the block is recorded as failed (its frames get ``failed`` records with the reason)
and the run goes on.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from sfxflow.errors import failure_reason
from sfxflow.io.prefetch import Prefetcher, prefetch
from sfxflow.pipeline.blocks import (
    BlockContext,
    BlockRef,
    BlockReport,
    Fetched,
    failed_block_shards,
    fetch_block,
    run_block,
)

__all__ = ["BlockFailure", "BlockRunner", "execute_dask", "execute_serial"]

logger = logging.getLogger(__name__)

OnReport = Callable[[BlockReport], None]


class BlockFailure:
    """A block whose task failed for good (retries spent): id and reason."""

    def __init__(self, block: BlockRef, reason: str) -> None:
        self.block = block
        self.reason = reason

    def __repr__(self) -> str:
        return f"BlockFailure({self.block.block_id!r}, {self.reason!r})"


try:
    from distributed import WorkerPlugin as _WorkerPluginBase
except ImportError:  # pragma: no cover - distributed is a dependency
    _WorkerPluginBase = object  # type: ignore[assignment,misc]


class BlockRunner(_WorkerPluginBase):  # type: ignore[misc,valid-type]
    """Worker plugin holding one run's context, block table and prefetcher.

    Parameters
    ----------
    name : plugin name (unique per run).
    ctx : the run context.
    blocks : task key -> block.
    prefetch_depth : blocks read ahead per worker thread (0 disables prefetching).
    """

    def __init__(self, name: str, ctx: BlockContext, blocks: dict[str, BlockRef],
                 prefetch_depth: int = 1, file_errors: dict[str, str] | None = None) -> None:
        self.name = name
        self.ctx = ctx
        self.blocks = blocks
        self.prefetch_depth = prefetch_depth
        self.file_errors = file_errors or {}
        self.worker: Any = None
        self.prefetcher: Prefetcher[BlockRef, Fetched] | None = None

    def setup(self, worker: Any) -> None:
        self.worker = worker
        nthreads = max(int(getattr(worker.state, "nthreads", 1) or 1), 1)
        ctx = self.ctx
        self.prefetcher = Prefetcher(lambda block: fetch_block(block, ctx),
                                     depth=self.prefetch_depth * nthreads)

    def teardown(self, worker: Any) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        block = self.blocks.get(key) if isinstance(key, str) else None
        if block is None or self.prefetcher is None:
            return
        if finish == "ready":
            self.prefetcher.want(key, block)
        elif finish in ("released", "cancelled", "forgotten", "error"):
            self.prefetcher.drop(key)

    def execute(self, key: str) -> BlockReport:
        block = self.blocks[key]
        assert self.prefetcher is not None
        fetched, waited_s, read_ahead = self.prefetcher.take(key, block)
        fetched.wait_s, fetched.prefetched = waited_s, read_ahead
        return run_block(block, self.ctx, fetched, worker=str(self.worker.address),
                         file_error=self.file_errors.get(block.block_id, ""))


def _block_task(plugin_name: str, key: str) -> BlockReport:
    """The Dask task of one block: delegate to this worker's :class:`BlockRunner`."""
    from distributed import get_worker

    worker = get_worker()
    plugin: Any = worker.plugins.get(plugin_name)
    if plugin is None:
        raise RuntimeError(f"worker {worker.address} has no {plugin_name} plugin")
    return plugin.execute(key)


def _record_failure(block: BlockRef, ctx: BlockContext, reason: str) -> BlockFailure:
    logger.error("block %s failed for good: %s", block.block_id, reason)
    ctx.run.write_shards(failed_block_shards(block, reason))
    return BlockFailure(block, reason)


def execute_serial(blocks: Sequence[BlockRef], ctx: BlockContext, on_report: OnReport,
                   on_failure: Callable[[BlockFailure], None], *, prefetch_depth: int = 1,
                   attempts: int = 1, file_errors: dict[str, str] | None = None) -> None:
    """Run blocks one after another in this process (no Dask), reading ahead with
    :func:`sfxflow.io.prefetch.prefetch` (``prefetch_depth`` blocks besides the current one).

    ``attempts`` bounds how often a block whose processing raised is tried.
    """
    file_errors = file_errors or {}
    depth = max(int(prefetch_depth), 0)
    stream = prefetch(list(blocks), lambda b: fetch_block(b, ctx), max_in_memory=1 + depth)
    try:
        while True:
            t0 = time.perf_counter()
            try:
                block, fetched = next(stream)
            except StopIteration:
                break
            if isinstance(fetched, Exception):  # fetch_block captures read errors itself
                raise fetched
            fetched.wait_s = time.perf_counter() - t0
            fetched.prefetched = depth > 0
            last: BaseException | None = None
            for attempt in range(max(attempts, 1)):
                try:
                    report = run_block(block, ctx, fetched if attempt == 0 else None,
                                       file_error=file_errors.get(block.block_id, ""))
                    last = None
                    break
                except (KeyboardInterrupt, SystemExit, MemoryError):
                    raise
                except Exception as exc:
                    logger.warning("block %s attempt %d failed: %s", block.block_id,
                                   attempt + 1, failure_reason(exc), exc_info=True)
                    last = exc
            del fetched
            if last is not None:
                on_failure(_record_failure(block, ctx, failure_reason(last)))
            else:
                on_report(report)
    finally:
        stream.close()  # type: ignore[attr-defined]  # a generator


def execute_dask(client: Any, blocks: Sequence[BlockRef], ctx: BlockContext,
                 on_report: OnReport, on_failure: Callable[[BlockFailure], None], *,
                 prefetch_depth: int = 1, task_retries: int = 1,
                 file_errors: dict[str, str] | None = None) -> None:
    """Run blocks as tasks on the cluster behind ``client``; call back as each finishes.

    Parameters
    ----------
    client : a connected ``distributed.Client``.
    blocks : blocks to run.
    ctx : run context (sent once to every worker in a plugin).
    on_report : called in this thread with each finished block's report.
    on_failure : called with each block that failed for good.
    prefetch_depth : blocks read ahead per worker thread.
    task_retries : reruns of a task that raised.
    """
    from distributed import as_completed

    if not blocks:
        return
    token = uuid.uuid4().hex[:10]
    name = f"sfxflow-run-{token}"
    keys = {f"sfxflow-{token}-{b.block_id}": b for b in blocks}
    plugin = BlockRunner(name, ctx, keys, prefetch_depth=prefetch_depth, file_errors=file_errors)
    client.register_plugin(plugin, name=name)
    futures = []
    try:
        for key in keys:
            futures.append(client.submit(_block_task, name, key, key=key, pure=False,
                                         retries=task_retries))
        for fut in as_completed(futures):
            block = keys[fut.key]
            try:
                report = fut.result()
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:
                on_failure(_record_failure(block, ctx, failure_reason(exc)))
                continue
            finally:
                fut.release()
            on_report(report)
    finally:
        for fut in futures:
            if fut.status == "pending":
                fut.cancel()
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(name)

