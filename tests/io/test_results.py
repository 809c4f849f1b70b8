"""The run directory (io/results.py RunDir): where a run's results go."""

from __future__ import annotations

import pytest

from sfxflow.errors import InputError
from sfxflow.io.results import RunDir


def test_run_directory_without_bucket_is_a_user_error(tmp_path, monkeypatch):
    # "s3://" used to become the local folder "s3:" and the run wrote its results there
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="no bucket or path"):
        RunDir("s3://")
    assert not (tmp_path / "s3:").exists()
