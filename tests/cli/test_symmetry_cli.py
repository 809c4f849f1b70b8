"""`process`, `index` and `merge` never guess a space group: without one they exit 2 with one
line that says how to give one."""

from __future__ import annotations

import pytest

from sfxflow.cli import main

HEXAGONAL_CELL = ("CrystFEL unit cell file version 1.0\n\nlattice_type = hexagonal\n"
                  "centering = P\nunique_axis = c\na = 93 A\nb = 93 A\nc = 130.5 A\n"
                  "al = 90 deg\nbe = 90 deg\nga = 120 deg\n")


def _one_line_exit_2(capsys, argv: list[str], *needles: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_process_with_a_cell_file_and_no_space_group_is_refused(tmp_path, capsys):
    # the README's laptop example ran in P 3 for this hexagonal cell, said at INFO level only
    cell = tmp_path / "x.cell"
    cell.write_text(HEXAGONAL_CELL)
    out = tmp_path / "run"
    _one_line_exit_2(capsys, ["process", str(tmp_path / "x.cxi"), "--cell-file", str(cell),
                              "--out", str(out), "--scheduler", "synchronous"],
                     f"--cell-file {cell}: no space group", "hexagonal P",
                     "expected --space-group")
    assert not out.exists()


@pytest.mark.needs_shared
def test_index_a_crystfel_stream_without_a_space_group_is_refused(shared_data, tmp_path, capsys):
    text = (shared_data / "crystfel" / "test.stream").read_text()
    head, *chunks = text.split("----- Begin chunk -----")
    excerpt = tmp_path / "excerpt.stream"
    excerpt.write_text(head + "----- Begin chunk -----" + chunks[0])
    _one_line_exit_2(capsys, ["index", str(excerpt)],
                     "the stream's target cell: no space group", "orthorhombic C",
                     "expected --space-group")


def test_index_with_a_cell_file_and_no_space_group_is_refused(tmp_path, capsys):
    cell = tmp_path / "x.cell"
    cell.write_text(HEXAGONAL_CELL)
    spots = tmp_path / "spots.parquet"
    spots.write_bytes(b"")
    _one_line_exit_2(capsys, ["index", str(spots), "--cell-file", str(cell)],
                     "no space group", "expected --space-group")


def test_merge_space_group_and_point_group_together_is_refused(tmp_path, capsys):
    _one_line_exit_2(capsys, ["merge", "x.stream", "--out", str(tmp_path / "m"),
                              "--space-group", "P6122", "--point-group", "622"],
                     "not both")
    _one_line_exit_2(capsys, ["merge", "x.stream", "--out", str(tmp_path / "m"),
                              "--space-group", "6/mmm"],
                     "a point group such as 422 goes to --point-group")
