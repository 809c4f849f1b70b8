"""``sfxflow process`` through the CLI entry point (in-process ``main(argv)``)."""

from __future__ import annotations

import json
import logging
import re

import pytest

from sfxflow.cli import main


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    from sfxflow.algorithms import layouts
    from sfxflow.algorithms.simulate import SimulationParams
    from sfxflow.io.simulated import write_simulated_dataset

    out = tmp_path_factory.mktemp("cli_sim")
    return write_simulated_dataset(out, layouts.simple(distance_mm=100.0, n_px=1024), None,
                                   SimulationParams(hit_fraction=0.5), n_frames=4, n_files=1,
                                   seed=2)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # fsspec's __del__
def test_unusable_url_scheme_is_a_user_error_without_password(capsys):
    # fsspec raised TypeError (traceback, exit 1) and the message would carry user:password
    code = main(["process", "x.cxi", "--out", "ftp://me:hunter2@/run"])
    err = capsys.readouterr().err
    assert code == 2
    assert "hunter2" not in err
    assert "Traceback" not in err


def test_bad_walltime_is_a_user_error(capsys):
    # "--walltime abc" used to go into the job script; every job would be rejected
    assert main(["process", "--cluster", "slurm", "--walltime", "abc", "--dry-run"]) == 2
    assert "--walltime 'abc': expected HH:MM:SS" in capsys.readouterr().err
    for ok in ("02:00:00", "1-00:00:00", "90", "30:00"):
        assert main(["process", "--cluster", "slurm", "--walltime", ok, "--dry-run"]) == 0


def test_run_directory_that_is_a_file_is_a_user_error(tmp_path, capsys):
    # --out naming an existing file ended in a NotADirectoryError traceback (exit 1)
    target = tmp_path / "notes.txt"
    target.write_text("x\n")
    assert main(["process", "x.cxi", "--out", str(target), "--scheduler", "synchronous"]) == 2
    err = capsys.readouterr().err
    assert f"{target}: cannot create the run directory" in err
    assert "Traceback" not in err



def test_slurm_dry_run_prints_job_script(capsys):
    rc = main(["process", "--cluster", "slurm", "--queue", "debug", "--walltime", "00:30:00",
               "--cores", "4", "--memory", "16GB", "--jobs", "2",
               "--container-image", "/images/sfxflow.sif", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("#!/usr/bin/env bash")
    directives = [line for line in out.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH -p debug" in directives
    assert "#SBATCH -t 00:30:00" in directives
    assert "#SBATCH --cpus-per-task=4" in directives
    worker = next(line for line in out.splitlines() if "distributed.cli.dask_worker" in line)
    assert worker.startswith("apptainer exec /images/sfxflow.sif python -m distributed.cli.dask_worker tcp://")
    assert "--nthreads 1" in worker and "--nworkers 4" in worker


def test_sge_dry_run_prints_job_script(capsys):
    rc = main(["process", "--cluster", "sge", "--queue", "all.q", "--walltime", "01:00:00",
               "--cores", "2", "--memory", "8GB", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.splitlines()
    assert "#$ -q all.q" in lines and "#$ -l h_rt=01:00:00" in lines
    assert any(re.match(r"#\$ -l mem_free=8GB", line) for line in lines)
    worker = next(line for line in lines if "distributed.cli.dask_worker" in line)
    assert re.search(r"python\S* -m distributed\.cli\.dask_worker tcp://\S+ ", worker)
    assert "--nthreads 1" in worker


def test_dry_run_needs_a_batch_cluster(capsys):
    assert main(["process", "--dry-run"]) == 2
    assert "--dry-run needs --cluster" in capsys.readouterr().err


def test_unknown_setting_is_a_one_line_user_error(capsys, small_set, tmp_path):
    rc = main(["process", str(small_set.files[0]), "--out", str(tmp_path / "r"),
               "--set", "spots.sigma_strnog=4"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert "spots.sigma_strnog" in err and "sigma_strong" in err  # names the key and the accepted ones


def test_bad_cell_is_a_user_error(capsys, small_set, tmp_path):
    rc = main(["process", str(small_set.files[0]), "--out", str(tmp_path / "r"),
               "--cell", "93 93 abc", "--space-group", "P6122"])
    assert rc == 2 and "--cell" in capsys.readouterr().err


def test_config_file_with_unknown_key(tmp_path, small_set, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("io:\n  frames_per_blok: 3\n")
    rc = main(["process", str(small_set.files[0]), "--out", str(tmp_path / "r"), "--config",
               str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2 and "io.frames_per_blok" in err and str(cfg) in err


def test_process_synchronous_end_to_end(small_set, tmp_path, capsys):
    cfg = tmp_path / "p.toml"
    cfg.write_text("[io]\nframes_per_block = 3\n\n[spots]\nsigma_strong = 3.0\n")
    out = tmp_path / "run"
    argv = ["process", str(small_set.files[0]), "--geometry", str(small_set.geometry_path),
            "--cell", "93 93 130.5 90 90 120", "--space-group", "P6122", "--out", str(out),
            "--config", str(cfg), "--scheduler", "synchronous", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["frames"] == 4 and summary["blocks"] == 2
    assert summary["indexed"] == small_set.n_hits
    text = (out / "config.toml").read_text()
    assert "frames_per_block = 3" in text
    assert main(argv) == 0  # resume: nothing left to do
    again = json.loads(capsys.readouterr().out)
    assert again["blocks_skipped"] == 2
    # the rerun did nothing: the throughput figures stay those of the run that did the work
    assert again["frames_processed"] == summary["frames_processed"] == 4
    assert again["core_seconds_per_frame"] == summary["core_seconds_per_frame"]
    assert again["frames"] == 4


def test_the_geometry_beside_the_cxi_files_is_used(small_set, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="sfxflow.io.nearby")
    out = tmp_path / "run"
    assert main(["process", str(small_set.files[0]), "--out", str(out), "--frames-per-block", "4",
                 "--scheduler", "synchronous", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["frames"] == 4
    geometry = str(small_set.geometry_path)
    assert f"using {geometry}, the .geom beside" in caplog.text
    assert f'geometry = "{geometry}"' in (out / "config.toml").read_text()


def test_run_where_every_input_fails_is_refused(small_set, tmp_path, capsys):
    junk = tmp_path / "notes.txt"
    junk.write_text("not an image\n")

    def argv(*inputs, out):
        return ["process", *map(str, inputs), "--geometry", str(small_set.geometry_path),
                "--cell", "93 93 130.5 90 90 120", "--space-group", "P6122",
                "--out", str(out), "--scheduler", "synchronous", "--json"]

    # nothing opens: refused before a cluster or run directory exists (issue 22)
    assert main(argv(junk, out=tmp_path / "run")) == 2
    assert f"no input opens: {junk}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # one good file beside the junk: a success with one failed record among the results
    assert main(argv(small_set.files[0], junk, out=tmp_path / "run2")) == 0
    assert json.loads(capsys.readouterr().out)["failed"] == 1
