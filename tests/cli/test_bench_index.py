"""``sfxflow bench index --multi``: the cost of the search for further lattices, on simulated
hits and on the frames not simulated here."""

from __future__ import annotations

import re

import pytest

from sfxflow.benchmarks import index as bench_index
from sfxflow.benchmarks import stills
from sfxflow.cli import main


def test_multi_prints_the_cost_on_frames_not_simulated_here(capsys) -> None:
    if stills.stills_dir() is None:
        pytest.skip("independent stills not in ../shared/data")
    assert main(["bench", "index", "--frames", "2", "--spots", "30", "--targets",
                 "lysozyme-like", "--multi"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "16 independent stills" in x)
    # every still is one crystal whose spots it explains: no search for another is made
    assert re.search(r"16 lattices, 0 searches for a further one", line), line


def test_multi_without_shared_frames_says_so(monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench_index, "_real_frames", lambda: [])
    bench_index._print_multi_cost_real(bench_index.IndexParams())
    assert "real-frame cost skipped" in capsys.readouterr().out
