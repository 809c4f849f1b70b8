"""``run_merge``: simulated observations with a known truth, serial and on a real Dask cluster."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import gemmi
import numpy as np
import pyarrow.parquet as pq
import pytest

from sfxflow.algorithms.layouts import simple
from sfxflow.algorithms.merge.scale import MergeParams
from sfxflow.algorithms.simulate_physical import PhysicalParams, TrueIntensities
from sfxflow.errors import InputError
from sfxflow.io.observations import write_simulated_observations
from sfxflow.pipeline.config import ClusterConfig
from sfxflow.pipeline.merge import run_merge

SERIAL = ClusterConfig(kind="synchronous")
CELL = "42.37 42.37 39.69 90 90 90"
SG = "P 41 21 2"
SHELL_KEYS = {"d_max_a", "d_min_a", "n_obs", "n_unique", "n_possible", "completeness",
              "multiplicity", "mean_i_over_sigma", "n_pairs", "cc_half", "cc_star", "r_split",
              "n_pairs_aimless", "cc_half_aimless", "cc_star_aimless", "n_pairs_ano", "cc_ano",
              "cc_ano_sigma",
              "n_possible_acentric", "anomalous_completeness", "anomalous_multiplicity",
              "cc_truth"}


def make_truth(cell: str = CELL, sg: str = SG, d_min: float = 2.5, seed: int = 0
               ) -> TrueIntensities:
    uc, group = gemmi.UnitCell(*map(float, cell.split())), gemmi.SpaceGroup(sg)
    hkl = np.asarray(gemmi.make_miller_array(uc, group, d_min, 0, True))
    rng = np.random.default_rng(seed)
    d = 1.0 / np.linalg.norm(hkl @ np.asarray(uc.frac.mat), axis=1)
    i = rng.exponential(1000.0, len(hkl)) * np.exp(-15.0 / (2 * d * d))
    return TrueIntensities.from_arrays(uc, group, hkl, i, i * rng.uniform(0.95, 1.05, len(hkl)))


@pytest.fixture(scope="module")
def truth() -> TrueIntensities:
    return make_truth()


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory, truth) -> Path:
    root = tmp_path_factory.mktemp("merge-sim")
    write_simulated_observations(str(root / "run"), truth, simple(80.0, 0.1, 3000),
                                 PhysicalParams(d_min_a=2.5, scale_photons=0.2), 80, 5,
                                 n_shards=3, stream_path=str(root / "run.stream"))
    return root


@pytest.fixture(scope="module")
def serial_results(sim_run, truth, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge-out")
    return {m: run_merge([str(sim_run / "run")], str(out / m), MergeParams(model=m, iterations=3),
                         SERIAL, truth=truth) for m in ("unity", "partiality")}


def test_partiality_model_beats_unity_against_the_truth(serial_results):
    u, p = (serial_results[m].stats for m in ("unity", "partiality"))
    assert p["overall"]["cc_truth"] > u["overall"]["cc_truth"]
    assert p["overall"]["cc_truth"] > 0.9
    # weak crystals whose observations do not follow the reference, or that the half-sets
    # disagree on, are rejected (and named); most are merged
    assert p["n_crystals_input"] == 80
    assert p["n_crystals_merged"] + sum(p["rejected"].values()) == 80
    assert p["n_crystals_merged"] >= 55
    # CC* estimates the correlation with the truth; they agree roughly
    assert abs(p["overall"]["cc_star"] - p["overall"]["cc_truth"]) < 0.1


def test_stats_json_keeps_to_the_contract(serial_results):
    r = serial_results["partiality"]
    stats = json.loads(Path(r.out_url, "stats.json").read_text())
    for key in ("space_group", "cell", "wavelength_a", "model", "n_crystals_input",
                "n_crystals_merged", "rejected", "overall", "shells", "wilson"):
        assert key in stats
    assert set(stats["overall"]) == SHELL_KEYS and all(set(s) == SHELL_KEYS
                                                       for s in stats["shells"])
    assert stats["space_group"] == "P 41 21 2" and stats["model"] == "partiality"
    assert 0 < stats["wilson"]["b_a2"] < 40  # truth B 15 plus the per-crystal spread
    assert 0.5 < stats["error_model"]["sdfac"] < 3
    # with the error model, deviations from the reference are about one standard deviation
    assert 0.7 < stats["normalised_deviation_rms"] < 1.3
    assert "cc1/2" not in r.table and "CC1/2" in r.table


def test_mtz_reads_back_with_cell_space_group_and_columns(serial_results):
    out = Path(serial_results["partiality"].out_url)
    mtz = gemmi.read_mtz_file(str(out / "merged.mtz"))
    assert mtz.spacegroup.hm == "P 41 21 2"
    assert mtz.cell.approx(gemmi.UnitCell(*map(float, CELL.split())), 0.2)
    labels = [c.label for c in mtz.columns]
    for col in ("H", "K", "L", "IMEAN", "SIGIMEAN", "I(+)", "SIGI(+)", "I(-)", "SIGI(-)", "N"):
        assert col in labels
    assert 1.2 < mtz.datasets[-1].wavelength < 1.4
    data = np.asarray(mtz.array)
    assert np.all(data[:, labels.index("N")] >= 2)
    scaled = pq.read_table(out / "scaled")
    assert scaled.num_rows > 5000 and "partiality" in scaled.column_names
    crystals = pq.read_table(out / "crystals.parquet")
    assert crystals.num_rows == 80 and "radius_inv_a" in crystals.column_names
    # per crystal: scale, relative B, CC with the reference, delta CC1/2, why rejected
    assert {"scale", "b_a2", "cc", "delta_cc_half", "accepted", "reason"} <= set(
        crystals.column_names)
    accepted = crystals.column("accepted").to_numpy()
    reason = crystals.column("reason").to_pylist()
    assert all((r == "") == a for r, a in zip(reason, accepted, strict=True))
    # NaN only for a crystal left out of the last cycle's sums (re-admitted after it)
    assert np.isfinite(crystals.column("delta_cc_half").to_numpy()[accepted]).mean() > 0.9


def test_merged_hkl_is_read_by_check_hkl(serial_results, tmp_path, shared_data):
    check_hkl = shared_data.parent / "peers" / "crystfel-0.12" / "bin" / "check_hkl"
    if not check_hkl.exists():
        pytest.skip(f"CrystFEL check_hkl not found at {check_hkl}")
    cell = tmp_path / "x.cell"
    cell.write_text("CrystFEL unit cell file version 1.0\nlattice_type = tetragonal\n"
                    "centering = P\nunique_axis = c\na = 42.37 A\nb = 42.37 A\nc = 39.69 A\n"
                    "al = 90 deg\nbe = 90 deg\nga = 90 deg\n")
    hkl = Path(serial_results["partiality"].out_url) / "merged.hkl"
    proc = subprocess.run([str(check_hkl), str(hkl), "-y", "4/mmm", "-p", str(cell),
                           "--highres=2.5"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Overall" in proc.stdout + proc.stderr


def _runs_with(tmp_path: Path, truth: TrueIntensities, n: int, name: str) -> Path:
    write_simulated_observations(str(tmp_path / name), truth, simple(80.0, 0.1, 3000),
                                 PhysicalParams(d_min_a=3.0, scale_photons=0.2), n, 9)
    return tmp_path / name


def test_inputs_with_different_space_groups_or_cells_are_refused(tmp_path):
    a = _runs_with(tmp_path, make_truth(d_min=3.0), 4, "a")
    b = _runs_with(tmp_path, make_truth("42.37 42.37 39.69 90 90 90", "P 43 21 2", 3.0), 4, "b")
    with pytest.raises(InputError, match="different space groups"):
        run_merge([str(a), str(b)], str(tmp_path / "o"), MergeParams(), SERIAL)
    c = _runs_with(tmp_path, make_truth("50 50 39.69 90 90 90", SG, 3.0), 4, "c")
    with pytest.raises(InputError, match="differs from"):
        run_merge([str(a), str(c)], str(tmp_path / "o"), MergeParams(), SERIAL)


def test_stream_without_reflections_is_a_clear_error(tmp_path, sim_run):
    text = (sim_run / "run.stream").read_text()
    head = text.split("----- Begin chunk -----")[0]
    bare = tmp_path / "bare.stream"
    bare.write_text(head + "----- Begin chunk -----\nImage filename: x.h5\nEvent: //0\n"
                    "hit = 0\nindexed_by = none\nnum_peaks = 0\nPeaks from peak search\n"
                    "  fs/px   ss/px (1/d)/nm^-1   Intensity  Panel\nEnd of peak list\n"
                    "----- End chunk -----\n")
    with pytest.raises(InputError, match="no crystal with integrated reflections"):
        run_merge([str(bare)], str(tmp_path / "o"), MergeParams(), SERIAL)


def test_absurd_scale_crystal_is_rejected_and_counted(tmp_path, sim_run, truth):
    run = tmp_path / "run"
    shutil.copytree(sim_run / "run", run)
    shard = run / "shards" / "sim-00000.reflections.parquet"
    table = pq.read_table(shard)
    frame = table.column("frame_index").to_numpy()
    boost = np.where(frame == frame[0], 1e6, 1.0)
    cols = {n: table.column(n) for n in table.column_names}
    cols["intensity"] = table.column("intensity").to_numpy() * boost
    cols["sigma"] = table.column("sigma").to_numpy() * boost
    import pyarrow as pa

    pq.write_table(pa.table(cols), shard)
    r = run_merge([str(run)], str(tmp_path / "o"), MergeParams(model="unity", iterations=2),
                  SERIAL, truth=truth)
    assert r.stats["rejected"].get("absurd scale") == 1
    assert r.stats["n_crystals_merged"] <= 79


def test_stream_of_the_same_crystals_merges_like_the_run_directory(sim_run, truth, tmp_path,
                                                                   serial_results):
    # the stream records its space group too; giving it is allowed
    r = run_merge([str(sim_run / "run.stream")], str(tmp_path / "s"),
                  MergeParams(model="partiality", iterations=3), SERIAL, truth=truth,
                  space_group=SG)
    assert r.stats["n_crystals_input"] == 80
    want = serial_results["partiality"].stats["overall"]["cc_truth"]
    assert r.stats["overall"]["cc_truth"] == pytest.approx(want, abs=0.03)


def test_p63_ambiguity_resolution_restores_the_cc_to_truth(tmp_path):
    truth = make_truth("60 60 90 90 90 120", "P 63", 3.0, seed=3)
    from sfxflow.algorithms.merge.reflections import ambiguity_operators

    ops = ambiguity_operators(truth.index.cell, truth.index.space_group)
    write_simulated_observations(str(tmp_path / "amb"), truth, simple(80.0, 0.1, 3000),
                                 PhysicalParams(d_min_a=3.0, scale_photons=0.5), 60, 2,
                                 reindex_ops=ops)
    with_res = run_merge([str(tmp_path / "amb")], str(tmp_path / "o1"),
                         MergeParams(iterations=3), SERIAL, truth=truth)
    without = run_merge([str(tmp_path / "amb")], str(tmp_path / "o2"),
                        MergeParams(iterations=3, resolve_ambiguity=False), SERIAL, truth=truth)
    crystals = pq.read_table(Path(with_res.out_url) / "crystals.parquet")
    found = crystals.column("operator").to_numpy()
    true_ops = pq.read_table(tmp_path / "amb" / "shards" / "sim-00000.crystals.parquet"
                             ).column("true_reindex_op").to_numpy()
    agree = float(np.mean(found == true_ops))
    assert max(agree, 1 - agree) > 0.9
    # (the merged setting is arbitrary: the CC is taken in the truth's best setting)
    assert with_res.stats["ambiguity"]["n_operators"] == 2
    assert with_res.stats["overall"]["cc_truth"] > without.stats["overall"]["cc_truth"] + 0.2


def test_shards_are_memory_mapped_from_scratch_files_removed_however_the_merge_ends(
        sim_run, truth, tmp_path):
    """The shards' observations are kept in memory-mapped scratch files under Dask's
    temporary-directory while the merge runs: nothing is left there after a merge, nor after
    one that failed."""
    import dask.config

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    seen: list[list[Path]] = []

    def look(cycle: int) -> None:
        seen.append(list(scratch.glob("sfxflow-merge-*/*")))

    def fail(cycle: int) -> None:
        raise RuntimeError(f"stopped in cycle {cycle}")

    with dask.config.set({"temporary-directory": str(scratch)}):
        r = run_merge([str(sim_run / "run")], str(tmp_path / "m"), MergeParams(iterations=3),
                      SERIAL, truth=truth, on_cycle=look)
        assert r.stats["overall"]["cc_truth"] > 0.9
        assert len(seen[0]) == 2 * 3  # each of the 3 shards as read and as prepared
        assert not list(scratch.iterdir())
        with pytest.raises(RuntimeError, match="stopped in cycle 1"):
            run_merge([str(sim_run / "run")], str(tmp_path / "f"), MergeParams(iterations=3),
                      SERIAL, truth=truth, on_cycle=fail)
        assert not list(scratch.iterdir())


def test_work_units_add_the_shards_in_the_tree_order_of_single_shards():
    """Units of 2**k consecutive shards summed with ``tree_sum``, then the units' sums added
    in MapReduce's tree: the same additions in the same order as the tree over the shards."""
    from sfxflow.pipeline.mapreduce import MapReduce, tree_sum
    from sfxflow.pipeline.merge_tasks import grouped as _grouped

    def add(a: str, b: str) -> str:
        return f"({a}+{b})"

    tree = MapReduce(None)._total
    for n in range(1, 40):
        shards = [str(i) for i in range(n)]
        whole = tree(shards, add, str)
        for size in (1, 2, 4, 8):
            assert tree([tree_sum(u, add) for u in _grouped(shards, size)], add, str) == whole


@pytest.mark.parametrize(("n_shards", "n_workers", "n_cores", "size"),
                         [(50, 2, 2, 8), (5, 2, 2, 2), (3, 1, 1, 4), (2, 2, 2, 1),
                          (20, 2, 4, 2), (1, 4, 4, 1)])
def test_work_units_are_as_large_as_the_balance_over_the_workers_allows(n_shards, n_workers,
                                                                          n_cores, size):
    from sfxflow.pipeline.merge_tasks import unit_shards as _unit_shards

    assert _unit_shards(n_shards, n_workers, n_cores) == size


def test_a_merge_in_work_units_is_the_merge_shard_by_shard_to_the_bit(
        sim_run, truth, serial_results, tmp_path, monkeypatch):
    import sfxflow.pipeline.merge_tasks as merge_tasks

    monkeypatch.setattr(merge_tasks, "UNIT_SHARDS_MAX", 1)  # one shard a unit
    r = run_merge([str(sim_run / "run")], str(tmp_path / "one"),
                  MergeParams(model="partiality", iterations=3), SERIAL, truth=truth)
    grouped = serial_results["partiality"]  # its 3 shards in one unit
    a = gemmi.read_mtz_file(str(tmp_path / "one" / "merged.mtz"))
    b = gemmi.read_mtz_file(str(Path(grouped.out_url) / "merged.mtz"))
    assert np.array_equal(np.asarray(a.array), np.asarray(b.array), equal_nan=True)
    assert r.crystals.column_names == grouped.crystals.column_names
    for name in r.crystals.column_names:  # NaN where a crystal has no delta CC1/2
        x, y = (t.column(name).to_numpy(zero_copy_only=False) for t in (r.crystals,
                                                                         grouped.crystals))
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name
    assert r.stats["overall"] == grouped.stats["overall"]


# ----------------------------------------------------------------------------- on Dask

@pytest.mark.dask
@pytest.mark.slow
def test_distributed_merge_equals_serial_and_survives_a_killed_worker(
        sim_run, truth, serial_results, dask_cluster, tmp_path):
    address, workers, pids = dask_cluster
    by_pid = {p.pid: p for p in workers}
    killed: list[int] = []

    def kill_one(cycle: int) -> None:
        if cycle == 1 and not killed:
            victim = next(iter(pids.values()))
            by_pid[victim].send_signal(signal.SIGKILL)
            killed.append(victim)

    r = run_merge([str(sim_run / "run")], str(tmp_path / "d"),
                  MergeParams(model="partiality", iterations=3),
                  ClusterConfig(scheduler=address), truth=truth, on_cycle=kill_one)
    assert killed and by_pid[killed[0]].wait(timeout=10) == -signal.SIGKILL
    serial = serial_results["partiality"].stats
    for key in ("n_obs", "n_unique"):
        assert r.stats["overall"][key] == serial["overall"][key]
    for key in ("cc_half", "cc_truth", "mean_i_over_sigma"):
        assert r.stats["overall"][key] == pytest.approx(serial["overall"][key], rel=1e-9)
    a = gemmi.read_mtz_file(str(tmp_path / "d" / "merged.mtz"))
    b = gemmi.read_mtz_file(str(Path(serial_results["partiality"].out_url) / "merged.mtz"))
    assert np.allclose(np.asarray(a.array), np.asarray(b.array), rtol=1e-5, equal_nan=True)
    # the surviving worker kept its shards in scratch files, all removed at the end
    from distributed import Client

    def left(dask_worker: Any) -> list[str]:
        return [p.name for p in Path(dask_worker.local_directory).glob("sfxflow-merge-*")]

    with Client(address, timeout="20s") as client:
        assert list(client.run(left).values()) == [[]]


@pytest.mark.s3
def test_run_directory_on_s3_merges_into_s3_like_local(sim_run, truth, serial_results, s3_bucket,
                                                       s3_storage_options):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_storage_options)
    run = sim_run / "run"
    for path in run.rglob("*"):
        if path.is_file():
            fs.put_file(str(path), f"{s3_bucket}/run/{path.relative_to(run).as_posix()}")
    out = f"s3://{s3_bucket}/run/merge"
    r = run_merge([f"s3://{s3_bucket}/run"], out, MergeParams(model="partiality", iterations=3),
                  SERIAL, truth=truth, storage_options=s3_storage_options)
    local = serial_results["partiality"].stats["overall"]
    assert r.stats["overall"]["cc_truth"] == pytest.approx(local["cc_truth"], rel=1e-9)
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/run/merge")}
    assert {"merged.mtz", "merged.hkl", "stats.json", "crystals.parquet", "scaled"} <= names
