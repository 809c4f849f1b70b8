"""LCLS-II XTC2 files, decoded by SLAC's own ``psana`` (the extra ``sfxflow[lcls]``).

An XTC2 file is a sequence of datagrams: a Configure transition (which names every detector,
its segments and the fields each carries), then BeginRun, steps, and one ``L1Accept`` datagram
per event. Each datagram starts with a fixed header (time stamp, environment word whose bits
24-27 give the transition, then the top ``Xtc`` whose ``extent`` is the datagram's size less the
12-byte transition header), so the events of a file can be indexed from the headers alone, as
psana's own small-data index files do; a block of events is then one ranged read of the file
(local or any fsspec URL), decoded datagram by datagram with psana's ``Dgram`` against the
file's Configure.

Pixels: the first detector of the Configure (by name) whose segments carry a 2-D ``raw`` (or ``calib``/``image``) array, in segment order, stacked along the
slow-scan axis (see :mod:`sfxflow.io.facility`), in the ADU of the CrystFEL ``.geom`` that
describes them (a Jungfrau's gain bits 14-15 must be zero: raw multi-gain data need psana's
calibration constants, which are fetched from the LCLS database and are not read here).
Per-event photon energy: the electron-beam record's ``ebeamPhotonEnergy`` (eV) fills the
geometry's ``photon_energy`` reference when it names one.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from sfxflow.errors import GeometryError, SourceError
from sfxflow.io import storage
from sfxflow.io.facility import FrameBuilder, RecentlyOpened, require
from sfxflow.io.source_base import ImageSource

if TYPE_CHECKING:
    from sfxflow.io.geometry import CrystfelGeometry
    from sfxflow.models import Frame

__all__ = ["Xtc2Source", "index_datagrams"]

#: transition header (time stamp 8 bytes, env 4) + top Xtc header (src 4, damage+type 4,
#: extent 4); the datagram's size is 12 + extent
_HEADER = struct.Struct("<IIIIII")
_TRANSITION_BYTES = 12
L1ACCEPT = 12
CONFIGURE = 2
_PIXEL_FIELDS = ("raw", "calib", "image")
_PHOTON_ENERGY_FIELDS = ("ebeamPhotonEnergy", "photon_energy_ev")


def index_datagrams(fh: Any, url: str) -> tuple[list[tuple[int, int, int]], int]:
    """``[(offset, size, transition), ...]`` of every datagram, from the headers alone.

    Returns the list and the file size read. A truncated last datagram is a
    :class:`~sfxflow.errors.SourceError` naming its offset.
    """
    out: list[tuple[int, int, int]] = []
    offset = 0
    while True:
        fh.seek(offset)
        head = fh.read(_HEADER.size)
        if not head:
            return out, offset
        if len(head) < _HEADER.size:
            raise SourceError(url, f"truncated XTC2 datagram header at byte {offset}")
        _t0, _t1, env, _src, _dt, extent = _HEADER.unpack(head)
        size = _TRANSITION_BYTES + extent
        if extent < _HEADER.size - _TRANSITION_BYTES:
            raise SourceError(url, f"corrupt XTC2 datagram at byte {offset} (extent {extent})")
        out.append((offset, size, (env >> 24) & 0xF))
        offset += size


#: datagram indexes of recently opened files, keyed by URL and content stamp
_INDEXES = RecentlyOpened(16)


def _datagrams_of(url: str, storage_options: Mapping[str, Any] | None
                  ) -> tuple[list[tuple[int, int, int]], int]:
    def index() -> tuple[list[tuple[int, int, int]], int]:
        with storage.open_url(url, "rb", storage_options) as fh:
            return index_datagrams(fh, url)

    size, version = storage.object_stamp(url, storage_options)
    return _INDEXES.get((url, f"{size}:{version}"), index)


class Xtc2Source(ImageSource):
    """The events of one XTC2 file (``L1Accept`` datagrams) as frames."""

    kind = "xtc2"

    def __init__(self, url: str, geometry: CrystfelGeometry | None,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        self._dgram = require("psana.dgram")
        self.url = url
        self._options = storage_options
        if geometry is None:
            raise GeometryError(f"{url}: an XTC2 file needs a CrystFEL geometry "
                                "(expected --geometry FILE.geom)")
        datagrams, self.size_bytes = _datagrams_of(url, storage_options)
        if not datagrams or datagrams[0][2] != CONFIGURE:
            raise SourceError(url, "not an XTC2 file (expected a Configure datagram first)")
        c_off, c_size, _ = datagrams[0]
        self._config_bytes = storage.read_bytes(url, storage_options, c_off, c_off + c_size)
        try:
            self._config = self._dgram.Dgram(view=memoryview(self._config_bytes), offset=0)
        except Exception as exc:  # psana raises bare Exceptions on damaged datagrams
            raise SourceError(url, f"psana cannot decode the Configure datagram ({exc})") from exc
        self._events = [(o, s) for o, s, t in datagrams if t == L1ACCEPT]
        self.n_frames = len(self._events)
        self.detector_name, self._field = self._pixel_detector()
        self._builder = FrameBuilder(geometry, url)

    def _pixel_detector(self) -> tuple[str, str]:
        described = getattr(self._config, "software", None)
        for name, segments in sorted(vars(described).items() if described else ()):
            if not isinstance(segments, dict):
                continue
            for seg in segments.values():
                alg = getattr(seg, "raw", None)
                for field in _PIXEL_FIELDS:
                    if alg is not None and field in vars(alg):
                        return name, field
        raise SourceError(self.url, "no area detector with a 2-D raw, calib or image array in "
                                    "its Configure")

    def read_frames(self, start: int, stop: int) -> list[Frame]:
        self._check_range(start, stop)
        if start == stop:
            return []
        first = self._events[start][0]
        last_off, last_size = self._events[stop - 1]
        buf = storage.read_bytes(self.url, self._options, first, last_off + last_size)
        view = memoryview(buf)
        frames = []
        for i in range(start, stop):
            offset = self._events[i][0] - first
            try:
                d = self._dgram.Dgram(config=self._config, view=view, offset=offset)
            except Exception as exc:
                raise SourceError(self.url, f"psana cannot decode event {i} ({exc})", i) from exc
            frames.append(self._frame(d, i))
        return frames

    def _frame(self, d: Any, i: int) -> Frame:
        segments = getattr(d, self.detector_name, None)
        if not segments:
            raise SourceError(self.url, f"event {i} has no {self.detector_name} data", i)
        arrays = [getattr(segments[k].raw, self._field) for k in sorted(segments)]
        modules = np.stack(arrays) if arrays[0].ndim == 2 else arrays[0]
        values: dict[str, float] = {}
        ebeam = getattr(d, "ebeam", None)
        if ebeam:
            seg = next(iter(ebeam.values())).raw
            energy = next((getattr(seg, f) for f in _PHOTON_ENERGY_FIELDS if hasattr(seg, f)),
                          None)
            if energy is not None:
                values["photon_energy"] = float(energy)
        return self._builder.from_modules(modules, i, f"//{i}", values)


def write_xtc2(path: str, modules: Any, photon_energy_ev: Any, *,
               detector: str = "jungfrau", experiment: str = "sfxsim01", run: int = 1) -> None:
    """Write events as an LCLS-II XTC2 file with psana's own writer (``DgramEdit``).

    A Jungfrau-like area detector (``raw`` field, one segment per module, uint16 as the
    detector's ADU, so values must fit 14 bits and carry no gain bits) and the electron-beam
    record's ``ebeamPhotonEnergy`` per event; for tests and benchmarks that read the same
    frames as CXI and as XTC2.

    Parameters
    ----------
    path : output file.
    modules : ``(events, modules, ss, fs)`` pixel values.
    photon_energy_ev : one photon energy per event.
    """
    dgramedit = require("psana.dgramedit")
    transition = require("psana.psexp").TransitionId
    pixels = np.asarray(modules)
    if pixels.ndim != 4:
        raise ValueError(f"expected (events, modules, ss, fs) pixels, got shape {pixels.shape}")
    if np.nanmax(pixels, initial=0) >= 1 << 14 or np.nanmin(pixels, initial=0) < 0:
        raise ValueError("Jungfrau raw pixels must lie in 0 .. 16383 ADU (14 bits)")
    energies = np.broadcast_to(np.asarray(photon_energy_ev, dtype=np.float64), pixels.shape[:1])
    out = bytearray(max(64 << 20, 2 * pixels[0].nbytes + (1 << 20)))
    ts = 0
    config = dgramedit.DgramEdit(transition_id=transition.Configure, ts=ts)
    segments = [
        config.Detector(dgramedit.DetectorDef(detector, "jungfrau", f"sim_module{m:02d}"),
                        dgramedit.AlgDef("raw", 0, 2, 0), {"raw": (np.uint16, 2)},
                        nodeId=1, namesId=m, segment=m)
        for m in range(pixels.shape[1])]
    ebeam = config.Detector(dgramedit.DetectorDef("ebeam", "ebeam", "sim_ebeam"),
                            dgramedit.AlgDef("raw", 2, 0, 0),
                            {"ebeamPhotonEnergy": (np.float64, 0)},
                            nodeId=1, namesId=pixels.shape[1] + 1, segment=0)
    runinfo = config.Detector(dgramedit.DetectorDef("runinfo", "runinfo", ""),
                              dgramedit.AlgDef("runinfo", 0, 0, 1),
                              {"expt": (str, 1), "runnum": (np.uint32, 0)},
                              nodeId=1, namesId=pixels.shape[1] + 2, segment=0)
    with open(path, "wb") as fh:
        def save(dg: Any) -> None:
            dg.save(out)
            fh.write(out[:dg.size])

        def transition_dgram(tid: int) -> Any:
            nonlocal ts
            ts += 1
            return dgramedit.DgramEdit(transition_id=tid, config_dgramedit=config, ts=ts)

        save(config)
        begin = transition_dgram(transition.BeginRun)
        runinfo.runinfo.expt = experiment
        runinfo.runinfo.runnum = run
        begin.adddata(runinfo.runinfo)
        save(begin)
        save(transition_dgram(transition.BeginStep))
        save(transition_dgram(transition.Enable))
        for event, energy in zip(pixels, energies, strict=True):
            dg = transition_dgram(transition.L1Accept)
            for seg, module in zip(segments, event, strict=True):
                seg.raw.raw = np.ascontiguousarray(module, dtype=np.uint16)
                dg.adddata(seg.raw)
            ebeam.raw.ebeamPhotonEnergy = float(energy)
            dg.adddata(ebeam.raw)
            save(dg)
        for tid in (transition.Disable, transition.EndStep, transition.EndRun):
            save(transition_dgram(tid))
