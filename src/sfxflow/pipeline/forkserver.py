"""The process a local cluster's workers are forked from: :func:`start`.

Light on purpose (the standard library only until it starts the server): the CLI starts it
before it parses its options, whose settings tree imports numba and the algorithms.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

__all__ = ["WORKER_MODULES", "dask_settings", "server_environment", "start"]

logger = logging.getLogger(__name__)

#: what a local worker imports before and in its first block (distributed, the run's worker
#: plugin, the settings its context unpickles into, the per-frame pipeline, the image readers):
#: imported once, by the server the workers are forked from
WORKER_MODULES = ("distributed", "sfxflow.pipeline.execute", "sfxflow.pipeline.config",
                  "sfxflow.pipeline.frame", "sfxflow.io.sources")
#: distributed's defaults of ``distributed.nanny.pre-spawn-environ`` and the hash seed its nanny
#: sets: a forked worker inherits its server's environment, so the server starts with them
_PRE_SPAWN_DEFAULTS = {"MALLOC_TRIM_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1",
                       "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                       "PYTHONHASHSEED": "6640"}
#: the environment the server started with (``None``: no server started)
_server_env: dict[str, str] | None = None


def start() -> bool:
    """Start now, in the background, multiprocessing's fork server, importing
    :data:`WORKER_MODULES`; returns whether it runs (it does not on a platform without fork
    servers, or called off the main thread).

    Why: each spawned local worker imported distributed and sfxflow itself (about 1 CPU-s:
    0.5 s before the cluster was up, the rest in its first block), after the client's own
    start-up (1.1 CPU-s on one core, the other idle). The server imports them once, on that
    idle core, while the client parses its options, checks its inputs and plans; a worker
    forked from it is up at once. It is no cluster (a user error still comes before any): a
    process that imports, and exits with this one. Its environment is the one the nanny gives
    a spawned worker (single-threaded BLAS, malloc trimming, the hash seed), and Ctrl-C is
    ignored there as in every local worker (the client alone stops them).
    """
    global _server_env
    import multiprocessing

    if _server_env is not None:
        return True
    if ("forkserver" not in multiprocessing.get_all_start_methods()
            or threading.current_thread() is not threading.main_thread()):
        return False
    import signal
    from multiprocessing import forkserver

    # not dask.config here: importing it now would read the DASK_* variables before the CLI
    # sets its logging ones (the nanny still sets a configured pre-spawn-environ in each
    # worker as it starts, too late only for what reads it at import, as BLAS)
    env = dict(_PRE_SPAWN_DEFAULTS)
    saved = {k: os.environ.get(k) for k in env}
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(WORKER_MODULES))
    os.environ.update(env)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the server
    try:
        forkserver.ensure_running()
    except Exception as exc:  # the workers are spawned instead
        logger.debug("no fork server for the local workers: %s", exc)
        return False
    finally:
        signal.signal(signal.SIGINT, previous)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    _server_env = env
    return True


def server_environment() -> dict[str, str] | None:
    """What the server's environment set (``None``: no server started)."""
    return _server_env


def dask_settings() -> dict[str, Any]:
    """The Dask setting that forks local workers from the server, where one was started."""
    if _server_env is None:
        return {}
    import distributed.utils

    # distributed would otherwise name its own preload (the server runs already: no effect)
    # and import pandas and lz4 here to make that list (0.25 s)
    if hasattr(distributed.utils, "_forkserver_preload_set"):
        distributed.utils._forkserver_preload_set = True
    return {"distributed.worker.multiprocessing-method": "forkserver"}
