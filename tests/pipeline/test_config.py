"""The configuration tree (pipeline/config.py): target cell checks."""

from __future__ import annotations

import pytest

from sfxflow.cli import main
from sfxflow.errors import InputError


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
