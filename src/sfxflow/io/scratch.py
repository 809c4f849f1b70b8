"""Scratch files: large read-only arrays written once to local disk and memory-mapped.

A merge keeps every shard's observations for all its cycles. Held in a worker's heap they are
anonymous memory that grows with the observations and that the kernel can only swap; written
once as raw ``.npy`` files and mapped read-only, their pages are file-backed: read from the
page cache at memory speed while there is room, dropped by the kernel under pressure and read
again when next touched. The caller picks the folder (a Dask worker's local directory, set by
Dask's ``temporary-directory``) and removes it with :func:`remove_scratch`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["mapped_arrays", "remove_scratch"]

log = logging.getLogger(__name__)


def mapped_arrays(arrays: Mapping[str, np.ndarray], folder: str | Path) -> dict[str, np.ndarray]:
    """Write each array to ``folder/<n>.npy`` (in a fresh subfolder: a task recomputed after a
    lost worker writes its own) and return them as read-only memory maps, keyed as given.

    Each file is unlinked as soon as it is mapped (where the system allows it: POSIX): the
    mapping keeps its data until the arrays are dropped, and nothing is left on disk however
    the process ends, a worker killed outright included.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     m = mapped_arrays({"x": np.arange(3.0)}, d)
    ...     bool(m["x"].flags.writeable), m["x"].tolist()
    (False, [0.0, 1.0, 2.0])
    """
    target = Path(folder) / uuid.uuid4().hex[:12]
    target.mkdir(parents=True)
    out = {}
    for n, (name, value) in enumerate(arrays.items()):
        path = target / f"{n}.npy"  # numbered: names may hold characters a file name may not
        np.save(path, np.ascontiguousarray(value), allow_pickle=False)
        out[name] = np.load(path, mmap_mode="r", allow_pickle=False)
        with contextlib.suppress(OSError):  # Windows: removed with the folder at the end
            path.unlink()
    return out


def remove_scratch(folder: str | Path) -> bool:
    """Remove ``folder`` and everything in it (mapped files stay readable until unmapped);
    whether it was there. A failure is logged, not raised: cleaning up must not hide the
    error that ended a merge."""
    path = Path(folder)
    if not path.exists():
        return False
    try:
        shutil.rmtree(path)
    except OSError as exc:
        log.warning("could not remove the scratch folder %s (%s)", path, exc)
    return True
