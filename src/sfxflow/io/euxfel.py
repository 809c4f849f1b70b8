"""European XFEL runs (a folder of ``RAW-``/``CORR-R####-<source>-S#####.h5`` sequence files),
read through European XFEL's own ``extra-data`` (the extra ``sfxflow[euxfel]``).

A run is one input: its frames are the (train, memory cell) pairs of its multi-module detector,
train by train, cells in order, so blocks of frames are cut from a run as from any file. The
detector is found by extra-data (``identify_multimod_detectors``); a run folder holding several
is refused, naming them (link one detector's sequence files into a folder of their own). The pixels of each frame are the modules stacked in module order (see
:mod:`sfxflow.io.facility`), described by a CrystFEL ``.geom`` as for CXI files; extra-geom
writes such a file for AGIPD, LPD and JUNGFRAU layouts (``write_crystfel_geom``).

Pixel arrays read: ``data.adc`` (JUNGFRAU) and ``image.data`` (AGIPD, LPD, DSSC); the values are
taken in the geometry's ADU (``adu_per_photon``), as corrected (``CORR``) or raw (``RAW``) data
hold them. Frames whose modules are missing from a train read as NaN and fail at read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sfxflow.errors import GeometryError, SourceError
from sfxflow.io.facility import PIXEL_KEYS, FrameBuilder, RecentlyOpened, require
from sfxflow.io.source_base import ImageSource

if TYPE_CHECKING:
    from sfxflow.io.geometry import CrystfelGeometry
    from sfxflow.models import Frame

__all__ = ["EuXfelRunSource", "is_euxfel_run"]

_SEQUENCE_FILE = re.compile(r"^(RAW|CORR)-R\d{4}-.+-S\d{5}\.h5$", re.IGNORECASE)


def is_euxfel_run(path: str | Path) -> bool:
    """A local folder holding European XFEL sequence files."""
    p = Path(path)
    try:
        return p.is_dir() and any(_SEQUENCE_FILE.match(c.name) for c in p.iterdir())
    except OSError:
        return False


#: runs opened recently, keyed by folder and the newest modification time of its files
_RUNS = RecentlyOpened(4)


def _open_run(ed: Any, url: str) -> Any:
    folder = Path(url)
    try:
        stamp = max((c.stat().st_mtime_ns for c in folder.iterdir()), default=0)
    except OSError as exc:
        raise SourceError(url, f"cannot list the run folder ({exc})") from exc

    def open_run() -> Any:
        try:
            return ed.RunDirectory(url)
        except Exception as exc:  # extra-data raises plain Exceptions for unreadable runs
            raise SourceError(url, f"not a readable European XFEL run ({exc})") from exc

    return _RUNS.get((str(folder.resolve()), stamp), open_run)


class EuXfelRunSource(ImageSource):
    """The frames of one European XFEL run folder, train by train and cell by cell."""

    kind = "euxfel"

    def __init__(self, url: str, geometry: CrystfelGeometry | None) -> None:
        ed = require("extra_data")
        from extra_data.components import identify_multimod_detectors

        self.url = url
        if geometry is None:
            raise GeometryError(f"{url}: a European XFEL run needs a CrystFEL geometry "
                                "(expected --geometry FILE.geom; extra-geom can write one)")
        self._run = _open_run(ed, url)
        found = sorted(identify_multimod_detectors(self._run), key=lambda d: d[0])
        if not found:
            raise SourceError(url, "no multi-module detector (AGIPD, LPD, JUNGFRAU, DSSC) in "
                                   "this run")
        if len(found) > 1:
            names = ", ".join(name for name, _cls in found)
            raise SourceError(url, f"several detectors in this run ({names}); process one "
                                   "run folder per detector")
        name, component = found[0]
        self.detector_name = name
        self._det = component(self._run, detector_name=name)
        self._key = next((k for k in PIXEL_KEYS if k in self._keys()), None)
        if self._key is None:
            raise SourceError(url, f"detector {name} has none of the pixel arrays "
                                   f"{', '.join(PIXEL_KEYS)}")
        # JUNGFRAU stores one entry per train holding every memory cell; AGIPD, LPD and DSSC
        # one entry per pulse
        source = next(iter(self._det.source_to_modno))
        entry_shape = tuple(self._run[source, self._key].entry_shape)
        cells = entry_shape[0] if self._key == "data.adc" and len(entry_shape) == 3 else 1
        counts = np.asarray(self._det.frame_counts, dtype=np.int64) * cells
        self.train_ids = np.asarray(self._det.frame_counts.index, dtype=np.uint64)
        self._frames_per_train = counts
        self._first_frame = np.concatenate([[0], np.cumsum(counts)])
        self.n_frames = int(self._first_frame[-1])
        self._builder = FrameBuilder(geometry, url)

    def _keys(self) -> set[str]:
        source = next(iter(self._det.source_to_modno))
        return set(self._run[source].keys())

    def read_frames(self, start: int, stop: int) -> list[Frame]:
        ed = require("extra_data")
        self._check_range(start, stop)
        if start == stop:
            return []
        t0 = int(np.searchsorted(self._first_frame, start, side="right") - 1)
        t1 = int(np.searchsorted(self._first_frame, stop, side="left"))
        try:
            arr = self._det.select_trains(ed.by_index[t0:t1]).get_array(
                self._key, fill_value=np.nan)
        except Exception as exc:  # h5py/extra-data errors for damaged sequence files
            raise SourceError(self.url, f"cannot read trains {t0}..{t1 - 1} of "
                                        f"{self.detector_name} {self._key} ({exc})") from exc
        pixels = np.asarray(arr.transpose("module", ...).values)
        # (module, train, cell, ss, fs) for multi-cell detectors; one cell may come squeezed
        if pixels.ndim == 4:
            pixels = pixels[:, :, None]
        frames: list[Frame] = []
        for t in range(t0, t1):
            for c in range(int(self._frames_per_train[t])):
                i = int(self._first_frame[t]) + c
                if start <= i < stop:
                    frames.append(self._builder.from_modules(
                        pixels[:, t - t0, c], i, f"train {int(self.train_ids[t])} cell {c}"))
        return frames

    def describe(self) -> dict[str, Any]:
        """What the run holds, for logs and benchmarks."""
        return {"detector": self.detector_name, "pixels": self._key,
                "trains": int(self.train_ids.size), "frames": self.n_frames}


def write_jungfrau_run(run_dir: str | Path, modules: Any, *, cells_per_train: int = 1,
                       run: int = 12, first_train: int = 10000) -> None:
    """Write frames as a European XFEL JUNGFRAU run with extra-data's own example-run helpers.

    One ``CORR-R####-JNGFR##-S00000.h5`` sequence file per module (source
    ``SPB_IRDA_JF4M/DET/JNGFR##:daqOutput``, ``data.adc`` float32), ``cells_per_train`` memory
    cells per train; for tests and benchmarks that read the same frames as CXI and as a run.

    Parameters
    ----------
    run_dir : the run folder to create.
    modules : ``(frames, modules, 512, 1024)`` pixel values; frames fill trains cell by cell.
    """
    require("extra_data")
    from extra_data.tests.mockdata import write_file
    from extra_data.tests.mockdata.jungfrau import JUNGFRAUModule

    pixels = np.asarray(modules, dtype=np.float32)
    n_frames, n_modules, n_ss, n_fs = pixels.shape
    if n_frames % cells_per_train:
        raise ValueError(f"{n_frames} frames do not fill trains of {cells_per_train} cells")
    n_trains = n_frames // cells_per_train
    cells = cells_per_train

    class Module(JUNGFRAUModule):  # type: ignore[misc]
        @property
        def instrument_keys(self) -> list[tuple[str, str, tuple[int, ...]]]:
            return [("frameNumber", "u8", (cells,)), ("memoryCell", "u1", (cells,)),
                    ("timestamp", "f8", (cells,)), ("adc", "f4", (cells, n_ss, n_fs)),
                    ("mask", "u4", (cells, n_ss, n_fs))]

    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    import h5py

    for m in range(n_modules):
        name = f"SPB_IRDA_JF4M/DET/JNGFR{m + 1:02d}"
        path = folder / f"CORR-R{run:04d}-JNGFR{m + 1:02d}-S00000.h5"
        write_file(str(path), [Module(name)], ntrains=n_trains, firsttrain=first_train,
                   chunksize=1, format_version="1.0")
        with h5py.File(path, "r+") as f:
            group = f[f"INSTRUMENT/{name}:daqOutput/data"]
            group["adc"][...] = pixels[:, m].reshape(n_trains, cells, n_ss, n_fs)
            group["memoryCell"][...] = np.arange(cells, dtype=np.uint8)[None, :]
