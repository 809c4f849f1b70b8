"""``sfxflow view --cell``: predicted (squares) against found (circles) positions on a frame."""

from __future__ import annotations

import re

import pytest

from sfxflow.cli import main


@pytest.fixture(scope="module")
def one_hit(tmp_path_factory):
    out = tmp_path_factory.mktemp("view_pred") / "sim"
    assert main(["-q", "simulate", str(out), "--frames", "1", "--detector", "simple",
                 "--seed", "4", "--hit-fraction", "1"]) == 0
    return out


def test_view_draws_predictions_and_found_spots(one_hit, tmp_path, capsys):
    png = tmp_path / "pred.png"
    rc = main(["view", str(one_hit / "run_0000.cxi"), "--geometry",
               str(one_hit / "geometry.geom"), "--cell", "93 93 130.5 90 90 120",
               "--space-group", "P6122", "--out", str(png)])
    assert rc == 0 and png.stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "reflections integrated, integrated" in out
    found = int(re.search(r"found spots \(indexed\): (\d+)", out).group(1))
    predicted = int(re.search(r"predicted: (\d+)", out).group(1))
    assert found > 10 and predicted > 10


def test_view_cell_without_space_group_is_a_user_error(one_hit, tmp_path, capsys):
    rc = main(["view", str(one_hit / "run_0000.cxi"), "--geometry",
               str(one_hit / "geometry.geom"), "--cell", "93 93 130.5 90 90 120",
               "--out", str(tmp_path / "x.png")])
    assert rc == 2
    assert "--space-group" in capsys.readouterr().err
