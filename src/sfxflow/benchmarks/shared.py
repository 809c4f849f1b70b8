"""Where the benchmarks find ``../shared`` (real data, reference intensities, CrystFEL peers)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["shared_path"]


def shared_path(relative: str) -> Path | None:
    """``relative`` under the shared folder, or ``None`` where no candidate has it.

    Candidates in order: the parent of ``SFXFLOW_SHARED_DATA`` (which names ``shared/data``),
    ``shared`` beside the working directory, and ``shared`` beside every folder above this
    file (a checkout's ``src/sfxflow/benchmarks`` finds the ``../shared`` next to it).
    """
    env = os.environ.get("SFXFLOW_SHARED_DATA")
    roots = [Path(env).parent] if env else []
    roots += [Path.cwd().parent / "shared", *(p / "shared" for p in Path(__file__).resolve().parents)]
    for root in roots:
        if (root / relative).exists():
            return root / relative
    return None
