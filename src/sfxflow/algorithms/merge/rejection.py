"""Crystal rejections that need every crystal's fit: what no shard can decide alone.

* **Absurd scale**: a crystal whose scale is further than ``MergeParams.max_scale_ratio`` from
  the median of the accepted ones (a failed fit, or a crystal that is not one).
"""

from __future__ import annotations

import math

import numpy as np

from sfxflow.algorithms.merge.scale import ACCEPTED, REASONS, REJECT_SCALE, CrystalFits

__all__ = ["reasons_counted", "reject_absurd_scales"]


def reject_absurd_scales(fits: list[CrystalFits], max_scale_ratio: float) -> None:
    """Mark (in place) accepted crystals whose scale is more than ``max_scale_ratio`` times
    from the median scale of all accepted crystals of all shards.

    >>> f = CrystalFits(*(np.zeros(3) for _ in range(9)))
    >>> f.scale[:] = [1.0, 1.2, 5e4]
    >>> reject_absurd_scales([f], 1e3)
    >>> f.status.tolist()
    [0.0, 0.0, 2.0]
    """
    scales = np.concatenate([f.scale[f.status == ACCEPTED] for f in fits] or [np.zeros(0)])
    med = float(np.median(scales)) if scales.size else math.nan
    for f in fits:
        with np.errstate(invalid="ignore", divide="ignore"):
            absurd = (f.status == ACCEPTED) & ~(np.abs(np.log(f.scale / med))
                                                <= math.log(max_scale_ratio))
        f.status[absurd] = REJECT_SCALE


def reasons_counted(status: np.ndarray) -> dict[str, int]:
    """How many crystals each rejection reason took (reasons that took none left out)."""
    counts = {reason: int(np.sum(status == code)) for code, reason in REASONS.items()}
    return {reason: n for reason, n in counts.items() if n}
