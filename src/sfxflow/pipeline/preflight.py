"""Checks before a run starts: a user error costs one line and exit status 2, not a cluster.

:func:`preflight` is what ``sfxflow process`` calls before any cluster, run directory or report
exists. It reads metadata only (and one frame), in parallel for many files or URLs:

* the cell file reads, and the cell fits the space group's lattice;
* the run directory is not a file; a ``--scheduler-file`` to join exists;
* the geometry reads, its beam is sane, and it fits the data: the panels lie inside the frames
  of every CXI file (checked while listing them), and the first frame reads with it (the
  photon energy and other per-frame values it names exist);
* every input exists (a path, glob, folder or list entry that names nothing is an error) and
  opens; files that exist but cannot be opened are an error when none opens, otherwise one
  warning line (they get a ``failed`` record each, as ever);
* ``s3://`` inputs, lists and run directories resolve their credentials and answer;
* the declared detector gain agrees with the one-photon peak of the first frame
  (:func:`sfxflow.algorithms.gain.gain_warning`: a warning, not an error).

A storage outage (retries spent) is not a user error: those files are left for the run, which
records them as unread and asks for a rerun.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sfxflow.errors import GeometryError, InputError, SourceError
from sfxflow.pipeline.config import ProcessConfig

__all__ = ["Preflight", "preflight"]

logger = logging.getLogger(__name__)


@dataclass
class Preflight:
    """What the checks found: the resolved configuration, the geometry and the input files."""

    config: ProcessConfig
    geometry: Any
    files: list[Any]
    gain_note: str = ""


def _more(n: int) -> str:
    return f" (and {n} more)" if n else ""


def _check_out(out: str, storage_options: Mapping[str, Any]) -> None:
    """An object-store run directory: credentials resolve and the bucket answers."""
    import os

    from sfxflow.io import storage

    if storage.is_local(out):
        path = storage.local_path(out)
        if os.path.exists(path) and not os.path.isdir(path):
            raise InputError(f"{out}: cannot create the run directory (a file of that name "
                             "exists); expected a folder path")
        return
    try:
        fs = storage.filesystem(out, storage_options)
        key = out.split("://", 1)[1]
        storage.retrying(lambda: fs.exists(key), out, "list")
    except SourceError:
        raise
    except Exception as exc:  # botocore/aiohttp errors come in many types
        raise storage._wrap_storage_error(out, exc, "list") from exc


def _check_files(files: Sequence[Any]) -> None:
    """Refuse inputs that name nothing, a geometry that does not fit, or a set of which no file
    opens; warn once for the rest."""
    errors = [f for f in files if not f.ok and not f.transient]
    for problem, expected in (("missing", "; expected an image file, glob, folder, URL or list "
                                          "(.lst, @FILE)"),
                              ("geometry", "")):
        found = [f for f in errors if f.problem == problem]
        if found:
            first = str(found[0].error)
            if "no such" not in first and "matched no" not in first:
                expected = ""  # credentials, access: the message says what is wrong
            raise InputError(f"{first}{expected}{_more(len(found) - 1)}")
    usable = [f for f in files if f.ok or f.transient]
    if errors and not usable:
        raise InputError(f"no input opens: {errors[0].error}{_more(len(errors) - 1)}")
    if errors:
        logger.warning("%d of %d input file(s) cannot be opened and will be recorded as failed "
                       "(first: %s)", len(errors), len(files), errors[0].error)
    if not any(f.transient or f.n_frames > 0 for f in usable):
        shown = ", ".join(f.url for f in files[:3])
        raise InputError(f"no frames in {shown}{_more(max(0, len(files) - 3))}; expected images")


def _first_frame(files: Sequence[Any], geometry: Any,
                 storage_options: Mapping[str, Any]) -> Any:
    """The first selected frame of the first good file: the geometry must read it."""
    from sfxflow.io.sources import open_source
    from sfxflow.io.storage import shown_url

    first = next((f for f in files if f.ok and f.n_frames > 0), None)
    if first is None:
        return None
    index = first.frames[0] if first.frames else 0
    try:
        with open_source(first.url, geometry, storage_options) as src:
            return src.read_frame(index)
    except GeometryError:
        raise
    except SourceError as exc:  # one bad frame is that frame's failure, not the run's
        logger.warning("%s frame %d does not read (%s); the checks of the detector are skipped",
                       shown_url(first.url), index, exc)
        return None


def preflight(inputs: Sequence[str], out: str, config: ProcessConfig,
              storage_options: Mapping[str, Any] | None = None, *,
              threads: int = 16) -> Preflight:
    """Check a run's inputs and settings before anything starts.

    Parameters
    ----------
    inputs : files, globs, folders, URLs and lists, as for :func:`~sfxflow.pipeline.run.run_process`.
    out : the run directory (not created here).
    config : the configuration.
    storage_options : fsspec options.
    threads : files or objects opened at once while listing.

    Returns
    -------
    Preflight

    Raises
    ------
    InputError
        One line naming the file or setting, the value and what was expected.
    """
    from sfxflow.algorithms.gain import gain_warning
    from sfxflow.io.sources import discover
    from sfxflow.pipeline.blocks import apply_storage_retry
    from sfxflow.pipeline.cluster import check_scheduler_file
    from sfxflow.pipeline.run import _geometry, resolve_config

    options = dict(storage_options or {})
    if not inputs:
        raise InputError("no INPUT given: name image files, globs, folders, s3:// prefixes or a "
                         "list (.lst)")
    config = resolve_config(config)
    # the run's storage_retry_s from the first storage call (the geometry, the listing), not
    # only once blocks are read: an unreachable endpoint at start was retried for the default
    # 60 s (11 attempts over 56 s with storage_retry_s = 2), or for what an earlier run in the
    # same process had set
    apply_storage_retry(config)
    config.target_cell()  # the cell fits the space group's lattice
    check_scheduler_file(config.cluster)
    _check_out(out, options)
    geometry = _geometry(config, options)
    files = discover(list(inputs), geometry=geometry, storage_options=options, threads=threads)
    _check_files(files)
    frame = _first_frame(files, geometry, options)
    note = ""
    if frame is not None:
        note = gain_warning(frame, config.detector.gain_adu_per_photon)
        if note:
            logger.warning("%s", note)
    return Preflight(config, geometry, files, note)
