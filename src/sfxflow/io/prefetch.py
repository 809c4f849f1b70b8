"""Fetch the next block in a background thread while the current one is processed, in bounded RAM.

>>> [(b, r) for b, r in prefetch([1, 2, 3], lambda b: b * 10)]
[(1, 10), (2, 20), (3, 30)]
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["prefetch"]

log = logging.getLogger(__name__)

B = TypeVar("B")
R = TypeVar("R")

_DONE = object()


class _Fatal:
    """A BaseException (not Exception) from fetch: re-raised in the consumer, not yielded."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


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
    it), so one thread overlaps it with the consumer's computation.
    """
    if max_in_memory < 1:
        raise ValueError(f"max_in_memory must be >= 1, got {max_in_memory}")
    slots = threading.Semaphore(max_in_memory)
    results: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()

    def worker() -> None:
        try:
            for block in blocks:
                while not slots.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                try:
                    item: Any = (block, fetch(block))
                except Exception as exc:
                    log.debug("fetch of %r failed: %s", block, exc)
                    item = (block, exc)
                except BaseException as exc:
                    results.put(_Fatal(exc))
                    return
                results.put(item)
                del item
        except BaseException as exc:  # the blocks iterable itself failed
            results.put(_Fatal(exc))
            return
        results.put(_DONE)

    thread = threading.Thread(target=worker, name="sfxflow-prefetch", daemon=True)
    thread.start()
    holding = False
    try:
        while True:
            # The consumer asked for the next block, so it is done with the previous one. With
            # room for more than one block, the next is already fetched or being fetched under
            # its own slot: take it first and only then free the previous slot, so the worker
            # never starts block k+2 while block k may still be referenced by the caller.
            if holding and max_in_memory == 1:
                slots.release()
                holding = False
            item = results.get()
            if holding:
                slots.release()
                holding = False
            if item is _DONE:
                return
            if isinstance(item, _Fatal):
                raise item.exc
            holding = True
            yield item
            del item
    finally:
        stop.set()
        if holding:
            slots.release()
        thread.join(timeout=5.0)
