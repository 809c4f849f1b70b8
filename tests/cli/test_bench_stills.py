"""``sfxflow bench process --stills-only``: the independent stills, timed and scored."""

from __future__ import annotations

import pytest

from sfxflow.benchmarks import stills
from sfxflow.cli import main


def test_measure_stills_indexes_every_frame() -> None:
    d = stills.stills_dir()
    if d is None:
        pytest.skip("independent stills not in ../shared/data")
    rep = stills.measure_stills(d, repeats=1)
    assert rep.frames == 16 and rep.indexed == 16
    assert rep.median_misorientation_deg < 0.1
    assert set(rep.cpu_ms) == set(stills.STAGES) and rep.cpu_ms["total"] > 0


def test_bench_process_stills_only_without_data(monkeypatch, capsys) -> None:
    monkeypatch.setattr(stills, "stills_dir", lambda: None)
    assert main(["bench", "process", "--stills-only", "--no-crystfel"]) == 0
    assert "independent stills not found" in capsys.readouterr().out
