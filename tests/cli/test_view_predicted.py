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
    found = int(re.search(r"crystal 1: spots indexed: (\d+)", out).group(1))
    predicted = int(re.search(r"crystal 1: predicted: (\d+)", out).group(1))
    assert found > 10 and predicted > 10


def test_view_cell_without_space_group_is_a_user_error(one_hit, tmp_path, capsys):
    rc = main(["view", str(one_hit / "run_0000.cxi"), "--geometry",
               str(one_hit / "geometry.geom"), "--cell", "93 93 130.5 90 90 120",
               "--out", str(tmp_path / "x.png")])
    assert rc == 2
    assert "--space-group" in capsys.readouterr().err


def _counts(out: str) -> dict[str, int]:
    wrote = next(ln for ln in out.splitlines() if ln.startswith("wrote "))
    items = wrote.split(" (", 1)[1].rstrip(")").split(", ")
    return {k.replace(":", ""): int(v) for k, v in (i.rsplit(": ", 1) for i in items)}


@pytest.fixture(scope="module")
def two_crystals(shared_data):
    frame = shared_data / "lcls-cspad-thermolysin" / "idx-20130301060858601.cbf"
    if not frame.exists():
        pytest.skip(f"{frame} not found (the real two-crystal CSPAD frame)")
    return frame


def test_view_gives_each_crystal_a_colour_and_counts_that_add_up(two_crystals, tmp_path,
                                                                   capsys):
    # issue 22: every prediction was white with one legend entry, and "found spots (indexed)
    # (118)" counted every spot where 55 + 30 were indexed
    png = tmp_path / "two.png"
    rc = main(["-q", "view", str(two_crystals), "--cell", "93 93 130.5 90 90 120",
               "--space-group", "P6122", "--preset", "cspad-cbf", "--out", str(png)])
    assert rc == 0
    out = capsys.readouterr().out
    counts = _counts(out)
    assert {"crystal 1 spots indexed", "crystal 2 spots indexed", "spots not indexed",
            "crystal 1 predicted", "crystal 2 predicted"} <= set(counts), out
    assert counts["crystal 1 spots indexed"] > 20 and counts["crystal 2 spots indexed"] > 10
    n_found = sum(v for k, v in counts.items() if "spots" in k)
    assert n_found == 118  # the spots found with the preset on this frame (algorithms/spots.py)
    # the picture: circles and squares in two colours besides the image's own
    import matplotlib.image as mpimg
    import numpy as np

    img = (mpimg.imread(png)[..., :3] * 255).round().astype(int)
    for hex_colour in ("#00e5ff", "#ff2bd6"):  # the first two overlay colours of io/picture.py
        rgb = [int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]
        assert (np.abs(img - rgb).sum(axis=-1) < 40).sum() > 200, hex_colour


def test_view_help_example_with_a_glob_of_two_files(two_crystals, tmp_path, capsys):
    # "sfxflow view ../shared/data/lcls-cspad-thermolysin/*.cbf ..." gave two files to a
    # command that took one
    files = sorted(str(p) for p in two_crystals.parent.glob("*.cbf"))
    assert len(files) == 2
    png = tmp_path / "cbf.png"
    assert main(["-q", "view", *files, "--frame", "1", "--out", str(png)]) == 0
    assert f"frame 1: {files[1]} frame 0" in capsys.readouterr().out
    assert main(["-q", "view", *files, "--frame", "2", "--out", str(png)]) == 2
    assert "--frame 2 is out of range" in capsys.readouterr().err


def test_view_takes_a_list(two_crystals, tmp_path, capsys):
    listing = tmp_path / "frames.lst"
    listing.write_text(f"# the second CBF only\n{two_crystals} //0\n")
    png = tmp_path / "l.png"
    assert main(["-q", "view", str(listing), "--out", str(png)]) == 0
    assert f"frame 0: {two_crystals} frame 0" in capsys.readouterr().out
    assert png.stat().st_size > 10_000
