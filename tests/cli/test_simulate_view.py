from __future__ import annotations

import matplotlib.image as mpimg
import pyarrow.parquet as pq
import pytest

from sfxflow.cli import main


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "sim"
    rc = main(["-q", "simulate", str(out), "--frames", "3", "--files", "2", "--detector",
               "cspad", "--seed", "2", "--hit-fraction", "1", "--distance-mm", "120",
               "--compression", "bitshuffle-lz4"])
    assert rc == 0
    return out


def test_simulate_writes_a_data_set(simulated, capsys):
    assert sorted(p.name for p in simulated.iterdir()) == [
        "geometry.geom", "run_0000.cxi", "run_0001.cxi", "simulation.json",
        "truth_frames.parquet", "truth_reflections.parquet"]
    frames = pq.read_table(simulated / "truth_frames.parquet").to_pylist()
    assert len(frames) == 3 and all(r["is_hit"] for r in frames)
    assert "clen = 0.12 m" in (simulated / "geometry.geom").read_text()


def test_simulate_with_options(tmp_path, capsys):
    rc = main(["-q", "simulate", str(tmp_path), "--frames", "2", "--detector", "simple",
               "--cell", "79 79 38 90 90 90", "--space-group", "P43212", "--wavelength-a", "1.0",
               "--hit-fraction", "1", "--d-min-a", "2.5"])
    assert rc == 0
    assert "wrote 2 frames (2 hits" in capsys.readouterr().out
    frames = pq.read_table(tmp_path / "truth_frames.parquet").to_pylist()
    assert frames[0]["cell"] == "79 79 38 90 90 90"
    assert frames[0]["space_group"] == "P 43 21 2"
    assert abs(frames[0]["wavelength_a"] - 1.0) < 0.01
    refl = pq.read_table(tmp_path / "truth_reflections.parquet")
    assert min(refl.column("d_a").to_pylist()) >= 2.5


def test_simulate_on_a_geometry_file(simulated, tmp_path):
    # our own geometry reads photon energy per frame: the simulated beam's energy is used
    rc = main(["-q", "simulate", str(tmp_path), "--frames", "1", "--geometry",
               str(simulated / "geometry.geom"), "--seed", "1"])
    assert rc == 0
    assert (tmp_path / "run_0000.cxi").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--frames", "3", "--files", "5"], "--files 5"),
        (["--frames", "0"], "--frames '0': expected an integer from 1 to 10000000"),
        (["--detector", "pilatus"], "unknown detector layout 'pilatus'"),
        (["--cell", "1 2 3"], "--cell '1 2 3': expected six numbers a b c alpha beta gamma"),
        (["--cell", "10 10 10 90 90 200"], "--cell '10 10 10 90 90 200': expected six numbers"),
        (["--space-group", "Q99"], "--space-group 'Q99': expected a space group symbol"),
        (["--space-group", "0"], "--space-group '0': expected a space group symbol"),
        (["--hit-fraction", "1.5"], "--hit-fraction '1.5': expected a number from 0 to 1"),
        (["--distance-mm", "-3"], "--distance-mm '-3': expected a number > 0"),
        (["--wavelength-a", "0"], "--wavelength-a '0': expected a number from 0.1 to 10"),
        (["--seed", "-1"], "--seed '-1': expected an integer >= 0"),
        (["--frames", "99999999999999999999"], "--frames '99999999999999999999': expected an "
                                               "integer from 1 to 10000000"),
        (["--geometry", "/nonexistent/x.geom"], "x.geom"),
    ],
)
def test_simulate_user_errors_exit_2_with_one_line(tmp_path, capsys, args, message):
    frames = [] if "--frames" in args else ["--frames", "1"]
    rc = main(["simulate", str(tmp_path / "o"), *frames, *args])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err


def test_view_draws_a_frame_with_truth(simulated, tmp_path, capsys):
    out = tmp_path / "v.png"
    rc = main(["-q", "view", str(simulated / "run_0001.cxi"), "--geometry",
               str(simulated / "geometry.geom"), "--frame", "0", "--out", str(out),
               "--truth", str(simulated / "truth_reflections.parquet"), "--min-snr", "5"])
    assert rc == 0
    printed = capsys.readouterr().out
    n_truth = int(printed.split("truth SNR>=5: ")[1].split(")")[0])
    assert n_truth > 10
    img = mpimg.imread(out)
    assert img.shape[0] > 1000 and img.shape[1] > 1000
    # without --geometry: the one .geom beside the file is used (the frame is read, then refused)
    rc = main(["view", str(simulated / "run_0001.cxi"), "--frame", "7", "--out", str(out)])
    assert rc == 2
    assert "out of range" in capsys.readouterr().err


def test_view_real_cbf(shared_data, tmp_path):
    cbf = sorted((shared_data / "lcls-cspad-thermolysin").glob("*.cbf"))[0]
    out = tmp_path / "cbf.png"
    assert main(["-q", "view", str(cbf), "--out", str(out)]) == 0
    assert mpimg.imread(out).shape[0] > 1000


def test_bench_simulate_prints_rates(capsys):
    assert main(["bench", "simulate", "--detector", "simple", "--frames", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "frames/s" in out and "first call" in out
