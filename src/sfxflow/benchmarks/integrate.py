"""``sfxflow bench integrate``: integration accuracy against the simulator's truth, and its cost.

Simulated CSPAD stills (every frame a hit; crystal sizes drawn from 100 nm to 2 µm, so shape
transforms broaden profiles and spots) go through the real per-frame pipeline (spots, indexing
of every lattice, profile model, prediction, summation integration). Integrated reflections are
matched to the truth by Miller index (after mapping the found setting onto the truth's), and
the figures of issue 12 are printed:

* Pearson CC of integrated I to the true photons (after partiality and polarisation, as the
  simulator put them on the panel) for reflections with true I/σ >= 10;
* the normalised deviation ``(I - I_true) / σ`` over all integrated reflections without a bad
  flag: median and robust standard deviation (1.4826 MAD), 1 for honest sigmas;
* the fraction of truth reflections with partiality >= 0.5 predicted within 0.5 px, and how
  many predicted reflections have no truth counterpart;
* ms per integrated crystal (the integrate stage, CPU time of one core, median over frames);
* per-frame throughput of the pipeline at hit fraction 0.3, one core, with integration off and
  one lattice per frame (the pipeline before this stage existed) and as configured now.

The truth is a different computation from the integrator: the simulator renders each spot as a
Gaussian integrated exactly over pixel areas, with a Gaussian partiality in the excitation error
from the crystal's size, mosaicity, divergence and bandwidth, then Poisson photons, readout
noise and whole-ADU digitisation; the integrator only sums pixels and fits a background plane.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from sfxflow.options import number

HELP = "integration accuracy against simulated truth (CC, normalised deviations, prediction) and ms/crystal"
DESCRIPTION = HELP + """

Examples:
  sfxflow bench integrate
  sfxflow bench integrate --frames 40 --min-size-nm 100 --max-size-nm 2000
"""

CELL = "93 93 130.5 90 90 120"
SPACE_GROUP = "P 61 2 2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    number(parser, "--frames", kind=int, default=30, ge=1, le=100_000, help="simulated hits (default 30)")
    number(parser, "--throughput-frames", kind=int, default=30, ge=0, le=100_000,
                        help="frames for the throughput comparison at hit fraction 0.3 "
                             "(default 30; 0 skips it)")
    number(parser, "--min-size-nm", default=100.0, gt=0, le=1e5,
                        help="smallest crystal (default 100 nm)")
    number(parser, "--max-size-nm", default=2000.0, ge=0, le=1e5,
                        help="largest crystal (default 2000 nm; 0: every crystal 300 nm "
                             "domains, no size spread)")
    number(parser, "--seed", kind=int, default=5, ge=0, le=2**32 - 1, help="random seed (default 5)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE",
                        help="processing setting, as for process (e.g. integrate.peak_radius_px=4)")


def _config(overrides: list[str] | None = None) -> Any:
    from sfxflow.pipeline.config import load_config

    return load_config(overrides=[f"target.cell=[{', '.join(CELL.split())}]",
                                  f"target.space_group='{SPACE_GROUP}'", *(overrides or [])])


def _setting_map(found: np.ndarray, truth: np.ndarray) -> np.ndarray | None:
    """Integer matrix ``M`` with ``h_truth = M h_found`` (``A_found = A_truth M``)."""
    m = np.linalg.solve(truth, found)
    r = np.rint(m)
    return r.astype(np.int64) if np.allclose(m, r, atol=0.05) else None


def _frames(detector: Any, sim: Any, n: int, seed: int) -> list[tuple[Any, np.ndarray, dict]]:
    from sfxflow.algorithms.simulate import iter_frames

    return list(iter_frames(detector, sim, n, seed))


@dataclass
class _Tally:
    """Integrated reflections compared with the simulator's truth, crystal by crystal."""

    z: list[np.ndarray] = field(default_factory=list)  # (I - I_true) / sigma
    i_obs: list[np.ndarray] = field(default_factory=list)
    i_true: list[np.ndarray] = field(default_factory=list)
    snr_true: list[np.ndarray] = field(default_factory=list)
    n_full: int = 0  # truth reflections with partiality >= 0.5
    n_full_hit: int = 0  # ... predicted within 0.5 px on their panel
    n_pred: int = 0
    n_pred_extra: int = 0  # predictions without a truth counterpart

    def add(self, refl: Any, truth: dict[str, np.ndarray], m: np.ndarray) -> None:
        """One crystal's reflections ``refl``, indexed in a setting that ``m`` maps to the
        truth's."""
        from sfxflow.algorithms.integrate import BAD_FLAGS

        t_hkl = np.stack([truth["h"], truth["k"], truth["l"]], axis=1)
        keys = {tuple(h): i for i, h in enumerate(t_hkl.tolist())}
        hkl = refl.hkl @ m.T
        idx = np.array([keys.get(tuple(h), -1) for h in hkl.tolist()], dtype=np.int64)
        self.n_pred += len(refl)
        self.n_pred_extra += int(np.count_nonzero(idx < 0))
        ok = (idx >= 0) & ((refl["flags"] & int(BAD_FLAGS)) == 0)
        self.z.append((refl["intensity"][ok] - truth["intensity_photons"][idx[ok]])
                      / refl["sigma"][ok])
        self.i_obs.append(refl["intensity"][ok])
        self.i_true.append(truth["intensity_photons"][idx[ok]])
        self.snr_true.append(truth["snr_true"][idx[ok]])
        full = np.flatnonzero(truth["partiality"] >= 0.5)
        near = np.zeros(len(t_hkl), bool)
        good = idx >= 0
        dist = np.hypot(refl["fs_px"][good] - truth["fs_px"][idx[good]],
                        refl["ss_px"][good] - truth["ss_px"][idx[good]])
        same_panel = refl["panel"][good] == truth["panel"][idx[good]]
        near[idx[good][(dist <= 0.5) & same_panel]] = True
        self.n_full += full.size
        self.n_full_hit += int(near[full].sum())

    def report(self, partiality_min: float) -> None:
        if not self.z:
            return
        z = np.concatenate(self.z)
        med = float(np.median(z))
        rsd = 1.4826 * float(np.median(np.abs(z - med)))
        strong = np.concatenate(self.snr_true) >= 10
        obs, tru = np.concatenate(self.i_obs), np.concatenate(self.i_true)
        cc = float(np.corrcoef(obs[strong], tru[strong])[0, 1]) if strong.sum() > 2 else float("nan")
        print(f"  CC(I, true photons), true I/sigma >= 10: {cc:.4f} over {int(strong.sum())} "
              "reflections (goal >= 0.99)")
        print(f"  (I - I_true)/sigma over {z.size} reflections: median {med:+.3f}, robust sd "
              f"{rsd:.3f} (goal 0.9-1.2)")
        n_full, n_pred = self.n_full, self.n_pred
        print(f"  truth reflections with partiality >= 0.5 predicted within 0.5 px: "
              f"{self.n_full_hit}/{n_full} = {100 * self.n_full_hit / max(n_full, 1):.1f}% "
              "(goal >= 95%)")
        print(f"  predicted reflections without a truth counterpart: {self.n_pred_extra} of "
              f"{n_pred} ({100 * self.n_pred_extra / max(n_pred, 1):.1f}%; the truth stops at "
              f"partiality {partiality_min})")


def run(args: argparse.Namespace) -> int:
    from sfxflow.algorithms import layouts
    from sfxflow.algorithms.index import index_lattices
    from sfxflow.algorithms.simulate import SimulationParams, with_defects_masked
    from sfxflow.algorithms.spots import find_spots
    from sfxflow.errors import InputError
    from sfxflow.models import Frame
    from sfxflow.pipeline.frame import integrate_lattices, process_frame

    if args.max_size_nm and not 0 < args.min_size_nm <= args.max_size_nm:
        raise InputError(f"--min-size-nm {args.min_size_nm} / --max-size-nm {args.max_size_nm}: "
                         "expected 0 < min <= max")
    sim = SimulationParams(hit_fraction=1.0, cell=tuple(float(x) for x in CELL.split()),  # type: ignore[arg-type]
                           space_group=SPACE_GROUP,
                           crystal_size_min_a=args.min_size_nm * 10.0,
                           crystal_size_max_a=args.max_size_nm * 10.0)
    plain = layouts.cspad().with_gain(sim.adu_per_photon)
    # the simulator's dead and hot pixels masked, as a bad-pixel mask from dark runs would
    detector = with_defects_masked(plain, sim.beam(), sim)
    cfg = _config(args.overrides)
    sizes = (f"crystals {args.min_size_nm:g}-{args.max_size_nm:g} nm" if args.max_size_nm
             else "crystals of one size")
    print(f"sfxflow bench integrate: {args.frames} simulated CSPAD hits, {SPACE_GROUP} "
          f"{CELL}, {sizes}; one core")
    # warm the compiled kernels and caches (as a long run would be) before timing
    warm = _frames(detector, sim, 1, args.seed + 1000)
    for ft, image, _ in warm:
        process_frame(Frame(image, detector, ft.beam, "warm", 0), cfg)
    tally = _Tally()
    n_crystals = n_indexed_frames = 0
    ms_per_crystal: list[float] = []
    for ft, image, truth in _frames(detector, sim, args.frames, args.seed):
        frame = Frame(image, detector, ft.beam, "sim", ft.index)
        spots = find_spots(frame, cfg.spots, gain_adu_per_photon=cfg.detector.gain_adu_per_photon)
        lattices = index_lattices(spots, detector, ft.beam, cfg.target_cell(), cfg.index)
        if not lattices[0].success:
            continue
        t0 = time.process_time()  # CPU time: other processes on the machine do not count
        crystals = integrate_lattices(frame, lattices, cfg)
        ms_per_crystal.append(1e3 * (time.process_time() - t0) / len(crystals))
        n_indexed_frames += 1
        n_crystals += len(crystals)
        rec = crystals[0]
        m = _setting_map(rec.crystal.a_matrix, ft.crystal.a_matrix)
        if m is not None and rec.reflections is not None:
            tally.add(rec.reflections, truth, m)
    print(f"  frames indexed: {n_indexed_frames} of {args.frames}; crystals integrated: "
          f"{n_crystals}")
    tally.report(sim.partiality_min)
    if ms_per_crystal:
        print(f"  integrate stage (profile, prediction, integration): median "
              f"{statistics.median(ms_per_crystal):.2f} ms CPU per crystal, p90 "
              f"{np.percentile(ms_per_crystal, 90):.2f} ms (goal <= 5 ms)")
    if args.throughput_frames:
        _throughput(detector, sim, args, cfg)
    return 0


def _throughput(detector: Any, sim: Any, args: argparse.Namespace, cfg: Any) -> None:
    from sfxflow.models import Frame
    from sfxflow.pipeline.frame import process_frame

    frames = [Frame(image, detector, ft.beam, "tp", ft.index) for ft, image, _ in
              _frames(detector, replace(sim, hit_fraction=0.3), args.throughput_frames,
                      args.seed + 1)]
    before = replace(cfg, integrate=replace(cfg.integrate, method="none"),
                     index=replace(cfg.index, max_crystals=1))
    rates: dict[str, float] = {}
    for label, c in (("before (index, one lattice)", before), ("after (every lattice, "
                                                               "integrated)", cfg)):
        per_run = []
        for _ in range(3):
            t0 = time.process_time()
            for f in frames:
                process_frame(f, c)
            per_run.append(len(frames) / (time.process_time() - t0))
        rates[label] = statistics.median(per_run)
        print(f"  pipeline at hit fraction 0.3, {label}: {rates[label]:.2f} frames/s per core "
              "(CPU time, decoding excluded; median of 3)")
    a, b = list(rates.values())
    print(f"  slowdown: {100 * (1 - b / a):.1f}% (goal <= 25%)")
