"""The space group in the stream header: written as a cell-file comment, read back, and a bad
one named with its line."""

from __future__ import annotations

import gemmi
import pytest

from sfxflow.io.cellfile import CellFile, lattice_from_space_group, parse_cell_file
from sfxflow.io.geometry import _EXAMPLE
from sfxflow.io.stream import (
    BEGIN_CELL,
    END_CELL,
    SPACE_GROUP_COMMENT,
    StreamError,
    format_stream_header,
    parse_stream,
)


@pytest.mark.parametrize("name", ["P 61 2 2", "R 3:H", "R 3 2:R", "C 1 2 1", "P 1 1 21"])
def test_space_group_round_trips_through_the_header(name):
    sg = gemmi.SpaceGroup(name)
    cell = gemmi.UnitCell(60, 60, 60, 80, 80, 80) if name.endswith(":R") else \
        gemmi.UnitCell(60, 70, 80, 90, 100, 90) if "1 2 1" in name else \
        gemmi.UnitCell(60, 70, 80, 90, 90, 100) if "1 1 21" in name else \
        gemmi.UnitCell(60, 60, 80, 90, 90, 120)
    text = format_stream_header(_EXAMPLE, target_cell=CellFile(cell, sg,
                                                               lattice_from_space_group(sg)))
    target = parse_stream(text, "x.stream").target_cell
    assert target is not None and target.space_group.xhm() == sg.xhm()
    # the block stays a cell file CrystFEL reads: the space group is only a ';' comment
    block = text.split(BEGIN_CELL)[1].split(END_CELL)[0]
    assert f"{SPACE_GROUP_COMMENT} {sg.xhm()}" in block
    assert parse_cell_file(block, "block.cell").space_group is None


def test_a_header_without_the_line_has_no_space_group():
    text = format_stream_header(_EXAMPLE, target_cell=(gemmi.UnitCell(60, 60, 80, 90, 90, 120),
                                                       lattice_from_space_group(
                                                           gemmi.SpaceGroup("P 3"))))
    assert SPACE_GROUP_COMMENT not in text
    assert parse_stream(text, "x.stream").target_cell.space_group is None


def test_a_bad_space_group_line_is_named():
    sg = gemmi.SpaceGroup("P 61 2 2")
    text = format_stream_header(_EXAMPLE, target_cell=CellFile(
        gemmi.UnitCell(93, 93, 130.5, 90, 90, 120), sg, lattice_from_space_group(sg)))
    bad = text.replace("P 61 2 2", "Q 99")
    line = bad.splitlines().index(f"{SPACE_GROUP_COMMENT} Q 99") + 1
    with pytest.raises(StreamError, match=rf"^x\.stream:{line}: unknown space group in the unit "
                                          r"cell block \(value 'Q 99'"):
        parse_stream(bad, "x.stream")
