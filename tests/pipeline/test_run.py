"""run_process (pipeline/run.py): input checks, resolved configuration and resume guards."""

from __future__ import annotations

import pytest

from sfxflow.errors import InputError
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


def test_rhombohedral_cell_file_keeps_its_setting(tmp_path):
    from sfxflow.pipeline.run import resolve_config

    cell = tmp_path / "r.cell"
    cell.write_text("CrystFEL unit cell file version 1.0\n\nlattice_type = rhombohedral\n"
                    "centering = R\na = 60 A\nb = 60 A\nc = 60 A\nal = 80 deg\nbe = 80 deg\n"
                    "ga = 80 deg\n")
    # a cell file names only the lattice: the space group is given, never guessed (was R 3:R)
    with pytest.raises(InputError, match=r"--cell-file .*r\.cell: no space group \(value: "
                                         r"none; the file gives only the lattice, rhombohedral "
                                         r"R\); expected --space-group"):
        resolve_config(load_config(overrides=[f"target.cell_file='{cell}'"]))
    cfg = resolve_config(load_config(overrides=[f"target.cell_file='{cell}'",
                                                "target.space_group='R 3 2:R'"]))
    assert cfg.target_cell().space_group.xhm() == "R 3 2:R"


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
