"""discover / plan_blocks / read_block / open_source over mixed, partly broken local inputs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from sfxflow.errors import ConfigError, GeometryError, SourceError
from sfxflow.io.geometry import parse_geom
from sfxflow.io.prefetch import prefetch
from sfxflow.io.sources import (
    Block,
    FileInfo,
    discover,
    open_source,
    plan_blocks,
    read_block,
    source_kind,
)

GEOM = """\
photon_energy = 9500
clen = 0.1
res = 10000
dim0 = %
dim1 = ss
dim2 = fs
data = /entry_1/data_1/data
p0/min_fs = 0
p0/max_fs = 15
p0/min_ss = 0
p0/max_ss = 11
p0/corner_x = -8
p0/corner_y = -6
p0/fs = x
p0/ss = y
"""
CBF = ("lcls-cspad-thermolysin", "idx-20130301060858401.cbf")


def _cxi(path: Path, n: int, seed: int) -> np.ndarray:
    data = np.random.default_rng(seed).poisson(4, (n, 12, 16)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f["/entry_1/data_1/data"] = data
    return data


@pytest.fixture()
def geom():
    return parse_geom(GEOM, "small.geom")


def test_block_ids_are_deterministic_safe_and_unique() -> None:
    a = Block("s3://bucket/some dir/run 0001.cxi", 0, 10)
    assert a.block_id == Block("s3://bucket/some dir/run 0001.cxi", 0, 10).block_id
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", a.block_id)
    ids = {Block(u, s, s + 10).block_id for u in ("/a/run.cxi", "/b/run.cxi") for s in (0, 10)}
    assert len(ids) == 4  # same file name in two folders still differs
    with pytest.raises(ValueError):
        Block("x", 5, 5)


def test_plan_blocks_never_spans_files_and_skips_errors() -> None:
    files = [FileInfo("a.cxi", 25, 1, "cxi"), FileInfo("bad.cxi", 0, 1, "cxi", "broken"),
             FileInfo("b.cxi", 3, 1, "cxi")]
    blocks = plan_blocks(files, 10)
    assert [(b.url, b.start, b.stop) for b in blocks] == [
        ("a.cxi", 0, 10), ("a.cxi", 10, 20), ("a.cxi", 20, 25), ("b.cxi", 0, 3)]
    with pytest.raises(ConfigError, match="frames_per_block must be >= 1, got 0"):
        plan_blocks(files, 0)


def test_discover_mixed_folder_records_errors(tmp_path: Path, geom, shared_data: Path) -> None:
    good1 = _cxi(tmp_path / "run_0001.cxi", 5, 1)
    _cxi(tmp_path / "run_0002.cxi", 3, 2)
    with h5py.File(tmp_path / "run_0003.cxi", "w") as f:  # no data set named by the geometry
        f["/entry_1/other"] = np.zeros(3)
    cbf_src = shared_data.joinpath(*CBF)
    shutil.copy(cbf_src, tmp_path / "good.cbf")
    (tmp_path / "truncated.cbf").write_bytes(cbf_src.read_bytes()[:200_000])
    (tmp_path / "notes.txt").write_text("not an image")

    infos = discover([str(tmp_path), str(tmp_path / "missing_*.cxi"), "/nonexistent/x.cxi"],
                     geom)
    by_name = {Path(i.url).name: i for i in infos}
    assert "notes.txt" not in by_name
    first = by_name["run_0001.cxi"]
    stat = (tmp_path / "run_0001.cxi").stat()
    # the version stamp is what a rerun compares to refuse changed inputs (issue 10.4)
    assert first == FileInfo(str(tmp_path / "run_0001.cxi"), 5, stat.st_size, "cxi",
                             version=f"mtime_ns:{stat.st_mtime_ns}")
    assert by_name["run_0002.cxi"].n_frames == 3
    assert by_name["good.cbf"].n_frames == 1 and by_name["good.cbf"].kind == "cbf"
    assert by_name["run_0003.cxi"].error and "no dataset /entry_1/data_1/data" in \
        by_name["run_0003.cxi"].error
    assert by_name["missing_*.cxi"].error and "matched no image files" in \
        by_name["missing_*.cxi"].error
    assert by_name["x.cxi"].error and "/nonexistent/x.cxi" in by_name["x.cxi"].error

    # every block of every file: the broken files fail alone, the others read
    blocks = plan_blocks(infos, 2)
    assert {Path(b.url).name for b in blocks} == {"run_0001.cxi", "run_0002.cxi", "good.cbf",
                                                  "truncated.cbf"}
    ok, failed = {}, {}
    for block, result in prefetch(blocks, lambda b: read_block(b, geom)):
        if isinstance(result, Exception):
            failed[Path(block.url).name] = result
        else:
            ok.setdefault(Path(block.url).name, []).extend(result)
    assert set(failed) == {"truncated.cbf"}
    assert isinstance(failed["truncated.cbf"], SourceError)
    assert "truncated.cbf" in str(failed["truncated.cbf"])
    assert [f.index for f in ok["run_0001.cxi"]] == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(np.stack([f.data for f in ok["run_0001.cxi"]]), good1)
    assert ok["good.cbf"][0].data.shape == (1480, 1552)


def test_open_source_dispatch_and_errors(tmp_path: Path, geom) -> None:
    _cxi(tmp_path / "a.h5", 2, 0)
    (tmp_path / "blob").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    assert source_kind(str(tmp_path / "a.h5")) == "hdf5"
    assert source_kind(str(tmp_path / "blob")) == "hdf5"  # sniffed from the content
    with open_source(str(tmp_path / "a.h5"), geom) as src:
        assert src.n_frames == 2
        with pytest.raises(SourceError, match=r"frame range 1\.\.3 out of range"):
            src.read_frames(1, 3)
    (tmp_path / "c.dat").write_bytes(b"hello")
    with pytest.raises(SourceError, match=r"c\.dat: unknown image format"):
        open_source(str(tmp_path / "c.dat"))
    with pytest.raises(GeometryError, match="needs a CrystFEL geometry"):
        open_source(str(tmp_path / "a.h5"))
    with pytest.raises(SourceError, match=r"frame range 0\.\.9"):
        read_block(Block(str(tmp_path / "a.h5"), 0, 9), geom)
