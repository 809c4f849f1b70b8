"""Checks before a run starts (issue 22, item 1): each user error is one line and exit status 2,
before any cluster, run directory or report exists; list inputs with ``//N`` events."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sfxflow.cli import main

from .conftest import CELL, SPACE_GROUP


def _refused(argv: list[str], out: Path, capsys) -> str:
    code = main(["process", *argv, "--out", str(out), "--scheduler", "synchronous",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not out.exists(), "a run directory was created before the checks"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("sfxflow process: error: "), err
    assert "bytes_per_frame" not in err and "Traceback" not in err
    return lines[0]


def _target() -> list[str]:
    return ["--cell", CELL, "--space-group", SPACE_GROUP]


def test_missing_input_is_refused_before_anything(sim_set, tmp_path, capsys):
    line = _refused([str(sim_set.files[0]), str(tmp_path / "nope.cxi"), "--geometry",
                     str(sim_set.geometry_path), *_target()], tmp_path / "run", capsys)
    assert f"{tmp_path / 'nope.cxi'}: no such file" in line and "expected an image file" in line


def test_glob_matching_nothing_is_refused(sim_set, tmp_path, capsys):
    line = _refused([str(tmp_path / "run_*.cxi"), "--geometry", str(sim_set.geometry_path),
                     *_target()], tmp_path / "run", capsys)
    assert "matched no image files" in line


def test_cxi_without_geometry_is_refused(sim_set, tmp_path, capsys):
    # copies in a folder without a .geom beside them (the one beside would be found)
    copy = tmp_path / "in" / "a.cxi"
    copy.parent.mkdir()
    copy.write_bytes(sim_set.files[0].read_bytes())
    line = _refused([str(copy), *_target()], tmp_path / "run", capsys)
    assert "needs a CrystFEL geometry" in line and "--geometry" in line


def test_geometry_that_does_not_fit_the_frames_is_refused(sim_set, tmp_path, capsys):
    text = sim_set.geometry_path.read_text()
    assert re.search(r"max_fs\s*=\s*1023", text)
    wide = tmp_path / "wide.geom"
    wide.write_text(re.sub(r"max_fs\s*=\s*1023", "max_fs = 2047", text))
    line = _refused([str(sim_set.files[0]), "--geometry", str(wide), *_target()],
                    tmp_path / "run", capsys)
    assert "falls outside the frame shape" in line and str(wide) in line


def test_missing_geometry_file_is_refused(sim_set, tmp_path, capsys):
    line = _refused([str(sim_set.files[0]), "--geometry", str(tmp_path / "g.geom"), *_target()],
                    tmp_path / "run", capsys)
    assert str(tmp_path / "g.geom") in line


def test_cell_that_does_not_fit_the_space_group_is_refused(sim_set, tmp_path, capsys):
    line = _refused([str(sim_set.files[0]), "--geometry", str(sim_set.geometry_path),
                     "--cell", "93 93 130.5 90 90 90", "--space-group", "P6122"],
                    tmp_path / "run", capsys)
    assert "does not have the symmetry of space group P 61 2 2" in line


def test_only_unreadable_inputs_are_refused(sim_set, tmp_path, capsys):
    junk = tmp_path / "notes.cxi"
    junk.write_text("not an image\n")
    line = _refused([str(junk), "--geometry", str(sim_set.geometry_path), *_target()],
                    tmp_path / "run", capsys)
    assert line.startswith(f"sfxflow process: error: no input opens: {junk}")


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # aiohttp's __del__
def test_s3_input_without_credentials_is_one_line(sim_set, tmp_path, capsys, no_credentials):
    line = _refused(["s3://bucket/run7/", "--endpoint-url", "http://127.0.0.1:9",
                     "--geometry", str(sim_set.geometry_path), *_target()],
                    tmp_path / "run", capsys)
    assert line == ("sfxflow process: error: s3://bucket/run7/: no S3 credentials found (set "
                    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or use anonymous "
                    "access)")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_s3_run_directory_without_credentials_is_one_line(sim_set, capsys, no_credentials):
    code = main(["process", str(sim_set.files[0]), "--geometry", str(sim_set.geometry_path),
                 *_target(), "--endpoint-url", "http://127.0.0.1:9", "--out", "s3://bucket/out",
                 "--scheduler", "synchronous"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert err.startswith("sfxflow process: error: s3://bucket/out: no S3 credentials found")


def test_a_list_with_events_processes_only_those_frames(sim_set, tmp_path, capsys):
    first = sim_set.files[0]
    listing = tmp_path / "files.lst"
    listing.write_text(f"# two events of the first file\n{first} //1\n\n{first} //3\n")
    out = tmp_path / "run"
    # -i LIST: indexamajig's habit
    code = main(["-q", "process", "-i", str(listing), "--geometry", str(sim_set.geometry_path),
                 *_target(), "--out", str(out), "--scheduler", "synchronous", "--no-progress",
                 "--no-write-stream"])
    assert code == 0, capsys.readouterr().err
    frames = pq.read_table(out / "frames.parquet").to_pylist()
    assert [(Path(r["source_url"]).name, r["frame_index"]) for r in frames] == [
        (first.name, 1), (first.name, 3)]


def test_a_list_mixed_with_paths_and_an_at_list(sim_set, tmp_path):
    from sfxflow.io.sources import discover

    listing = tmp_path / "names.txt"
    listing.write_text(f"{sim_set.files[1]}\n")
    files = discover([str(sim_set.files[0]), f"@{listing}"], geometry=None)
    assert [Path(f.url).name for f in files] == [p.name for p in sim_set.files[:2]]
    assert all(f.frames is None for f in files)


def test_event_out_of_range_and_bad_event_are_refused(sim_set, tmp_path, capsys):
    listing = tmp_path / "files.lst"
    listing.write_text(f"{sim_set.files[0]} //99\n")
    line = _refused([str(listing), "--geometry", str(sim_set.geometry_path), *_target()],
                    tmp_path / "run", capsys)
    assert "event //99 out of range; expected an integer from 0 to 5" in line
    listing.write_text(f"{sim_set.files[0]} //x\n")
    line = _refused([str(listing), "--geometry", str(sim_set.geometry_path), *_target()],
                    tmp_path / "run", capsys)
    assert f"{listing} line 1: event '//x'; expected //N with N an integer >= 0" in line


def test_one_unreadable_file_among_good_ones_warns_once_and_runs(sim_set, tmp_path, capsys):
    junk = tmp_path / "notes.cxi"
    junk.write_text("not an image\n")
    from sfxflow.pipeline.config import load_config
    from sfxflow.pipeline.preflight import preflight

    cfg = load_config(overrides=[f"io.geometry={sim_set.geometry_path}",
                                 "target.cell=[93, 93, 130.5, 90, 90, 120]",
                                 "target.space_group=P6122"])
    found = preflight([str(sim_set.files[0]), str(junk)], str(tmp_path / "run"), cfg)
    assert [f.ok for f in found.files] == [True, False]
    assert not (tmp_path / "run").exists()


def test_preflight_gain_note_on_the_real_cspad_cbfs(shared_data, tmp_path):
    from sfxflow.pipeline.config import load_config
    from sfxflow.pipeline.preflight import preflight

    cbfs = sorted(str(p) for p in (shared_data / "lcls-cspad-thermolysin").glob("*.cbf"))
    if not cbfs:
        pytest.skip("no CSPAD CBFs in ../shared/data/lcls-cspad-thermolysin")
    target = ["target.cell=[93, 93, 130.5, 90, 90, 120]", "target.space_group=P6122"]
    note = preflight(cbfs, str(tmp_path / "r"), load_config(overrides=target)).gain_note
    assert "--gain-adu-per-photon 9" in note and "--preset cspad-cbf" in note
    with_preset = load_config(overrides=target, presets=["cspad-cbf"])
    assert preflight(cbfs, str(tmp_path / "r"), with_preset).gain_note == ""


def test_relative_names_in_a_list_are_taken_from_the_current_folder(sim_set, tmp_path,
                                                                     monkeypatch):
    # as indexamajig -i does (not from the list's folder)
    from sfxflow.io.geometry import read_geom
    from sfxflow.io.sources import discover

    geometry = read_geom(str(sim_set.geometry_path))
    elsewhere = tmp_path / "lists"
    elsewhere.mkdir()
    listing = elsewhere / "files.lst"
    listing.write_text(f"{sim_set.files[0].name} //2\n")
    monkeypatch.chdir(sim_set.files[0].parent)
    files = discover([str(listing)], geometry=geometry)
    assert files[0].url == sim_set.files[0].name and files[0].frames == (2,)
    monkeypatch.chdir(elsewhere)
    assert discover([str(listing)], geometry=geometry)[0].problem == "missing"
