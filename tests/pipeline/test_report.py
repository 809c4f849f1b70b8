"""The run report's data (sfxflow.pipeline.report) against the records it summarises, the refresh
during ``run_process``, and the page in a real headless Chromium."""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from sfxflow.benchmarks.report import write_simulated_run
from sfxflow.errors import InputError
from sfxflow.pipeline.report import Unavailable, build_report
from sfxflow.report.html import render_report_html
from sfxflow.report.page import LiveReport, write_report

from .conftest import base_overrides


def _status(table) -> np.ndarray:
    return table.column("status").to_numpy(zero_copy_only=False)


def test_finished_run_figures_match_the_records(tmp_path):
    made = write_simulated_run(tmp_path / "run", n_frames=600, frames_per_block=50, seed=3)
    data = build_report(str(tmp_path / "run"), with_picture=False, cost=True)
    assert data.state == "complete" and not data.running
    frames, crystals = made["frames"], made["crystals"]
    status = _status(frames)
    o = data.overview
    assert not isinstance(o, Unavailable)
    n_failed = int((status == "failed").sum())
    hits = int(np.isin(status, ["hit", "indexed"]).sum())
    assert dict(o.counts) == {"frames": 600, "hits": hits, "indexed": int((status == "indexed").sum()),
                              "misses": int((status == "miss").sum()), "failed": n_failed}
    assert o.hit_rate == pytest.approx(hits / (600 - n_failed))
    expected = Counter(zip(frames.column("stage").to_pylist(), frames.column("reason").to_pylist(),
                           strict=True))
    got = {(s, r): n for s, r, n in o.failures}
    assert got == {k: v for k, v in expected.items() if k != ("", "")}
    assert (o.blocks_total, o.blocks_done, o.blocks_failed) == (12, 12, 0)
    assert o.n_crystals == crystals.num_rows

    # one node of a catalogue type runs every frame back to back: node time = the work
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    row = next(r for r in o.cost if r.instance == "c3.8xlarge" and r.n_nodes == 1)
    work_s = 600 * summary["core_seconds_per_frame"] / 32  # c3.8xlarge: 32 reference vCPUs
    assert row.wall_s == pytest.approx(work_s, rel=1e-9)
    assert row.cost_usd == pytest.approx(work_s / 3600 * 0.387, rel=1e-9)
    assert {r.n_nodes for r in o.cost} == {1, 12}  # 16 nodes for 12 blocks would idle
    many = next(r for r in o.cost if r.instance == "c3.8xlarge" and r.n_nodes == 12)
    assert many.wall_s == pytest.approx(work_s / 12, rel=1e-9)  # equal blocks, no spread

    a = data.along
    assert not isinstance(a, Unavailable)
    assert a.frame_end.tolist() == list(range(50, 601, 50))
    block0 = status[:50]
    judged0 = block0 != "failed"
    assert a.hit_rate[0] == pytest.approx(np.isin(block0, ["hit", "indexed"]).sum() / judged0.sum())
    assert sum(v.size for v in a.n_spots.values()) == 600 - n_failed

    c = data.crystals
    assert not isinstance(c, Unavailable)
    np.testing.assert_allclose(np.sort(c.cells["c"]), np.sort(crystals.column("c").to_numpy()))
    n_cr = frames.column("n_crystals").to_numpy()
    assert Counter(c.crystals_per_frame.tolist()) == Counter(n_cr[status == "indexed"].tolist())
    assert not isinstance(c.resolution_limit_a, Unavailable)
    assert c.target_cell == (93.0, 93.0, 130.5, 90.0, 90.0, 120.0)
    assert data.merged.stats == made["stats"]
    assert isinstance(data.picture, Unavailable)


def test_run_still_going_reads_its_shards_and_says_what_is_missing(tmp_path):
    run = tmp_path / "run"
    made = write_simulated_run(run, n_frames=600, frames_per_block=50, done_blocks=5,
                               with_crystals=False, with_merge=False, seed=4)
    # a shard left by an earlier plan of this run directory (redone with --force)
    (run / "shards" / "old-block.frames.parquet").write_bytes(
        (run / "shards" / f"{made['blocks'][0]}.frames.parquet").read_bytes())
    data = build_report(str(run), with_picture=False)
    assert data.running and data.state == "running: 5 of 12 blocks done"
    assert data.overview.counts["frames"] == 250
    assert data.along.frame_end[-1] == 250
    indexed = int((_status(made["frames"])[:250] == "indexed").sum())
    assert len(data.crystals.cells["a"]) == indexed  # first crystal of each indexed frame
    assert "before integration" in data.crystals.resolution_limit_a.reason
    assert "no n_crystals column" in data.crystals.crystals_per_frame.reason
    page = render_report_html(data)
    assert "not available: no merged data in this run" in page
    assert '<meta http-equiv="refresh"' in page

    # the process stopped (max_blocks): its summary is newer than the manifest
    (run / "summary.json").write_text(json.dumps({"complete": False}))
    later = time.time() + 5
    os.utime(run / "summary.json", (later, later))
    stopped = build_report(str(run), with_picture=False)
    assert not stopped.running and stopped.state.startswith("stopped: 5 of 12 blocks done")
    assert '<meta http-equiv="refresh"' not in render_report_html(stopped)


def test_no_blocks_done_yet(tmp_path):
    write_simulated_run(tmp_path / "run", n_frames=100, frames_per_block=50, done_blocks=0,
                        with_merge=False)
    data = build_report(str(tmp_path / "run"))
    assert isinstance(data.overview, Unavailable) and isinstance(data.along, Unavailable)
    assert "not available: no indexed frame yet" in render_report_html(data)


def test_not_a_run_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not an sfxflow run directory"):
        build_report(str(tmp_path / "empty"))


def test_process_writes_the_report_and_refreshes_it_while_running(sim_set, tmp_path):
    from sfxflow.pipeline.config import load_config
    from sfxflow.pipeline.run import run_process

    out = tmp_path / "run"
    cfg = load_config(overrides=[*base_overrides(sim_set.geometry_path), "cluster.kind=synchronous",
                                 "run.report=true", "run.report_interval_s=0"])
    during: list[str] = []

    def on_block(_report) -> None:
        # the first refresh is drawn in a background thread: wait for its page
        page = out / "report.html"
        deadline = time.monotonic() + 120
        while not during and time.monotonic() < deadline:
            if page.exists():
                during.append(page.read_text())
            else:
                time.sleep(0.1)

    run_process([str(sim_set.files[0])], str(out), cfg, on_block=on_block, reporter=LiveReport)
    assert "running: " in during[0] and '<meta http-equiv="refresh"' in during[0]
    final = (out / "report.html").read_text()
    assert ">complete<" in final and 'http-equiv="refresh"' not in final
    frames = pq.read_table(out / "frames.parquet")
    n_indexed = int(pc.sum(pc.equal(frames.column("status"), "indexed")).as_py())
    assert n_indexed > 0 and f'<div class="v">{n_indexed:,}</div><div class="k">indexed' in final
    assert "data:image/png;base64," in final  # the strongest frame, read from its CXI file
    predicted = re.search(r"squares: predicted reflections \((\d+)\)", final)
    assert predicted and int(predicted.group(1)) > 0  # from the block's reflections shard
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]


@pytest.fixture(scope="session")
def chromium() -> str:
    from sfxflow.report.headless import find_chromium

    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium on this machine (scripts/install-chromium.sh installs "
                    "Debian's chromium)")
    return path


@pytest.fixture(scope="module")
def full_page(chromium, serial_run, tmp_path_factory) -> Path:
    """The report of a real (simulated-image) run, with merged statistics beside it."""
    from sfxflow.benchmarks.report import _merge_stats

    run_dir, _ = serial_run
    where = tmp_path_factory.mktemp("report")
    (where / "merge").mkdir()
    stats = _merge_stats(np.random.default_rng(0), 10)
    (where / "merge" / "stats.json").write_text(json.dumps(stats))
    return Path(write_report(str(run_dir), str(where / "report.html"),
                             merge_url=str(where / "merge")))


def test_page_in_headless_chromium_has_no_errors_and_fetches_nothing(full_page):
    from sfxflow.report.headless import render_page

    seen = render_page(full_page, evaluate=(
        "JSON.stringify({svg: document.querySelectorAll('figure.plot svg').length,"
        " images: Array.from(document.images).map(i => i.complete && i.naturalWidth),"
        " sections: document.querySelectorAll('section').length,"
        " missing: Array.from(document.querySelectorAll('.na')).map(e => e.textContent)})"))
    assert seen.console_errors == []
    assert seen.external_requests == []
    assert seen.requests[0] == full_page.resolve().as_uri()
    page = json.loads(seen.evaluated)
    assert page["sections"] == 6
    # throughput, along the run, spots per frame; radial histogram + peakogram, offsets per
    # panel; cells, cell scatter, resolution, crystals per frame; merged
    assert page["svg"] == 10
    assert len(page["images"]) == 1 and page["images"][0] > 100  # the frame picture decoded
    assert page["missing"] == []  # every section has its data


def test_merge_page_and_a_large_run_in_headless_chromium(chromium, tmp_path):
    """The merge's own page, and the run page of 20,000 frames: small, clean, every plot drawn."""
    from sfxflow.report.headless import render_page
    from sfxflow.report.page import write_merge_report

    run = tmp_path / "run"
    write_simulated_run(run, n_frames=20_000, frames_per_block=100, seed=9)
    merge_page, run_page = (Path(p) for p in write_merge_report(str(run / "merge"), [str(run)]))
    probe = ("JSON.stringify({svg: document.querySelectorAll('figure.plot svg').length,"
             " sections: Array.from(document.querySelectorAll('section')).map(s => s.id),"
             " missing: Array.from(document.querySelectorAll('.na')).map(e => e.textContent)})")
    for page, sections, n_svg in ((merge_page, ["merged", "scaling"], 2),
                                  (run_page, ["overview", "along", "spots", "crystals",
                                              "merged", "frame"], 10)):
        seen = render_page(page, evaluate=probe)
        assert seen.console_errors == [] and seen.external_requests == []
        got = json.loads(seen.evaluated)
        assert got["sections"] == sections and got["svg"] == n_svg
        if page == merge_page:
            assert got["missing"] == []
    # 4,000-odd crystals: the cell scatter is a 2-D histogram, the page stays small
    assert run_page.stat().st_size < 900_000


def test_browser_check_catches_errors_and_external_requests(chromium, tmp_path):
    """The check above can fail: a page with a console error and an outside image is caught."""
    from sfxflow.report.headless import render_page

    bad = tmp_path / "bad.html"
    # port 9 (discard) on this machine: refused at once, nothing leaves it
    bad.write_text('<!DOCTYPE html><html><body><img src="http://127.0.0.1:9/x.png">'
                   '<script>console.error("boom")</script></body></html>')
    seen = render_page(bad)
    assert "http://127.0.0.1:9/x.png" in seen.external_requests
    assert any("boom" in m for m in seen.console_errors)


def test_merge_reports_one_run_and_several(tmp_path):
    from sfxflow.report.page import write_merge_report

    run = tmp_path / "run"
    made = write_simulated_run(run, n_frames=200, frames_per_block=50, seed=6)
    stats = made["stats"]
    # what a merge writes for empty shells and a failed Wilson fit: JSON nulls
    stats["shells"][-1].update(cc_half=None, cc_star=None, mean_i_over_sigma=None)
    stats["wilson"]["b_a2"] = None
    (run / "merge" / "stats.json").write_text(json.dumps(stats))
    (run / "merge" / "report.html").unlink(missing_ok=True)
    written = write_merge_report(str(run / "merge"), [str(run)])
    assert written == [f"{run}/merge/report.html", f"{run}/report.html"]
    merge_page, run_page = (Path(p).read_text() for p in written)
    # the merge's own page: merged data, the shell table and the per-crystal scaling, no frames
    assert "CC1/2 and CC*" in merge_page and "Wilson plot" in merge_page
    assert ">merged<" in merge_page and "Per-crystal scaling" in merge_page
    assert "shell d (Å)" in merge_page and 'href="../report.html"' in merge_page
    assert "Run overview" not in merge_page and "Strongest frame" not in merge_page
    # the run's page: its frames and the merged curves, linking to the merge page
    assert ">complete<" in run_page and "Run overview" in run_page and "CC1/2 and CC*" in run_page
    assert "Per-crystal scaling" not in run_page and 'href="merge/report.html"' in run_page

    other = tmp_path / "merged-two"
    other.mkdir()
    (other / "stats.json").write_text(json.dumps(stats))
    (written,) = write_merge_report(str(other), [str(run), "/data/run2"])
    text = Path(written).read_text()
    assert "Wilson plot" in text and "merged from 2 input(s)" in text
    assert "Run overview" not in text


def test_a_run_where_every_frame_failed(tmp_path):
    """Nothing to plot but the failures: every section still renders (warnings are errors)."""
    import pyarrow as pa

    from sfxflow.io.results import parquet_bytes

    made = write_simulated_run(tmp_path / "run", n_frames=100, frames_per_block=50,
                               with_merge=False, with_spots=False, seed=8)
    frames = made["frames"]
    n = frames.num_rows
    failed = frames.set_column(frames.schema.get_field_index("status"), "status",
                               pa.array(["failed"] * n))
    failed = failed.set_column(failed.schema.get_field_index("reason"), "reason",
                               pa.array(["truncated file"] * n))
    (tmp_path / "run" / "frames.parquet").write_bytes(parquet_bytes(failed))
    (tmp_path / "run" / "crystals.parquet").unlink()
    for p in (tmp_path / "run" / "shards").glob("*.crystals.parquet"):
        p.unlink()
    data = build_report(str(tmp_path / "run"))
    assert data.overview.counts["failed"] == n and data.overview.failures[0][2] == n
    assert isinstance(data.crystals, Unavailable) and isinstance(data.picture, Unavailable)
    page = render_report_html(data)
    assert "truncated file" in page and page.count("<svg") == 3
