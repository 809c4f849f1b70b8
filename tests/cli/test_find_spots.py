"""``sfxflow find-spots`` end to end: simulated CXI files with truth, the real CSPAD CBFs, and
user errors (exit 2, one line)."""

from __future__ import annotations

import logging
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from sfxflow.cli import main

SPOT_COLUMNS = ["source_url", "frame_index", "panel", "fs_px", "ss_px", "intensity",
                "background", "snr", "n_pixels", "d_a"]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    out = tmp_path_factory.mktemp("find_spots") / "sim"
    rc = main(["-q", "simulate", str(out), "--frames", "4", "--detector", "cspad", "--seed", "5",
               "--hit-fraction", "0.5"])
    assert rc == 0
    return out


def test_find_spots_on_simulated_cxi(simulated, tmp_path, capsys):
    out = tmp_path / "spots.parquet"
    rc = main(["-q", "find-spots", str(simulated / "run_0000.cxi"), "--geometry",
               str(simulated / "geometry.geom"), "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    lines = [ln for ln in text.splitlines() if " frame " in ln]
    assert len(lines) == 4
    counts = [int(re.search(r"frame \d+:\s+(\d+) spots", ln).group(1)) for ln in lines]
    table = pq.read_table(out)
    assert table.column_names[: len(SPOT_COLUMNS)] == SPOT_COLUMNS
    assert table.num_rows == sum(counts)
    # hit decisions agree with the simulation's truth
    truth = {r["frame_index"]: r["is_hit"]
             for r in pq.read_table(simulated / "truth_frames.parquet").to_pylist()}
    for ln in lines:
        i = int(re.search(r"frame (\d+):", ln).group(1))
        assert (" hit " in ln) == truth[i], ln
    # found spots sit on truth reflections
    refl = pq.read_table(simulated / "truth_reflections.parquet").to_pydict()
    rows = table.to_pydict()
    t_frame = np.asarray(refl["frame_index"])
    t_xy = np.c_[refl["panel"], refl["fs_px"], refl["ss_px"]]
    matched = 0
    for f, p, x, y in zip(rows["frame_index"], rows["panel"], rows["fs_px"], rows["ss_px"],
                          strict=True):
        sel = (t_frame == f) & (t_xy[:, 0] == p)
        if sel.any() and np.min(np.hypot(t_xy[sel, 1] - x, t_xy[sel, 2] - y)) <= 2.0:
            matched += 1
    assert table.num_rows > 20 and matched >= 0.95 * table.num_rows


def test_frame_range_and_options(simulated, tmp_path, capsys):
    out = tmp_path / "spots.parquet"
    rc = main(["-q", "find-spots", str(simulated / "run_0000.cxi"), "--geometry",
               str(simulated / "geometry.geom"), "--frame-range", "1:3", "--out", str(out),
               "--d-min-a", "2.5", "--method", "radial", "--hit-min-spots", "5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "frame 1:" in text and "frame 2:" in text and "frame 0:" not in text
    table = pq.read_table(out)
    assert set(table.column("frame_index").to_pylist()) <= {1, 2}
    assert min(table.column("d_a").to_pylist(), default=3.0) >= 2.5


@pytest.mark.parametrize(("argv", "message"), [
    (["--frame-range", "x:y"], "--frame-range 'x:y'"),
    (["--frame-range", "3:1"], "expected 0 <= A <= B"),
    (["--frames", "3:1"], "expected 0 <= A <= B"),  # the old name still works
    (["--window-px", "8"], "--window-px '8': expected an odd integer from 3 to 63"),
    (["--window", "8"], "--window '8': expected an odd integer"),
    (["--sigma-strong", "-2"], "--sigma-strong '-2': expected a number from 0"),
    (["--set", "spots.sigma_strong=-2"], "--set spots.sigma_strong = -2: expected a number"),
])
def test_user_errors_exit_2(simulated, capsys, argv, message):
    rc = main(["-q", "find-spots", str(simulated / "run_0000.cxi"), "--geometry",
               str(simulated / "geometry.geom"), *argv])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_missing_input_exit_2(tmp_path, capsys):
    rc = main(["-q", "find-spots", str(tmp_path / "nope.cbf")])
    assert rc == 2
    assert "nope.cbf" in capsys.readouterr().err


def test_find_spots_on_real_cbfs(shared_data, tmp_path, capsys):
    cbfs = sorted(str(p) for p in (shared_data / "lcls-cspad-thermolysin").glob("*.cbf"))
    out = tmp_path / "real.parquet"
    rc = main(["-q", "find-spots", *cbfs, "--out", str(out), "--png-dir", str(tmp_path / "png")])
    assert rc == 0
    text = capsys.readouterr().out
    assert text.count(" hit ") == 2
    table = pq.read_table(out)
    assert set(table.column("source_url").to_pylist()) == set(cbfs)
    assert table.num_rows > 100
    assert len(list((tmp_path / "png").glob("*.png"))) == 2


def test_find_spots_cspad_settings_on_real_cbfs(shared_data, tmp_path, capsys):
    cbfs = sorted(str(p) for p in (shared_data / "lcls-cspad-thermolysin").glob("*.cbf"))
    counts = {}
    for label, extra in (("default", []), ("cspad", ["--preset", "cspad-cbf"]),
                         ("explicit", ["--gain-adu-per-photon", "9", "--min-snr", "6"]),
                         ("old-name", ["--cspad"])):
        out = tmp_path / f"{label}.parquet"
        assert main(["-q", "find-spots", *cbfs, "--out", str(out), *extra]) == 0
        assert capsys.readouterr().out.count(" hit ") == 2
        table = pq.read_table(out)
        counts[label] = table.num_rows
        if label != "default":
            assert min(table.column("snr").to_pylist()) >= 6.0
    assert counts["cspad"] == counts["explicit"] == counts["old-name"]
    assert 150 <= counts["cspad"] <= 0.4 * counts["default"]


def test_border_option(simulated, tmp_path, capsys):
    rows = {}
    for border in ("0", "3"):
        out = tmp_path / f"b{border}.parquet"
        assert main(["-q", "find-spots", str(simulated / "run_0000.cxi"), "--geometry",
                     str(simulated / "geometry.geom"), "--border-px", border, "--min-snr", "0",
                     "--out", str(out)]) == 0
        rows[border] = pq.read_table(out).to_pydict()
    capsys.readouterr()
    fs3, ss3 = np.asarray(rows["3"]["fs_px"]), np.asarray(rows["3"]["ss_px"])
    assert len(fs3) > 20 and len(rows["0"]["fs_px"]) >= len(fs3)
    assert fs3.min() >= 3 and ss3.min() >= 3


def test_the_one_geometry_beside_a_cxi_file_is_used_and_several_are_named(simulated, tmp_path,
                                                                          capsys, caplog):
    caplog.set_level(logging.INFO, logger="sfxflow.io.nearby")
    rc = main(["-q", "find-spots", str(simulated / "run_0000.cxi"), "--frame-range", "0:1"])
    assert rc == 0, capsys.readouterr().err
    assert f"using {simulated / 'geometry.geom'}, the .geom beside" in caplog.text
    both = tmp_path / "two"
    both.mkdir()
    (both / "run.cxi").symlink_to(simulated / "run_0000.cxi")
    for name in ("a.geom", "b.geom"):
        (both / name).write_text((simulated / "geometry.geom").read_text())
    capsys.readouterr()
    assert main(["-q", "find-spots", str(both / "run.cxi")]) == 2
    err = capsys.readouterr().err
    assert f"{both / 'a.geom'}, {both / 'b.geom'}; expected --geometry" in err
    assert len(err.strip().splitlines()) == 1


def test_two_frames_print_each_timing_not_a_median_and_a_list_selects_events(simulated,
                                                                              tmp_path, capsys):
    listing = tmp_path / "two.lst"
    listing.write_text(f"# CrystFEL style\n{simulated / 'run_0000.cxi'} //1\n"
                       f"{simulated / 'run_0000.cxi'} //3\n")
    rc = main(["-q", "find-spots", f"@{listing}", "--geometry", str(simulated / "geometry.geom")])
    assert rc == 0
    text = capsys.readouterr().out
    assert [int(m) for m in re.findall(r" frame (\d+):", text)] == [1, 3]
    assert "median" not in text
    assert re.search(r"spot finding [\d.]+ and [\d.]+ ms per frame", text), text
