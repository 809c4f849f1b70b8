"""A live stream of trains from the beamline: European XFEL's karabo-bridge protocol (ZeroMQ +
msgpack), received with the facility's own ``karabo-bridge`` client (extra ``sfxflow[euxfel]``),
and the spool files its frames are kept in.

The bridge sends one message per train: for each source (``SPB_IRDA_JF4M/DET/JNGFR01:daqOutput``
...) a dict of arrays keyed like the run files (``data.adc`` (cells, ss, fs) for JUNGFRAU,
``image.data`` for AGIPD and LPD) plus metadata with the train id. The frames of a train are its
memory cells, with the modules in module-number order (see :mod:`sfxflow.io.facility`).

Received frames are written, a block at a time, as CXI spool files in the run directory
(``spool/stream-TTTTTTTTTT-TTTTTTTTTT.cxi``: the first and last train id), atomically (written
under a temporary name, then renamed), so a frame that has reached the spool is never lost and
the ordinary file pipeline processes it; the train ids of the spool files already written tell
a resumed stream which trains to skip.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from sfxflow.errors import ConfigError, SourceError
from sfxflow.io.facility import PIXEL_KEYS, require
from sfxflow.io.hdf5 import DEFAULT_DATA_PATHS

__all__ = ["BridgeReceiver", "SpooledFrames", "TrainFrames", "spooled_trains",
           "train_frames", "write_spool"]

_MODULE_NUMBER = re.compile(r"(\d+)(?:CH\d+)?(?::[A-Za-z]+)?$")
_SPOOL_NAME = re.compile(r"^stream-(\d{10,})-(\d{10,})\.cxi$")
TRAIN_ID_PATH = "/entry_1/train_id"
CELL_PATH = "/entry_1/cell"


@dataclass(frozen=True)
class TrainFrames:
    """The frames of one train: ``pixels`` is ``(cells, modules, ss, fs)``."""

    train_id: int
    pixels: np.ndarray

    @property
    def n_frames(self) -> int:
        return int(self.pixels.shape[0])


def _module_number(source: str) -> int:
    m = _MODULE_NUMBER.search(source.split(":")[0])
    return int(m.group(1)) if m else 0


def train_frames(data: Mapping[str, Any], meta: Mapping[str, Any]) -> TrainFrames:
    """The frames of one bridge message (one train), modules in module-number order.

    >>> d = {f"DET/JNGFR0{m}:daqOutput": {"data.adc": np.full((2, 4, 8), m, np.float32)}
    ...      for m in (2, 1)}
    >>> t = train_frames(d, {"DET/JNGFR01:daqOutput": {"timestamp.tid": 7}})
    >>> t.train_id, t.pixels.shape, t.pixels[0, :, 0, 0].tolist()
    (7, (2, 2, 4, 8), [1.0, 2.0])
    """
    modules = []
    for source in sorted(data, key=_module_number):
        content = data[source]
        key = next((k for k in PIXEL_KEYS if k in content), None)
        if key is not None:
            modules.append(np.asarray(content[key], dtype=np.float32))
    if not modules:
        raise SourceError("karabo bridge", f"a train without detector pixels (expected one of "
                                           f"{', '.join(PIXEL_KEYS)} in {sorted(data)})")
    shapes = {m.shape for m in modules}
    if len(shapes) != 1:
        raise SourceError("karabo bridge", f"modules of different shapes {sorted(shapes)}")
    stacked = np.stack(modules, axis=1)  # (cells, modules, ss, fs)
    if stacked.ndim == 3:  # one cell per train, sent without its axis
        stacked = stacked[None]
    metas = list(meta.values()) + [c.get("metadata", {}) for c in data.values()]
    tid = next((int(m["timestamp.tid"]) for m in metas
                if isinstance(m, Mapping) and "timestamp.tid" in m), None)
    if tid is None:
        raise SourceError("karabo bridge", "a train without a train id (timestamp.tid)")
    return TrainFrames(tid, stacked)


class BridgeReceiver:
    """Trains from a karabo-bridge endpoint, reconnecting after a dropped connection.

    ``next_train()`` returns a :class:`TrainFrames`, or ``None`` when nothing came within
    ``poll_s`` (the caller decides when a quiet stream has ended). After ``reconnect_s`` of
    silence the socket is closed and opened again: a request socket whose server restarted
    would otherwise wait forever for a reply that was lost with the connection. (Not sooner: a
    reply to a request whose socket was closed is dropped by ZeroMQ, so a server slower than
    ``reconnect_s`` per train would lose that train.)
    """

    def __init__(self, endpoint: str, socket_type: str = "REQ", poll_s: float = 1.0,
                 reconnect_s: float = 5.0) -> None:
        self._kb = require("karabo_bridge")
        if not re.match(r"^(tcp|ipc|inproc)://", endpoint):
            raise ConfigError(f"--stream {endpoint!r}: expected a ZeroMQ endpoint such as "
                              "tcp://host:port")
        self.endpoint = endpoint
        self.socket_type = socket_type
        self.poll_ms = max(int(poll_s * 1000), 10)
        self.reconnect_s = reconnect_s
        self.reconnects = 0
        self._client: Any = None
        self._context: Any = None
        self._quiet_since: float | None = None

    def _connect(self) -> Any:
        if self._client is None:
            import zmq

            self._context = zmq.Context()
            self._client = self._kb.Client(self.endpoint, sock=self.socket_type,
                                           timeout=self.poll_ms / 1000, context=self._context)
        return self._client

    def next_train(self) -> TrainFrames | None:
        client = self._connect()
        try:
            data, meta = client.next()
        except TimeoutError:
            now = time.monotonic()
            if self._quiet_since is None:
                self._quiet_since = now
            elif now - self._quiet_since >= self.reconnect_s:
                self.close()
                self.reconnects += 1
                self._quiet_since = now
            return None
        self._quiet_since = None
        return train_frames(data, meta)

    def close(self) -> None:
        if self._client is not None:
            # linger 0: a request the server never answered must not block the close
            self._client._socket.close(linger=0)
            self._context.term()
            self._client = None


@dataclass(frozen=True)
class SpooledFrames:
    """One spool file written: its path and what it holds."""

    path: Path
    first_train: int
    last_train: int
    n_frames: int


def spool_data_path(geometry: Any) -> str:
    """Where the spool files keep the pixels: the geometry's data path (frames first)."""
    if getattr(geometry, "frame_dim", 0) not in (0, None):
        raise ConfigError(f"{geometry.source}: a live stream is spooled with the frame axis "
                          "first; the geometry must say dim0 = %")
    return getattr(geometry, "data_path", None) or DEFAULT_DATA_PATHS[0]


def write_spool(folder: Path, trains: Iterable[TrainFrames], data_path: str,
                flatten_modules: bool) -> SpooledFrames:
    """Write trains as one CXI spool file, atomically; frames first, then ``(ss, fs)`` (modules
    stacked) or ``(modules, ss, fs)`` as the geometry lays them out."""
    trains = list(trains)
    if not trains:
        raise ValueError("no trains to spool")
    pixels = np.concatenate([t.pixels for t in trains])
    if flatten_modules:
        pixels = pixels.reshape(pixels.shape[0], -1, pixels.shape[-1])
    train_ids = np.concatenate([np.full(t.n_frames, t.train_id, np.uint64) for t in trains])
    cells = np.concatenate([np.arange(t.n_frames, dtype=np.int32) for t in trains])
    first, last = int(train_ids[0]), int(train_ids[-1])
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"stream-{first:010d}-{last:010d}.cxi"
    temporary = folder / f".tmp-{final.name}-{os.getpid()}"
    with h5py.File(temporary, "w") as f:
        chunks = (1, *pixels.shape[1:])
        f.create_dataset(data_path, data=pixels, chunks=chunks)
        f.create_dataset(TRAIN_ID_PATH, data=train_ids)
        f.create_dataset(CELL_PATH, data=cells)
    os.replace(temporary, final)
    return SpooledFrames(final, first, last, int(pixels.shape[0]))


def spooled_trains(folder: Path) -> list[tuple[int, int]]:
    """``(first, last)`` train ids of the spool files already in ``folder``."""
    if not folder.is_dir():
        return []
    return sorted((int(m.group(1)), int(m.group(2))) for p in folder.iterdir()
                  if (m := _SPOOL_NAME.match(p.name)))
