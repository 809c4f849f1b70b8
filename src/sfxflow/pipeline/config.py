"""``ProcessConfig``: the one frozen, typed configuration tree of ``sfxflow process``.

Sections (each a frozen dataclass; the algorithms' own ``Params`` live next to their code):

* ``detector`` - :class:`DetectorConfig`: the detector's gain
* ``spots`` - :class:`~sfxflow.algorithms.spots.SpotParams` (``spots.radial``: the radial method's)
* ``hit`` - :class:`~sfxflow.algorithms.spots.HitParams`
* ``index`` - :class:`~sfxflow.algorithms.index.IndexParams` (with ``index.refine``)
* ``predict`` - :class:`~sfxflow.algorithms.predict.PredictParams`: the per-crystal profile model
* ``integrate`` - :class:`~sfxflow.algorithms.integrate.IntegrateParams`: summation integration
* ``target`` - :class:`TargetConfig`: the known cell and space group (or a CrystFEL cell file)
* ``io`` - :class:`IOConfig`: blocks, prefetching, geometry, storage endpoint (no secrets)
* ``run`` - :class:`RunConfig`: retries, failure tolerance, limits
* ``cluster`` - :class:`ClusterConfig`: where the workers run

Precedence: defaults < ``--preset NAME`` < ``--config FILE`` < command-line flags <
``--set section.key=value``. Flags, keys, ranges and docs are generated from the dataclasses
(:mod:`sfxflow.pipeline.params`); a section added to a tree needs no code here or in the CLI.
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
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from sfxflow.algorithms.index import IndexParams, TargetCell
from sfxflow.algorithms.integrate import IntegrateParams
from sfxflow.algorithms.merge.scale import MergeParams
from sfxflow.algorithms.predict import PredictParams
from sfxflow.algorithms.simulate import SimulationParams
from sfxflow.algorithms.spots import HitParams, SpotParams
from sfxflow.errors import ConfigError, redact_userinfo
from sfxflow.models import as_space_group, as_unit_cell
from sfxflow.pipeline import params as _params
from sfxflow.settings import SettingError, check_fields, section, setting

T = TypeVar("T")

__all__ = [
    "CLUSTER_KINDS",
    "MOVED",
    "TREES",
    "ClusterConfig",
    "DetectorConfig",
    "FindSpotsConfig",
    "IOConfig",
    "IndexConfig",
    "MergeConfig",
    "ProcessConfig",
    "RunConfig",
    "SimulateConfig",
    "TargetConfig",
    "changed_settings",
    "config_from_toml",
    "config_reference",
    "load_config",
    "preset",
    "preset_names",
    "resolve_tree",
]

logger = logging.getLogger(__name__)

CLUSTER_KINDS = ("local", "synchronous", "slurm", "sge", "pbs")
CELL_EXPECTED = "six numbers a b c alpha beta gamma (Å, degrees) that form a real cell"
SPACE_GROUP_EXPECTED = "a space group symbol (P6122, 'P 61 2 2') or number from 1 to 230"


def _space_group_or_empty(text: str) -> None:
    if text:
        as_space_group(text)


@dataclass(frozen=True)
class TargetConfig:
    """The unit cell to index against.

    Parameters
    ----------
    cell : ``(a, b, c, alpha, beta, gamma)`` in Å and degrees; ``None`` = no indexing.
    space_group : Hermann-Mauguin symbol or number (1 to 230).
    cell_file : a CrystFEL ``.cell`` file (resolved into ``cell``/``space_group`` at start).
    """

    cell: tuple[float, float, float, float, float, float] | None = setting(
        None, check=as_unit_cell, expect=CELL_EXPECTED)
    space_group: str = setting("", check=_space_group_or_empty, expect=SPACE_GROUP_EXPECTED)
    cell_file: str = ""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class DetectorConfig:
    """The detector's response (its geometry: ``io.geometry``).

    Parameters
    ----------
    gain_adu_per_photon : overrides every panel's ``adu_per_photon`` (from the geometry or the
        image files) when set; panels without a gain and no override are taken as 1 ADU per
        photon. LCLS CSPAD CBFs declare a placeholder 1.0; their one-photon peak is at ~9 ADU
        (``--preset cspad-cbf``); a warning names the gain the first frame shows.
    """

    gain_adu_per_photon: float | None = setting(None, gt=0, le=1e6)

    def __post_init__(self) -> None:
        check_fields(self)


#: Settings that moved: old dotted key -> new one. Configuration files, presets, ``--set`` and
#: the old flags (``--spots-gain-adu-per-photon``) still take the old key, with a warning that
#: names the new one; a run directory's ``config.toml`` from before the move still resumes.
MOVED: dict[str, str] = {
    "spots.gain_adu_per_photon": "detector.gain_adu_per_photon",
    "spots.radial_snr": "spots.radial.snr",
    "spots.radial_iterations": "spots.radial.iterations",
    "spots.radial_bin_px": "spots.radial.bin_px",
}


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

    frames_per_block: int = setting(10, ge=1, le=1000)
    prefetch_depth: int = setting(1, ge=0, le=4)
    geometry: str = ""
    endpoint_url: str = ""
    profile: str = ""
    write_stream: bool = True

    def __post_init__(self) -> None:
        check_fields(self)


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
    report : write ``report.html`` into the run directory (refreshed while running).
    report_interval_s : least seconds between report refreshes while running.
    storage_retry_s : how long a transient storage error (refused connection, timeout, HTTP
        5xx, EIO) is retried, with back-off, before the frames concerned are left for a rerun;
        one storage operation ends within this plus one connect timeout (3 s) in any case.
    """

    task_retries: int = setting(1, ge=0, le=100)
    allowed_failures: int = setting(3, ge=0, le=100)
    max_blocks: int = setting(0, ge=0, le=10**12)
    strict: bool = False
    manifest_interval_s: float = setting(5.0, ge=0, le=86_400)
    report: bool = True
    report_interval_s: float = setting(30.0, ge=0, le=86_400)
    storage_retry_s: float = setting(60.0, ge=0, le=86_400)

    def __post_init__(self) -> None:
        check_fields(self)


def _pattern(regex: str, flags: int = 0) -> Callable[[str], None]:
    compiled = re.compile(regex, flags)

    def check(text: str) -> None:
        if text and not compiled.fullmatch(text.strip()):
            raise ValueError(text)

    return check


_scheduler = _pattern(r"synchronous|(?:(?:tcp|tls|ucx|ws|wss|inproc)://)?[\w.\-\[\]:]*[\w\]]:\d{1,5}/?")
# the batch system would reject every worker job and the run would wait forever
_walltime = _pattern(r"(\d+-)?\d+(:\d{1,2}){0,2}")
_memory_text = _pattern(r"\d*\.?\d+\s*([KMGTP]i?B?|B)?", re.IGNORECASE)


def _memory(text: str) -> None:
    _memory_text(text)
    if not text.strip() or not float(re.match(r"[\d.]*", text.strip()).group() or 0) > 0:  # type: ignore[union-attr]
        raise ValueError(text)


def _optional(check: Any) -> Any:
    """``check``, except that an empty value (not set here: the site's setting) passes."""
    def optional(text: str) -> None:
        if str(text).strip():
            check(text)
    return optional


def _adapt(text: str) -> tuple[int, int]:
    # a minimum of 0 would leave the run waiting for a first worker nobody asks for
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise ValueError(text)
    return int(match[1]), int(match[2])


@dataclass(frozen=True)
class ClusterConfig:
    """Where the Dask workers run.

    Parameters
    ----------
    kind : ``local`` (a LocalCluster on this machine), ``synchronous`` (no Dask: serial, in
        process), or a batch system through dask-jobqueue: ``slurm``, ``sge``, ``pbs``.
    scheduler : address of a running scheduler (``tcp://host:8786``); overrides ``kind``.
    scheduler_file : with a batch ``kind``, the scheduler writes its address there (for workers
        started by hand); otherwise join the scheduler that file describes.
    n_workers : local worker processes (0 = one per CPU core).
    threads_per_worker : threads per worker process.
    queue, account, walltime, cores, memory, processes : batch job settings (``cores`` and
        ``memory`` per job; ``processes`` worker processes per job). Empty or 0 = not set here:
        the site's Dask configuration (``jobqueue.yaml``) applies, then sfxflow's fallback
        (1 core, 4GB, one single-threaded worker per core; dask-jobqueue's wall time).
    jobs : batch jobs to submit (a fixed-size cluster).
    adapt : ``"MIN:MAX"`` jobs, scaled with the queue of blocks (dask-jobqueue's adaptive
        mode) instead of a fixed ``jobs``; empty = fixed.
    worker_timeout_s : seconds to wait for the first batch worker before giving up.
    interface : network interface workers bind to on batch nodes (e.g. ``ib0``), optional.
    container_image : run batch workers inside this image (``apptainer exec IMAGE`` or shifter).
    container_runtime : ``apptainer``, ``singularity`` or ``shifter``.
    job_extra : extra scheduler directives added to the site's, e.g. ``["--qos=debug"]``.
    """

    kind: str = setting("local", choices=CLUSTER_KINDS, flag="cluster")
    scheduler: str = setting("", check=_scheduler, expect="a scheduler address such as "
                             "tcp://host:8786, or synchronous (no Dask: serial, in process)")
    n_workers: int = setting(0, ge=0, le=1024, flag="workers")
    threads_per_worker: int = setting(1, ge=1, le=1024)
    scheduler_file: str = ""
    queue: str = ""
    account: str = ""
    walltime: str = setting("", check=_optional(_walltime),
                            expect="HH:MM:SS, D-HH:MM:SS or minutes (empty: the site's setting)")
    cores: int = setting(0, ge=0, le=4096)
    memory: str = setting("", check=_optional(_memory),
                          expect="a positive amount such as 4GB or 512MiB (empty: the site's)")
    processes: int = setting(0, ge=0, le=4096)
    jobs: int = setting(1, ge=1, le=100_000)
    adapt: str = setting("", check=_optional(_adapt),
                         expect="MIN:MAX jobs with 1 <= MIN <= MAX (e.g. 1:20)")
    worker_timeout_s: float = setting(1800.0, gt=0, le=1e7)
    interface: str = ""
    container_image: str = ""
    container_runtime: str = setting("apptainer", choices=("apptainer", "singularity", "shifter"))
    job_extra: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_fields(self)
        if self.scheduler.strip() == "synchronous":
            object.__setattr__(self, "kind", "synchronous")
            object.__setattr__(self, "scheduler", "")

    def adapt_range(self) -> tuple[int, int] | None:
        """``adapt`` as ``(minimum, maximum)`` jobs, or ``None`` for a fixed number of jobs."""
        return _adapt(self.adapt) if self.adapt else None


@dataclass(frozen=True)
class ProcessConfig:
    """Everything ``sfxflow process`` needs besides its inputs and run directory.

    Parameters
    ----------
    detector : the detector's gain (flag ``--gain-adu-per-photon``).
    spots : spot finding (flags ``--spots-*``).
    hit : hit finding (flags ``--hit-*``).
    index : indexing (flags ``--index-*``; refinement ``--refine-*``).
    predict : prediction of reflection positions (flags ``--predict-*``).
    integrate : integration of the predicted reflections (flags ``--integrate-*``).
    target : the target cell (flags ``--cell``, ``--space-group``, ``--cell-file``).
    io : reading inputs and writing results.
    run : failure handling and limits.
    cluster : where the Dask workers run.
    """

    detector: DetectorConfig = section(DetectorConfig, flag_prefix="")
    spots: SpotParams = section(SpotParams, flag_prefix="spots-")
    hit: HitParams = section(HitParams, flag_prefix="hit-")
    index: IndexParams = section(IndexParams, flag_prefix="index-")
    predict: PredictParams = section(PredictParams, flag_prefix="predict-")
    integrate: IntegrateParams = section(IntegrateParams, flag_prefix="integrate-")
    target: TargetConfig = section(TargetConfig, flag_prefix="")
    io: IOConfig = section(IOConfig, flag_prefix="")
    run: RunConfig = section(RunConfig, flag_prefix="")
    cluster: ClusterConfig = section(ClusterConfig, flag_prefix="")

    def target_cell(self) -> TargetCell | None:
        """The indexing target, or ``None`` when no cell is configured (hits are not indexed)."""
        if self.target.cell is None:
            return None
        if not self.target.space_group:
            raise SettingError("target.space_group is empty: a cell needs a space group "
                               "(e.g. --space-group P6122)")
        return _target(tuple(self.target.cell), self.target.space_group)

    def to_toml(self) -> str:
        """The whole resolved tree as TOML (see :func:`config_from_toml`); a password inside a
        URL (``--geometry http://user:password@host/...``) is written as ``***``."""
        return redact_userinfo(_params.to_toml(self))


@dataclass(frozen=True)
class FindSpotsConfig:
    """Settings of ``sfxflow find-spots``.

    Parameters
    ----------
    detector : the detector's gain (as for ``process``).
    spots : spot finding (flags ``--spots-*``, as for ``process``).
    hit : hit finding (flags ``--hit-*``).
    """

    detector: DetectorConfig = section(DetectorConfig, flag_prefix="")
    spots: SpotParams = section(SpotParams, flag_prefix="spots-")
    hit: HitParams = section(HitParams, flag_prefix="hit-")


@dataclass(frozen=True)
class IndexConfig:
    """Settings of ``sfxflow index``.

    Parameters
    ----------
    index : indexing (flags ``--index-*``, as for ``process``; refinement ``--refine-*``).
    """

    index: IndexParams = section(IndexParams, flag_prefix="index-")


@dataclass(frozen=True)
class SimulateConfig:
    """Settings of ``sfxflow simulate``.

    Parameters
    ----------
    simulation : the simulated beam, crystals and detector response.
    """

    simulation: SimulationParams = section(SimulationParams, flag_prefix="")


@dataclass(frozen=True)
class MergeConfig:
    """Settings of ``sfxflow merge`` (and of ``process --merge``).

    Parameters
    ----------
    merge : scaling, partiality model, rejection and statistics.
    cluster : where the Dask workers run (as for ``process``).
    """

    merge: MergeParams = section(MergeParams, flag_prefix="")
    cluster: ClusterConfig = section(ClusterConfig, flag_prefix="")


#: Every configuration tree with a command of its own: name -> (tree, what it configures).
TREES: dict[str, tuple[type, str]] = {
    "process": (ProcessConfig, "`sfxflow process` (written in full to RUN/config.toml)"),
    "find-spots": (FindSpotsConfig, "`sfxflow find-spots`"),
    "index": (IndexConfig, "`sfxflow index`"),
    "simulate": (SimulateConfig, "`sfxflow simulate`"),
    "merge": (MergeConfig, "`sfxflow merge`"),
}


@functools.lru_cache(maxsize=16)
def _target(cell: tuple[float, ...], space_group: str) -> TargetCell:
    try:
        return TargetCell(cell, space_group)  # type: ignore[arg-type]  # it converts
    except ValueError as exc:
        raise SettingError(f"target: {exc}") from None


def preset_names() -> list[str]:
    """Names of the presets shipped in ``sfxflow/presets`` (``cspad-cbf``, ...)."""
    folder = resources.files("sfxflow") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def preset(name: str) -> dict[str, Any]:
    """The settings of a shipped preset, as a nested mapping."""
    if name not in preset_names():
        raise ConfigError(f"--preset {name!r}: no such preset; expected one of "
                          f"{', '.join(preset_names())}")
    text = (resources.files("sfxflow") / "presets" / f"{name}.toml").read_text("utf-8")
    return tomllib.loads(text)


def resolve_tree(cls: type[T], *, presets: Sequence[str] = (), path: str | Path | None = None,
                 flags: Mapping[str, Any] | None = None, overrides: Sequence[str] = ()) -> T:
    """A configuration tree from, in rising precedence: defaults, presets, a file, flags, ``--set``.

    Parameters
    ----------
    cls : the tree (:class:`ProcessConfig`, :class:`FindSpotsConfig`, ...).
    presets : names of shipped presets (their sections the tree lacks are ignored).
    path : a ``.toml`` / ``.yaml`` configuration file.
    flags : ``{dotted key: value}`` from command-line flags.
    overrides : ``section.key=value`` strings.

    Raises
    ------
    ConfigError
        Unknown key (naming it and the accepted keys) or a bad value, naming where it came from.
    """
    tree: T = _params.resolve(cls, [])
    for name in presets:
        tree = _params.resolve(cls, [(f"preset {name}", preset(name))], base=tree, strict=False,
                               moved=MOVED)
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if path is not None:
        layers.append((str(path), _params.load_mapping(path)))
    if flags:
        layers.append((_params.FLAGS, flags))
    if overrides:
        layers.append(("--set", dict(_params.parse_override(o) for o in overrides)))
    return _params.resolve(cls, layers, base=tree, moved=MOVED)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                base: Mapping[str, Any] | None = None,
                presets: Sequence[str] = ()) -> ProcessConfig:
    """Build a :class:`ProcessConfig` from presets, a file, a mapping of values and ``--set`` strings.

    Parameters
    ----------
    path : ``.toml`` / ``.yaml`` file, or ``None``.
    overrides : ``section.key=value`` strings applied last.
    base : nested or dotted mapping applied after the file, before ``overrides``.
    presets : shipped presets applied first (see :func:`preset_names`).
    """
    return resolve_tree(ProcessConfig, presets=presets, path=path, flags=base, overrides=overrides)


def config_from_toml(text: str, where: str = "config.toml") -> ProcessConfig:
    """Read back a ``config.toml`` written by :meth:`ProcessConfig.to_toml`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    return _params.resolve(ProcessConfig, [(where, data)], moved=MOVED, warn_moved=False)


def changed_settings(cfg: ProcessConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ from the defaults: key -> (default, value)."""
    return _params.differences(ProcessConfig(), cfg)


def with_target(cfg: ProcessConfig, cell: Sequence[float], space_group: str) -> ProcessConfig:
    """Copy of ``cfg`` with the target cell and space group set (cell file resolved)."""
    target = TargetConfig(cell=tuple(float(x) for x in cell), space_group=space_group,  # type: ignore[arg-type]
                          cell_file=cfg.target.cell_file)
    return replace(cfg, target=target)


def config_reference() -> str:
    """The text of ``docs/config.md``: every setting of every command, generated from the code.

    Regenerate with ``python -m sfxflow.pipeline.config > docs/config.md`` (a test fails when
    the file is stale).
    """
    parts = [
        "# Configuration reference",
        "",
        "Generated from the code by `python -m sfxflow.pipeline.config > docs/config.md`; do not "
        "edit by hand (`tests/pipeline/test_params_config.py` fails when this file is stale).",
        "",
        "Every setting is a key of a TOML/YAML file (`--config FILE`, sections as tables), a "
        "`--set SECTION.KEY=VALUE` override and a command-line flag; precedence: defaults < "
        "`--preset NAME` < `--config FILE` < flags < `--set`. `--print-config` prints the resolved "
        "configuration of a command with these docs. A value outside its range is refused with a "
        "message naming the option or key, the value and the accepted range (exit status 2). "
        "Optional settings take `none`. Each `Params` class lives next to its algorithm and "
        "declares its ranges with `sfxflow.settings.setting`; a section added to a tree gets its "
        "flags, keys, checks and this documentation with no other code.",
        "",
        "Moved settings (the old key, in a file or `--set`, and its old flag still work, with a "
        "warning naming the new one): " + ", ".join(f"`{old}` -> `{new}`" for old, new in MOVED.items())
        + ".",
        "",
        "Presets (`--preset NAME`, files in `src/sfxflow/presets/`):",
        "",
    ]
    for name in preset_names():
        text = (resources.files("sfxflow") / "presets" / f"{name}.toml").read_text("utf-8")
        comment = " ".join(line.lstrip("# ").strip() for line in text.splitlines()
                           if line.startswith("#"))
        changed = _params.differences(ProcessConfig(), _params.resolve(
            ProcessConfig, [(name, tomllib.loads(text))], strict=False, moved=MOVED))
        settings = ", ".join(f"`{k} = {new}`" for k, (_, new) in changed.items())
        parts.append(f"* `{name}`: {comment} Sets {settings}.")
    parts.append("")
    for command, (tree, what) in TREES.items():
        parts.append(_params.markdown(tree, f"`sfxflow {command}`", f"Settings of {what}."))
    return "\n".join(parts).rstrip("\n") + "\n"


if __name__ == "__main__":
    import sys

    from sfxflow.pipeline import config  # the module itself, not this __main__ copy

    sys.stdout.write(config.config_reference())
