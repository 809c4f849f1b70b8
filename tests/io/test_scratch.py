from __future__ import annotations

import numpy as np
import pytest

from sfxflow.io.scratch import mapped_arrays, remove_scratch


def test_mapped_arrays_are_read_only_copies_backed_by_unlinked_files(tmp_path):
    given = {"codes": np.arange(12, dtype=np.int32).reshape(2, 6), "intensity": np.linspace(0, 1, 5),
             "empty": np.zeros((3, 0)), "strided": np.arange(10.0)[::2]}
    got = mapped_arrays(given, tmp_path / "merge")
    for name, value in given.items():
        assert got[name].dtype == value.dtype and np.array_equal(got[name], value)
        assert not got[name].flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        got["intensity"][0] = 2.0
    # unlinked once mapped: nothing to leave behind, the data still there
    assert not [p for p in (tmp_path / "merge").rglob("*") if p.is_file()]
    assert float(got["intensity"][-1]) == 1.0


def test_remove_scratch(tmp_path):
    mapped_arrays({"x": np.ones(3)}, tmp_path / "merge")
    assert remove_scratch(tmp_path / "merge") and not (tmp_path / "merge").exists()
    assert not remove_scratch(tmp_path / "merge")
