"""``ProcessConfig``: the one frozen, typed configuration tree of ``sfxflow process``.

Sections (each a frozen dataclass; the algorithms' own ``Params`` live next to their code):

* ``spots`` - :class:`~sfxflow.algorithms.spots.SpotParams`
* ``hit`` - :class:`~sfxflow.algorithms.spots.HitParams`
* ``index`` - :class:`~sfxflow.algorithms.index.IndexParams` (with ``index.refine``)
* ``predict`` - :class:`~sfxflow.algorithms.predict.PredictParams`: the per-crystal profile model
* ``integrate`` - :class:`~sfxflow.algorithms.integrate.IntegrateParams`: summation integration
* ``target`` - :class:`TargetConfig`: the known cell and space group (or a CrystFEL cell file)
* ``io`` - :class:`IOConfig`: blocks, prefetching, geometry, storage endpoint (no secrets)
* ``run`` - :class:`RunConfig`: retries, failure tolerance, limits
* ``cluster`` - :class:`ClusterConfig`: where the workers run

Precedence: defaults < ``--config FILE`` < command-line options < ``--set section.key=value``.
The resolved tree is written in full to ``config.toml`` in the run directory and the values that
differ from the defaults are logged.

>>> cfg = load_config(overrides=["io.frames_per_block=5", "target.space_group=P6122",
...                              "target.cell=[93, 93, 130.5, 90, 90, 120]"])
>>> cfg.io.frames_per_block, cfg.target_cell().space_group.hm
(5, 'P 61 2 2')
>>> sorted(changed_settings(cfg))
['io.frames_per_block', 'target.cell', 'target.space_group']
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sfxflow.algorithms.index import IndexParams, TargetCell
from sfxflow.algorithms.integrate import IntegrateParams
from sfxflow.algorithms.predict import PredictParams
from sfxflow.algorithms.spots import HitParams, SpotParams
from sfxflow.errors import ConfigError
from sfxflow.pipeline import params as _params

__all__ = [
    "CLUSTER_KINDS",
    "ClusterConfig",
    "IOConfig",
    "ProcessConfig",
    "RunConfig",
    "TargetConfig",
    "changed_settings",
    "config_from_toml",
    "load_config",
]

logger = logging.getLogger(__name__)

CLUSTER_KINDS = ("local", "synchronous", "slurm", "sge", "pbs")


@dataclass(frozen=True)
class TargetConfig:
    """The unit cell to index against.

    Parameters
    ----------
    cell : ``(a, b, c, alpha, beta, gamma)`` in Å and degrees; ``None`` = no indexing.
    space_group : Hermann-Mauguin symbol or number.
    cell_file : a CrystFEL ``.cell`` file (resolved into ``cell``/``space_group`` at start).
    """

    cell: tuple[float, float, float, float, float, float] | None = None
    space_group: str = ""
    cell_file: str = ""

    def __post_init__(self) -> None:
        if self.cell is not None:
            if len(self.cell) != 6 or not all(math.isfinite(x) and x > 0 for x in self.cell):
                raise ConfigError(f"target.cell = {list(self.cell)}: expected 6 positive numbers "
                                  "a b c alpha beta gamma (Å, degrees)")


@dataclass(frozen=True)
class IOConfig:
    """Reading inputs and writing results.

    Parameters
    ----------
    frames_per_block : frames per block (the unit of work, one task, one shard).
    prefetch_depth : blocks each worker thread reads ahead while computing (0 = off).
    geometry : CrystFEL ``.geom`` for HDF5/CXI inputs (path or URL); empty for CBF.
    endpoint_url : S3-compatible endpoint for ``s3://`` inputs and run directories.
    profile : AWS profile name (credentials themselves are never part of the configuration).
    write_stream : write CrystFEL stream shards.
    """

    frames_per_block: int = 10
    prefetch_depth: int = 1
    geometry: str = ""
    endpoint_url: str = ""
    profile: str = ""
    write_stream: bool = True

    def __post_init__(self) -> None:
        if self.frames_per_block < 1:
            raise ConfigError(f"io.frames_per_block = {self.frames_per_block}: expected >= 1")
        if not 0 <= self.prefetch_depth <= 4:
            raise ConfigError(f"io.prefetch_depth = {self.prefetch_depth}: expected 0 to 4")


@dataclass(frozen=True)
class RunConfig:
    """Failure handling and limits.

    Parameters
    ----------
    task_retries : reruns of a block whose task raised (a bug or a storage error).
    allowed_failures : worker deaths one block may cause before it is recorded as failed.
    max_blocks : process at most this many blocks in this invocation (0 = all); the next run
        resumes from there.
    strict : let unexpected exceptions in per-frame processing propagate (debugging) instead
        of recording the frame as ``failed``.
    manifest_interval_s : least seconds between manifest rewrites while running.
    """

    task_retries: int = 1
    allowed_failures: int = 3
    max_blocks: int = 0
    strict: bool = False
    manifest_interval_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("task_retries", "allowed_failures", "max_blocks"):
            if getattr(self, name) < 0:
                raise ConfigError(f"run.{name} = {getattr(self, name)}: expected >= 0")


@dataclass(frozen=True)
class ClusterConfig:
    """Where the Dask workers run.

    Parameters
    ----------
    kind : ``local`` (a LocalCluster on this machine), ``synchronous`` (no Dask: serial, in
        process), or a batch system through dask-jobqueue: ``slurm``, ``sge``, ``pbs``.
    scheduler : address of a running scheduler (``tcp://host:8786``); overrides ``kind``.
    n_workers : local worker processes (0 = one per CPU core).
    threads_per_worker : threads per worker process.
    queue, account, walltime, cores, memory, processes, jobs : batch job settings (``cores``
        and ``memory`` per job; ``processes`` worker processes per job; ``jobs`` to submit).
    interface : network interface workers bind to on batch nodes (e.g. ``ib0``), optional.
    container_image : run batch workers inside this image (``apptainer exec IMAGE`` or shifter).
    container_runtime : ``apptainer``, ``singularity`` or ``shifter``.
    job_extra : extra scheduler directives, e.g. ``["--gres=gpu:1"]``.
    """

    kind: str = "local"
    scheduler: str = ""
    n_workers: int = 0
    threads_per_worker: int = 1
    queue: str = ""
    account: str = ""
    walltime: str = "01:00:00"
    cores: int = 1
    memory: str = "4GB"
    processes: int = 0
    jobs: int = 1
    interface: str = ""
    container_image: str = ""
    container_runtime: str = "apptainer"
    job_extra: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in CLUSTER_KINDS:
            raise ConfigError(f"cluster.kind = {self.kind!r}: expected one of {', '.join(CLUSTER_KINDS)}")
        if self.container_runtime not in ("apptainer", "singularity", "shifter"):
            raise ConfigError(f"cluster.container_runtime = {self.container_runtime!r}: expected "
                              "apptainer, singularity or shifter")
        for name in ("n_workers", "processes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"cluster.{name} = {getattr(self, name)}: expected >= 0")
        for name in ("threads_per_worker", "cores", "jobs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"cluster.{name} = {getattr(self, name)}: expected >= 1")
        if not re.fullmatch(r"(\d+-)?\d+(:\d{1,2}){0,2}", str(self.walltime).strip()):
            # the batch system would reject every worker job and the run would wait forever
            raise ConfigError(f"cluster.walltime = {self.walltime!r}: expected HH:MM:SS "
                              "(or D-HH:MM:SS, or minutes)")


@dataclass(frozen=True)
class ProcessConfig:
    """Everything ``sfxflow process`` needs besides its inputs and run directory."""

    spots: SpotParams = field(default_factory=SpotParams)
    hit: HitParams = field(default_factory=HitParams)
    index: IndexParams = field(default_factory=IndexParams)
    predict: PredictParams = field(default_factory=PredictParams)
    integrate: IntegrateParams = field(default_factory=IntegrateParams)
    target: TargetConfig = field(default_factory=TargetConfig)
    io: IOConfig = field(default_factory=IOConfig)
    run: RunConfig = field(default_factory=RunConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def target_cell(self) -> TargetCell | None:
        """The indexing target, or ``None`` when no cell is configured (hits are not indexed)."""
        if self.target.cell is None:
            return None
        if not self.target.space_group:
            raise ConfigError("target.space_group is empty: a cell needs a space group "
                              "(e.g. --space-group P6122)")
        return _target(tuple(self.target.cell), self.target.space_group)

    def to_toml(self) -> str:
        """The whole resolved tree as TOML (see :func:`config_from_toml`)."""
        return _params.to_toml(self)


@functools.lru_cache(maxsize=16)
def _target(cell: tuple[float, ...], space_group: str) -> TargetCell:
    try:
        return TargetCell(cell, space_group)  # type: ignore[arg-type]  # it converts
    except ValueError as exc:
        raise ConfigError(f"target: {exc}") from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                base: Mapping[str, Any] | None = None) -> ProcessConfig:
    """Build a :class:`ProcessConfig` from a file, a mapping of CLI values and ``--set`` strings.

    Parameters
    ----------
    path : ``.toml`` / ``.yaml`` file, or ``None``.
    overrides : ``section.key=value`` strings applied last.
    base : nested mapping applied after the file (the CLI's own options), before ``overrides``.

    Raises
    ------
    ConfigError
        Unknown key (naming it and the accepted keys) or a bad value.
    """
    data: dict[str, Any] = {}
    where = "configuration"
    if path is not None:
        data = _params.load_mapping(path)
        where = str(path)
    cfg = _params.from_toml_mapping(ProcessConfig, data, where=where)
    if base:
        merged = _params.to_mapping(cfg)
        for section, values in base.items():
            for key, value in values.items():
                _params.set_path(merged, f"{section}.{key}", value)
        cfg = _params.from_mapping(ProcessConfig, merged, where="command line")
    return _params.apply_overrides(cfg, list(overrides))


def config_from_toml(text: str, where: str = "config.toml") -> ProcessConfig:
    """Read back a ``config.toml`` written by :meth:`ProcessConfig.to_toml`."""
    import tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    return _params.from_toml_mapping(ProcessConfig, data, where=where)


def changed_settings(cfg: ProcessConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ from the defaults: key -> (default, value)."""
    return _params.differences(ProcessConfig(), cfg)


def with_target(cfg: ProcessConfig, cell: Sequence[float], space_group: str) -> ProcessConfig:
    """Copy of ``cfg`` with the target cell and space group set (cell file resolved)."""
    target = TargetConfig(cell=tuple(float(x) for x in cell), space_group=space_group,  # type: ignore[arg-type]
                          cell_file=cfg.target.cell_file)
    return replace(cfg, target=target)
