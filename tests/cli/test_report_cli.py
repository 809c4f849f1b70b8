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
    other = out.read_text()
    assert other.count("<section") == 6 and "Spots and detector" in other
    # a local run is not priced at cloud prices unless asked for
    assert "cloud prices" not in other
    assert main(["report", str(run), "--out", str(out), "--no-picture", "--cost"]) == 0
    assert "The same run at cloud prices" in out.read_text()


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
    assert "The same run at cloud prices" in page  # a run on object storage is priced
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


def test_merge_writes_the_report_with_the_merged_data(tmp_path, capsys):
    import gemmi
    import numpy as np

    from sfxflow.algorithms.layouts import simple
    from sfxflow.algorithms.simulate_physical import PhysicalParams, TrueIntensities
    from sfxflow.io.observations import write_simulated_observations

    uc, sg = gemmi.UnitCell(40, 40, 60, 90, 90, 90), gemmi.SpaceGroup("P 41 21 2")
    hkl = np.asarray(gemmi.make_miller_array(uc, sg, 3.0, 0, True))
    truth = TrueIntensities.from_arrays(uc, sg, hkl,
                                        np.random.default_rng(0).exponential(1000.0, len(hkl)))
    run = tmp_path / "run"
    write_simulated_observations(str(run), truth, simple(80.0, 0.1, 3000),
                                 PhysicalParams(d_min_a=3.0, scale_photons=0.2), 20, 1)
    assert main(["merge", str(run), "--out", str(run / "merge"), "--scheduler", "synchronous",
                 "--iterations", "1"]) == 0
    err = capsys.readouterr().err
    assert f"report: {run}/merge/report.html" in err and f"report: {run}/report.html" in err
    for page in (run / "merge" / "report.html", run / "report.html"):
        text = page.read_text()
        assert "Wilson plot" in text and "CC1/2 and CC*" in text
        assert "20 crystals" in text  # the crystals section, from the run's crystals shards


def test_report_of_a_file_is_a_one_line_user_error(tmp_path, capsys):
    f = tmp_path / "frames.parquet"
    f.write_bytes(b"x")
    assert main(["report", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not a directory" in err and "Traceback" not in err


def test_report_out_where_no_file_can_be_is_a_user_error(tmp_path, capsys):
    run = tmp_path / "run"
    write_simulated_run(run, n_frames=100, frames_per_block=50, seed=2)
    assert main(["report", str(run), "--no-picture", "--out", "/dev/null/x.html"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "/dev/null" in err and "Traceback" not in err


@pytest.mark.s3
def test_report_on_s3_without_credentials_is_one_line(tmp_path, s3_server, s3_bucket,
                                                      s3_storage_options, monkeypatch, capsys):
    import s3fs

    write_simulated_run(tmp_path / "run", n_frames=100, frames_per_block=50, seed=2)
    s3fs.S3FileSystem(**s3_storage_options).put(str(tmp_path / "run") + "/",
                                                f"{s3_bucket}/runs/nocreds/", recursive=True)
    s3fs.S3FileSystem.clear_instance_cache()  # a fresh client: no credentials cached
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert main(["report", f"s3://{s3_bucket}/runs/nocreds", "--endpoint-url", s3_server]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "credentials" in err and "Traceback" not in err
