"""Starting or joining the Dask cluster a run executes on.

* ``local``: a :class:`distributed.LocalCluster` sized to this machine: one worker process per
  CPU core, one thread each, scheduler and dashboard bound to 127.0.0.1. The CLI forks its
  workers from a process started early that imports what they need
  (:func:`start_worker_forkserver`), and closes it beside the report
  (:func:`closing_in_background`).
* ``scheduler = tcp://host:port`` (or ``scheduler_file``): join a running cluster
  (``dask scheduler`` + ``dask worker``). A joined scheduler is shared: its settings are left as
  they are, and what the run registers there (its worker plugin) is removed at the end.
* ``slurm`` / ``sge`` / ``pbs``: a dask-jobqueue cluster submitting ``jobs`` batch jobs (or
  ``adapt = "MIN:MAX"``, scaled with the work left); with ``container_image`` the worker command
  runs inside the image (``apptainer exec IMAGE python -m distributed.cli.dask_worker ...`` or
  ``shifter --image=IMAGE ...``). :func:`job_script` renders the script without submitting and
  without starting a scheduler.
* ``synchronous``: no Dask at all (serial, in this process): :func:`open_cluster` yields ``None``.

Dask's own configuration applies the usual way: a setting given to sfxflow (command line or
``cluster`` section) is passed to dask-jobqueue; one not given is left to the site's
``jobqueue.yaml`` (``jobqueue.slurm.account``, ``...walltime``, ``...job-extra-directives``,
``...scheduler-options``), and only where that says nothing either does sfxflow fill in its own
choice: 1 core and 4GB per job, one single-threaded worker process per core. TLS comes from
Dask's ``distributed.comm.tls.*`` settings (see docs/hpc.md).

The batch scheduler listens on one address only: the one on ``interface`` (``--interface``, or
the site's ``jobqueue.<kind>.interface``), else this host's outward address; its dashboard on
127.0.0.1 (reach it through an ssh tunnel) unless the site's ``scheduler-options`` say otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sfxflow.errors import ConfigError, InputError
from sfxflow.pipeline.config import ClusterConfig

__all__ = ["ClusterInfo", "closing_in_background", "cluster_threads", "job_script",
           "local_worker_count", "open_cluster", "start_worker_forkserver"]

logger = logging.getLogger(__name__)

_JOBQUEUE = {"slurm": "SLURMCluster", "sge": "SGECluster", "pbs": "PBSCluster"}
# what each batch system calls the account a job is charged to
_ACCOUNT_KEYWORD = {"slurm": "account", "pbs": "account", "sge": "project"}
# sfxflow's choices where neither the user nor the site's Dask configuration set a value
_FALLBACK_CORES = 1
_FALLBACK_MEMORY = "4GB"
_DRY_RUN_SCHEDULER = "{protocol}://<scheduler-address>:8786"


@dataclass
class ClusterInfo:
    """What the run reports about its cluster."""

    kind: str
    scheduler_address: str = ""
    dashboard_link: str = ""
    n_workers: int = 0
    n_threads: int = 0
    job_ids: list[str] = field(default_factory=list)


def local_worker_count() -> int:
    """CPU cores available to this process (affinity-aware)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # pragma: no cover - not on Linux
        return max(os.cpu_count() or 1, 1)


def _site(kind: str, key: str) -> Any:
    """The site's Dask configuration value ``jobqueue.<kind>.<key>`` (``None`` when unset)."""
    import dask.config
    import dask_jobqueue  # noqa: F401 - its import adds the jobqueue defaults to Dask's config

    return dask.config.get(f"jobqueue.{kind}.{key}", None)


def _container_python(cfg: ClusterConfig) -> str:
    image = shlex.quote(cfg.container_image)
    if cfg.container_runtime == "shifter":
        return f"shifter --image={image} python"
    return f"{cfg.container_runtime} exec {image} python"


def _job_kwargs(cfg: ClusterConfig) -> dict[str, Any]:
    """Keyword arguments for the dask-jobqueue job class: what the user set, sfxflow's fallback
    where the site's configuration is silent too, nothing else."""
    kind = cfg.kind
    kwargs: dict[str, Any] = {}
    cores = cfg.cores or _site(kind, "cores")
    if cfg.cores:
        kwargs["cores"] = cfg.cores
    elif cores is None:
        cores = kwargs["cores"] = _FALLBACK_CORES
    if cfg.memory:
        kwargs["memory"] = cfg.memory
    elif _site(kind, "memory") is None:
        kwargs["memory"] = _FALLBACK_MEMORY
    if cfg.processes:
        kwargs["processes"] = cfg.processes
    elif _site(kind, "processes") is None:
        # the per-frame kernels are single-threaded: one worker process per core
        kwargs["processes"] = int(cores)
    processes = kwargs.get("processes") or _site(kind, "processes")
    if processes and int(cores) % int(processes):
        raise ConfigError(f"cluster.processes = {processes} must divide cluster.cores = {cores}")
    if cfg.walltime:
        kwargs["walltime"] = cfg.walltime
    if cfg.queue:
        kwargs["queue"] = cfg.queue
    if cfg.account:
        kwargs[_ACCOUNT_KEYWORD[kind]] = cfg.account
    if cfg.interface:
        kwargs["interface"] = cfg.interface
    if cfg.container_image:
        kwargs["python"] = _container_python(cfg)
    if cfg.job_extra:  # added to the site's directives, not instead of them
        kwargs["job_extra_directives"] = [*(_site(kind, "job-extra-directives") or []),
                                          *cfg.job_extra]
    if kind == "sge" and "memory" in kwargs and _site(kind, "resource-spec") is None:
        # SGE has no memory option of its own: ask for a host with that much free memory.
        # Not h_vmem: it caps the job's address space, and a worker's thread pools and malloc
        # arenas (one per core the host reports) reserve far more than they touch, so pyarrow's
        # allocations failed at 1G on a many-core host; the Dask worker bounds its own memory.
        kwargs["resource_spec"] = f"mem_free={kwargs['memory']}"
    return kwargs


def _security() -> Any:
    """Dask's TLS settings (``distributed.comm.tls.*``) when configured, else ``None``."""
    from distributed.security import Security

    security = Security()
    if security.require_encryption or getattr(security, "tls_ca_file", None):
        return security
    return None


def _job_class(kind: str) -> Any:
    if kind not in _JOBQUEUE:
        raise ConfigError(f"--cluster {kind!r}: expected slurm, sge or pbs")
    try:
        import dask_jobqueue
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise InputError(f"--cluster {kind} needs dask-jobqueue: {exc}") from None
    return getattr(dask_jobqueue, _JOBQUEUE[kind])


def job_script(cfg: ClusterConfig) -> str:
    """The batch script ``--cluster slurm|sge|pbs`` would submit.

    Nothing is submitted and no scheduler is started: the script names a placeholder where the
    scheduler's address will be.
    """
    cls = _job_class(cfg.kind)
    security = _security()
    protocol = "tls" if security is not None else "tcp"
    try:
        job = cls.job_cls(scheduler=_DRY_RUN_SCHEDULER.format(protocol=protocol), name="dry-run",
                          security=security, **_job_kwargs(cfg))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"--cluster {cfg.kind}: {exc}") from None
    return str(job.job_script())


def _scheduler_options(cfg: ClusterConfig) -> dict[str, Any]:
    """Where the batch cluster's scheduler listens: one address, never every interface."""
    from distributed.utils import get_ip

    options = dict(_site(cfg.kind, "scheduler-options") or {})
    options.setdefault("dashboard_address", "127.0.0.1:0")
    if "host" not in options and "interface" not in options:
        interface = cfg.interface or _site(cfg.kind, "interface")
        if interface:
            options["interface"] = interface
        else:  # the address this host reaches others from; batch nodes reach it there
            options["host"] = get_ip()
    if cfg.scheduler_file:
        options["scheduler_file"] = cfg.scheduler_file
    return options


def _jobqueue_cluster(cfg: ClusterConfig, allowed_failures: int | None) -> Any:
    import dask.config

    cls = _job_class(cfg.kind)
    kwargs = _job_kwargs(cfg)
    security = _security()
    settings = {} if allowed_failures is None else {
        "distributed.scheduler.allowed-failures": allowed_failures}
    try:
        with dask.config.set(settings):  # read once, by the scheduler we start here
            return cls(scheduler_options=_scheduler_options(cfg), security=security, **kwargs)
    except ValueError as exc:
        raise ConfigError(f"--cluster {cfg.kind}: {exc}") from None


def _job_ids(cluster: Any) -> list[str]:
    jobs = getattr(cluster, "workers", {}) or {}
    return [str(job.job_id) for job in list(jobs.values()) if getattr(job, "job_id", None)]


def _wait_for_first_worker(cluster: Any, client: Any, cfg: ClusterConfig) -> None:
    from dask.utils import format_time

    try:
        client.wait_for_workers(1, timeout=cfg.worker_timeout_s)
    except TimeoutError:
        ids = _job_ids(cluster)
        queue = cfg.queue or _site(cfg.kind, "queue") or "the default queue"
        jobs = (f"job(s) {', '.join(ids)} still waiting or failed" if ids else
                "no job was accepted by the batch system (see the messages above)")
        raise InputError(f"--cluster {cfg.kind}: no worker joined within "
                         f"{format_time(cfg.worker_timeout_s)} in {queue}: {jobs} "
                         "(check the queue, e.g. squeue/qstat, and the jobs' output files; "
                         "cluster.worker_timeout_s sets the wait)") from None


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


def start_worker_forkserver(cfg: ClusterConfig) -> bool:
    """For a local cluster (``cfg``): start the process its workers will be forked from
    (:func:`sfxflow.pipeline.forkserver.start`), if it does not run yet; returns whether it
    runs. :func:`open_cluster` forks a local cluster's workers from it where it runs."""
    if cfg.kind != "local" or cfg.scheduler or cfg.scheduler_file:
        return False
    from sfxflow.pipeline import forkserver

    return forkserver.start()


#: closes handed to background threads inside :func:`closing_in_background` (``None``: outside)
_background_closes: list[threading.Thread] | None = None


@contextlib.contextmanager
def closing_in_background() -> Iterator[None]:
    """Within: a local cluster whose run ended normally is closed in a background thread, and
    the caller goes on (writes the summary, draws the report) while its workers stop; on
    leaving, wait for those closes.

    Why: the close is a wait (0.3-0.5 s: the workers' teardown and exit, little CPU anywhere),
    and the report drawn after it (1.2-1.4 s of the client's CPU) had the machine to itself.
    A run that raises (Ctrl-C, SIGTERM, a failure) closes its cluster before the exception goes
    on, as outside. For a program that exits after the run (the CLI); a library caller gets
    its cluster closed when :func:`open_cluster` returns.
    """
    global _background_closes
    outer, _background_closes = _background_closes, []
    closes = _background_closes
    try:
        yield
    finally:
        _background_closes = outer
        for thread in closes:
            thread.join()


def _close(client: Any, cluster: Any, *, ended: bool) -> None:
    """Close ``client`` then ``cluster``: in a background thread when the run ``ended``
    normally inside :func:`closing_in_background`, else here and now."""

    def close() -> None:
        try:
            client.close()
        finally:
            cluster.close()

    closes = _background_closes
    if not ended or closes is None:
        close()
        return
    thread = threading.Thread(target=close, name="sfxflow-cluster-close")
    thread.start()
    closes.append(thread)


@contextlib.contextmanager
def open_cluster(cfg: ClusterConfig, *, allowed_failures: int | None = None
                 ) -> Iterator[tuple[Any, ClusterInfo]]:
    """Start or join the cluster; yields ``(client, info)`` (``(None, info)`` when synchronous).

    ``allowed_failures`` (worker deaths one task may cause) is set on a scheduler started here;
    a joined scheduler keeps its own. The cluster started here is closed on exit (batch jobs are
    cancelled, workers stop); a joined one is left running.
    """
    if cfg.scheduler or (cfg.scheduler_file and cfg.kind not in _JOBQUEUE):
        yield from _joined(cfg)
        return
    if cfg.kind == "synchronous":
        yield None, ClusterInfo(kind="synchronous", n_workers=1, n_threads=1)
        return
    import dask.config
    from distributed import Client

    settings = {} if allowed_failures is None else {
        "distributed.scheduler.allowed-failures": allowed_failures}
    if cfg.kind == "local":
        from distributed import LocalCluster

        if cfg.adapt:
            raise ConfigError("cluster.adapt needs a batch cluster (--cluster slurm, sge or pbs)")
        n = cfg.n_workers or local_worker_count()
        from sfxflow.pipeline import forkserver

        forked = forkserver.dask_settings()
        settings.update(forked)
        # a forked worker has its server's environment: this one's now is set in it as it
        # starts, as a spawned worker would inherit it (credentials set since, for one), but
        # not over what the server's own environment set (the nanny's)
        server_env = forkserver.server_environment() or {}
        env = {"env": {k: v for k, v in os.environ.items() if k not in server_env}
               } if forked else {}
        with dask.config.set(settings), _children_ignore_ctrl_c():
            cluster = LocalCluster(n_workers=n, threads_per_worker=cfg.threads_per_worker,
                                   processes=True, host="127.0.0.1",
                                   dashboard_address="127.0.0.1:0",
                                   silence_logs=logging.WARNING, **env)
        try:
            client = Client(cluster)
        except BaseException:
            cluster.close()
            raise
        ended = False
        try:
            from sfxflow.pipeline.execute import LocalWorkerExit

            try:
                client.register_plugin(LocalWorkerExit(), name=LocalWorkerExit.name)
            except Exception as exc:  # only the close is slower without it
                logger.debug("workers will exit without gc.freeze: %s", exc)
            yield client, _info("local", client, cluster.scheduler)
            ended = True
        finally:
            _close(client, cluster, ended=ended)
        return
    cluster = _jobqueue_cluster(cfg, allowed_failures)
    with cluster:
        adapt = cfg.adapt_range()
        if adapt is None:
            cluster.scale(jobs=cfg.jobs)
        else:
            cluster.adapt(minimum_jobs=adapt[0], maximum_jobs=adapt[1])
        with Client(cluster) as client:
            logger.info("%s: %s job(s) submitted; waiting for the first worker", cfg.kind,
                        f"{adapt[0]} to {adapt[1]}" if adapt else cfg.jobs)
            _wait_for_first_worker(cluster, client, cfg)
            info = _info(cfg.kind, client, cluster.scheduler)
            info.job_ids = _job_ids(cluster)
            yield client, info


def check_scheduler_file(cfg: ClusterConfig) -> None:
    """A ``--scheduler-file`` to join must exist (checked before a run starts, too)."""
    if cfg.scheduler_file and not cfg.scheduler and cfg.kind not in _JOBQUEUE \
            and not os.path.exists(cfg.scheduler_file):
        raise InputError(f"--scheduler-file {cfg.scheduler_file}: no such file (start the "
                         "scheduler with `dask scheduler --scheduler-file FILE`, or add --cluster "
                         "to start one)")


def _joined(cfg: ClusterConfig) -> Iterator[tuple[Any, ClusterInfo]]:
    from distributed import Client

    what = f"--scheduler {cfg.scheduler}" if cfg.scheduler else \
        f"--scheduler-file {cfg.scheduler_file}"
    check_scheduler_file(cfg)
    try:
        if cfg.scheduler:
            client = Client(cfg.scheduler, timeout="20s")
        else:
            client = Client(scheduler_file=cfg.scheduler_file, timeout="20s")
    except OSError as exc:
        raise InputError(f"{what}: cannot connect ({exc})") from None
    with client:
        yield client, _info("scheduler", client, None)


def _dashboard_link(client: Any, scheduler: Any) -> str:
    """The dashboard's URL at the address its server really listens on."""
    from distributed.comm.utils import get_tcp_server_addresses
    from distributed.utils import format_dashboard_link

    def listening(dask_scheduler: Any) -> list[tuple[str, int]]:
        server = getattr(dask_scheduler, "http_server", None)
        return [] if server is None else list(get_tcp_server_addresses(server))

    with contextlib.suppress(Exception):
        addresses = (listening(scheduler) if scheduler is not None
                     else client.run_on_scheduler(listening))
        for host, port in addresses:
            if host not in ("0.0.0.0", "::"):  # listening everywhere names no host
                return str(format_dashboard_link(host, port))
    with contextlib.suppress(Exception):
        return str(client.dashboard_link or "")
    return ""


def _info(kind: str, client: Any, scheduler: Any) -> ClusterInfo:
    workers = client.scheduler_info().get("workers", {})
    return ClusterInfo(kind=kind, scheduler_address=str(client.scheduler.address),
                       dashboard_link=_dashboard_link(client, scheduler), n_workers=len(workers),
                       n_threads=sum(int(w.get("nthreads", 1)) for w in workers.values()))


def cluster_threads(client: Any) -> int:
    """Worker threads currently in the cluster."""
    workers = client.scheduler_info().get("workers", {})
    return sum(int(w.get("nthreads", 1)) for w in workers.values())
