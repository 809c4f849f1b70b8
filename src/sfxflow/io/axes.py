"""Axis chains: where a pixel is, given axes that each depend on another (lengths mm, angles deg).

imgCIF's ``_axis`` table (CBF) and NeXus ``depends_on`` transformations (NXmx) describe the same
thing: each axis moves points of its own frame into its parent's, and a pixel's lab position is
the product along the chain. Both readers build :class:`Axis` tables and call
:func:`transform_chain` / :func:`pixel_geometry`; the frame conversions stay in each reader.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from sfxflow.errors import GeometryError

__all__ = ["Axis", "PixelAxis", "pixel_geometry", "transform_chain"]




@dataclass(frozen=True)
class Axis:
    """One axis of an imgCIF ``_axis`` table / NeXus transformation (lengths in mm, angles deg).

    ``kind`` is ``"rotation"``, ``"translation"`` or ``"general"`` (no motion).
    """

    id: str
    kind: str
    vector: tuple[float, float, float]
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    depends_on: str | None = None


def _rotation(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    n = float(np.linalg.norm(axis))
    if n == 0.0:
        raise GeometryError(f"rotation axis has zero length: {axis.tolist()}")
    x, y, z = axis / n
    t = math.radians(angle_deg)
    c, s = math.cos(t), math.sin(t)
    C = 1.0 - c
    return np.array(
        [
            [c + x * x * C, x * y * C - z * s, x * z * C + y * s],
            [y * x * C + z * s, c + y * y * C, y * z * C - x * s],
            [z * x * C - y * s, z * y * C + x * s, c + z * z * C],
        ]
    )


def _local_matrix(axis: Axis, setting: float) -> np.ndarray:
    m = np.eye(4)
    v = np.asarray(axis.vector, dtype=float)
    if axis.kind == "rotation":
        m[:3, :3] = _rotation(v, setting)
        m[:3, 3] = axis.offset
    elif axis.kind == "translation":
        n = float(np.linalg.norm(v))
        if n == 0.0:
            raise GeometryError(f"translation axis {axis.id} has a zero vector")
        m[:3, 3] = np.asarray(axis.offset) + v / n * setting
    else:
        m[:3, 3] = axis.offset
    return m


def transform_chain(
    axes: Mapping[str, Axis],
    settings: Mapping[str, float],
    axis_id: str,
    overrides: Mapping[str, float] | None = None,
) -> np.ndarray:
    """4x4 homogeneous transform from the frame of ``axis_id`` to the lab, following ``depends_on``.

    Each axis maps a point ``p`` of its own frame into its parent's: a rotation by its setting
    (degrees, right-handed about ``vector``) then ``+ offset``; a translation adds
    ``offset + unit(vector) * setting``. ``overrides`` replaces settings (pixel indices along
    pixel axes).

    >>> axes = {"z": Axis("z", "translation", (0, 0, 1)),
    ...         "r": Axis("r", "rotation", (0, 0, 1), (1, 0, 0), "z")}
    >>> (transform_chain(axes, {"z": -100.0, "r": 90.0}, "r") @ [1, 0, 0, 1]).round(6).tolist()
    [1.0, 1.0, -100.0, 1.0]
    """
    overrides = overrides or {}
    mats: list[np.ndarray] = []
    seen: set[str] = set()
    cur: str | None = axis_id
    while cur not in (None, "", "."):
        assert cur is not None
        if cur in seen:
            raise GeometryError(f"axis dependency loop through {cur!r}")
        seen.add(cur)
        ax = axes.get(cur)
        if ax is None:
            raise GeometryError(f"axis {cur!r} is referenced but not defined")
        setting = overrides.get(cur, settings.get(cur, 0.0))
        mats.append(_local_matrix(ax, setting))
        cur = ax.depends_on
    m = np.eye(4)
    for local in reversed(mats):
        m = m @ local
    return m


def _ancestors(axes: Mapping[str, Axis], axis_id: str) -> list[str]:
    out: list[str] = []
    cur: str | None = axes[axis_id].depends_on if axis_id in axes else None
    while cur not in (None, "", ".") and cur not in out:
        assert cur is not None
        out.append(cur)
        cur = axes[cur].depends_on if cur in axes else None
    return out


@dataclass(frozen=True)
class PixelAxis:
    """A pixel axis of an array: ``displacement`` of pixel 0 and ``increment`` per pixel."""

    axis_id: str
    displacement: float
    increment: float


def pixel_geometry(
    axes: Mapping[str, Axis],
    settings: Mapping[str, float],
    fast: PixelAxis,
    slow: PixelAxis,
    what: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Origin of pixel (0, 0), unit fast/slow vectors and pixel sizes, in the source frame."""
    if slow.axis_id in _ancestors(axes, fast.axis_id) or slow.axis_id == fast.axis_id:
        leaf = fast.axis_id
    elif fast.axis_id in _ancestors(axes, slow.axis_id):
        leaf = slow.axis_id
    else:
        raise GeometryError(
            f"{what}: pixel axes {fast.axis_id} and {slow.axis_id} do not depend on each other"
        )

    def at(i_f: float, i_s: float) -> np.ndarray:
        over = {
            fast.axis_id: fast.displacement + i_f * fast.increment,
            slow.axis_id: slow.displacement + i_s * slow.increment,
        }
        return (transform_chain(axes, settings, leaf, over) @ [0.0, 0.0, 0.0, 1.0])[:3]

    origin = at(0, 0)
    df = at(1, 0) - origin
    ds = at(0, 1) - origin
    pf, ps = float(np.linalg.norm(df)), float(np.linalg.norm(ds))
    if pf == 0.0 or ps == 0.0:
        raise GeometryError(f"{what}: zero pixel size along a pixel axis")
    return origin, df / pf, ds / ps, pf, ps
