"""The facilities' own formats, written by the facilities' own libraries, give the same results
as the same frames written as CXI: LCLS-II XTC2 (psana's DgramEdit writes, psana decodes) and a
European XFEL run (extra-data's example-run helpers write, extra-data reads)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from sfxflow.benchmarks.localhost import free_port
from sfxflow.cli import main

HAVE_PSANA = importlib.util.find_spec("psana") is not None
HAVE_EXTRA_DATA = importlib.util.find_spec("extra_data") is not None
N_FRAMES = 4
CELL = "79.1 79.1 38.4 90 90 90"


@pytest.fixture(scope="module")
def jungfrau_set(tmp_path_factory) -> dict:
    """Simulated Jungfrau 4M hits as 14-bit integer ADU (what the Jungfrau's raw data hold),
    one photon energy, the CXI file and a geometry that gives that energy as a number."""
    from sfxflow.algorithms import layouts
    from sfxflow.algorithms.simulate import SimulationParams
    from sfxflow.io.simulated import DATA_PATH, write_simulated_dataset

    out = tmp_path_factory.mktemp("facility")
    params = SimulationParams(hit_fraction=1.0, cell=tuple(float(x) for x in CELL.split()),
                              space_group="P 43 21 2", energy_jitter_rel=0.0)
    energy_ev = params.beam().photon_energy_ev
    info = write_simulated_dataset(out, layouts.jungfrau4m(distance_mm=100.0), None, params,
                                   n_frames=N_FRAMES, n_files=1, seed=5)
    cxi = Path(info.files[0])
    with h5py.File(cxi, "r+") as f:
        ds = f[DATA_PATH]
        ds[...] = np.clip(np.rint(ds[...]), 0, (1 << 14) - 1)
        modules = ds[...].reshape(N_FRAMES, 8, 512, 1024).astype(np.uint16)
    geom = out / "constant-energy.geom"
    text = Path(info.geometry_path).read_text()
    lines = [f"photon_energy = {energy_ev!r} eV" if ln.startswith("photon_energy") else ln
             for ln in text.splitlines()]
    geom.write_text("\n".join(lines) + "\n")
    return {"dir": out, "cxi": cxi, "geom": geom, "modules": modules, "energy_ev": energy_ev}


def _process(inputs: list[str], geom: Path, out: Path) -> list[dict]:
    code = main(["process", *inputs, "--geometry", str(geom), "--cell", CELL,
                 "--space-group", "P 43 21 2", "--out", str(out), "--scheduler", "synchronous",
                 "--no-report", "-q"])
    assert code == 0
    rows = pq.read_table(out / "frames.parquet").to_pylist()
    return sorted(rows, key=lambda r: r["frame_index"])


def _same_results(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) == N_FRAMES
    indexed = 0
    for ra, rb in zip(a, b, strict=True):
        assert ra["status"] == rb["status"]
        assert ra["n_spots"] == rb["n_spots"]
        if ra["status"] == "indexed":
            indexed += 1
            for col in ("a11", "a22", "a33", "a12"):
                assert ra[col] == pytest.approx(rb[col], abs=1e-9)
    assert indexed >= N_FRAMES - 1


@pytest.mark.skipif(not HAVE_PSANA, reason="psana not installed (pip install 'sfxflow[lcls]')")
def test_xtc2_written_by_psana_processes_like_cxi(jungfrau_set, tmp_path):
    from psana import DataSource

    from sfxflow.io.xtc2 import write_xtc2

    run_dir = tmp_path / "xtc"
    run_dir.mkdir()
    xtc = run_dir / "sfxsim01-r0007-s000-c000.xtc2"
    write_xtc2(str(xtc), jungfrau_set["modules"], jungfrau_set["energy_ev"], run=7)

    # psana's own reader sees every event and the same pixels
    ds = DataSource(files=str(xtc), skip_calib_load="all")
    run = next(ds.runs())
    det = run.Detector("jungfrau")
    raws = [det.raw.raw(evt) for evt in run.events()]
    assert len(raws) == N_FRAMES
    assert np.array_equal(raws[2], jungfrau_set["modules"][2])

    cxi = _process([str(jungfrau_set["cxi"])], jungfrau_set["geom"], tmp_path / "cxi-run")
    # the run named as psana names it
    xtc_rows = _process([f"exp=sfxsim01:run=7:dir={run_dir}"], jungfrau_set["geom"],
                        tmp_path / "xtc-run")
    _same_results(cxi, xtc_rows)


@pytest.mark.skipif(not HAVE_EXTRA_DATA,
                    reason="extra-data not installed (pip install 'sfxflow[euxfel]')")
def test_euxfel_run_processes_like_cxi(jungfrau_set, tmp_path):
    from sfxflow.io.euxfel import write_jungfrau_run

    run_dir = tmp_path / "r0012"
    write_jungfrau_run(run_dir, jungfrau_set["modules"], cells_per_train=2)
    cxi = _process([str(jungfrau_set["cxi"])], jungfrau_set["geom"], tmp_path / "cxi-run")
    eux = _process([str(run_dir)], jungfrau_set["geom"], tmp_path / "eux-run")
    _same_results(cxi, eux)


def test_missing_facility_package_is_one_line(monkeypatch, tmp_path, capsys, caplog):
    import sys

    # None in sys.modules makes "import psana" raise ImportError, as where it is not installed
    for name in ("psana", "psana.dgram", "psana.dgramedit"):
        monkeypatch.setitem(sys.modules, name, None)
    xtc = tmp_path / "x-r0001-s000-c000.xtc2"
    xtc.write_bytes(b"\0" * 64)
    geom = tmp_path / "g.geom"
    geom.write_text("photon_energy = 9500 eV\nclen = 0.1\nres = 10000\n"
                    "p0/min_fs = 0\np0/max_fs = 9\np0/min_ss = 0\np0/max_ss = 9\n"
                    "p0/fs = +1x\np0/ss = +1y\np0/corner_x = -5\np0/corner_y = -5\n")
    code = main(["process", str(xtc), "--geometry", str(geom), "--cell", CELL,
                 "--space-group", "P 43 21 2", "--out", str(tmp_path / "run"),
                 "--scheduler", "synchronous", "--no-report", "-q"])
    err = capsys.readouterr().err
    # refused before anything starts, in one line naming the extra to install
    assert code == 2
    assert "pip install 'sfxflow[lcls]'" in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err + caplog.text
    assert not (tmp_path / "run").exists()




def _serve(run_dir: Path, port: int):
    """The real karabo-bridge server of extra-data replaying a run, on the loopback only."""
    import shutil
    import subprocess
    import sys

    exe = shutil.which("karabo-bridge-serve-files") or str(
        Path(sys.executable).with_name("karabo-bridge-serve-files"))
    return subprocess.Popen([exe, str(run_dir), f"tcp://127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.skipif(not HAVE_EXTRA_DATA,
                    reason="extra-data/karabo-bridge not installed (pip install 'sfxflow[euxfel]')")
def test_live_stream_resumes_and_matches_cxi(jungfrau_set, tmp_path):
    from sfxflow.io.euxfel import write_jungfrau_run

    run_dir = tmp_path / "r0012"
    write_jungfrau_run(run_dir, jungfrau_set["modules"], cells_per_train=1)
    out = tmp_path / "live-run"
    common = ["--geometry", str(jungfrau_set["geom"]), "--cell", CELL, "--space-group",
              "P 43 21 2", "--out", str(out), "--scheduler", "synchronous", "--no-report",
              "-q", "--stream-idle-s", "4", "--stream-update-s", "1", "--frames-per-block", "1"]
    port = free_port()
    server = _serve(run_dir, port)
    try:
        # the beamline's stream stops after two frames (the connection is gone) ...
        assert main(["process", "--stream", f"tcp://127.0.0.1:{port}", *common,
                     "--stream-max-frames", "2"]) == 0
    finally:
        server.kill()
        server.wait()
    first = pq.read_table(out / "frames.parquet").num_rows
    assert first == 2
    # ... and comes back replaying the whole run: what was spooled is not duplicated
    port = free_port()
    server = _serve(run_dir, port)
    try:
        assert main(["process", "--stream", f"tcp://127.0.0.1:{port}", *common]) == 0
    finally:
        server.kill()
        server.wait()
    rows = pq.read_table(out / "frames.parquet").to_pylist()
    rows.sort(key=lambda r: (r["source_url"], r["frame_index"]))
    assert len({(r["source_url"], r["frame_index"]) for r in rows}) == N_FRAMES
    cxi = _process([str(jungfrau_set["cxi"])], jungfrau_set["geom"], tmp_path / "cxi-run")
    _same_results(cxi, rows)
