"""Write a simulated SFX data set: Cheetah-style CXI files, a CrystFEL geometry, Parquet truth.

Layout of ``out_dir`` after :func:`write_simulated_dataset`::

    run_0000.cxi ...           /entry_1/data_1/data  float32 (frames, ss, fs), one frame per chunk
                               /LCLS/photon_energy_eV  float64 (frames,)  per-shot photon energy
                               /entry_1/instrument_1/detector_1/distance  float64 (frames,) metres
    geometry.geom              CrystFEL geometry (photon_energy read per frame from the files)
    truth_frames.parquet       one row per frame
    truth_reflections.parquet  one row per simulated reflection
    simulation.json            the parameters, seed and layout that made the set

Truth columns: ``file`` is the CXI file's base name and ``frame_index`` the frame's index in it
(what an image source reports); ``truth_frames`` has ``is_hit``, the orientation matrix ``A`` in
the sfxflow lab frame (Å⁻¹, row-major ``a11 .. a33``; NaN for misses), ``cell``, ``space_group``,
``photon_energy_ev``, ``wavelength_a``, ``scale_photons``, ``crystal_size_a`` (NaN unless
sizes vary), ``n_reflections`` and ``n_strong``
(reflections with ``snr_true >= 5``); ``truth_reflections`` has the columns of
:data:`sfxflow.algorithms.simulate.TRUTH_COLUMNS` plus ``file``, ``frame_index`` and
``panel_name``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sfxflow import __version__
from sfxflow.algorithms.simulate import TRUTH_COLUMNS, SimulationParams, iter_frames
from sfxflow.errors import InputError
from sfxflow.models import A_MATRIX_COLUMNS, Beam, Detector, a_matrix_columns

__all__ = [
    "COMPRESSIONS",
    "DATA_PATH",
    "DISTANCE_PATH",
    "PHOTON_ENERGY_PATH",
    "DatasetInfo",
    "physical_model",
    "write_simulated_dataset",
]

log = logging.getLogger(__name__)

DATA_PATH = "/entry_1/data_1/data"
PHOTON_ENERGY_PATH = "/LCLS/photon_energy_eV"
DISTANCE_PATH = "/entry_1/instrument_1/detector_1/distance"
COMPRESSIONS = ("none", "bitshuffle-lz4")


@dataclass(frozen=True)
class DatasetInfo:
    """What :func:`write_simulated_dataset` wrote."""

    out_dir: Path
    files: tuple[Path, ...]
    geometry_path: Path
    truth_frames_path: Path
    truth_reflections_path: Path
    n_frames: int
    n_hits: int
    n_reflections: int
    n_strong: int


def _compression_kwargs(compression: str) -> dict:
    if compression == "none":
        return {}
    if compression == "bitshuffle-lz4":
        import hdf5plugin

        return dict(hdf5plugin.Bitshuffle(cname="lz4"))
    raise InputError(
        f"compression {compression!r}: expected one of {', '.join(COMPRESSIONS)}"
    )


def _frames_per_file(n_frames: int, n_files: int) -> list[int]:
    return [(f + 1) * n_frames // n_files - f * n_frames // n_files for f in range(n_files)]


def write_simulated_dataset(
    out_dir: str | Path,
    detector: Detector,
    beam: Beam | None,
    params: SimulationParams,
    n_frames: int,
    n_files: int = 1,
    seed: int = 0,
    compression: str = "none",
    *,
    detector_name: str = "",
    physics: Any = None,
) -> DatasetInfo:
    """Simulate ``n_frames`` stills and write them as ``n_files`` CXI files plus geometry + truth.

    Parameters
    ----------
    out_dir : folder to write into (created when missing; existing files of the same names are
        replaced).
    detector : layout (for example :func:`sfxflow.algorithms.layouts.cspad`).
    beam : nominal beam; ``None`` uses ``params.beam()``. Each frame's photon energy is jittered
        by ``params.energy_jitter_rel`` and stored per frame.
    params : simulation parameters.
    n_frames, n_files : frames in total, split as evenly as possible over the files.
    seed : series seed; frame ``i`` of the series is the same whatever ``n_files`` is.
    compression : ``"none"`` or ``"bitshuffle-lz4"`` (HDF5 filter from hdf5plugin).
    detector_name : recorded in ``simulation.json``.
    physics : the physical model of :func:`sfxflow.algorithms.simulate.simulate_frame`
        (``None``: the fast closed form).

    Returns
    -------
    DatasetInfo

    Raises
    ------
    InputError
        For bad counts or an unknown compression, naming the value.
    """
    _check_counts(n_frames, n_files)
    comp = _compression_kwargs(compression)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out}: cannot create the output folder ({exc.strerror})") from exc
    nominal = params.beam() if beam is None else beam
    geometry_path = _write_geometry(out, detector, params, nominal, seed)
    frame_rows: dict[str, list] = {k: [] for k in _FRAME_COLUMNS}
    refl_parts: list[dict[str, np.ndarray]] = []
    files: list[Path] = []
    series = iter_frames(detector, params, n_frames, seed, beam=nominal, physics=physics)
    for f, count in enumerate(_frames_per_file(n_frames, n_files)):
        path = out / f"run_{f:04d}.cxi"
        _write_cxi_file(path, count, series, detector, params, comp, frame_rows, refl_parts)
        files.append(path)
        log.info("wrote %s (%d frames)", path, count)
    truth_frames_path = out / "truth_frames.parquet"
    pq.write_table(pa.table(frame_rows), truth_frames_path)
    truth_reflections_path = out / "truth_reflections.parquet"
    n_reflections = _write_truth_reflections(truth_reflections_path, refl_parts)
    info = DatasetInfo(
        out_dir=out,
        files=tuple(files),
        geometry_path=geometry_path,
        truth_frames_path=truth_frames_path,
        truth_reflections_path=truth_reflections_path,
        n_frames=n_frames,
        n_hits=int(np.sum(frame_rows["is_hit"])),
        n_reflections=n_reflections,
        n_strong=int(np.sum(frame_rows["n_strong"])),
    )
    meta = {"sfxflow_version": __version__, "seed": seed, "n_frames": n_frames,
            "n_files": n_files, "compression": compression, "detector": detector_name,
            "n_panels": len(detector), "data_shape": list(detector.data_shape()),
            "beam": dataclasses.asdict(nominal), "params": dataclasses.asdict(params),
            "n_hits": info.n_hits, "n_reflections": info.n_reflections,
            "n_strong": info.n_strong}
    (out / "simulation.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return info


_FRAME_COLUMNS = ("file", "frame_index", "frame_global", "is_hit", *A_MATRIX_COLUMNS, "cell",
                  "space_group", "photon_energy_ev", "wavelength_a", "scale_photons",
                  "crystal_size_a", "n_reflections", "n_strong")


def _check_counts(n_frames: int, n_files: int) -> None:
    if isinstance(n_frames, bool) or int(n_frames) != n_frames or n_frames < 1:
        raise InputError(f"number of frames {n_frames!r}: expected a whole number >= 1")
    if isinstance(n_files, bool) or int(n_files) != n_files or not 1 <= n_files <= n_frames:
        raise InputError(
            f"number of files {n_files!r}: expected a whole number from 1 to the number of "
            f"frames ({n_frames})"
        )


def _write_geometry(out: Path, detector: Detector, params: SimulationParams, nominal: Beam,
                    seed: int) -> Path:
    from sfxflow.io.geometry import write_geom

    geometry_path = out / "geometry.geom"
    write_geom(
        detector.with_gain(params.adu_per_photon),
        geometry_path,
        beam=nominal,
        data_path=DATA_PATH,
        references={"photon_energy": PHOTON_ENERGY_PATH},
        header=f"Simulated by sfxflow {__version__} (seed {seed}); "
        "photon energy is read per frame from the data files",
    )
    return geometry_path


def _write_cxi_file(path: Path, count: int, series: Iterator[Any], detector: Detector,
                    params: SimulationParams, comp: dict[str, Any],
                    frame_rows: dict[str, list], refl_parts: list[dict[str, np.ndarray]]) -> None:
    """The next ``count`` frames of ``series`` into the CXI file ``path`` (written as ``.part``,
    renamed when complete); their truth appended to ``frame_rows`` and ``refl_parts``."""
    shape = detector.data_shape()
    names = np.array([p.name for p in detector.panels])
    part = path.with_name(path.name + ".part")
    energies = np.empty(count)
    with h5py.File(part, "w") as h5:
        h5.attrs["creator"] = f"sfxflow {__version__} simulate"
        h5.attrs["sfxflow_simulation"] = json.dumps(dataclasses.asdict(params))
        dset = h5.create_dataset(
            DATA_PATH, shape=(count, *shape), dtype="float32", chunks=(1, *shape), **comp
        )
        for i in range(count):
            truth_frame, image, truth = next(series)
            dset[i] = image
            energies[i] = truth_frame.beam.photon_energy_ev
            for k, v in _frame_row(path.name, i, truth_frame, truth, params).items():
                frame_rows[k].append(v)
            if len(truth["h"]):
                part_cols = {k: truth[k] for k in TRUTH_COLUMNS}
                part_cols["file"] = np.full(len(truth["h"]), path.name)
                part_cols["frame_index"] = np.full(len(truth["h"]), i, dtype=np.int32)
                part_cols["panel_name"] = names[truth["panel"]]
                refl_parts.append(part_cols)
        h5.create_dataset(PHOTON_ENERGY_PATH, data=energies)
        distance_m = detector.mean_distance_mm() / 1000.0
        dist = h5.create_dataset(DISTANCE_PATH, data=np.full(count, distance_m))
        dist.attrs["units"] = "m"
    os.replace(part, path)


def _frame_row(file: str, i: int, truth_frame: Any, truth: dict[str, np.ndarray],
               params: SimulationParams) -> dict[str, Any]:
    """One row of ``truth_frames.parquet``: frame ``i`` of ``file``."""
    crystal = truth_frame.crystal
    row = {
        "file": file,
        "frame_index": i,
        "frame_global": truth_frame.index,
        "is_hit": truth_frame.is_hit,
        "cell": " ".join(f"{x:g}" for x in params.cell),
        "space_group": params.spacegroup().hm,
        "photon_energy_ev": truth_frame.beam.photon_energy_ev,
        "wavelength_a": truth_frame.beam.wavelength_a,
        "scale_photons": truth_frame.scale,
        "crystal_size_a": truth_frame.size_a,
        "n_reflections": len(truth["h"]),
        "n_strong": int(np.count_nonzero(truth["snr_true"] >= 5.0)),
    }
    row.update(a_matrix_columns(crystal.a_matrix if crystal is not None else None))
    return row


def _write_truth_reflections(path: Path, refl_parts: list[dict[str, np.ndarray]]) -> int:
    """``truth_reflections.parquet`` from the frames' parts; returns its number of rows."""
    columns = ["file", "frame_index", *TRUTH_COLUMNS, "panel_name"]
    if refl_parts:
        refl = {k: np.concatenate([p[k] for p in refl_parts]) for k in columns}
    else:
        refl = {k: np.zeros(0, dtype=TRUTH_COLUMNS.get(k, "int32")) for k in columns}
        refl["file"] = refl["panel_name"] = np.zeros(0, dtype=str)
    pq.write_table(pa.table({k: refl[k] for k in columns}), path)
    return len(refl["h"])


def physical_model(mtz_path: str, params: Any) -> tuple[Any, Any]:
    """The crystal of the MTZ and the physical model of its stills
    (``sfxflow simulate --intensities``): the simulation parameters set to its cell, space
    group and resolution, and the :class:`~sfxflow.algorithms.simulate_physical.PhysicalFrames`."""
    from sfxflow.algorithms.simulate_physical import (
        PhysicalFrames,
        PhysicalParams,
        TrueIntensities,
    )
    from sfxflow.io.mtz import read_intensity_columns

    truth = TrueIntensities.from_arrays(*read_intensity_columns(mtz_path))
    cell, sg = truth.index.cell, truth.index.space_group
    d_min = max(params.d_min_a, truth.index.d_min_a)
    params = dataclasses.replace(params, cell=tuple(cell.parameters), space_group=sg.xhm(),
                                 d_min_a=d_min, wilson_b_a2=0.0, crystal_scale_log_sigma=0.0)
    physical = PhysicalParams(wavelength_a=params.wavelength_a, d_min_a=d_min,
                              bandwidth_fwhm=max(params.bandwidth_fwhm, 1e-4))
    return params, PhysicalFrames(truth, physical)
