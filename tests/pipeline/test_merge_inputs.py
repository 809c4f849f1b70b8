"""What ``run_merge`` takes in: the space group an input records (never a guessed one), one
answer per run however it is read, and inputs it must refuse or clean up after."""

from __future__ import annotations

import shutil
from pathlib import Path

import gemmi
import numpy as np
import pytest

from sfxflow.algorithms.layouts import simple
from sfxflow.algorithms.merge.scale import MergeParams
from sfxflow.algorithms.simulate_physical import PhysicalParams, TrueIntensities
from sfxflow.errors import InputError
from sfxflow.io.observations import write_simulated_observations
from sfxflow.io.stream import SPACE_GROUP_COMMENT, read_stream
from sfxflow.pipeline.config import ClusterConfig
from sfxflow.pipeline.merge import run_merge

SERIAL = ClusterConfig(kind="synchronous")
QUICK = MergeParams(model="unity", iterations=1)


def _truth() -> TrueIntensities:
    uc, sg = gemmi.UnitCell(42.37, 42.37, 39.69, 90, 90, 90), gemmi.SpaceGroup("P 41 21 2")
    hkl = np.asarray(gemmi.make_miller_array(uc, sg, 3.0, 0, True))
    i = np.random.default_rng(0).exponential(1000.0, len(hkl))
    return TrueIntensities.from_arrays(uc, sg, hkl, i)


def _write(root: Path, n_crystals: int, n_shards: int = 3) -> Path:
    write_simulated_observations(str(root / "run"), _truth(), simple(80.0, 0.1, 3000),
                                 PhysicalParams(d_min_a=3.0, scale_photons=0.2), n_crystals, 5,
                                 n_shards=n_shards, stream_path=str(root / "run.stream"))
    return root


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("merge-inputs"), 24)


def _overall(result) -> tuple:
    o = result.stats["overall"]
    return o["n_obs"], o["n_unique"], round(o["cc_half"], 3), result.stats["space_group"]


def test_run_directory_and_its_own_stream_give_one_answer(sim, tmp_path):
    # were 4,683 vs 4,380 unique and CC1/2 0.889 vs 0.861 on the demo run: the stream left
    # out flagged reflections the run kept, and the half-sets followed the shard numbering
    run = run_merge([str(sim / "run")], str(tmp_path / "r"), QUICK, SERIAL)
    stream = run_merge([str(sim / "run.stream")], str(tmp_path / "s"), QUICK, SERIAL)
    assert _overall(run) == _overall(stream)
    assert run.stats["cell"] == pytest.approx(stream.stats["cell"], abs=1e-3)
    assert run.stats["overall"]["cc_half"] == pytest.approx(stream.stats["overall"]["cc_half"],
                                                            abs=2e-3)


def test_the_stream_header_records_the_space_group(sim):
    text = (sim / "run.stream").read_text()
    assert f"{SPACE_GROUP_COMMENT} P 41 21 2" in text.split("----- Begin chunk -----")[0]
    assert read_stream(sim / "run.stream").target_cell.space_group.hm == "P 41 21 2"


def _without_space_group(sim: Path, tmp_path: Path) -> Path:
    bare = tmp_path / "crystfel.stream"
    bare.write_text("".join(line for line in (sim / "run.stream").open()
                            if not line.startswith(SPACE_GROUP_COMMENT)))
    return bare


def test_a_stream_without_a_space_group_is_refused_and_nothing_is_written(sim, tmp_path):
    bare = _without_space_group(sim, tmp_path)
    with pytest.raises(InputError, match=r"crystfel\.stream: records no space group \(value: "
                                         r"none\); give --space-group .* --point-group"):
        run_merge([str(bare)], str(tmp_path / "o"), QUICK, SERIAL)
    assert not (tmp_path / "o").exists()


def test_a_point_group_merges_in_its_symmorphic_group(sim, tmp_path):
    bare = _without_space_group(sim, tmp_path)
    r = run_merge([str(bare)], str(tmp_path / "o"), QUICK, SERIAL, point_group="4/mmm")
    assert r.stats["space_group"] == "P 4 2 2"
    mtz = gemmi.read_mtz_file(str(tmp_path / "o" / "merged.mtz"))
    assert mtz.spacegroup.hm == "P 4 2 2"
    assert mtz.cell.is_compatible_with_spacegroup(mtz.spacegroup)


def test_the_same_run_given_twice_is_refused(sim, tmp_path):
    # was merged twice: CC1/2 0.939 -> 0.964, multiplicity 7.16 -> 12.31
    with pytest.raises(InputError, match=r"given twice .*expected each run directory or "
                                         r"stream once"):
        run_merge([str(sim / "run"), str(sim / "run") + "/"], str(tmp_path / "o"), QUICK, SERIAL)


def test_merging_into_the_run_directory_is_refused(sim, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sim / "run", run)
    (run / "crystals.parquet").write_bytes(b"the run's own")
    with pytest.raises(InputError, match=r"--out .*run: is the input run directory"):
        run_merge([str(run)], str(run), QUICK, SERIAL)
    with pytest.raises(InputError, match=r"is an sfxflow run directory"):
        run_merge([str(sim / "run")], str(run), QUICK, SERIAL)
    assert (run / "crystals.parquet").read_bytes() == b"the run's own"


def test_merging_again_into_a_merge_folder_leaves_no_stale_scaled_files(sim, tmp_path):
    out = tmp_path / "m"
    run_merge([str(sim / "run")], str(out), QUICK, SERIAL)
    assert len(list((out / "scaled").glob("*.parquet"))) == 3
    (out / "scaled" / "notes.txt").write_text("not ours")
    (tmp_path / "small").mkdir()
    small = _write(tmp_path / "small", 6, n_shards=1)
    run_merge([str(small / "run")], str(out), QUICK, SERIAL)
    assert sorted(p.name for p in (out / "scaled").iterdir()) == ["00000.parquet", "notes.txt"]


def test_a_one_crystal_stream_is_a_clear_error(tmp_path):
    one = _write(tmp_path, 1, n_shards=1)
    with pytest.raises(InputError, match=r"run\.stream: 1 crystal\(s\) with integrated "
                                         r"reflections .*expected at least 2"):
        run_merge([str(one / "run.stream")], str(tmp_path / "o"), QUICK, SERIAL)
    assert not (tmp_path / "o" / "merged.mtz").exists()


def test_leftover_temporary_shards_are_ignored(sim, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sim / "run", run)
    (run / "shards" / ".tmp-0123abcd-sim-00000.reflections.parquet").write_bytes(b"partial")
    r = run_merge([str(run)], str(tmp_path / "o"), QUICK, SERIAL)
    assert r.stats["n_crystals_input"] == 24


def test_a_missing_reflections_shard_is_an_error_naming_it(sim, tmp_path):
    # was a silent drop of the block's crystals (224 of 232 merged)
    run = tmp_path / "run"
    shutil.copytree(sim / "run", run)
    (run / "shards" / "sim-00001.reflections.parquet").unlink()
    with pytest.raises(InputError, match=r"shards/sim-00001\.reflections\.parquet: missing"):
        run_merge([str(run)], str(tmp_path / "o"), QUICK, SERIAL)
