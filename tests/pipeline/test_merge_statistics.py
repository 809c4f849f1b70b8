"""The merge's statistics end to end: stats.json keys, balanced half-sets, the half-data sets
``merged.hkl1``/``merged.hkl2`` checked by CrystFEL 0.12's compare_hkl, and ``--d-min-a``."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import gemmi
import numpy as np
import pytest

from sfxflow.algorithms.layouts import simple
from sfxflow.algorithms.merge.reflections import d_spacing_a
from sfxflow.algorithms.merge.scale import MergeParams
from sfxflow.algorithms.merge.statistics import MIN_PAIRS
from sfxflow.algorithms.simulate_physical import PhysicalParams, TrueIntensities
from sfxflow.io.cellfile import format_cell_file, lattice_from_space_group
from sfxflow.io.hkl import read_hkl
from sfxflow.io.observations import write_simulated_observations
from sfxflow.pipeline.config import ClusterConfig
from sfxflow.pipeline.merge import run_merge

SERIAL = ClusterConfig(kind="synchronous")
CELL = "42.37 42.37 39.69 90 90 90"
SG = "P 41 21 2"
N_SHELLS = 8
#: CC1/2, CC* and Rsplit (a fraction): compare_hkl reads our 7-digit half-set files in single
#: precision; the two agree to about 1e-6 in practice
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    uc, group = gemmi.UnitCell(*map(float, CELL.split())), gemmi.SpaceGroup(SG)
    hkl = np.asarray(gemmi.make_miller_array(uc, group, 2.5, 0, True))
    rng = np.random.default_rng(0)
    d = d_spacing_a(uc, hkl)
    i = rng.exponential(1000.0, len(hkl)) * np.exp(-15.0 / (2 * d * d))
    truth = TrueIntensities.from_arrays(uc, group, hkl, i, i)
    root = tmp_path_factory.mktemp("merge-stats")
    # 35 crystals in 3 shards: an independent coin per crystal would split them unevenly
    write_simulated_observations(str(root / "run"), truth, simple(80.0, 0.1, 3000),
                                 PhysicalParams(d_min_a=2.5, scale_photons=0.2), 35, 5,
                                 n_shards=3)
    out = root / "merge"
    run_merge([str(root / "run")], str(out),
              MergeParams(model="unity", iterations=2, n_shells=N_SHELLS), SERIAL)
    return out


def test_stats_json_has_pairs_both_cc_halves_anomalous_and_an_estimate(merged):
    stats = json.loads((merged / "stats.json").read_text())
    for s in [stats["overall"], *stats["shells"]]:
        for key in ("n_pairs", "cc_half", "cc_star", "r_split", "n_pairs_aimless",
                    "cc_half_aimless", "cc_star_aimless", "n_pairs_ano", "cc_ano",
                    "anomalous_completeness", "anomalous_multiplicity", "mean_i_over_sigma"):
            assert key in s
        # the aimless convention (>= 1 per half) counts at least the CrystFEL pairs
        assert s["n_pairs_aimless"] >= s["n_pairs"]
        if s["n_pairs"] < MIN_PAIRS:
            assert s["cc_half"] is None
    assert len(stats["shells"]) == N_SHELLS
    a, b = stats["half_sets"]["n_crystals"]
    assert abs(a - b) <= 1 and a + b == stats["n_crystals_merged"]
    est = stats["resolution_estimate"]
    for key in ("cc_half", "i_over_sigma"):
        assert set(est[key]) >= {"d_min_a", "limit", "reached", "fitted"}
        d = est[key]["d_min_a"]
        assert d is None or stats["overall"]["d_min_a"] - 1e-6 <= d
    # the first shell starts at the lowest-resolution reflection measured, not at c = 39.7 A
    hkl = read_hkl(merged / "merged.hkl")[1]
    d_obs = d_spacing_a(gemmi.UnitCell(*stats["cell"]), hkl)
    assert stats["shells"][0]["d_max_a"] >= d_obs.max() - 1e-6
    assert stats["shells"][0]["d_max_a"] < 39.0


def _compare_hkl(tool: Path, merged: Path, stats: dict, fom: str, tmp_path: Path
                 ) -> list[tuple[float, float, int]]:
    """(d of the shell centre in A, value, pairs) per shell from compare_hkl's --shell-file
    (columns: 1/d centre, value, nref, d, min and max 1/d)."""
    sg = gemmi.SpaceGroup(stats["space_group"])
    cell = gemmi.UnitCell(*stats["cell"])
    (tmp_path / "cell.cell").write_text(format_cell_file(cell, lattice_from_space_group(sg)))
    shells = tmp_path / f"{fom}.dat"
    overall = stats["overall"]
    # our outermost edges are reflections; widen them a hair so that rounding (the cell file
    # has 4 decimals) keeps them inside
    cmd = [str(tool), str(merged / "merged.hkl1"), str(merged / "merged.hkl2"),
           "-y", _symmetry_of(merged), "-p", str(tmp_path / "cell.cell"), f"--fom={fom}",
           f"--nshells={len(stats['shells'])}", "-u",
           f"--lowres={overall['d_max_a'] * (1 + 1e-5):.9f}",
           f"--highres={overall['d_min_a'] * (1 - 1e-5):.9f}", f"--shell-file={shells}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = []
    for line in shells.read_text().splitlines()[1:]:
        f = line.split()
        if len(f) >= 6:
            rows.append((float(f[3]), float(f[1]), int(f[2])))
    return rows


def _symmetry_of(merged: Path) -> str:
    return read_hkl(merged / "merged.hkl1")[0]


def test_compare_hkl_reproduces_our_cc_half_cc_star_and_rsplit_per_shell(merged, tmp_path,
                                                                         shared_data):
    tool = shared_data.parent / "peers" / "crystfel-0.12" / "bin" / "compare_hkl"
    if not tool.exists():
        pytest.skip(f"CrystFEL 0.12 compare_hkl not found at {tool}")
    probe = subprocess.run([str(tool), "--version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("compare_hkl does not run here (missing Debian libraries? see "
                    f"../shared/peers/README.md): {probe.stderr.strip()[:200]}")
    stats = json.loads((merged / "stats.json").read_text())
    ours = stats["shells"]
    for fom, key, scale in (("cc", "cc_half", 1.0), ("ccstar", "cc_star", 1.0),
                            ("rsplit", "r_split", 100.0)):
        theirs = _compare_hkl(tool, merged, stats, fom, tmp_path)
        assert len(theirs) == len(ours), (fom, theirs)
        for mine, (d_centre, value, n_pairs) in zip(ours, theirs, strict=True):
            assert mine["d_min_a"] <= d_centre <= mine["d_max_a"]  # the same shell
            assert n_pairs == mine["n_pairs"], (fom, d_centre)  # the same reflections
            if mine[key] is None:  # a thin shell we blank: compare_hkl still has a number
                assert mine["n_pairs"] < MIN_PAIRS
                continue
            assert value / scale == pytest.approx(mine[key], abs=TOLERANCE), (fom, d_centre)


def test_d_min_a_cuts_the_merged_data_and_the_statistics(merged, tmp_path):
    run = merged.parent / "run"
    out = tmp_path / "cut"
    result = run_merge([str(run)], str(out),
                       MergeParams(model="unity", iterations=2, n_shells=4, d_min_a=3.2), SERIAL)
    stats = result.stats
    assert stats["overall"]["d_min_a"] >= 3.2 and stats["shells"][-1]["d_min_a"] >= 3.2
    for name in ("merged.hkl", "merged.hkl1", "merged.hkl2"):
        hkl = read_hkl(out / name)[1]
        assert (d_spacing_a(gemmi.UnitCell(*stats["cell"]), hkl) >= 3.2 - 1e-9).all()
    mtz = gemmi.read_mtz_file(str(out / "merged.mtz"))
    assert mtz.resolution_high() >= 3.2 - 1e-6
    assert not math.isnan(stats["overall"]["n_unique"])
    assert "resolution estimate" in result.table


def test_merge_json_prints_valid_json_with_null_for_blank_shells(merged, tmp_path, capsys):
    from sfxflow.cli import main

    rc = main(["merge", str(merged.parent / "run"), "--out", str(tmp_path / "j"), "--scheduler",
               "synchronous", "--model", "unity", "--iterations", "1", "--n-shells", "12",
               "--json"])
    assert rc == 0

    def no_nan(name: str) -> None:
        raise AssertionError(f"{name} in --json output")

    stats = json.loads(capsys.readouterr().out, parse_constant=no_nan)
    thin = [s for s in stats["shells"] if s["n_pairs"] < MIN_PAIRS]
    assert thin and all(s["cc_half"] is None and s["r_split"] is None for s in thin)
    assert "resolution_estimate" in stats


def test_compare_hkl_reproduces_our_cc_ano_on_half_sets_with_friedel_mates_apart(tmp_path,
                                                                                shared_data):
    tool = shared_data.parent / "peers" / "crystfel-0.12" / "bin" / "compare_hkl"
    if not tool.exists():
        pytest.skip(f"CrystFEL 0.12 compare_hkl not found at {tool}")
    if subprocess.run([str(tool), "--version"], capture_output=True).returncode != 0:
        pytest.skip("compare_hkl does not run here (see ../shared/peers/README.md)")
    from sfxflow.algorithms.merge.reflections import AsuIndex
    from sfxflow.algorithms.merge.scale import ShardSums
    from sfxflow.algorithms.merge.statistics import merge_sums, shell_statistics
    from sfxflow.io.hkl import write_reflections

    index = AsuIndex.build(CELL, SG, 2.5)
    rng = np.random.default_rng(2)
    # I(+) = I(-) with noise growing with the intensity, each sign in each half 0 to 2 times
    code = np.repeat(np.arange(2 * len(index)), rng.integers(0, 5, 2 * len(index)))
    code = code[~(index.centric[code // 2] & (code % 2 == 1))]  # a centric's mate is itself
    obs = rng.exponential(100.0, len(index))[code // 2] * rng.normal(1.0, 0.5, code.size)
    half = rng.integers(0, 2, code.size)
    sums = ShardSums.zeros(2 * len(index))
    for name, sel in (("", half >= 0), ("_a", half == 0), ("_b", half == 1)):
        for field, w in (("n", 1.0), ("sw", 1.0), ("swi", obs[sel])):
            np.add.at(getattr(sums, f"{field}{name}"), code[sel], w)
    merged = merge_sums(sums)
    overall, _ = shell_statistics(index, merged, 1)
    hkl = np.concatenate([index.hkl, -index.hkl])
    files = []
    for h in "ab":
        i = np.concatenate([getattr(merged, f"i_plus_{h}"), getattr(merged, f"i_minus_{h}")])
        files.append(tmp_path / f"ano.hkl{h}")
        write_reflections(files[-1], gemmi.SpaceGroup("P 1"), hkl, i, np.ones(i.size),
                          np.isfinite(i).astype(int))
    uc, sg = gemmi.UnitCell(*map(float, CELL.split())), gemmi.SpaceGroup(SG)
    (tmp_path / "cell.cell").write_text(format_cell_file(uc, lattice_from_space_group(sg)))
    proc = subprocess.run(
        [str(tool), *map(str, files), "-y", "422", "-p", str(tmp_path / "cell.cell"),
         "--fom=ccano", "--nshells=1", "-u", f"--lowres={overall['d_max_a'] * (1 + 1e-5):.9f}",
         f"--highres={overall['d_min_a'] * (1 - 1e-5):.9f}",
         f"--shell-file={tmp_path / 'ano.dat'}"], capture_output=True, text=True, cwd=tmp_path,
        timeout=120)
    assert proc.returncode == 0, proc.stderr
    value, n_pairs = (float(x) for x in
                         (tmp_path / "ano.dat").read_text().splitlines()[1].split()[1:3])
    assert n_pairs == overall["n_pairs_ano"] > 100
    assert value == pytest.approx(overall["cc_ano"], abs=TOLERANCE)
    # the differences do not correlate beyond their own standard error
    assert abs(overall["cc_ano"]) < 4 * overall["cc_ano_sigma"]


@pytest.mark.parametrize("model", ["unity", "partiality"])
def test_error_model_makes_the_normalised_deviations_unit_without_a_clip(model, tmp_path):
    # unity's deviations are mostly unmodelled partiality, about proportional to I: sdadd's
    # to absorb (the old per-observation fit left them at rms 0.83 here, and at sdfac's
    # clip of 10 on x4wide stills)
    uc, group = gemmi.UnitCell(*map(float, CELL.split())), gemmi.SpaceGroup(SG)
    hkl = np.asarray(gemmi.make_miller_array(uc, group, 2.5, 0, True))
    d = d_spacing_a(uc, hkl)
    i = np.random.default_rng(0).exponential(1000.0, len(hkl)) * np.exp(-15.0 / (2 * d * d))
    truth = TrueIntensities.from_arrays(uc, group, hkl, i)
    write_simulated_observations(str(tmp_path / "run"), truth, simple(80.0, 0.1, 3000),
                                 PhysicalParams(d_min_a=2.5), 80, 3)
    stats = run_merge([str(tmp_path / "run")], str(tmp_path / "merge"),
                      MergeParams(model=model, iterations=3), SERIAL, truth=truth).stats
    assert 0.9 < stats["normalised_deviation_rms"] < 1.1
    assert 0.3 < stats["error_model"]["sdfac"] < 10.0 and stats["error_model"]["sdadd"] < 1.0
    assert stats["overall"]["cc_truth"] > (0.78 if model == "unity" else 0.91)
