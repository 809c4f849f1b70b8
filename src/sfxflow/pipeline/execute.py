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
and the run goes on. The plugin is unregistered when the run ends, and, through a small
scheduler plugin (:class:`RunCleanup`), when the client dies without ending it.

Serial execution and crashes
----------------------------
In serial mode a native decoder that crashes (a segmentation fault) kills the run itself, and
would do so again at the same block on every rerun. So the blocks being read or processed are
recorded in the run lock before they start (:meth:`~sfxflow.pipeline.runlock.RunLock.set_in_flight`);
the next run learns from the dead run's lock which blocks they were and runs them in a child
process (:func:`run_block_in_child`): if that crashes too, the block is recorded as failed
("decoder crashed") and the run goes on.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

from sfxflow.errors import RunDirError, failure_reason, raise_pending_interrupt
from sfxflow.io.prefetch import Prefetcher, prefetch
from sfxflow.pipeline.blocks import (
    BlockContext,
    BlockRef,
    BlockReport,
    Fetched,
    apply_storage_retry,
    failed_block_shards,
    fetch_block,
    run_block,
)

if TYPE_CHECKING:
    from sfxflow.pipeline.runlock import RunLock

__all__ = ["BlockCrashed", "BlockFailure", "BlockRunner", "LocalWorkerExit", "RunCleanup",
           "execute_dask", "execute_serial", "run_block_in_child"]

logger = logging.getLogger(__name__)

OnReport = Callable[[BlockReport], None]


class BlockFailure:
    """A block whose task failed for good (retries spent, or it crashed its process)."""

    def __init__(self, block: BlockRef, reason: str, crashed: bool = False) -> None:
        self.block = block
        self.reason = reason
        self.crashed = crashed

    def __repr__(self) -> str:
        return f"BlockFailure({self.block.block_id!r}, {self.reason!r})"


try:
    from distributed import WorkerPlugin as _WorkerPluginBase
except ImportError:  # pragma: no cover - distributed is a dependency
    _WorkerPluginBase = object  # type: ignore[assignment,misc]


class _NoComputeFailedDumps(logging.Filter):
    """On a worker: drop distributed's "Compute Failed" dump (key, task, exception and
    traceback text) for this run's tasks. The client says what failed, once: one line per
    block failed for good, or the run's own error (an unwritable run directory); the dump
    stays with ``-v -v`` (debug logging)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Compute Failed") or logging.getLogger().isEnabledFor(
                logging.DEBUG):
            return True
        key = record.args[0] if isinstance(record.args, tuple) and record.args else ""
        return not str(key).startswith(self.prefix)


class LocalWorkerExit(_WorkerPluginBase):  # type: ignore[misc,valid-type]
    """Worker plugin of a local cluster this run started: when the worker closes, its objects
    are frozen out of the garbage collector (:func:`gc.freeze`).

    Why: a worker process that has run blocks holds millions of objects (numba's typing and
    target registries, the imported libraries), and the collection at interpreter exit took
    longer than the nanny's 4 s before it kills the process ("Worker process still alive after
    4.0 seconds, killing"): the cluster's close took 3.6-4.2 s after 16 frames, 0.3-0.5 s with
    this. Only on workers that exit with the run: a joined cluster's long-lived workers keep
    collecting. What tornado and asyncio log after this point is the event loop's shutdown
    (a comm callback cut by the close, after Ctrl-C most often): silenced, as it was when the
    nanny killed the process before it could say it.

    When the worker starts, pyarrow is told that pandas is not there to check for
    (:func:`~sfxflow.io.arrow.pyarrow_without_pandas`): the worker's first block imported pandas
    for it (0.23 s of CPU). Only here, on workers of this run's own: a joined cluster's workers
    may serve others whose pandas objects pyarrow must recognise.
    """

    name = "sfxflow-local-worker-exit"

    def setup(self, worker: Any) -> None:
        from sfxflow.io.arrow import pyarrow_without_pandas

        pyarrow_without_pandas()

    def teardown(self, worker: Any) -> None:
        import gc

        for name in ("tornado", "asyncio"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        gc.freeze()


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
        self._quiet: logging.Filter | None = None

    def setup(self, worker: Any) -> None:
        self.worker = worker
        self._quiet = _NoComputeFailedDumps(self.name.replace("sfxflow-run-", "sfxflow-"))
        logging.getLogger("distributed.worker").addFilter(self._quiet)
        apply_storage_retry(self.ctx.config)
        nthreads = max(int(getattr(worker.state, "nthreads", 1) or 1), 1)
        ctx = self.ctx
        self.prefetcher = Prefetcher(lambda block: fetch_block(block, ctx),
                                     depth=self.prefetch_depth * nthreads)

    def teardown(self, worker: Any) -> None:
        if self._quiet is not None:
            logging.getLogger("distributed.worker").removeFilter(self._quiet)
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


def _record_failure(block: BlockRef, ctx: BlockContext, reason: str,
                    crashed: bool = False) -> BlockFailure:
    logger.error("block %s failed for good: %s", block.block_id, reason)
    ctx.run.write_shards(failed_block_shards(block, reason))
    return BlockFailure(block, reason, crashed)


class BlockCrashed(Exception):
    """The child process running a block died (a signal or an abnormal exit)."""

    def __init__(self, block: BlockRef, exitcode: int | None) -> None:
        how = f"exit status {exitcode}"
        if exitcode is not None and exitcode < 0:
            try:
                how = signal.Signals(-exitcode).name
            except ValueError:
                how = f"signal {-exitcode}"
        super().__init__(f"decoder crashed: the process running this block died ({how}) "
                         "twice; its frames were not processed")
        self.exitcode = exitcode


def _child_run_block(conn: Any, block: BlockRef, ctx: BlockContext, file_error: str) -> None:
    """Body of the child process of :func:`run_block_in_child`: the report or the error back."""
    apply_storage_retry(ctx.config)
    try:
        report = run_block(block, ctx, None, worker="child", file_error=file_error)
    except BaseException as exc:  # sent back to the parent, which records it
        conn.send(("error", failure_reason(exc)))
    else:
        conn.send(("report", report))
    finally:
        conn.close()


def run_block_in_child(block: BlockRef, ctx: BlockContext, file_error: str = "") -> BlockReport:
    """Run one block in a fresh child process, so that a crash kills only the child.

    Raises
    ------
    BlockCrashed
        The child died before answering (a segmentation fault in a native decoder).
    RuntimeError
        The block raised in the child (its reason as message).
    """
    import multiprocessing

    # spawn, not fork: the parent has threads (prefetching, the lock's heartbeat)
    mp = multiprocessing.get_context("spawn")
    receive, send = mp.Pipe(duplex=False)
    proc = mp.Process(target=_child_run_block, args=(send, block, ctx, file_error),
                      name=f"sfxflow-block-{block.block_id}", daemon=True)
    proc.start()
    send.close()
    try:
        kind, payload = receive.recv()
    except EOFError:
        proc.join()
        raise BlockCrashed(block, proc.exitcode) from None
    finally:
        receive.close()
    proc.join()
    if kind == "error":
        raise RuntimeError(payload)
    assert isinstance(payload, BlockReport)
    return payload


def _not_fetched(block: BlockRef) -> Fetched:
    return Fetched(None, None, 0.0)


def execute_serial(blocks: Sequence[BlockRef], ctx: BlockContext, on_report: OnReport,
                   on_failure: Callable[[BlockFailure], None], *, prefetch_depth: int = 1,
                   attempts: int = 1, file_errors: dict[str, str] | None = None,
                   isolated: Collection[str] = (), lock: RunLock | None = None) -> None:
    """Run blocks one after another in this process (no Dask), reading ahead with
    :func:`sfxflow.io.prefetch.prefetch` (``prefetch_depth`` blocks besides the current one).

    ``attempts`` bounds how often a block whose processing raised is tried. Blocks in
    ``isolated`` (they crashed a process before) run in a child process, once. With a ``lock``,
    the blocks being read or processed are recorded in it before they start.
    """
    file_errors = file_errors or {}
    depth = max(int(prefetch_depth), 0)
    in_flight: list[str] = []
    in_flight_lock = threading.Lock()

    def mark(block_id: str, busy: bool) -> None:
        if lock is None:
            return
        with in_flight_lock:
            if busy:
                in_flight.append(block_id)
            elif block_id in in_flight:
                in_flight.remove(block_id)
            lock.set_in_flight(",".join(in_flight))

    def fetch(block: BlockRef) -> Fetched:
        if block.block_id in isolated:
            return _not_fetched(block)
        mark(block.block_id, True)  # decoding happens here, in the read-ahead thread
        return fetch_block(block, ctx)

    stream = prefetch(list(blocks), fetch, max_in_memory=1 + depth)
    try:
        while True:
            raise_pending_interrupt()  # a SIGTERM swallowed inside the last block stops here
            t0 = time.perf_counter()
            try:
                block, fetched = next(stream)
            except StopIteration:
                break
            if isinstance(fetched, Exception):  # fetch_block captures read errors itself
                raise fetched
            file_error = file_errors.get(block.block_id, "")
            if block.block_id in isolated:
                del fetched
                _run_isolated(block, ctx, file_error, on_report, on_failure)
                continue
            fetched.wait_s = time.perf_counter() - t0
            fetched.prefetched = depth > 0
            last: BaseException | None = None
            for attempt in range(max(attempts, 1)):
                try:
                    report = run_block(block, ctx, fetched if attempt == 0 else None,
                                       file_error=file_error)
                    last = None
                    break
                except (KeyboardInterrupt, SystemExit, MemoryError, RunDirError):
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
            mark(block.block_id, False)
    finally:
        stream.close()  # type: ignore[attr-defined]  # a generator


def _run_isolated(block: BlockRef, ctx: BlockContext, file_error: str, on_report: OnReport,
                  on_failure: Callable[[BlockFailure], None]) -> None:
    logger.info("block %s: running in a separate process (it crashed a process before)",
                block.block_id)
    try:
        report = run_block_in_child(block, ctx, file_error)
    except BlockCrashed as exc:
        on_failure(_record_failure(block, ctx, str(exc), crashed=True))
    except RuntimeError as exc:
        on_failure(_record_failure(block, ctx, str(exc)))
    else:
        on_report(report)


try:
    from distributed.diagnostics.plugin import SchedulerPlugin as _SchedulerPluginBase
except ImportError:  # pragma: no cover - distributed is a dependency
    _SchedulerPluginBase = object  # type: ignore[assignment,misc]


class RunCleanup(_SchedulerPluginBase):  # type: ignore[misc,valid-type]
    """Scheduler plugin: when the run's client goes away without unregistering its worker
    plugin (killed, lost its network), unregister it, so that long-lived workers do not keep
    the run's context (and its prefetcher) for ever; then remove itself.

    Needs sfxflow importable on the scheduler; where it is not, registering fails and the run
    goes on without it (the client still unregisters its plugin when it ends normally).
    """

    def __init__(self, name: str, client_id: str, worker_plugin: str) -> None:
        self.name = name
        self.client_id = client_id
        self.worker_plugin = worker_plugin

    def remove_client(self, scheduler: Any, client: str) -> None:
        if client != self.client_id:
            return
        import asyncio

        async def cleanup() -> None:
            with contextlib.suppress(Exception):  # already unregistered
                await scheduler.unregister_worker_plugin(comm=None, name=self.worker_plugin)
            with contextlib.suppress(Exception):
                scheduler.remove_plugin(name=self.name)

        self._task = asyncio.ensure_future(cleanup())  # referenced until it is done


def _register_cleanup(client: Any, worker_plugin: str) -> str | None:
    name = f"{worker_plugin}-cleanup"
    try:
        client.register_plugin(RunCleanup(name, client.id, worker_plugin), name=name)
    except Exception as exc:  # e.g. a scheduler without sfxflow installed
        logger.info("the scheduler cannot clean up after this client (%s); the worker plugin is "
                    "removed when the run ends", failure_reason(exc))
        return None
    return name


def _quiet_distributed_logs() -> None:
    # CRITICAL, not ERROR: a block still queued when the run stops runs after the plugin is
    # unregistered, and its "Compute Failed" dump is logged at ERROR, past the plugin's filter;
    # tornado too: a comm callback cut by Ctrl-C logs "Exception in callback" with a traceback
    # (asyncio's loop logs one the same way when the callback is its own)
    for name in ("distributed", "tornado", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


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
    cleanup = _register_cleanup(client, name)
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
            except RunDirError:
                # an unwritable run directory fails every block alike: stop now, and let the
                # blocks still running fail without a warning each (the CLI says it, once)
                with contextlib.suppress(Exception):
                    client.run(_quiet_distributed_logs)
                _quiet_distributed_logs()
                raise
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:
                on_failure(_record_failure(block, ctx, failure_reason(exc)))
                continue
            finally:
                fut.release()
            on_report(report)
    except KeyboardInterrupt:
        # the workers are about to cancel the running blocks: each would log a warning about
        # it, when the interruption is the one thing to say (the CLI says it)
        with contextlib.suppress(Exception):
            client.run(_quiet_distributed_logs)
        # and here: a local cluster's nannies live in this process and warn while they stop
        # the workers
        _quiet_distributed_logs()
        raise
    finally:
        for fut in futures:
            if fut.status == "pending":
                fut.cancel()
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(name)
        if cleanup is not None:
            with contextlib.suppress(Exception):
                client.unregister_scheduler_plugin(cleanup)

