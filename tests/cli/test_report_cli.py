"""``sfxflow report``: local and s3:// run directories, user errors, ``bench report``."""

from __future__ import annotations

import re

import pytest

from sfxflow.benchmarks.report import write_simulated_run
from sfxflow.cli import main


def test_report_of_a_local_run(tmp_path, capsys):
    run = tmp_path / "run"
    write_simulated_run(run, n_frames=200, frames_per_block=50, seed=2)
    assert main(["report", str(run), "--no-picture"]) == 0
    page = (run / "report.html").read_text()
    assert capsys.readouterr().out.strip() == f"wrote {run}/report.html"
    assert page.startswith("<!DOCTYPE html>") and "200</div><div class=\"k\">frames" in page
    # nothing on the page points anywhere: no http(s), protocol-relative or file links; url()
    # only to the SVGs' own clip paths (#id)
    assert not re.search(r"(https?:|file:|src=\"//|href=\"//|@import|url\((?!#))", page)
    out = tmp_path / "elsewhere" / "r.html"
    assert main(["report", str(run), "--out", str(out), "--no-picture"]) == 0
    assert out.read_text().count("<section") == 5


def test_not_a_run_directory_is_a_one_line_user_error(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert main(["report", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not an sfxflow run directory" in err and str(tmp_path) in err


@pytest.mark.s3
def test_report_of_a_run_on_s3(tmp_path, s3_server, s3_bucket, s3_storage_options, capsys):
    import s3fs

    local = tmp_path / "run"
    write_simulated_run(local, n_frames=200, frames_per_block=50, done_blocks=3, seed=5)
    fs = s3fs.S3FileSystem(**s3_storage_options)
    fs.put(str(local) + "/", f"{s3_bucket}/runs/r1/", recursive=True)
    url = f"s3://{s3_bucket}/runs/r1"
    assert main(["report", url, "--endpoint-url", s3_server, "--out",
                 str(tmp_path / "r1.html")]) == 0
    page = (tmp_path / "r1.html").read_text()
    assert "running: 3 of 4 blocks done" in page and "150</div>" in page
    assert main(["report", url, "--endpoint-url", s3_server, "--no-picture"]) == 0
    assert fs.cat_file(f"{s3_bucket}/runs/r1/report.html").decode().startswith("<!DOCTYPE")
    assert f"wrote {url}/report.html" in capsys.readouterr().out


def test_bench_report_prints_its_timings(capsys):
    assert main(["bench", "report", "--frames", "300", "--frames-per-block", "50",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "300 frames in 6 blocks" in out
    assert re.search(r"finished run .*\n\s+gather\s+[\d.]+ s \+ render\s+[\d.]+ s", out)
    assert "run going (3 of 6 blocks' shards)" in out
