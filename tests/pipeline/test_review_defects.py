"""Regression tests for defects found in the pre-beamtime review (each failed before its fix)."""

from __future__ import annotations

import pytest

from sfxflow.cli import main
from sfxflow.errors import InputError
from sfxflow.io.results import RunDir
from sfxflow.io.storage import shown_url, storage_options_from
from sfxflow.pipeline.config import load_config
from sfxflow.pipeline.run import run_process

from .conftest import base_overrides


def test_same_file_under_two_spellings_is_refused(sim_set, tmp_path):
    # processing a/x.cxi and a/../a/x.cxi used to give every frame of x.cxi twice
    first = str(sim_set.files[0])
    folder, name = first.rsplit("/", 1)
    other = f"{folder}/../{folder.rsplit('/', 1)[1]}/{name}"
    cfg = load_config(overrides=[*base_overrides(sim_set.geometry_path), "cluster.kind=synchronous"])
    with pytest.raises(InputError, match="same file as"):
        run_process([first, other], str(tmp_path / "run"), cfg)


def test_run_directory_without_bucket_is_a_user_error(tmp_path, monkeypatch):
    # "s3://" used to become the local folder "s3:" and the run wrote its results there
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="no bucket or path"):
        RunDir("s3://")
    assert not (tmp_path / "s3:").exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # fsspec's __del__
def test_unusable_url_scheme_is_a_user_error_without_password(capsys):
    # fsspec raised TypeError (traceback, exit 1) and the message would carry user:password
    code = main(["process", "x.cxi", "--out", "ftp://me:hunter2@/run"])
    err = capsys.readouterr().err
    assert code == 2
    assert "hunter2" not in err
    assert "Traceback" not in err


def test_endpoint_url_with_credentials_is_refused_without_echo():
    with pytest.raises(InputError) as info:
        storage_options_from("http://me:hunter2@127.0.0.1:9000")
    assert "hunter2" not in str(info.value)
    assert "user:password" in str(info.value)


def test_shown_url_hides_userinfo():
    assert shown_url("ftp://me:pw@host/a/b") == "ftp://***@host/a/b"
    assert shown_url("s3://bucket/k@x") == "s3://bucket/k@x"
    assert shown_url("/local/path") == "/local/path"


def test_cell_without_the_space_groups_symmetry_is_a_user_error(capsys, tmp_path):
    # a hexagonal cell with P212121 used to run and index nothing, silently
    from sfxflow.pipeline.config import load_config as _load

    cfg = _load(overrides=["target.cell=[93, 93, 130.5, 90, 90, 120]",
                           "target.space_group='P212121'"])
    with pytest.raises(InputError, match="symmetry of space group P 21 21 21"):
        cfg.target_cell()
    spots = tmp_path / "x.parquet"
    spots.write_bytes(b"")  # the target is checked before the table is read
    code = main(["index", str(spots), "--cell", "93 93 130.5 90 90 120", "--space-group",
                 "P212121"])
    assert code == 2
    assert "orthorhombic" in capsys.readouterr().err


def test_cells_with_the_symmetry_are_accepted():
    from sfxflow.algorithms.index import TargetCell

    for cell, sg in (("93 93 130.5 90 90 120", "P 61 2 2"), ("93 93 130.5 90 90 120", "R 3"),
                     ("61.4 122.6 168 90 90 90", "C 2 2 21"), ("50 60 70 90 100 90", "P 1 21 1"),
                     ("79.1 79.2 38 90 90 90", "P 43 21 2"), ("40 50 60 80 85 95", "P 1")):
        assert TargetCell(cell, sg).space_group.hm == sg


def test_bad_walltime_is_a_user_error(capsys):
    # "--walltime abc" used to go into the job script; every job would be rejected
    assert main(["process", "--cluster", "slurm", "--walltime", "abc", "--dry-run"]) == 2
    assert "--walltime 'abc': expected HH:MM:SS" in capsys.readouterr().err
    for ok in ("02:00:00", "1-00:00:00", "90", "30:00"):
        assert main(["process", "--cluster", "slurm", "--walltime", ok, "--dry-run"]) == 0


def test_rhombohedral_setting_is_kept_for_indexing():
    # "R 3:R" was reduced to its H-M symbol "R 3", i.e. the hexagonal setting: wrong point-group
    # rotations and centring absences for a cell on rhombohedral axes
    import numpy as np

    from sfxflow.algorithms.index import TargetCell, point_group_rotations, target_table

    target = TargetCell("60 60 60 80 80 80", "R 3:R")
    images = {tuple(int(v) for v in m @ np.array([1, 0, 0]))
              for m in point_group_rotations(target.space_group)}
    assert images == {(1, 0, 0), (0, 1, 0), (0, 0, 1)}
    hkl = {tuple(int(v) for v in h) for h in target_table(target, 3.0).hkl}
    assert (1, 0, 0) in hkl  # primitive on rhombohedral axes: no centring absence


def test_rhombohedral_cell_file_keeps_its_setting(tmp_path):
    from sfxflow.pipeline.run import resolve_config

    cell = tmp_path / "r.cell"
    cell.write_text("CrystFEL unit cell file version 1.0\n\nlattice_type = rhombohedral\n"
                    "centering = R\na = 60 A\nb = 60 A\nc = 60 A\nal = 80 deg\nbe = 80 deg\n"
                    "ga = 80 deg\n")
    cfg = resolve_config(load_config(overrides=[f"target.cell_file='{cell}'"]))
    assert cfg.target_cell().space_group.xhm() == "R 3:R"


_GEOM_PER_FRAME = """\
clen = /LCLS/detector_1/EncoderValue
coffset = 0.5
photon_energy = /LCLS/photon_energy_eV keV
res = 10000
p0/min_fs = 0
p0/max_fs = 9
p0/min_ss = 0
p0/max_ss = 4
p0/corner_x = -5
p0/corner_y = -2.5
p0/fs = x
p0/ss = y
"""


def test_run_stream_records_per_frame_geometry_values():
    # chunks lacked the hdf5/... values (clen read per frame from the data file), so a run's
    # own stream could not be read back with its header's geometry
    import numpy as np

    from sfxflow.io.geometry import parse_geom
    from sfxflow.io.stream import format_stream_header, parse_stream
    from sfxflow.models import Frame, FrameStatus, ImageResult
    from sfxflow.pipeline.streams import stream_chunk

    geom = parse_geom(_GEOM_PER_FRAME, "per-frame.geom")
    detector, beam = geom.resolve({"/LCLS/detector_1/EncoderValue": 120.0,
                                   "/LCLS/photon_energy_eV": 9.5})
    assert detector.panels[0].origin_mm[2] == pytest.approx(620.0)
    frame = Frame(np.zeros((5, 10), np.float32), detector, beam, "x.cxi", 3)
    chunk = stream_chunk(ImageResult("x.cxi", 3, FrameStatus.MISS), frame, geometry=geom)
    stream = parse_stream(format_stream_header(geom.text) + chunk)
    det2, beam2 = stream.resolve(next(iter(stream)))
    assert det2.panels[0].origin_mm == pytest.approx(detector.panels[0].origin_mm)
    assert beam2.wavelength_a == pytest.approx(beam.wavelength_a)


def test_turning_the_stream_on_when_resuming_is_refused(sim_set, tmp_path):
    # blocks done without a stream were skipped and the run's stream silently lacked them
    from sfxflow.errors import ConfigError

    files = [str(sim_set.files[0])]
    base = [*base_overrides(sim_set.geometry_path, frames_per_block=6), "cluster.kind=synchronous"]
    out = str(tmp_path / "run")
    run_process(files, out, load_config(overrides=[*base, "io.write_stream=false"]))
    with pytest.raises(ConfigError, match=r"io\.write_stream = False, now True"):
        run_process(files, out, load_config(overrides=base))
    result = run_process(files, out, load_config(overrides=base), force=True)
    assert result.blocks_skipped == 0
    assert "Begin chunk" in (tmp_path / "run" / "shards").joinpath(
        next(p.name for p in (tmp_path / "run" / "shards").glob("*.stream"))).read_text()


def test_edited_geometry_file_is_not_resumed(sim_set, tmp_path):
    # io.geometry was compared as a path only: an edited .geom kept every done block as it was
    from sfxflow.errors import ConfigError

    geom = tmp_path / "det.geom"
    geom.write_text(sim_set.geometry_path.read_text())
    files = [str(sim_set.files[0])]
    base = [*base_overrides(geom, frames_per_block=6), "cluster.kind=synchronous"]
    out = str(tmp_path / "run")
    run_process(files, out, load_config(overrides=base))
    assert run_process(files, out, load_config(overrides=base)).blocks_skipped == 1
    geom.write_text(geom.read_text().replace("clen = 0.1 m", "clen = 0.102 m"))
    with pytest.raises(ConfigError, match=r"geometry file .* changed"):
        run_process(files, out, load_config(overrides=base))
    assert run_process(files, out, load_config(overrides=base), force=True).blocks_skipped == 0


def test_run_directory_that_is_a_file_is_a_user_error(tmp_path, capsys):
    # --out naming an existing file ended in a NotADirectoryError traceback (exit 1)
    target = tmp_path / "notes.txt"
    target.write_text("x\n")
    assert main(["process", "x.cxi", "--out", str(target), "--scheduler", "synchronous"]) == 2
    err = capsys.readouterr().err
    assert f"{target}: cannot create the run directory" in err
    assert "Traceback" not in err


def test_failed_write_does_not_say_read(tmp_path):
    from sfxflow.io.storage import open_url

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot write"):
        open_url(str(blocker / "out.parquet"), "wb")
