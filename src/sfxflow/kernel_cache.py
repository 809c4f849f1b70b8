"""Compiled kernels that travel in a container image: numba's cache, copied where numba can write.

Numba only uses a cache directory it can write to, and an image run by Apptainer, Shifter, or
``podman image mount`` is read-only: a cache compiled into the image at build time would be
skipped, and every worker of every node would compile every kernel again (about 70 CPU-s each,
longer than a 100-frame run). The image therefore keeps its build-time cache in
``SFXFLOW_NUMBA_CACHE_SEED`` and points ``NUMBA_CACHE_DIR`` at a writable place; the first sfxflow
process on a node copies what is missing from the first into the second, before any kernel module
is imported. Numba keys each entry by the source file and the CPU it was compiled for, so a node
whose CPU differs from the build host's still compiles (as without a seed), and never loads code
built for another CPU.
"""

import logging
import os
import shutil
from pathlib import Path

_log = logging.getLogger(__name__)

SEED_VARIABLE = "SFXFLOW_NUMBA_CACHE_SEED"
_SEEDED_MARKER = ".sfxflow-seeded"


def seed_numba_cache(environ: dict[str, str] | None = None) -> int:
    """Copy the image's compiled kernels into ``NUMBA_CACHE_DIR``; return the files copied.

    Does nothing without both variables, when they name the same folder, or once a process has
    seeded this cache. Files already there are kept (numba's own entries win); each copy lands
    under a temporary name and is renamed, so workers starting together never read half a file.
    A cache that cannot be written costs compilation, never the run: the error is logged.
    """
    env = os.environ if environ is None else environ
    seed, target = env.get(SEED_VARIABLE), env.get("NUMBA_CACHE_DIR")
    if not seed or not target or not Path(seed).is_dir():
        return 0
    seed_dir, target_dir = Path(seed).resolve(), Path(target).resolve()
    if seed_dir == target_dir or (target_dir / _SEEDED_MARKER).exists():
        return 0
    copied = 0
    try:
        for source in seed_dir.rglob("*"):
            destination = target_dir / source.relative_to(seed_dir)
            if not source.is_file() or destination.exists():
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            partial = destination.with_name(f".{destination.name}.{os.getpid()}.partial")
            shutil.copyfile(source, partial)
            os.replace(partial, destination)
            copied += 1
        (target_dir / _SEEDED_MARKER).touch()
    except OSError as exc:
        _log.warning("compiled kernels not copied from %s=%s to NUMBA_CACHE_DIR=%s (%s); "
                     "numba compiles them instead", SEED_VARIABLE, seed, target, exc)
    return copied
