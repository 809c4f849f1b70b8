"""Frames we did not simulate: the 16 independent lysozyme stills rendered by CrystFEL's
``pattern_sim`` (``../shared/data/independent-stills-lysozyme``, kept out of the repository),
timed stage by stage in CPU time, scored against their true orientations, and compared with
CrystFEL 0.12's ``indexamajig`` on the same frames when it is present (a benchmark peer only).
"""

from __future__ import annotations

import csv
import resource
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sfxflow.benchmarks.shared import shared_path

CELL = "[104.447, 67.542, 31.835, 90, 90, 90]"
SPACE_GROUP = "P21212"
STAGES = ("read", "spots", "index", "integrate", "total")


def stills_dir() -> Path | None:
    d = shared_path("data/independent-stills-lysozyme")
    return d if d and (d / "sim.geom").is_file() and any(d.glob("sim-*.h5")) else None


def stills_config() -> Any:
    from sfxflow.pipeline.config import load_config

    return load_config(overrides=[f"target.cell={CELL}", f"target.space_group='{SPACE_GROUP}'"])


def read_still(path: Path, geometry: Any) -> Any:
    from sfxflow.io.sources import open_source

    with open_source(str(path), geometry) as src:
        return src.read_frame(0)


def load_stills(d: Path) -> tuple[list[Path], Any, dict[str, np.ndarray]]:
    """The files, their geometry and each file's true ``A`` (columns a*, b*, c*, 1/Å)."""
    from sfxflow.io.geometry import read_geom

    truth = {}
    with open(d / "truth.csv") as fh:
        for row in csv.DictReader(fh):
            truth[row["file"]] = np.array([[float(row[f"a{i}{j}"]) for j in (1, 2, 3)]
                                           for i in (1, 2, 3)])
    return sorted(d.glob("sim-*.h5")), read_geom(str(d / "sim.geom")), truth


@dataclass(frozen=True)
class StillsReport:
    frames: int
    repeats: int
    cpu_ms: dict[str, float]  # median CPU ms per frame of each stage
    indexed: int
    median_misorientation_deg: float
    max_misorientation_deg: float
    spots_per_frame: float
    mpixel: float


def measure_stills(d: Path, repeats: int = 5) -> StillsReport:
    """Read, spots (+ hit), index (every lattice) and integrate each still, as
    :func:`~sfxflow.pipeline.frame.process_frame` does, timed with ``time.process_time``;
    median over frames x repeats after one untimed pass (compilation, caches)."""
    from sfxflow.algorithms.index import index_lattices, misorientation_deg
    from sfxflow.algorithms.spots import find_spots, is_hit
    from sfxflow.models import Crystal
    from sfxflow.pipeline.frame import integrate_lattices

    files, geometry, truth = load_stills(d)
    cfg = stills_config()
    target = cfg.target_cell()
    times: dict[str, list[float]] = {k: [] for k in STAGES}
    mis: list[float] = []
    n_spots: list[int] = []
    indexed = 0
    mpx = 0.0
    for rep in range(repeats + 1):
        for path in files:
            c0 = time.process_time()
            frame = read_still(path, geometry)
            c1 = time.process_time()
            spots = find_spots(frame, cfg.spots,
                               gain_adu_per_photon=cfg.detector.gain_adu_per_photon)
            hit = is_hit(spots, cfg.hit)
            c2 = time.process_time()
            lattices = index_lattices(spots, frame.detector, frame.beam, target, cfg.index) \
                if hit else []
            c3 = time.process_time()
            ok = bool(lattices) and lattices[0].success
            if ok:
                integrate_lattices(frame, lattices, cfg)
            c4 = time.process_time()
            if rep == 0:
                mpx = frame.detector.n_pixels / 1e6
                n_spots.append(len(spots))
                if ok:
                    indexed += 1
                    found = lattices[0].crystal
                    assert found is not None
                    true = Crystal(found.cell, found.space_group, truth[path.name])
                    mis.append(misorientation_deg(found, true))
                continue
            for k, v in zip(STAGES, (c1 - c0, c2 - c1, c3 - c2, c4 - c3, c4 - c0), strict=True):
                times[k].append(v)
    return StillsReport(
        frames=len(files), repeats=repeats,
        cpu_ms={k: 1e3 * statistics.median(v) for k, v in times.items()},
        indexed=indexed,
        median_misorientation_deg=float(np.median(mis)) if mis else float("nan"),
        max_misorientation_deg=float(np.max(mis)) if mis else float("nan"),
        spots_per_frame=float(np.median(n_spots)), mpixel=mpx)


def indexamajig() -> Path | None:
    exe = shared_path("peers/crystfel-0.12/bin/indexamajig")
    return exe if exe is not None and exe.is_file() else None


def crystfel_cpu_per_frame(d: Path) -> tuple[float, int, str]:
    """CPU seconds per frame (user + system of the child) and frames indexed by indexamajig,
    peakfinder8 + XGANDALF (fast) on one core over the same stills; ``(nan, 0, reason)`` when it
    cannot run (not present, XGANDALF's sample points not linked, see the peers' README)."""
    exe = indexamajig()
    if exe is None:
        return float("nan"), 0, "indexamajig not found under ../shared/peers"
    files = sorted(d.glob("sim-*.h5"))
    with tempfile.TemporaryDirectory(prefix="sfxflow-bench-crystfel-") as tmp:
        lst = Path(tmp) / "files.lst"
        lst.write_text("".join(f"{p}\n" for p in files))
        out = Path(tmp) / "out.stream"
        cmd = [str(exe), "-i", str(lst), "-g", str(d / "sim.geom"), "-p", str(d / "cell.cell"),
               "-o", str(out), "-j", "1", "--peaks=peakfinder8", "--threshold=4",
               "--min-snr=5", "--min-pix-count=2", "--indexing=xgandalf",
               "--xgandalf-fast-execution", "--int-radius=3,4,6"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, check=False)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
            return float("nan"), 0, f"indexamajig failed ({tail[0]})"
        n_indexed = out.read_text(errors="replace").count("Cell parameters")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu / len(files), n_indexed, ""


def print_stills(repeats: int, crystfel: bool = True) -> None:
    """The stills section of ``sfxflow bench process`` (and the spot figures' data)."""
    d = stills_dir()
    if d is None:
        print("(independent stills not found under ../shared/data: skipped)")
        return
    import numba

    numba.set_num_threads(1)
    rep = measure_stills(d, repeats)
    ms = rep.cpu_ms
    print(f"independent stills ({rep.frames} lysozyme frames by pattern_sim, {rep.mpixel:.2f} "
          f"Mpixel, gzip uint16, median {rep.spots_per_frame:.0f} spots), CPU ms per frame, "
          f"median of {rep.frames} x {rep.repeats}, 1 core:")
    print("  " + "  ".join(f"{k} {ms[k]:.2f}" for k in STAGES)
          + f"  (spots {ms['spots'] / rep.mpixel:.2f} ms/Mpixel)")
    print(f"  indexed {rep.indexed}/{rep.frames}, misorientation to the truth median "
          f"{rep.median_misorientation_deg:.4f} deg (max {rep.max_misorientation_deg:.4f})")
    if not crystfel:
        return
    cpu, n_idx, why = crystfel_cpu_per_frame(d)
    if why:
        print(f"  CrystFEL 0.12 indexamajig: {why}")
        return
    print(f"  CrystFEL 0.12 indexamajig (peakfinder8 + XGANDALF fast, -j 1): "
          f"{1e3 * cpu:.0f} CPU ms per frame, {n_idx}/{rep.frames} indexed -> sfxflow "
          f"{1e3 * cpu / ms['total']:.1f}x faster per core end to end")
