"""What the facility readers (LCLS-II XTC2, European XFEL runs, the karabo bridge) share.

Each facility format is read through the facility's own library, an optional extra of sfxflow:
``sfxflow[lcls]`` (psana) and ``sfxflow[euxfel]`` (extra-data, karabo-bridge). A missing package
is a user error naming the extra to install, never an ImportError traceback.

The pixels of every facility frame are laid out as the CrystFEL geometry describes them: the
modules of a multi-module detector (JUNGFRAU, AGIPD, LPD) are stacked along the slow-scan axis in
module order, which is the layout of CrystFEL's own ``.geom`` files for these detectors
(``dim1 = modulenumber`` flattened into ``ss``) and of our simulated JUNGFRAU 4M CXI files; so
one ``.geom`` serves a CXI file and the same frames read from a facility format.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from sfxflow.errors import ConfigError, GeometryError
from sfxflow.io.hdf5 import check_fit
from sfxflow.models import Frame

if TYPE_CHECKING:
    from sfxflow.io.geometry import CrystfelGeometry
    from sfxflow.models import Beam, Detector

__all__ = ["PIXEL_KEYS", "FrameBuilder", "RecentlyOpened", "modules_stacked", "require",
           "stack_modules"]

#: where a multi-module detector's source keeps its pixels (JUNGFRAU; AGIPD, LPD; DSSC)
PIXEL_KEYS = ("data.adc", "image.data", "data.image.pixels")
#: the extra that provides each optional facility module
_EXTRA_OF = {
    "psana": "lcls",
    "extra_data": "euxfel",
    "karabo_bridge": "euxfel",
}


def require(module: str) -> ModuleType:
    """Import a facility library, or raise a one-line user error naming the extra to install.

    >>> require("numpy").__name__
    'numpy'
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".")[0]
        extra = _EXTRA_OF.get(package, "")
        hint = f"pip install 'sfxflow[{extra}]'" if extra else f"pip install {package}"
        raise ConfigError(f"reading this input needs the Python package {package!r}, which "
                          f"cannot be imported ({exc}); install it with: {hint}") from None


class RecentlyOpened:
    """What opening a source costs once (a run folder's file index, a file's datagram index),
    kept for the last ``size`` sources: every block of a source opens it again.

    >>> cache = RecentlyOpened(1)
    >>> cache.get("a", lambda: 1), cache.get("a", lambda: 2), cache.get("b", lambda: 3)
    (1, 1, 3)
    """

    def __init__(self, size: int) -> None:
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._size = size

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        hit = self._items.get(key)
        if hit is None:
            hit = self._items[key] = make()
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(key)
        return hit


def stack_modules(modules: np.ndarray) -> np.ndarray:
    """``(n_modules, ss, fs)`` -> ``(n_modules * ss, fs)`` float32, module 0 on top.

    >>> stack_modules(np.zeros((8, 512, 1024), np.uint16)).shape
    (4096, 1024)
    """
    arr = np.asarray(modules)
    if arr.ndim == 2:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if arr.ndim != 3:
        raise ValueError(f"expected (modules, ss, fs) pixels, got shape {arr.shape}")
    return np.ascontiguousarray(arr.reshape(-1, arr.shape[-1]), dtype=np.float32)


def modules_stacked(geometry: CrystfelGeometry) -> bool:
    """``True`` when the geometry lays modules out stacked in 2-D frames (``min_ss`` offsets),
    ``False`` when it gives each module its own plane (``dim1 = <module number>``)."""
    return not any(p.data_index for p in geometry.panel_specs)


class FrameBuilder:
    """Frames from stacked pixel arrays with a CrystFEL geometry.

    The geometry's per-frame references (``photon_energy = /path``, ``clen = /path``) are
    filled from the values a facility record carries (for example the photon energy of the
    LCLS-II electron-beam record); a reference the record cannot fill is a user error naming it.
    """

    def __init__(self, geometry: CrystfelGeometry, url: str) -> None:
        self.geometry = geometry
        self.url = url
        self._cache: dict[tuple[float, ...], tuple[Detector, Beam]] = {}
        self._checked_shape: tuple[int, ...] | None = None
        self.stacked = modules_stacked(geometry)

    def from_modules(self, modules: np.ndarray, index: int, event_id: str,
                     values: Mapping[str, float] | None = None) -> Frame:
        """A frame from ``(modules, ss, fs)`` pixels, laid out as the geometry describes."""
        data = stack_modules(modules) if self.stacked else np.ascontiguousarray(
            modules, dtype=np.float32)
        return self.build(data, index, event_id, values)

    def build(self, data: np.ndarray, index: int, event_id: str,
              values: Mapping[str, float] | None = None) -> Frame:
        refs = self.geometry.references
        given = {k: float(v) for k, v in (values or {}).items() if k in refs}
        missing = sorted(set(refs) - set(given))
        if missing:
            raise GeometryError(
                f"{self.url}: geometry {self.geometry.source} reads {', '.join(missing)} from "
                f"{', '.join(refs[k] for k in missing)}, which this input does not carry "
                "(expected numbers in the .geom, e.g. photon_energy = 9500 eV)")
        key = tuple(given[k] for k in sorted(given))
        hit = self._cache.get(key)
        if hit is None:
            det, beam = self.geometry.resolve(given or None)
            if beam is None:
                raise GeometryError(f"{self.url}: geometry {self.geometry.source} gives no "
                                    "photon energy or wavelength (expected photon_energy = ...)")
            hit = (det, beam)
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = hit
        det, beam = hit
        if self._checked_shape != data.shape:
            check_fit(det, data.shape, self.url, "its pixel arrays", self.geometry.source)
            self._checked_shape = data.shape
        return Frame(data=data, detector=det, beam=beam, source_url=self.url, index=index,
                     event_id=event_id)


