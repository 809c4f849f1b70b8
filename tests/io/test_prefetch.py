"""prefetch(): overlap of fetch and compute, bounded number of blocks alive, errors yielded."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest

from sfxflow.io.prefetch import prefetch


class Payload:
    """A fetched block; instances are tracked to count how many are alive at once."""

    def __init__(self, block: int) -> None:
        self.block = block
        self.data = bytearray(1000)


class Tracker:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.alive = 0
        self.max_alive = 0

    def made(self, obj: Payload) -> None:
        with self.lock:
            self.alive += 1
            self.max_alive = max(self.max_alive, self.alive)
        weakref.finalize(obj, self.freed)

    def freed(self) -> None:
        with self.lock:
            self.alive -= 1


def _fetcher(tracker: Tracker, delay_s: float):
    def fetch(block: int) -> Payload:
        time.sleep(delay_s)
        p = Payload(block)
        tracker.made(p)
        return p

    return fetch


def test_overlaps_fetch_and_compute_with_two_blocks_alive() -> None:
    n, fetch_s, compute_s = 8, 0.06, 0.06
    tracker = Tracker()
    t0 = time.perf_counter()
    got = []
    for block, payload in prefetch(range(n), _fetcher(tracker, fetch_s), max_in_memory=2):
        assert isinstance(payload, Payload) and payload.block == block
        got.append(block)
        time.sleep(compute_s)  # the consumer's work on this block
        del payload
    total = time.perf_counter() - t0
    gc.collect()
    assert got == list(range(n))
    serial = n * (fetch_s + compute_s)
    overlapped = n * max(fetch_s, compute_s) + min(fetch_s, compute_s)
    assert total >= n * max(fetch_s, compute_s) * 0.95
    assert total < 0.5 * (serial + overlapped), (total, serial, overlapped)  # far from serial
    assert tracker.max_alive <= 2
    assert tracker.alive == 0


def test_slow_consumer_holds_fetching_back() -> None:
    """With a slow consumer the worker must wait: never more than max_in_memory alive."""
    tracker = Tracker()
    for max_in_memory in (1, 2, 3):
        tracker.max_alive = 0
        for _block, payload in prefetch(range(6), _fetcher(tracker, 0.0), max_in_memory):
            time.sleep(0.02)
            del payload
        assert tracker.max_alive <= max_in_memory
    # with no delay in fetch the bound is actually reached when more than one is allowed
    assert tracker.max_alive == 3


def test_fetch_errors_are_yielded_not_raised() -> None:
    def fetch(block: int) -> int:
        if block == 2:
            raise OSError(f"block {block} unreadable")
        return block * 10

    out = list(prefetch(range(5), fetch))
    assert [b for b, _ in out] == [0, 1, 2, 3, 4]
    assert isinstance(out[2][1], OSError) and "block 2" in str(out[2][1])
    assert [r for b, r in out if b != 2] == [0, 10, 30, 40]


def test_early_exit_stops_the_worker() -> None:
    fetched = []

    def fetch(block: int) -> int:
        fetched.append(block)
        return block

    gen = prefetch(range(1000), fetch, max_in_memory=2)
    assert next(gen) == (0, 0)
    gen.close()
    time.sleep(0.2)
    assert len(fetched) <= 3


def test_keyboard_interrupt_in_fetch_propagates() -> None:
    def fetch(block: int) -> int:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        list(prefetch(range(3), fetch))


def test_bad_max_in_memory() -> None:
    with pytest.raises(ValueError, match="max_in_memory"):
        list(prefetch([1], lambda b: b, max_in_memory=0))
