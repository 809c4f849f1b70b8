"""The report's data from damaged, incomplete or hostile run directories (issue 19 item 7), and
the diagnostics gathered from the spots and merge tables (issue 22)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from sfxflow.benchmarks.report import SIM_SHIFT_PX, write_simulated_run
from sfxflow.errors import InputError
from sfxflow.io.results import parquet_bytes
from sfxflow.pipeline.report import (
    DIAG_BLOCKS,
    Diagnostics,
    FramePicture,
    Merged,
    PanelOffsets,
    RunOverview,
    Scaling,
    Unavailable,
    build_merge_report,
    build_report,
)
from sfxflow.report.html import render_report_html


def _run(tmp_path: Path, **kw) -> Path:
    run = tmp_path / "run"
    write_simulated_run(run, **{"n_frames": 200, "frames_per_block": 50, "seed": 4, **kw})
    return run


def _strongest_block(run: Path) -> str:
    frames = pq.read_table(run / "frames.parquet")
    indexed = frames.filter(pc.equal(frames.column("status"), "indexed"))
    best = indexed.sort_by([("n_indexed", "descending"), ("n_spots", "descending")])
    return str(best.column("block_id")[0])


# ------------------------------------------------------------------------------ damaged files


def test_a_corrupt_frames_shard_is_named_and_left_out(tmp_path):
    run = _run(tmp_path, done_blocks=3)
    shard = sorted((run / "shards").glob("*.frames.parquet"))[1]
    shard.write_bytes(b"PAR1 this is not parquet PAR1")
    data = build_report(str(run), with_picture=False)
    assert isinstance(data.overview, RunOverview) and data.overview.counts["frames"] == 100
    assert any(shard.name in n and "cannot be read" in n for n in data.notes)
    assert shard.name in render_report_html(data)


def test_a_corrupt_frames_parquet_falls_back_to_the_shards(tmp_path):
    run = _run(tmp_path)
    (run / "frames.parquet").write_bytes(b"garbage")
    (run / "crystals.parquet").write_bytes(b"garbage")
    data = build_report(str(run), with_picture=False)
    assert isinstance(data.overview, RunOverview) and data.overview.counts["frames"] == 200
    assert any("frames.parquet" in n for n in data.notes)
    assert data.state == "complete"


def test_a_deleted_shard_is_not_reported_complete(tmp_path):
    run = _run(tmp_path)
    (run / "frames.parquet").unlink()
    victim = sorted((run / "shards").glob("*.frames.parquet"))[2]
    victim.unlink()
    data = build_report(str(run), with_picture=False)
    assert data.state.startswith("incomplete: 150 of 200 frames found, the results of 1 of 4 "
                                 "blocks missing")
    assert isinstance(data.overview, RunOverview)
    assert (data.overview.blocks_done, data.overview.blocks_total) == (3, 4)
    assert ">complete<" not in render_report_html(data)


def test_a_damaged_merge_crystals_table_is_said_in_its_place(tmp_path):
    run = _run(tmp_path)
    (run / "merge" / "crystals.parquet").write_bytes(b"nope")
    data = build_merge_report(str(run / "merge"), [str(run)])
    assert isinstance(data.scaling, Unavailable) and "cannot be read" in data.scaling.reason


def test_not_a_directory_is_a_user_error(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        build_report(str(f))


# ------------------------------------------------------------------------- untrusted contents


def _rewrite_frames(run: Path, **columns) -> None:
    frames = pq.read_table(run / "frames.parquet")
    block = _strongest_block(run)
    pick = pc.equal(frames.column("block_id"), block).to_numpy(zero_copy_only=False)
    for name, value in columns.items():
        old = frames.column(name).to_numpy(zero_copy_only=False).astype(object)
        old[pick] = value
        frames = frames.set_column(frames.schema.get_field_index(name), name,
                                   pa.array(old, pa.string()))
    (run / "frames.parquet").write_bytes(parquet_bytes(frames))


def test_a_source_url_the_manifest_does_not_declare_is_not_read(tmp_path):
    run = _run(tmp_path)
    secret = tmp_path / "secret.cbf"
    secret.write_text("not for the report")
    _rewrite_frames(run, source_url=str(secret))
    data = build_report(str(run))
    assert isinstance(data.picture, Unavailable)
    assert "is not one of the inputs the run's manifest.json declares: not read" in \
        data.picture.reason


def test_block_ids_that_leave_the_run_directory_are_not_used_as_paths(tmp_path):
    run = _run(tmp_path)
    _rewrite_frames(run, block_id="../../outside")
    data = build_report(str(run))
    assert isinstance(data.picture, Unavailable)
    assert "block id '../../outside' is not a plain name" in data.picture.reason


def test_a_shard_linking_out_of_the_run_directory_is_not_read(tmp_path):
    run = _run(tmp_path, done_blocks=2)
    outside = tmp_path / "outside.parquet"
    shard = sorted((run / "shards").glob("*.frames.parquet"))[0]
    shutil.copy(shard, outside)
    shard.unlink()
    os.symlink(outside, shard)
    data = build_report(str(run), with_picture=False)
    assert any("points outside the run directory" in n for n in data.notes)
    assert isinstance(data.overview, RunOverview) and data.overview.counts["frames"] == 50


def test_damaged_spots_and_reflections_of_the_pictured_frame(serial_run, tmp_path):
    """A real run: the frame is still drawn, and the caption says what could not be read."""
    src, _ = serial_run
    run = tmp_path / "run"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("report.html", "run.lock"))
    block = _strongest_block(run)
    for kind in ("spots", "reflections"):
        (run / "shards" / f"{block}.{kind}.parquet").write_bytes(b"broken")
    data = build_report(str(run))
    assert isinstance(data.picture, FramePicture), data.picture
    assert "Unreadable: " in data.picture.caption and f"{block}.spots.parquet" in \
        data.picture.caption
    assert "reflections shard cannot be read" in data.picture.caption
    assert "data:image/png;base64," in render_report_html(data)


# ------------------------------------------------------------------------------ diagnostics


def test_spots_diagnostics_show_the_detector_shift_and_the_ice_rings(tmp_path):
    run = _run(tmp_path)
    data = build_report(str(run), with_picture=False)
    d = data.diagnostics
    assert isinstance(d, Diagnostics)
    n_spots = sum(pq.read_metadata(p).num_rows for p in (run / "shards").glob("*.spots.parquet"))
    assert d.d_a.size == n_spots and "of 4 blocks" in d.source
    on_ice = np.isclose(d.d_a, 3.897, atol=1e-6) | np.isclose(d.d_a, 3.669, atol=1e-6)
    assert 0.01 < on_ice.mean() < 0.1
    o = d.offsets
    assert isinstance(o, PanelOffsets) and o.panels.size == 64
    n = o.n.astype(float)
    assert np.sum(o.dfs_px * n) / n.sum() == pytest.approx(SIM_SHIFT_PX[0], abs=0.05)
    assert np.sum(o.dss_px * n) / n.sum() == pytest.approx(SIM_SHIFT_PX[1], abs=0.05)


def test_spots_are_read_from_a_bounded_sample_of_blocks(tmp_path):
    run = _run(tmp_path, n_frames=400, frames_per_block=10)
    data = build_report(str(run), with_picture=False)
    assert isinstance(data.diagnostics, Diagnostics)
    assert f"of {DIAG_BLOCKS} of 40 blocks spread along the run" in data.diagnostics.source


def test_per_crystal_scaling_read_under_other_column_names(tmp_path):
    run = _run(tmp_path)
    table = pq.read_table(run / "merge" / "crystals.parquet")
    table = table.rename_columns([{"b_a2": "b_factor_a2", "cc": "cc_to_reference",
                                   "reason": "rejected_reason"}.get(c, c)
                                  for c in table.column_names]).drop_columns(["accepted"])
    (run / "merge" / "crystals.parquet").write_bytes(parquet_bytes(table))
    data = build_merge_report(str(run / "merge"), [str(run)])
    sc = data.scaling
    assert isinstance(sc, Scaling)
    assert sc.columns["b_a2"] == "b_factor_a2" and sc.columns["cc"] == "cc_to_reference"
    reasons = table.column("rejected_reason").to_pylist()
    assert int((~sc.accepted).sum()) == sum(bool(r) for r in reasons)
    assert dict(sc.reasons) == {r: reasons.count(r) for r in set(reasons) if r}

    # a merge without B or CC columns: the page says so instead of plotting
    (run / "merge" / "crystals.parquet").write_bytes(
        parquet_bytes(table.select(["source_url", "frame_index", "crystal", "scale"])))
    page = render_report_html(build_merge_report(str(run / "merge"), [str(run)]))
    assert "the merge wrote no B factor, CC to the reference column" in page


def test_resolution_estimate_read_whatever_its_keys(tmp_path):
    run = _run(tmp_path)
    stats = json.loads((run / "merge" / "stats.json").read_text())
    stats["resolution_estimate"] = {"cc_half_0p3_a": 2.1, "i_over_sigma_1_a": 2.45,
                                    "method": "fit"}
    (run / "merge" / "stats.json").write_text(json.dumps(stats))
    data = build_report(str(run), with_picture=False)
    assert isinstance(data.merged, Merged)
    assert list(data.merged.resolution_estimate) == [("CC1/2 0.3", 2.1), ("I/σ 1", 2.45)]
    page = render_report_html(data)
    assert "2.10 Å" in page and "2.45 Å" in page


def test_a_geometry_other_than_the_runs_is_not_used(serial_run, tmp_path):
    """config.toml may name any file: the picture uses it only when its checksum is the one
    manifest.json recorded."""
    src, _ = serial_run
    run = tmp_path / "run"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("report.html", "run.lock"))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["geometry_sha256"] = "0" * 64
    (run / "manifest.json").write_text(json.dumps(manifest))
    data = build_report(str(run))
    assert isinstance(data.picture, Unavailable)
    assert "is not the one the run used" in data.picture.reason
