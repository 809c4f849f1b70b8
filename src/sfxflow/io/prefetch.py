"""Fetch blocks ahead in a background thread while the current one is processed, in bounded RAM.

One mechanism, :class:`Prefetcher` (keyed reads ahead, at most ``depth`` in flight), serves
both executors: a Dask worker asks for blocks as the scheduler queues them there, and the
serial executor walks its blocks in order through :func:`prefetch`.

>>> [(b, r) for b, r in prefetch([1, 2, 3], lambda b: b * 10)]
[(1, 10), (2, 20), (3, 30)]
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

__all__ = ["Prefetcher", "prefetch"]

log = logging.getLogger(__name__)

B = TypeVar("B")
R = TypeVar("R")


class Prefetcher(Generic[B, R]):
    """Reads blocks ahead in one background thread, holding at most ``depth`` of them.

    ``want(key, block)`` queues a block (e.g. when its task is queued on this worker);
    ``take(key, block)`` returns ``(fetch(block), seconds waited, read ahead?)``, waiting for an
    in-flight read or reading now when the block was never queued, and then starts the next
    queued read; ``drop(key)`` forgets a block that went elsewhere. ``depth = 0`` reads nothing
    ahead.
    """

    def __init__(self, fetch: Callable[[B], R], depth: int = 1) -> None:
        self.fetch = fetch
        self.depth = max(int(depth), 0)
        self._lock = threading.Lock()
        self._pending: OrderedDict[Hashable, B] = OrderedDict()
        self._inflight: dict[Hashable, Future[R]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sfxflow-prefetch")

    def want(self, key: Hashable, block: B) -> None:
        if self.depth == 0:
            return
        with self._lock:
            if key in self._inflight or key in self._pending:
                return
            self._pending[key] = block
            self._pump()

    def drop(self, key: Hashable) -> None:
        with self._lock:
            self._pending.pop(key, None)
            fut = self._inflight.pop(key, None)
            if fut is not None:
                fut.cancel()
            self._pump()

    def _pump(self) -> None:  # caller holds the lock
        while self._pending and len(self._inflight) < self.depth:
            key, block = self._pending.popitem(last=False)
            self._inflight[key] = self._pool.submit(self.fetch, block)

    def take(self, key: Hashable, block: B) -> tuple[R, float, bool]:
        with self._lock:
            self._pending.pop(key, None)
            fut = self._inflight.pop(key, None)
        t0 = time.perf_counter()
        ahead = fut is not None and not fut.cancelled()
        result = fut.result() if ahead and fut is not None else self.fetch(block)
        waited = time.perf_counter() - t0
        with self._lock:
            self._pump()
        return result, waited, ahead

    def held(self) -> int:
        """Reads in flight or done and not yet taken."""
        with self._lock:
            return len(self._inflight)

    def close(self) -> None:
        with self._lock:
            for fut in self._inflight.values():
                fut.cancel()
            self._inflight.clear()
            self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)


def prefetch(
    blocks: Iterable[B],
    fetch: Callable[[B], R],
    max_in_memory: int = 2,
) -> Iterator[tuple[B, R | Exception]]:
    """Yield ``(block, fetch(block))`` in order, fetching ahead in one background thread.

    Parameters
    ----------
    blocks : the blocks, in processing order.
    fetch : reads one block (e.g. :func:`sfxflow.io.sources.read_block` with options bound).
    max_in_memory : most fetched blocks alive at once, counting the one the consumer holds
        (2 = the current block plus the next). Must be >= 1; 1 means no overlap.

    Yields
    ------
    ``(block, result)``, or ``(block, exception)`` when ``fetch`` raised an :class:`Exception`:
    the consumer records the failure and goes on. A fetched block counts as released when the
    consumer asks for the next one, so it should drop its reference by then.

    Notes
    -----
    Fetching is I/O and decompression (h5py, CBFlib and zlib/LZ4 release the GIL for much of
    it), so one thread overlaps it with the consumer's computation. A new read starts when the
    consumer asks for the next block (it has let the previous one go), not before.
    """
    if max_in_memory < 1:
        raise ValueError(f"max_in_memory must be >= 1, got {max_in_memory}")

    def fetch_or_error(block: B) -> R | Exception:
        try:
            return fetch(block)
        except Exception as exc:
            log.debug("fetch of %r failed: %s", block, exc)
            return exc

    pf: Prefetcher[B, R | Exception] = Prefetcher(fetch_or_error, depth=max_in_memory - 1)
    source = enumerate(blocks)
    ahead: deque[tuple[int, B]] = deque()

    def want_next() -> None:
        for key, block in source:
            ahead.append((key, block))
            pf.want(key, block)
            return

    try:
        for _ in range(pf.depth):
            want_next()
        while True:
            if not ahead:
                want_next()
                if not ahead:
                    return
            key, block = ahead.popleft()
            result, _, _ = pf.take(key, block)
            # the consumer asked for this block, so it is done with the previous one: the read
            # after the window starts now and overlaps the consumer's work on this block
            want_next()
            yield block, result
            del result
    finally:
        pf.close()
