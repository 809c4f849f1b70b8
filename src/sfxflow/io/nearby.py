"""Files that travel with the data: the CrystFEL geometry in the folder of CXI files."""

from __future__ import annotations

import glob
import logging
from collections.abc import Sequence
from pathlib import Path

from sfxflow.errors import GeometryError

__all__ = ["geometry_beside"]

log = logging.getLogger(__name__)


def _local_cxi_folders(inputs: Sequence[str]) -> set[Path]:
    folders: set[Path] = set()
    for text in inputs:
        if "://" in text and not text.startswith("file://"):
            continue  # object storage: listing a prefix for a guess is not worth a request
        path = Path(text.removeprefix("file://"))
        if path.is_dir():
            if any(p.suffix.lower() == ".cxi" for p in path.iterdir()):
                folders.add(path)
        elif path.suffix.lower() == ".cxi":
            matches = [Path(m) for m in glob.glob(str(path))] or [path]
            folders.update(m.parent for m in matches)
    return folders


def geometry_beside(inputs: Sequence[str]) -> str | None:
    """The one CrystFEL ``.geom`` in the folders of local CXI inputs (``None`` when there is none).

    CXI files describe no detector; their geometry file usually sits beside them. Used when no
    ``--geometry`` is given; the choice is logged.

    Raises
    ------
    GeometryError
        When there are several, naming them (which one is meant is the user's to say).
    """
    folders = _local_cxi_folders(inputs)
    found = sorted({str(g) for f in folders for g in f.glob("*.geom")})
    if len(found) > 1:
        raise GeometryError(f"no --geometry given, and {len(found)} .geom files sit beside the CXI "
                            f"input(s): {', '.join(found)}; expected --geometry naming one")
    if found:
        log.info("no --geometry given: using %s, the .geom beside the CXI input(s)", found[0])
        return found[0]
    return None
