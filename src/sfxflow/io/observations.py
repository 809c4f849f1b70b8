"""Integrated observations for merging: read from sfxflow run directories and CrystFEL streams;
write simulated ones as a run directory (docs/run-directory.md) and as a stream.

A merge input is cut into shards (:class:`ShardSpec`): one per ``shards/<id>.reflections.parquet``
of a run directory, one per stream file. :func:`read_shard` turns one into plain arrays
(:class:`ShardData`), on whichever worker the shard is merged.
"""

from __future__ import annotations

import logging
import math
import re
import tomllib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import gemmi
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sfxflow.algorithms.diffraction import polarisation_factor
from sfxflow.errors import InputError
from sfxflow.io.results import RunDir, parquet_bytes, read_parquet_bytes
from sfxflow.io.storage import shown_url
from sfxflow.io.stream import UNUSABLE_FLAGS
from sfxflow.models import A_MATRIX_COLUMNS, a_matrix_columns

__all__ = [
    "ShardData",
    "ShardSpec",
    "discover_shards",
    "read_shard",
    "read_stream_header",
    "refuse_merge_output",
    "remove_stale_scaled",
    "write_observation_run",
]

log = logging.getLogger(__name__)

def crystal_ids_of(source_url: Sequence[str], frame_index: Sequence[int],
                   crystal: Sequence[int]) -> np.ndarray:
    """Global crystal ids: a 63-bit hash of ``(source_url, frame_index, crystal)``.

    The id names the crystal, not its place in an input, so a run directory and its own stream
    give every crystal the same id, hence the same random half-set (CC1/2) and the same
    subsets: one answer per run however it is read.

    >>> a = crystal_ids_of(["r.cxi", "r.cxi"], [3, 3], [0, 1])
    >>> bool(a[0] != a[1]), bool((a == crystal_ids_of(["r.cxi", "r.cxi"], [3, 3], [0, 1])).all())
    (True, True)
    """
    import hashlib

    out = np.empty(len(source_url), dtype=np.int64)
    for i, (u, f, c) in enumerate(zip(source_url, frame_index, crystal, strict=True)):
        digest = hashlib.blake2b(f"{u}\0{int(f)}\0{int(c)}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") & (2**63 - 1)
    return out


@dataclass(frozen=True)
class ShardSpec:
    """One unit of merge work: a run directory's reflection shard, or a whole stream."""

    kind: str  # "run" or "stream"
    root: str  # the run directory, or the stream's URL
    name: str  # shard id within the run directory ("" for a stream)
    number: int  # position among all shards (names its scaled/ file)
    space_group: str = ""  #: what the input records ("": none); never guessed
    cell: tuple[float, ...] = ()
    lattice: tuple[str, ...] = ()  #: a stream's target lattice (type, centering, unique axis)

    @property
    def label(self) -> str:
        return shown_url(self.root) + (f"/shards/{self.name}" if self.name else "")

    @property
    def input_label(self) -> str:
        """The input (run directory or stream) this shard belongs to, for messages."""
        return shown_url(self.root)


@dataclass
class ShardData:
    """A shard's crystals and observations as arrays.

    ``crystal_ids`` are global (:func:`crystal_ids_of`); ``obs_crystal`` indexes
    ``crystal_ids``; ``rejected`` counts crystals left out on reading, by reason.
    """

    crystal_ids: np.ndarray
    a_matrices: np.ndarray
    wavelengths_a: np.ndarray
    cells: np.ndarray
    source_url: list[str]
    frame_index: np.ndarray
    crystal: np.ndarray
    obs_crystal: np.ndarray
    hkl: np.ndarray
    intensity: np.ndarray
    sigma: np.ndarray
    polarisation: np.ndarray
    rejected: dict[str, int] = field(default_factory=dict)
    #: crystals per lattice as the input records them ("orthorhombic C": 12; streams only)
    lattices: dict[str, int] = field(default_factory=dict)

    @property
    def n_crystals(self) -> int:
        return int(self.crystal_ids.shape[0])


def _is_stream(url: str) -> bool:
    return url.rstrip("/").lower().endswith(".stream")


def _run_target(run: RunDir) -> tuple[str, tuple[float, ...]]:
    if not run.exists("config.toml"):
        return "", ()
    try:
        cfg = tomllib.loads(run.read_text("config.toml"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{shown_url(run.url)}/config.toml: not readable TOML ({exc})") from None
    target = cfg.get("target", {})
    cell = target.get("cell") or ()
    return str(target.get("space_group", "") or ""), tuple(float(x) for x in cell)


def _identity(url: str) -> str:
    """One name per input however it is spelt (``run``, ``./run/``, its absolute path)."""
    from sfxflow.io.storage import is_local, local_path

    if is_local(url):
        return str(local_path(url).resolve())
    return url.rstrip("/")


def _refuse_twice(inputs: Sequence[str]) -> None:
    seen: dict[str, str] = {}
    for url in inputs:
        key = _identity(url)
        if key in seen:
            same = "" if seen[key] == url else f" (as {shown_url(seen[key])} and {shown_url(url)})"
            raise InputError(f"{shown_url(url)}: given twice{same}; expected each run directory "
                             "or stream once (merging one twice counts its crystals twice)")
        seen[key] = url


_SHARD_KINDS = (".reflections.parquet", ".crystals.parquet", ".frames.parquet")


def _run_shard_names(run: RunDir, url: str) -> list[str]:
    """Block ids with a reflections shard; an error naming any block whose other shards are
    there but whose reflections shard is missing (its crystals would be dropped silently)."""
    try:
        names = run.list("shards")
    except Exception as exc:  # fsspec backends raise many kinds
        raise InputError(f"{shown_url(url)}: cannot list the run directory ({exc})") from None
    blocks: dict[str, set[str]] = {}
    for n in names:
        if n.startswith("."):  # .tmp-* left by an interrupted write: not a shard
            continue
        for suffix in _SHARD_KINDS:
            if n.endswith(suffix):
                blocks.setdefault(n[: -len(suffix)], set()).add(suffix)
    missing = sorted(b for b, kinds in blocks.items() if ".reflections.parquet" not in kinds)
    if missing:
        raise InputError(f"{shown_url(url)}/shards/{missing[0]}.reflections.parquet: missing "
                         f"({len(missing)} block(s) without a reflections shard, value: "
                         f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); "
                         "expected one per block (rerun `sfxflow process` to write it)")
    no_crystals = sorted(b for b, kinds in blocks.items() if ".crystals.parquet" not in kinds)
    if no_crystals:
        raise InputError(f"{shown_url(url)}/shards/{no_crystals[0]}.crystals.parquet: missing "
                         f"({len(no_crystals)} block(s)); expected one per reflections shard "
                         "(rerun `sfxflow process` to write it)")
    return sorted(blocks)


def read_stream_header(url: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    """A stream's header only (no chunks): :class:`~sfxflow.io.stream.Stream` with its target
    cell, read without loading the whole stream onto the client."""
    from sfxflow.io.storage import open_url
    from sfxflow.io.stream import BEGIN_CHUNK, StreamError, parse_stream

    lines: list[str] = []
    try:
        with open_url(url, "rb", storage_options) as fh:
            for raw in fh:
                line = raw.decode("utf-8", errors="replace")
                if line.strip() == BEGIN_CHUNK:
                    break
                lines.append(line)
    except InputError:
        raise
    except OSError as exc:
        raise StreamError(f"{shown_url(url)}: cannot read the stream ({exc})") from None
    return parse_stream("".join(lines), url)


def discover_shards(inputs: Sequence[str], storage_options: Mapping[str, Any] | None = None
                    ) -> list[ShardSpec]:
    """The shards of every input (run directories local or remote, stream files), each with
    the space group the input records (a run's ``config.toml``, a stream written by sfxflow).

    Raises
    ------
    InputError
        An input that is neither a stream nor a run directory with reflection shards; an input
        given twice; a block of a run directory whose reflections or crystals shard is missing.
    """
    _refuse_twice(inputs)
    specs: list[ShardSpec] = []
    for url in inputs:
        if _is_stream(url):
            target = read_stream_header(url, storage_options).target_cell
            sg = lat = None
            if target is not None:
                sg = target.space_group.xhm() if target.space_group is not None else ""
                lat = tuple(target.lattice)
            specs.append(ShardSpec("stream", url, "", len(specs), sg or "", (), lat or ()))
            continue
        run = RunDir(url, storage_options)
        found = _run_shard_names(run, url)
        if not found:
            raise InputError(f"{shown_url(url)}: no shards/*.reflections.parquet (value: none "
                             "found); expected an sfxflow run directory with integrated "
                             "reflections, or a CrystFEL .stream")
        sg, cell = _run_target(run)
        for name in found:
            specs.append(ShardSpec("run", run.url, name, len(specs), sg, cell))
    return specs


def refuse_merge_output(out_url: str, inputs: Sequence[str],
                        storage_options: Mapping[str, Any] | None = None) -> None:
    """Refuse a merge folder that is one of the inputs or any run directory: the merge writes
    ``crystals.parquet`` there, which would replace the run's own."""
    key = _identity(out_url)
    for url in inputs:
        if not _is_stream(url) and _identity(url) == key:
            raise InputError(f"--out {shown_url(out_url)}: is the input run directory; expected "
                             f"a folder of its own (e.g. {shown_url(url.rstrip('/'))}/merge), "
                             "the merge would replace the run's crystals.parquet")
    out = RunDir(out_url, storage_options)
    try:
        is_run = out.exists("manifest.json") or out.exists("frames.parquet") or any(
            n.endswith(_SHARD_KINDS) for n in out.list("shards"))
    except Exception:  # an unreachable output is reported when it is written
        is_run = False
    if is_run:
        raise InputError(f"--out {shown_url(out_url)}: is an sfxflow run directory (it has a "
                         "manifest.json, frames.parquet or result shards); expected a merge "
                         "folder of its own (e.g. RUN/merge), the merge would replace the "
                         "run's crystals.parquet")


_SCALED_NAME = re.compile(r"^\d{5}\.parquet$")


def remove_stale_scaled(out_url: str, written: Sequence[int],
                        storage_options: Mapping[str, Any] | None = None) -> int:
    """Remove ``scaled/NNNNN.parquet`` files a previous merge into the same folder left and
    this one did not write (other names are not ours and stay); returns how many."""
    out = RunDir(out_url, storage_options)
    keep = {f"{n:05d}.parquet" for n in written}
    stale = [n for n in out.list("scaled") if _SCALED_NAME.match(n) and n not in keep]
    for name in stale:
        out.remove(f"scaled/{name}")
    if stale:
        log.info("removed %d scaled/ file(s) of an earlier merge into %s", len(stale),
                 shown_url(out_url))
    return len(stale)


#: how a run directory's reflections name their crystal (crystals.parquet has the same columns)
_CRYSTAL_KEY = ("source_url", "frame_index", "crystal")
_CELL_COLUMNS = ("a", "b", "c", "alpha", "beta", "gamma")
#: the columns a merge reads (the shards' others are not decoded)
_CRYSTAL_COLUMNS = frozenset((*_CRYSTAL_KEY, *A_MATRIX_COLUMNS, *_CELL_COLUMNS, "wavelength_a",
                              "status"))
_OBSERVATION_COLUMNS = frozenset((*_CRYSTAL_KEY, "h", "k", "l", "intensity", "sigma", "flags",
                                  "polarisation"))


def _usable(intensity: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Observations with an intensity to merge: finite, with a finite positive sigma."""
    return np.isfinite(intensity) & np.isfinite(sigma) & (sigma > 0)


def _join(crystals: pa.Table, observations: pa.Table, key: Sequence[str]) -> np.ndarray:
    """Row of ``crystals`` each observation belongs to (-1: none), joined on the columns
    ``key`` at once: the source URL as its place among the crystals' URLs, the columns as one
    integer, a binary search among the crystals' sorted keys. A key on two crystal rows names
    the later one."""
    n = crystals.num_rows
    if n == 0:
        return np.full(observations.num_rows, -1, np.int64)
    codes = []
    for k in key:
        c, o = crystals.column(k), observations.column(k)
        if k == "source_url":
            c, o = c.cast(pa.string()), o.cast(pa.string())
            known = pc.unique(c)
            c, o = (pc.index_in(x, value_set=known).fill_null(-1) for x in (c, o))
        code = np.concatenate([c.to_numpy(), o.to_numpy()]).astype(np.int64)
        codes.append(code - code.min())
    whole = codes[0]
    for code in codes[1:]:
        size = int(code.max()) + 1
        if (int(whole.max()) + 1) * size >= 2**62:  # too wide for one integer: number the keys
            whole = np.unique(np.column_stack([whole, code]), axis=0, return_inverse=True)[1]
            whole = whole.reshape(-1)
        else:
            whole = whole * size + code
    order = np.argsort(whole[:n], kind="stable")
    ranked = whole[:n][order]
    # the last of equal keys; a key below every crystal's lands on the first and differs
    at = np.maximum(np.searchsorted(ranked, whole[n:], side="right") - 1, 0)
    return np.where(ranked[at] == whole[n:], order[at], -1).astype(np.int64)


def _floats(table: pa.Table, names: Sequence[str]) -> np.ndarray:
    if not names:
        return np.zeros((table.num_rows, 0))
    return np.column_stack([table.column(k).to_numpy(zero_copy_only=False).astype(float)
                            for k in names]).reshape(table.num_rows, len(names))


def _assemble(label: str, crys: pa.Table, refl: pa.Table, key: Sequence[str],
              rejected: Counter[str], crystals_file: str) -> ShardData:
    """A shard's crystals (the crystals.parquet columns) and observations (the reflections
    columns: ``key``, ``h k l intensity sigma``, optional ``flags polarisation``) as
    :class:`ShardData`, both readers' one path: crystals without a usable orientation and
    wavelength, or whose integration failed, are left out and counted; observations are
    joined to their crystal on ``key`` and kept when usable and without an unusable flag."""
    ok = np.ones(crys.num_rows, bool)
    if "status" in crys.column_names:  # no status (None) counts as integrated
        status = crys.column("status").cast(pa.string())
        ok = pc.fill_null(pc.equal(status, "integrated"), True).to_numpy(zero_copy_only=False)
        if n := int(np.sum(~ok)):
            rejected["integration failed"] += n
    a = _floats(crys, A_MATRIX_COLUMNS).reshape(-1, 3, 3)
    lam = _floats(crys, ("wavelength_a",))[:, 0]
    with np.errstate(invalid="ignore"):
        oriented = np.isfinite(a).all(axis=(1, 2)) & np.isfinite(lam) & (lam > 0)
    if n := int(np.sum(ok & ~oriented)):
        rejected["no orientation or wavelength"] += n
    take = ok & oriented
    crys = crys.filter(pa.array(take))
    obs_c = _join(crys, refl, key)
    if refl.num_rows and (obs_c < 0).all() and crys.num_rows:
        raise InputError(f"{label}: no reflection belongs to a crystal of {crystals_file}")
    inten = refl.column("intensity").to_numpy().astype(float)
    sig = refl.column("sigma").to_numpy().astype(float)
    keep = (obs_c >= 0) & _usable(inten, sig)
    if "flags" in refl.column_names:
        # what the run's stream leaves out, left out here too: one answer per run
        keep &= (refl.column("flags").to_numpy() & int(UNUSABLE_FLAGS)) == 0
    pol = _floats(refl, ("polarisation",))[:, 0] if "polarisation" in refl.column_names else \
        np.ones(refl.num_rows)
    counts = np.bincount(obs_c[keep], minlength=crys.num_rows)
    rejected["no integrated reflections"] += int(np.sum(counts == 0))
    src = crys.column("source_url").to_pylist()
    fr = crys.column("frame_index").to_numpy().astype(np.int64)
    cr = crys.column("crystal").to_numpy().astype(np.int32)
    lattices = Counter(crys.column("lattice").to_pylist()) if "lattice" in crys.column_names \
        else {}
    hkl = np.column_stack([refl.column(x).to_numpy() for x in "hkl"]).reshape(-1, 3)
    return ShardData(
        crystal_ids=crystal_ids_of(src, fr, cr), a_matrices=a[take],
        wavelengths_a=lam[take], cells=_floats(crys, _CELL_COLUMNS), source_url=src,
        frame_index=fr, crystal=cr, obs_crystal=obs_c[keep],
        hkl=hkl.astype(np.int32)[keep], intensity=inten[keep], sigma=sig[keep],
        polarisation=pol[keep], rejected={k: v for k, v in rejected.items() if v},
        lattices=dict(lattices),
    )


def _read_run_shard(spec: ShardSpec, storage_options: Mapping[str, Any] | None) -> ShardData:
    run = RunDir(spec.root, storage_options)
    rel = f"shards/{spec.name}.reflections.parquet"
    try:
        refl = read_parquet_bytes(run.read_bytes(rel), _OBSERVATION_COLUMNS)
        crys = read_parquet_bytes(run.read_bytes(f"shards/{spec.name}.crystals.parquet"),
                                  _CRYSTAL_COLUMNS)
    except FileNotFoundError as exc:
        raise InputError(f"{spec.label}: missing shard file ({exc})") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{spec.label}: unreadable Parquet shard ({exc})") from None
    need = {*_CRYSTAL_KEY, "h", "k", "l", "intensity", "sigma"}
    missing = need - set(refl.column_names)
    if missing:
        raise InputError(f"{spec.label}: reflections shard lacks column(s) "
                         f"{', '.join(sorted(missing))} (see docs/run-directory.md)")
    return _assemble(spec.label, crys, refl, _CRYSTAL_KEY, Counter(),
                     f"shards/{spec.name}.crystals.parquet")


def _polarisation(stream: Any, chunk: Any, refl: Any, cache: dict,
                  polarisation_fraction: float = 1.0) -> np.ndarray:
    """Polarisation factor (:func:`sfxflow.algorithms.diffraction.polarisation_factor`) of each
    reflection from the stream's geometry (1 where the geometry is unknown); CrystFEL streams
    do not record the beam's polarisation: horizontal (1.0), partialator's default."""
    if stream.geometry is None or len(refl) == 0:
        return np.ones(len(refl))
    key = tuple(sorted(chunk.header_values.items()))
    det = cache.get(key)
    if det is None:
        try:
            det, _ = stream.resolve(chunk)
        except InputError:
            return np.ones(len(refl))
        cache[key] = det
    pos = np.zeros((len(refl), 3))
    for p in np.unique(refl.panel):
        sel = refl.panel == p
        pos[sel] = det.panels[int(p)].lab_mm(refl.fs_px[sel], refl.ss_px[sel])
    return polarisation_factor(pos, polarisation_fraction)


def _read_stream_shard(spec: ShardSpec, storage_options: Mapping[str, Any] | None
                       ) -> ShardData:
    from sfxflow.io.stream import read_stream

    stream = read_stream(spec.root, storage_options)
    rejected: Counter[str] = Counter()
    rows: list[dict[str, Any]] = []  # the crystals.parquet columns, and the crystal's place
    obs: dict[str, list[np.ndarray]] = {k: [] for k in ("_n", "hkl", "intensity", "sigma",
                                                        "polarisation")}
    cache: dict = {}
    for n_chunk, chunk in enumerate(stream):
        for k, xtal in enumerate(chunk.crystals):
            refl = xtal.reflections
            lam = chunk.wavelength_a
            if lam is None or not math.isfinite(lam):
                rejected["no wavelength"] += 1
                continue
            if not _usable(refl.intensity, refl.sigma).any():
                rejected["no integrated reflections"] += 1
                continue
            lt, cen, *_ = xtal.lattice
            frame = chunk.frame_index if chunk.frame_index is not None else n_chunk
            rows.append({"_n": len(rows), "source_url": chunk.filename, "frame_index": frame,
                         "crystal": k, "wavelength_a": lam, "lattice": f"{lt} {cen}",
                         **a_matrix_columns(np.asarray(xtal.a_matrix, dtype=float)),
                         **dict(zip(_CELL_COLUMNS, xtal.cell.parameters, strict=True))})
            for name, values in (("_n", np.full(len(refl.intensity), len(rows) - 1)),
                                 ("hkl", refl.hkl), ("intensity", refl.intensity),
                                 ("sigma", refl.sigma),
                                 ("polarisation", _polarisation(stream, chunk, refl, cache))):
                obs[name].append(values)
    if not rows:
        n_x = sum(len(c.crystals) for c in stream)
        raise InputError(f"{spec.label}: no crystal with integrated reflections ({len(stream)} "
                         f"chunks, {n_x} crystals); expected indexamajig output with "
                         "reflection lists (not --integration=none)")
    # the crystal's place in the stream names it: a stream may hold one frame twice
    cols = {k: np.concatenate(v) for k, v in obs.items()}
    hkl = cols.pop("hkl")
    refl_table = pa.table({**cols, "h": hkl[:, 0], "k": hkl[:, 1], "l": hkl[:, 2]})
    return _assemble(spec.label, pa.Table.from_pylist(rows), refl_table, ("_n",), rejected,
                     "the stream")


def read_shard(spec: ShardSpec, storage_options: Mapping[str, Any] | None = None) -> ShardData:
    """Read one shard (on a worker)."""
    if spec.kind == "stream":
        return _read_stream_shard(spec, storage_options)
    return _read_run_shard(spec, storage_options)


# ----------------------------------------------------------------------------- writing


def write_observation_run(run_url: str, cell: gemmi.UnitCell, space_group: gemmi.SpaceGroup,
                          shards: Sequence[tuple[list[dict], list[dict[str, np.ndarray]]]],
                          storage_options: Mapping[str, Any] | None = None) -> None:
    """Write integrated observations as a run directory (the contract's reflections and crystals
    shards, and the target cell in config.toml).

    Parameters
    ----------
    shards : per shard, (crystal rows as dicts with the crystals.parquet columns, per crystal
        a dict of reflection columns without ``source_url frame_index crystal``).
    """
    run = RunDir(run_url, storage_options)
    run.makedirs()
    p = cell.parameters
    run.write_text("config.toml", "[target]\n" f"cell = [{', '.join(f'{x:.6f}' for x in p)}]\n"
                   f"space_group = \"{space_group.xhm()}\"\n")
    for n, (rows, refls) in enumerate(shards):
        name = f"sim-{n:05d}"
        parts = []
        for row, refl in zip(rows, refls, strict=True):
            m = len(refl["h"])
            cols = {"source_url": pa.array([row["source_url"]] * m, pa.string()),
                    "frame_index": pa.array(np.full(m, row["frame_index"], np.int64)),
                    "crystal": pa.array(np.full(m, row["crystal"], np.int32))}
            cols.update({k: pa.array(np.asarray(v)) for k, v in refl.items()})
            parts.append(pa.table(cols))
        run.write_bytes(f"shards/{name}.reflections.parquet",
                        parquet_bytes(pa.concat_tables(parts)) if parts else b"")
        run.write_bytes(f"shards/{name}.crystals.parquet", parquet_bytes(pa.Table.from_pylist(rows)))


def write_table(url: str, table: pa.Table, storage_options: Mapping[str, Any] | None = None
                ) -> None:
    """Write a Parquet table to a path or URL."""
    from sfxflow.io.storage import open_url

    with open_url(url, "wb", storage_options) as fh:
        pq.write_table(table, fh)


def write_simulated_observations(
    run_url: str,
    truth: Any,
    detector: Any,
    params: Any,
    n_crystals: int,
    seed: int,
    *,
    n_shards: int = 1,
    reindex_ops: list[np.ndarray] | None = None,
    stream_path: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[dict]:
    """Simulate ``n_crystals`` crystals (:func:`sfxflow.algorithms.simulate_physical
    .simulate_crystal`, crystal ``i`` from ``default_rng([seed, i])``) and write them as a run
    directory, and as a CrystFEL stream when ``stream_path`` is given. Returns the crystal rows.
    """
    from sfxflow.algorithms.simulate_physical import crystal_row, simulate_crystal

    per_shard = max(1, math.ceil(n_crystals / n_shards))
    shards: list[tuple[list[dict], list[dict[str, np.ndarray]]]] = []
    stream = _SimStream(stream_path, detector, truth, params.wavelength_a,
                        params.bandwidth_fwhm) if stream_path else None
    all_rows = []
    for i in range(n_crystals):
        sim = simulate_crystal(truth, detector, params, np.random.default_rng([seed, i]),
                               reindex_ops)
        row = crystal_row(sim, f"sim-{seed}.cxi", i)
        if i % per_shard == 0:
            shards.append(([], []))
        shards[-1][0].append(row)
        shards[-1][1].append(sim.reflections)
        all_rows.append(row)
        if stream is not None:
            stream.add(sim, i, row["source_url"])
    write_observation_run(run_url, truth.index.cell, truth.index.space_group, shards,
                          storage_options)
    if stream is not None:
        stream.close()
    return all_rows


class _SimStream:
    """Writes simulated crystals as stream chunks (reflection lists with positions)."""

    def __init__(self, path: str, detector: Any, truth: Any, wavelength_a: float,
                 bandwidth_fwhm: float) -> None:

        from sfxflow.io.cellfile import CellFile, lattice_from_space_group
        from sfxflow.io.geometry import format_geom
        from sfxflow.io.stream import format_stream_header
        from sfxflow.models import Beam

        # CrystFEL needs a wavelength and a gain in the geometry (intensities are photons)
        detector = detector.with_gain(1.0)
        self.detector = detector
        self.bandwidth_fwhm = bandwidth_fwhm
        self.fh = open(path, "w", encoding="utf-8")
        cell, sg = truth.index.cell, truth.index.space_group
        geom = format_geom(detector, beam=Beam(wavelength_a, bandwidth_fwhm=bandwidth_fwhm))
        self.fh.write(format_stream_header(geom, target_cell=CellFile(
            cell, sg, lattice_from_space_group(sg)),
            command_line="sfxflow simulate (observations)"))

    def add(self, sim: Any, frame: int, source_url: str) -> None:
        from sfxflow.io.stream import Reflections, format_chunk
        from sfxflow.models import Beam, FrameStatus, ImageResult

        r = sim.reflections
        refl = Reflections(np.column_stack([r["h"], r["k"], r["l"]]), r["intensity"], r["sigma"],
                           r["intensity"] + r["background"] * r["peak_pixels"], r["background"],
                           r["fs_px"], r["ss_px"], r["panel"])
        # the run directory's file name: the same crystal has the same id in both
        result = ImageResult(source_url, frame, FrameStatus.INDEXED, crystal=sim.reported)
        beam = Beam(sim.wavelength_a, bandwidth_fwhm=self.bandwidth_fwhm)
        self.fh.write(format_chunk(result, self.detector, beam=beam,
                                   serial=frame + 1, reflections=refl, crystal_info={
                                       "profile_radius": "0.00300 nm^-1",
                                       "diffraction_resolution_limit":
                                           f"{10.0 / float(r['d_a'].min()):.2f} nm^-1 or "
                                           f"{float(r['d_a'].min()):.2f} A"}))

    def close(self) -> None:
        self.fh.close()
