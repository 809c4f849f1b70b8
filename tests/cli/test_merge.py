"""``sfxflow merge`` on the command line: real CrystFEL stream, simulated run, user errors."""

from __future__ import annotations

import json

import gemmi
import numpy as np
import pytest

from sfxflow.algorithms.layouts import simple
from sfxflow.algorithms.simulate_physical import PhysicalParams, TrueIntensities
from sfxflow.cli import main
from sfxflow.io.observations import write_simulated_observations


@pytest.mark.needs_shared
def test_merges_the_32_xgandalf_crystals_of_the_crystfel_test_stream(shared_data, tmp_path,
                                                                    capsys):
    out = tmp_path / "m"
    stream = str(shared_data / "crystfel" / "test.stream")
    # CrystFEL's stream records no space group: never guessed (was C 2 2 2 from the lattice)
    assert main(["merge", stream, "--out", str(out), "--scheduler", "synchronous"]) == 2
    err = capsys.readouterr().err
    assert "test.stream: records no space group (value: none); give --space-group" in err
    assert "--point-group" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not out.exists()
    rc = main(["merge", stream, "--out", str(out), "--space-group", "C2221",
               "--scheduler", "synchronous", "--model", "unity"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "of 32 crystals merged" in text and "CC1/2" in text
    stats = json.loads((out / "stats.json").read_text())
    assert stats["space_group"] == "C 2 2 21"
    assert stats["n_crystals_input"] == 32 and stats["n_crystals_merged"] >= 28
    assert stats["overall"]["n_obs"] > 1000
    mtz = gemmi.read_mtz_file(str(out / "merged.mtz"))
    assert mtz.spacegroup.hm == "C 2 2 21" and mtz.cell.a == pytest.approx(61.5, abs=1.0)
    # was 61.52 122.60 168.81 90.07 90.07 90.34, which gemmi called incompatible
    assert mtz.cell.is_compatible_with_spacegroup(mtz.spacegroup)
    assert mtz.cell.parameters[3:] == (90.0, 90.0, 90.0)


@pytest.mark.needs_shared
def test_a_point_group_is_enough_to_merge_the_crystfel_test_stream(shared_data, tmp_path,
                                                                   capsys):
    out = tmp_path / "m"
    assert main(["merge", str(shared_data / "crystfel" / "test.stream"), "--out", str(out),
                 "--point-group", "mmm", "--scheduler", "synchronous", "--model", "unity",
                 "--iterations", "1"]) == 0
    mtz = gemmi.read_mtz_file(str(out / "merged.mtz"))
    assert mtz.spacegroup.hm == "C 2 2 2"  # mmm on the crystals' orthorhombic C lattice
    assert mtz.cell.is_compatible_with_spacegroup(mtz.spacegroup)
    assert main(["merge", "x.stream", "--out", str(out), "--point-group", "6mm"]) == 2
    assert "expected a chiral point group" in capsys.readouterr().err


def test_simulated_run_with_truth_prints_the_table(tmp_path, capsys):
    uc, sg = gemmi.UnitCell(40, 40, 60, 90, 90, 90), gemmi.SpaceGroup("P 41 21 2")
    hkl = np.asarray(gemmi.make_miller_array(uc, sg, 3.0, 0, True))
    i = np.random.default_rng(0).exponential(1000.0, len(hkl))
    truth = TrueIntensities.from_arrays(uc, sg, hkl, i)
    write_simulated_observations(str(tmp_path / "run"), truth, simple(80.0, 0.1, 3000),
                                 PhysicalParams(d_min_a=3.0, scale_photons=0.2), 30, 1)
    mtz = gemmi.Mtz(with_base=True)
    mtz.spacegroup, mtz.cell = sg, uc
    mtz.add_dataset("truth")
    mtz.add_column("IMEAN", "J")
    mtz.set_data(np.column_stack([hkl, i]).astype(np.float32))
    mtz.write_to_file(str(tmp_path / "truth.mtz"))
    rc = main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "m"), "--scheduler",
               "synchronous", "--iterations", "2", "--truth", str(tmp_path / "truth.mtz")])
    out = capsys.readouterr().out
    assert rc == 0 and "CCtrue" in out
    stats = json.loads((tmp_path / "m" / "stats.json").read_text())
    assert stats["overall"]["cc_truth"] > 0.5


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["merge", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "m"),
                 "--scheduler", "synchronous"]) == 2
    err = capsys.readouterr().err
    assert "no shards/*.reflections.parquet" in err and "Traceback" not in err
    assert main(["merge", "x.stream", "--out", str(tmp_path / "m"), "--iterations", "0"]) == 2
    assert "iterations" in capsys.readouterr().err
    assert main(["merge", "x", "--out", "m", "--set", "merge.nope=1"]) == 2
