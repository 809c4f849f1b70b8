"""``sfxflow process --stream tcp://host:port``: process frames while the beamline sends them.

The receiver (on the client) takes trains from a karabo-bridge stream and writes them, a block
of frames at a time, as CXI spool files in ``RUN/spool/``; every few seconds the ordinary file
pipeline (:func:`~sfxflow.pipeline.run.run_process`) runs over the spool on a cluster started
once for the whole stream, so the run directory, summary, stream and report are those of any
run, refreshed while the experiment goes (a spooled block whose shards verify is not processed
again). The stream ends after ``idle_s`` without a train, or after ``max_frames``.

No frame is lost on the way: a request/reply stream (the bridge's default) sends the next train
only when asked; a dropped connection is reopened and the stream goes on; trains already in the
spool (a server that replays, a resumed stream) are skipped by train id; a frame in the spool is
processed by this run or by the next one over the same run directory.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sfxflow.errors import ConfigError, InputError
from sfxflow.io import storage
from sfxflow.pipeline.config import ProcessConfig

__all__ = ["LiveResult", "run_live"]

logger = logging.getLogger(__name__)

FIRST_TRAIN_WAIT_S = 60.0


@dataclass
class LiveResult:
    """What a live stream brought and what became of it."""

    trains_received: int = 0
    frames_received: int = 0
    trains_skipped: int = 0
    frames_spooled: int = 0
    spool_files: int = 0
    reconnects: int = 0
    cycles: int = 0
    wall_s: float = 0.0
    last: Any = None  # the last cycle's RunResult


def _spooled(spool: Path) -> set[int]:
    from sfxflow.io.karabo import spooled_trains

    done: set[int] = set()
    for first, last in spooled_trains(spool):
        done.update(range(first, last + 1))
    return done


class _Spooler:
    """Trains received and not yet spooled; :meth:`flush` writes them as one spool file."""

    def __init__(self, folder: Path, data_path: str, flatten: bool, result: LiveResult) -> None:
        self.folder, self.data_path, self.flatten, self.result = folder, data_path, flatten, result
        self.pending: list[Any] = []
        self.n_frames = 0

    def add(self, train: Any) -> None:
        self.pending.append(train)
        self.n_frames += train.n_frames

    def flush(self) -> None:
        from sfxflow.io.karabo import write_spool

        if not self.pending:
            return
        written = write_spool(self.folder, self.pending, self.data_path, self.flatten)
        self.result.frames_spooled += written.n_frames
        self.result.spool_files += 1
        self.pending, self.n_frames = [], 0


def _receive(receiver: Any, seen: set[int], spooler: _Spooler, cycle: Callable[[], None], *,
             block: int, idle_s: float, update_s: float, max_frames: int, poll_s: float) -> None:
    """Receive trains until the stream ends (``idle_s`` quiet, or ``max_frames`` received):
    new trains spooled a block at a time (sooner when the stream pauses), a processing
    ``cycle`` at least every ``update_s`` and a last one at the end."""
    result = spooler.result
    last_train = time.monotonic()
    last_cycle = time.monotonic()
    while True:
        train = receiver.next_train()
        now = time.monotonic()
        if train is not None:
            last_train = now
            result.trains_received += 1
            result.frames_received += train.n_frames
            if train.train_id in seen:
                result.trains_skipped += 1
            else:
                seen.add(train.train_id)
                spooler.add(train)
        quiet = train is None and spooler.pending and now - last_train >= poll_s
        if spooler.pending and (spooler.n_frames >= block or quiet):
            spooler.flush()
        patience = idle_s if result.trains_received else max(idle_s, FIRST_TRAIN_WAIT_S)
        done = (max_frames and result.frames_received >= max_frames) or \
            now - last_train >= patience
        if done or now - last_cycle >= update_s:
            if done:
                spooler.flush()
            cycle()
            last_cycle = time.monotonic()
            if done:
                break


def run_live(endpoint: str, out: str, config: ProcessConfig, *,
             socket_type: str = "REQ", idle_s: float = 30.0, update_s: float = 5.0,
             max_frames: int = 0, poll_s: float = 0.5,
             storage_options: Mapping[str, Any] | None = None,
             reporter: Any = None,
             on_cycle: Callable[[LiveResult], None] | None = None) -> LiveResult:
    """Receive, spool and process a live stream into the run directory ``out`` (local).

    Parameters
    ----------
    endpoint : the bridge's ZeroMQ endpoint (``tcp://host:port``).
    out : run directory (a local path: the spool is written with HDF5).
    config : as for :func:`~sfxflow.pipeline.run.run_process`; ``io.geometry`` is required.
    socket_type : ``REQ`` (the bridge's default REP server), ``PULL`` (a PUSH server) or ``SUB``
        (a PUB server, which drops trains a slow receiver misses).
    idle_s : end the stream after this long without a train (before the first train, wait at
        least ``FIRST_TRAIN_WAIT_S``: a beamline server may take that long to start sending).
    update_s : least seconds between processing cycles (rates and report refresh).
    max_frames : stop after this many frames received (0 = no limit).
    reporter : passed on to :func:`~sfxflow.pipeline.run.run_process` (the report's writer).
    """
    from sfxflow.io.facility import modules_stacked
    from sfxflow.io.geometry import read_geom
    from sfxflow.io.karabo import BridgeReceiver, spool_data_path
    from sfxflow.pipeline.cluster import open_cluster
    from sfxflow.pipeline.run import resolve_config, run_process

    if not storage.is_local(out):
        raise ConfigError(f"--out {storage.shown_url(out)}: a live stream needs a local run "
                          "directory (its frames are spooled there as they arrive)")
    if not config.io.geometry:
        raise ConfigError("--stream needs --geometry FILE.geom (the detector's layout)")
    config = resolve_config(config)
    geometry = read_geom(config.io.geometry, dict(storage_options or {}))
    data_path = spool_data_path(geometry)
    flatten = modules_stacked(geometry)
    spool = storage.local_path(out) / "spool"
    seen = _spooled(spool)
    block = config.io.frames_per_block
    result = LiveResult()
    receiver = BridgeReceiver(endpoint, socket_type, poll_s)
    t0 = time.monotonic()
    with open_cluster(config.cluster) as (client, _info):
        cycle_config = config
        if client is not None:
            # each cycle joins the cluster started here: no start-up, warm workers
            cycle_config = dataclasses.replace(config, cluster=dataclasses.replace(
                config.cluster, scheduler=client.scheduler.address, kind="local"))

        def cycle() -> None:
            if result.spool_files == 0:
                return
            result.last = run_process([str(spool)], out, cycle_config,
                                      storage_options=storage_options, reporter=reporter)
            result.cycles += 1
            if on_cycle is not None:
                on_cycle(result)

        spooler = _Spooler(spool, data_path, flatten, result)
        try:
            _receive(receiver, seen, spooler, cycle, block=block, idle_s=idle_s,
                     update_s=update_s, max_frames=max_frames, poll_s=poll_s)
        finally:
            receiver.close()
            result.reconnects = receiver.reconnects
    result.wall_s = time.monotonic() - t0
    if result.spool_files == 0 and result.cycles == 0:
        raise InputError(f"--stream {endpoint}: no trains arrived within "
                         f"{max(idle_s, FIRST_TRAIN_WAIT_S):g} s")
    return result
