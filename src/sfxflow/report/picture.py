"""Pictures of frames: every panel resampled into one image of the lab plane, with spot overlays.

The picture is a central projection onto the plane ``z = z_mm`` (the detector's mean distance):
each picture pixel's ray from the sample is intersected with the panels by
:func:`sfxflow.algorithms.geometry.plane_grid_to_pixels` and takes the value of the panel pixel it
hits (nearest neighbour), so quadrants, gaps and tilts appear where they are in the lab.
The view is along ``-z`` (standing behind the detector, looking back at the sample):
``+x`` to the right, ``+y`` up. Gaps between panels are white, masked pixels grey.
Matplotlib is used through its object API with an Agg canvas per figure (no global backend).
"""

from __future__ import annotations

import logging
import math
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sfxflow.algorithms.detector_tables import detector_tables
from sfxflow.algorithms.geometry import pixels_to_lab_mm, plane_grid_to_pixels
from sfxflow.errors import InputError
from sfxflow.models import Detector, Frame

__all__ = [
    "LabImage",
    "assemble_lab_image",
    "lab_xy_mm",
    "read_spot_overlay",
    "render_frame_png",
]

log = logging.getLogger(__name__)

_OVERLAY_COLOURS = ("#00e5ff", "#ff2bd6", "#7CFC00", "#ffa500", "#ffffff")
_MASKED_RGBA = np.array([140, 140, 140, 255], dtype=np.uint8)  # grey, 0.55 of full scale


@dataclass(frozen=True)
class LabImage:
    """A frame resampled onto the lab plane ``z = z_mm``.

    ``values[row, col]`` is the data value at lab ``x = x0 + (col + 0.5) * pixel_mm``,
    ``y = y0 + (row + 0.5) * pixel_mm`` (row 0 at the bottom); NaN where no panel is hit.
    ``masked`` is True where a panel is hit at a masked (bad) pixel; ``panel`` holds the panel
    index hit (-1 for gaps).
    """

    values: np.ndarray
    masked: np.ndarray
    panel: np.ndarray
    x0_mm: float
    y0_mm: float
    pixel_mm: float
    z_mm: float

    @property
    def extent_mm(self) -> tuple[float, float, float, float]:
        ny, nx = self.values.shape
        return (self.x0_mm, self.x0_mm + nx * self.pixel_mm, self.y0_mm, self.y0_mm + ny * self.pixel_mm)


def lab_xy_mm(
    detector: Detector, panel: np.ndarray, fs_px: np.ndarray, ss_px: np.ndarray, z_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Centrally project pixel positions onto the plane ``z = z_mm``; returns lab ``(x, y)`` mm."""
    if len(np.atleast_1d(panel)) == 0:
        return np.zeros(0), np.zeros(0)
    r = pixels_to_lab_mm(detector, panel, fs_px, ss_px)
    scale = z_mm / r[:, 2]
    return r[:, 0] * scale, r[:, 1] * scale


def assemble_lab_image(frame: Frame, max_size_px: int = 2000) -> LabImage:
    """Resample every panel of ``frame`` into one lab-plane image (see the module docstring).

    Parameters
    ----------
    frame : the frame (raw data array + detector).
    max_size_px : longest side of the picture; the picture pixel is the smallest panel pixel,
        enlarged when needed to stay within this size.

    Examples
    --------
    >>> from sfxflow.algorithms.layouts import simple
    >>> from sfxflow.models import Beam
    >>> det = simple(n_px=64)
    >>> frame = Frame(np.arange(64 * 64, dtype=np.float32).reshape(64, 64), det, Beam(1.0))
    >>> lab = assemble_lab_image(frame)
    >>> lab.values.shape, float(lab.values[-1, 0]), float(lab.values[0, 0])  # top-left, bottom-left
    ((64, 64), 0.0, 4032.0)
    """
    det = frame.detector
    z_mm = det.mean_distance_mm()
    corners = []
    for p in det.panels:
        n_ss, n_fs = p.shape
        corners.append(
            (np.full(4, det.panel_index(p.name)), np.array([0, n_fs, 0, n_fs]), np.array([0, 0, n_ss, n_ss]))
        )
    pan = np.concatenate([c[0] for c in corners])
    xs, ys = lab_xy_mm(det, pan, np.concatenate([c[1] for c in corners]),
                       np.concatenate([c[2] for c in corners]), z_mm)
    pixel_mm = min(p.pixel_size_mm for p in det.panels)
    span = max(xs.max() - xs.min(), ys.max() - ys.min())
    pixel_mm = max(pixel_mm, span / max_size_px)
    x0, y0 = float(xs.min()), float(ys.min())
    nx = max(1, math.ceil((xs.max() - x0) / pixel_mm))
    ny = max(1, math.ceil((ys.max() - y0) / pixel_mm))
    values = np.full((ny, nx), np.nan, dtype=np.float64)
    masked = np.zeros((ny, nx), dtype=bool)
    panel_of = np.full((ny, nx), -1, dtype=np.int32)
    matrices = detector_tables(det).matrices
    for i, p in enumerate(det.panels):
        # picture pixels within this panel's projected bounding box only
        px, py = xs[pan == i], ys[pan == i]
        c0 = max(0, int(np.floor((px.min() - x0) / pixel_mm)))
        c1 = min(nx, int(np.ceil((px.max() - x0) / pixel_mm)) + 1)
        r0 = max(0, int(np.floor((py.min() - y0) / pixel_mm)))
        r1 = min(ny, int(np.ceil((py.max() - y0) / pixel_mm)) + 1)
        if c1 <= c0 or r1 <= r0:
            continue
        hit, fs, ss = plane_grid_to_pixels(matrices, i, x0 + (np.arange(c0, c1) + 0.5) * pixel_mm,
                                           y0 + (np.arange(r0, r1) + 0.5) * pixel_mm, z_mm)
        ok = hit & (panel_of[r0:r1, c0:c1] < 0)
        if not ok.any():
            continue
        fi = np.clip(np.floor(fs[ok]).astype(np.int64), 0, p.shape[1] - 1)
        si = np.clip(np.floor(ss[ok]).astype(np.int64), 0, p.shape[0] - 1)
        rr, cc = np.nonzero(ok)
        rr += r0
        cc += c0
        data = np.asarray(frame.panel_data(i), dtype=np.float64)
        values[rr, cc] = data[si, fi]
        masked[rr, cc] = ~p.good_mask()[si, fi]
        panel_of[rr, cc] = i
    return LabImage(values, masked, panel_of, x0, y0, pixel_mm, z_mm)


def _overlay_arrays(spots: Any, detector: Detector) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """panel, fs, ss arrays from a SpotTable, a dict of arrays or a pyarrow table."""
    def col(name: str) -> np.ndarray:
        if isinstance(spots, Mapping):
            return np.asarray(spots[name])
        if hasattr(spots, "column"):  # pyarrow.Table
            return spots.column(name).to_numpy(zero_copy_only=False)
        return np.asarray(getattr(spots, name))

    panel = col("panel")
    if panel.dtype.kind in "OUS":
        panel = np.array([detector.panel_index(str(n)) for n in panel], dtype=np.int64)
    return panel.astype(np.int64), col("fs_px").astype(float), col("ss_px").astype(float)


def _scaled_values(lab: LabImage, scaling: str, low_percentile: float,
                   high_percentile: float) -> np.ndarray:
    """Good pixels mapped to 0..1 between the percentiles (``log`` or ``linear``), others NaN."""
    good = np.isfinite(lab.values) & ~lab.masked
    shown = np.full(lab.values.shape, np.nan)
    if good.any():
        lo, hi = np.percentile(lab.values[good], [low_percentile, high_percentile])
        hi = max(hi, lo + 1e-6)
        v = np.clip((lab.values[good] - lo) / (hi - lo), 0.0, 1.0)
        shown[good] = np.log1p(v * 100.0) / np.log1p(100.0) if scaling == "log" else v
    return shown


def _draw_spots(ax: Any, spots: Mapping[str, Any], detector: Detector,
                lab: LabImage) -> list[Any]:
    """Open circles, one colour per label, for each ``{label: table}``; their legend handles."""
    from matplotlib.patches import Patch

    handles: list[Any] = []
    radius_mm = 6 * lab.pixel_mm
    for n, (label, table) in enumerate(spots.items()):
        panel, fs, ss = _overlay_arrays(table, detector)
        x, y = lab_xy_mm(detector, panel, fs, ss, lab.z_mm)
        colour = _OVERLAY_COLOURS[n % len(_OVERLAY_COLOURS)]
        ax.scatter(x, y, s=(radius_mm / lab.pixel_mm) ** 2 * 2.0, facecolors="none",
                   edgecolors=colour, linewidths=0.8)
        handles.append(Patch(facecolor="none", edgecolor=colour, label=f"{label} ({len(x)})"))
    return handles


def _draw_predicted(ax: Any, predicted: Any, detector: Detector, lab: LabImage) -> list[Any]:
    """Open squares for the predicted positions (one table or ``{label: table}``); their handles."""
    from matplotlib.patches import Patch

    handles: list[Any] = []
    # {label: table} (one per crystal): squares coloured as the spot overlay of the same rank
    several = isinstance(predicted, Mapping) and "panel" not in predicted
    for n, (label, table) in enumerate((predicted if several else
                                        {"predicted": predicted} if predicted is not None
                                        else {}).items()):
        panel, fs, ss = _overlay_arrays(table, detector)
        x, y = lab_xy_mm(detector, panel, fs, ss, lab.z_mm)
        colour = _OVERLAY_COLOURS[n % len(_OVERLAY_COLOURS)] if several else "#ffffff"
        ax.scatter(x, y, s=60, marker="s", facecolors="none", edgecolors=colour, linewidths=0.7)
        handles.append(Patch(facecolor="none", edgecolor=colour, label=f"{label} ({len(x)})"))
    return handles


def _save_png(fig: Any, out: Path) -> Path:
    """Write ``fig`` to ``out`` as PNG, creating its folder; a one-line error if it cannot."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png")
    except OSError as exc:
        raise InputError(f"{out}: cannot write the picture ({exc.strerror})") from exc
    return out


def render_frame_png(
    frame: Frame,
    out_path: str | Path,
    spots: Mapping[str, Any] | None = None,
    predicted: Any = None,
    *,
    title: str | None = None,
    scaling: str = "log",
    low_percentile: float = 50.0,
    high_percentile: float = 99.95,
    max_size_px: int = 2000,
    dpi: int = 200,
) -> Path:
    """Write a PNG of ``frame`` assembled in lab coordinates, with optional spot overlays.

    Parameters
    ----------
    frame : the frame to draw.
    out_path : PNG path (parent folders are created).
    spots : ``{label: table}``; each table has ``panel`` (index or panel name), ``fs_px`` and
        ``ss_px`` (a :class:`~sfxflow.models.SpotTable`, a dict of arrays or a pyarrow table),
        drawn as open circles, one colour per label.
    predicted : one more such table, drawn as open white squares labelled "predicted"; or
        ``{label: table}`` (one per crystal), squares in the colour of the ``spots`` entry of
        the same rank.
    title : figure title (default: the frame id and photon energy).
    scaling : ``"log"`` (default) or ``"linear"`` mapping of values between the percentiles.
    low_percentile, high_percentile : percentiles of the good pixels shown as black and as the
        brightest colour (the median as black hides the background, so spots stand out).
    max_size_px : longest side of the resampled image.
    dpi : PNG resolution.

    Returns
    -------
    Path of the PNG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    if scaling not in ("log", "linear"):
        raise InputError(f"picture scaling {scaling!r}: expected 'log' or 'linear'")
    lab = assemble_lab_image(frame, max_size_px=max_size_px)
    shown = _scaled_values(lab, scaling, low_percentile, high_percentile)
    cmap = ListedColormap(_inferno_like()).with_extremes(bad="white")

    ny, nx = lab.values.shape
    width_in = 9.0
    fig = Figure(figsize=(width_in, width_in * ny / nx * 0.92 + 0.6), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    extent = lab.extent_mm
    # one RGBA image, coloured here with the masked pixels already grey: Agg resamples it
    # once (a colour-mapped image under a grey layer was two full-size resamplings)
    rgba = cmap(shown, bytes=True)
    rgba[lab.masked] = _MASKED_RGBA
    ax.imshow(rgba, origin="lower", extent=extent, interpolation="nearest")
    ax.plot([0.0], [0.0], marker="+", color="#00ff00", markersize=10, linestyle="none")
    handles = _draw_spots(ax, spots or {}, frame.detector, lab)
    handles += _draw_predicted(ax, predicted, frame.detector, lab)
    if handles:
        ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.7)
    ax.set_xlabel("x (mm)")
    ax.set_ylabel("y (mm)")
    ax.set_facecolor("white")
    if title is None:
        title = f"{frame.frame_id}   {frame.beam.photon_energy_ev:.1f} eV   ({scaling} scale)"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out = _save_png(fig, Path(out_path))
    log.info("wrote %s (%d x %d px of %.3f mm)", out, nx, ny, lab.pixel_mm)
    return out


def _inferno_like() -> np.ndarray:
    from matplotlib import colormaps

    return colormaps["inferno"](np.linspace(0.0, 1.0, 256))


def read_spot_overlay(
    path: str | Path,
    detector: Detector,
    source_url: str,
    frame_index: int,
    min_snr: float = 0.0,
) -> dict[str, np.ndarray]:
    """Read the rows of a spot/reflection Parquet table that belong to one frame.

    The table needs ``panel`` (index, or panel name), ``fs_px`` and ``ss_px``. Rows are kept
    when the frame matches: ``frame_index`` equal and, when the table has ``source_url`` or
    ``file``, the same URL or base name as ``source_url``; with ``min_snr > 0`` only rows whose
    ``snr_true`` (simulated truth) or ``snr`` (found spots) reaches it.

    Raises
    ------
    InputError
        When the file cannot be read or lacks the columns.
    """
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
        raise InputError(f"{path}: cannot read the spot table as Parquet ({exc})") from exc
    missing = [c for c in ("panel", "fs_px", "ss_px") if c not in table.column_names]
    if missing:
        raise InputError(
            f"{path}: spot table lacks columns {missing} (expected panel, fs_px, ss_px)"
        )
    n = table.num_rows
    keep = np.ones(n, dtype=bool)
    if "frame_index" in table.column_names:
        keep &= table.column("frame_index").to_numpy() == frame_index
    base = posixpath.basename(str(source_url).replace("\\", "/"))
    for name in ("source_url", "file"):
        if name in table.column_names:
            vals = table.column(name).to_numpy(zero_copy_only=False).astype(str)
            same = (vals == str(source_url)) | (np.char.rpartition(vals, "/")[:, 2] == base)
            keep &= same
    if min_snr > 0:
        snr_col = next((c for c in ("snr_true", "snr") if c in table.column_names), None)
        if snr_col is None:
            raise InputError(f"{path}: no snr_true or snr column to apply a minimum SNR to")
        keep &= table.column(snr_col).to_numpy(zero_copy_only=False) >= min_snr
    panel, fs, ss = _overlay_arrays(table, detector)
    return {"panel": panel[keep], "fs_px": fs[keep], "ss_px": ss[keep]}
