"""Starting or joining the Dask cluster a run executes on.

* ``local``: a :class:`distributed.LocalCluster` sized to this machine: one worker process per
  CPU core, one thread each, scheduler and dashboard bound to 127.0.0.1.
* ``scheduler = tcp://host:port``: join a running cluster (``dask scheduler`` + ``dask worker``).
* ``slurm`` / ``sge`` / ``pbs``: a dask-jobqueue cluster submitting ``jobs`` batch jobs of
  ``cores`` worker processes (one thread each); with ``container_image`` the worker command runs
  inside the image (``apptainer exec IMAGE python -m distributed.cli.dask_worker ...`` or
  ``shifter --image=IMAGE ...``). :func:`job_script` renders the script without submitting.
* ``synchronous``: no Dask at all (serial, in this process): :func:`open_cluster` yields ``None``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sfxflow.errors import ConfigError, InputError
from sfxflow.pipeline.config import ClusterConfig

__all__ = ["ClusterInfo", "job_script", "local_worker_count", "open_cluster"]

logger = logging.getLogger(__name__)

_JOBQUEUE = {"slurm": "SLURMCluster", "sge": "SGECluster", "pbs": "PBSCluster"}


@dataclass
class ClusterInfo:
    """What the run reports about its cluster."""

    kind: str
    scheduler_address: str = ""
    dashboard_link: str = ""
    n_workers: int = 0
    n_threads: int = 0


def local_worker_count() -> int:
    """CPU cores available to this process (affinity-aware)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # pragma: no cover - not on Linux
        return max(os.cpu_count() or 1, 1)


def _python_command(cfg: ClusterConfig) -> str:
    python = "python" if cfg.container_image else sys.executable
    if not cfg.container_image:
        return python
    image = shlex.quote(cfg.container_image)
    if cfg.container_runtime == "shifter":
        return f"shifter --image={image} {python}"
    return f"{cfg.container_runtime} exec {image} {python}"


def _jobqueue_cluster(cfg: ClusterConfig) -> Any:
    try:
        import dask_jobqueue
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise InputError(f"--cluster {cfg.kind} needs dask-jobqueue: {exc}") from None
    cls = getattr(dask_jobqueue, _JOBQUEUE[cfg.kind])
    processes = cfg.processes or cfg.cores
    if cfg.cores % processes:
        raise ConfigError(f"cluster.processes = {processes} must divide cluster.cores = {cfg.cores}")
    kwargs: dict[str, Any] = {
        "cores": cfg.cores,
        "memory": cfg.memory,
        "processes": processes,
        "walltime": cfg.walltime,
        "python": _python_command(cfg),
        "job_name": "sfxflow-worker",
        "scheduler_options": {"dashboard_address": "127.0.0.1:0"},
        "job_extra_directives": list(cfg.job_extra),
    }
    if cfg.queue:
        kwargs["queue"] = cfg.queue
    if cfg.account:
        kwargs["account"] = cfg.account
    if cfg.interface:
        kwargs["interface"] = cfg.interface
    if cfg.kind == "sge":  # SGE has no --mem; pass the memory as a resource request
        kwargs["resource_spec"] = f"h_vmem={cfg.memory}"
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"--cluster {cfg.kind}: {exc}") from None


def job_script(cfg: ClusterConfig) -> str:
    """The batch script ``--cluster slurm|sge|pbs`` would submit (nothing is submitted)."""
    if cfg.kind not in _JOBQUEUE:
        raise ConfigError(f"--dry-run needs --cluster slurm, sge or pbs, got {cfg.kind!r}")
    cluster = _jobqueue_cluster(cfg)
    try:
        return str(cluster.job_script())
    finally:
        cluster.close()


@contextlib.contextmanager
def _children_ignore_ctrl_c() -> Iterator[None]:
    """Start local worker processes with SIGINT ignored (an ignored signal survives exec, and
    Python then installs no KeyboardInterrupt handler): Ctrl-C at the terminal reaches the
    whole process group, and workers dying of it print dozens of lines of tracebacks, when the
    client alone should stop and close them."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def open_cluster(cfg: ClusterConfig) -> Iterator[tuple[Any, ClusterInfo]]:
    """Start or join the cluster; yields ``(client, info)`` (``(None, info)`` when synchronous).

    The cluster started here is closed on exit (workers stop); a joined one is left running.
    """
    if cfg.scheduler:
        from distributed import Client

        try:
            client = Client(cfg.scheduler, timeout="20s")
        except OSError as exc:
            raise InputError(f"--scheduler {cfg.scheduler}: cannot connect ({exc})") from None
        with client:
            yield client, _info("scheduler", client)
        return
    if cfg.kind == "synchronous":
        yield None, ClusterInfo(kind="synchronous", n_workers=1, n_threads=1)
        return
    if cfg.kind == "local":
        from distributed import Client, LocalCluster

        n = cfg.n_workers or local_worker_count()
        with _children_ignore_ctrl_c():
            cluster = LocalCluster(n_workers=n, threads_per_worker=cfg.threads_per_worker,
                                   processes=True, host="127.0.0.1",
                                   dashboard_address="127.0.0.1:0", silence_logs=logging.WARNING)
        with cluster, Client(cluster) as client:
            yield client, _info("local", client)
        return
    cluster = _jobqueue_cluster(cfg)
    from distributed import Client

    with cluster:
        cluster.scale(jobs=cfg.jobs)
        with Client(cluster) as client:
            logger.info("submitted %d %s job(s); waiting for the first worker", cfg.jobs, cfg.kind)
            client.wait_for_workers(1)
            yield client, _info(cfg.kind, client)


def _info(kind: str, client: Any) -> ClusterInfo:
    workers = client.scheduler_info().get("workers", {})
    dashboard = ""
    with contextlib.suppress(Exception):
        dashboard = str(client.dashboard_link or "")
    return ClusterInfo(kind=kind, scheduler_address=str(client.scheduler.address),
                       dashboard_link=dashboard, n_workers=len(workers),
                       n_threads=sum(int(w.get("nthreads", 1)) for w in workers.values()))


def cluster_threads(client: Any) -> int:
    """Worker threads currently in the cluster."""
    workers = client.scheduler_info().get("workers", {})
    return sum(int(w.get("nthreads", 1)) for w in workers.values())
