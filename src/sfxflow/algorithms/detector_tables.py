"""Tables derived from a detector, in one cache shared by every stage.

Frames of a run share one :class:`~sfxflow.models.Detector` object, and rebuilding its tables
per frame or per crystal (64 panel matrices, a mask the size of the frame, radial bins) would
cost more than the work that uses them. :func:`detector_tables` keeps them per Detector object
(by identity, held weakly) in one bounded, thread-safe cache:

* :attr:`DetectorTables.matrices` and :attr:`~DetectorTables.corner_dirs`: panel matrices and
  unit rays to the panel corners (prediction, refinement, the frame picture);
* :meth:`DetectorTables.layout` / :func:`frame_layout`: the :class:`FrameLayout` of the frame
  data (spot finding, integration);
* :meth:`DetectorTables.memo`: anything else a stage derives from the detector alone (the
  simulator's pixel maps).

Pure numpy; no I/O.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from sfxflow.algorithms.geometry import PanelMatrices, panel_matrices, pixels_to_lab_mm
from sfxflow.errors import GeometryError
from sfxflow.models import Detector

__all__ = ["DetectorTables", "FrameLayout", "as_data3", "detector_tables", "frame_layout"]

T = TypeVar("T")


class FrameLayout:
    """Where each panel lies in a frame's data array (``ptab`` rows: lead index, ss0, fs0,
    n_ss, n_fs), the combined good-pixel mask ``mask3`` and, on demand, the per-panel gain
    table and radial bins: what spot finding and integration need of the detector."""

    def __init__(self, detector: Detector, lead_shape: tuple[int, ...], plane: tuple[int, int]):
        n_lead = int(np.prod(lead_shape)) if lead_shape else 1
        self.lead_shape = lead_shape
        self.plane = plane
        self.ptab = np.zeros((len(detector), 5), dtype=np.int64)
        self.mask3 = np.zeros((n_lead, *plane), dtype=np.uint8)
        for i, p in enumerate(detector.panels):
            if len(p.data_index) != len(lead_shape):
                raise GeometryError(
                    f"panel {p.name}: data_index {p.data_index} has {len(p.data_index)} "
                    f"leading indices but the frame data has {len(lead_shape)}"
                )
            if any(ix >= n for ix, n in zip(p.data_index, lead_shape, strict=True)):
                raise GeometryError(
                    f"panel {p.name}: data_index {p.data_index} is outside frame data with "
                    f"leading shape {lead_shape}"
                )
            ss0, fs0 = p.data_origin
            n_ss, n_fs = p.shape
            if ss0 < 0 or fs0 < 0 or ss0 + n_ss > plane[0] or fs0 + n_fs > plane[1]:
                raise GeometryError(
                    f"panel {p.name}: pixels ss {ss0}..{ss0 + n_ss}, fs {fs0}..{fs0 + n_fs} do "
                    f"not fit in frame data of shape {(*lead_shape, *plane)}"
                )
            lead = int(np.ravel_multi_index(p.data_index, lead_shape)) if lead_shape else 0
            self.ptab[i] = (lead, ss0, fs0, n_ss, n_fs)
            self.mask3[lead, ss0 : ss0 + n_ss, fs0 : fs0 + n_fs] = p.good_mask()
        self._radial: dict[float, tuple[np.ndarray, int]] = {}
        self._lock = threading.Lock()
        self.detector_ref = weakref.ref(detector)

    def pf(self, detector: Detector, gain_override: float | None) -> np.ndarray:
        out = np.zeros((len(detector), 3))
        for i, p in enumerate(detector.panels):
            gain = gain_override if gain_override is not None else p.adu_per_photon
            out[i, 0] = gain if gain is not None and gain > 0 else 1.0
            out[i, 1] = p.max_adu
        return out

    def radial_bins(self, detector: Detector, bin_px: float) -> tuple[np.ndarray, int]:
        """Per-pixel ring index (int32, -1 off-panel) by distance from the beam axis."""
        with self._lock:
            if bin_px in self._radial:
                return self._radial[bin_px]
            bins3 = np.full(self.mask3.shape, -1, dtype=np.int32)
            for i, p in enumerate(detector.panels):
                lead, ss0, fs0, n_ss, n_fs = (int(x) for x in self.ptab[i])
                ss, fs = np.mgrid[0:n_ss, 0:n_fs]
                xyz = pixels_to_lab_mm(
                    Detector((p,)), np.zeros(ss.size, np.int64), fs.ravel() + 0.5,
                    ss.ravel() + 0.5,
                )
                r_px = np.hypot(xyz[:, 0], xyz[:, 1]) / p.pixel_size_mm
                bins3[lead, ss0 : ss0 + n_ss, fs0 : fs0 + n_fs] = (
                    (r_px / bin_px).astype(np.int32).reshape(n_ss, n_fs)
                )
            result = (bins3, int(bins3.max()) + 1)
            self._radial[bin_px] = result
            return result


class DetectorTables:
    """Every table derived from one Detector object, built on first use (see the module)."""

    def __init__(self, detector: Detector) -> None:
        self.detector_ref = weakref.ref(detector)
        self._memo: dict[Any, Any] = {}
        self._lock = threading.Lock()

    def _detector(self) -> Detector:
        det = self.detector_ref()
        if det is None:  # pragma: no cover - callers hold the detector they ask about
            raise RuntimeError("the detector of these tables is gone")
        return det

    def memo(self, key: Any, build: Callable[[], T]) -> T:
        """``build()`` once per ``key`` for this detector (built outside the lock)."""
        with self._lock:
            if key in self._memo:
                return self._memo[key]  # type: ignore[no-any-return]
        value = build()
        with self._lock:
            return self._memo.setdefault(key, value)  # type: ignore[no-any-return]

    @property
    def matrices(self) -> PanelMatrices:
        return self.memo("matrices", lambda: panel_matrices(self._detector()))

    @property
    def d(self) -> np.ndarray:
        """(n_panels, 3, 3) as :attr:`sfxflow.algorithms.geometry.PanelMatrices.d`."""
        return self.matrices.d

    @property
    def corner_dirs(self) -> np.ndarray:
        """(4 n_panels, 3) unit vectors from the sample to the panel corners."""
        def build() -> np.ndarray:
            corners = []
            for p in self._detector().panels:
                n_ss, n_fs = p.shape
                corners.append(p.lab_mm(np.array([0.0, n_fs, 0.0, n_fs]),
                                        np.array([0.0, 0.0, n_ss, n_ss])))
            lab = np.concatenate(corners)
            return lab / np.linalg.norm(lab, axis=1, keepdims=True)
        return self.memo("corner_dirs", build)

    def layout(self, lead_shape: tuple[int, ...], plane: tuple[int, int]) -> FrameLayout:
        """The :class:`FrameLayout` of frame data of shape ``(*lead_shape, *plane)``."""
        return self.memo(("layout", tuple(lead_shape), tuple(plane)),
                         lambda: FrameLayout(self._detector(), lead_shape, plane))


_CACHE: dict[int, DetectorTables] = {}
_CACHE_LOCK = threading.Lock()
_CACHE_MAX = 16


def detector_tables(detector: Detector) -> DetectorTables:
    """The tables of ``detector`` (the same object for every call with the same Detector).

    >>> from sfxflow.algorithms.layouts import simple
    >>> det = simple()
    >>> t = detector_tables(det)
    >>> t is detector_tables(det), t.d.shape == (len(det), 3, 3)
    (True, True)
    """
    key = id(detector)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit.detector_ref() is detector:
            return hit
        tables = DetectorTables(detector)
        if len(_CACHE) >= _CACHE_MAX:
            for k in [k for k, v in _CACHE.items() if v.detector_ref() is None] or list(_CACHE)[:1]:
                del _CACHE[k]
        _CACHE[key] = tables
        return tables


def frame_layout(detector: Detector, lead_shape: tuple[int, ...], plane: tuple[int, int]
                 ) -> FrameLayout:
    """:meth:`DetectorTables.layout` of ``detector``'s tables."""
    return detector_tables(detector).layout(lead_shape, plane)


def as_data3(data: np.ndarray) -> np.ndarray:
    """View the frame data as (n_lead, n_ss, n_fs) in native byte order (copy only if needed)."""
    a = np.asarray(data)
    if a.ndim < 2:
        raise GeometryError(f"frame data must have at least 2 dimensions, got shape {a.shape}")
    if a.dtype == np.bool_ or a.dtype.kind not in "iuf":
        raise GeometryError(f"frame data must be integer or float pixels, got dtype {a.dtype}")
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    # C order keeps the compiled kernels to one layout per dtype (a copy only for views)
    return np.ascontiguousarray(a).reshape(-1, a.shape[-2], a.shape[-1])
