"""``sfxflow index`` in-process: Parquet spot tables + .geom, CrystFEL streams, user errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sfxflow.algorithms.index import TargetCell
from sfxflow.algorithms.layouts import cspad
from sfxflow.benchmarks.index import simulated_hit
from sfxflow.cli import main
from sfxflow.io.geometry import write_geom
from sfxflow.models import SPOT_COLUMNS, Beam

CELL = "79.1 79.1 38.0 90 90 90"
SG = "P 43 21 2"


def _spot_table(tmp_path: Path, n_frames: int = 4, n_junk_frames: int = 1) -> tuple[Path, Path]:
    det = cspad(130.0)
    beam = Beam(wavelength_a=1.3)
    target = TargetCell(CELL, SG)
    rng = np.random.default_rng(42)
    cols: dict[str, list] = {k: [] for k in ("source_url", "frame_index", *SPOT_COLUMNS)}
    for f in range(n_frames + n_junk_frames):
        if f < n_frames:
            spots = simulated_hit(target, det, beam, 30, rng).spots
        else:  # random spots: must not index
            n = 25
            spots = simulated_hit(target, det, beam, n, rng, false_fraction=1.0).spots
        for k in SPOT_COLUMNS:
            cols[k].append(getattr(spots, k))
        cols["source_url"].append(np.array([str(tmp_path / "run.cxi")] * len(spots), object))
        cols["frame_index"].append(np.full(len(spots), f))
    table = pa.table({k: np.concatenate(v) for k, v in cols.items()})
    spots_path = tmp_path / "spots.parquet"
    pq.write_table(table, spots_path)
    geom = tmp_path / "cspad.geom"
    write_geom(det, geom, beam=beam)
    return spots_path, geom


def test_index_parquet_with_geometry_writes_results(tmp_path: Path, capsys) -> None:
    spots, geom = _spot_table(tmp_path)
    out = tmp_path / "indexed.parquet"
    rc = main(["index", str(spots), "--cell", CELL, "--space-group", SG,
               "--geometry", str(geom), "-o", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "frames 5, indexed 4 (80.0%)" in text
    # five timings: a median with digits enough for a fast step (was "median 0.0 ms")
    assert re.search(r"median [1-9][\d.]* ms per frame \([\d.]+ to [\d.]+ ms, 5 frames\)",
                     text), text
    # reasons grouped by kind, not one per distinct probability value
    assert re.search(r"not indexed: [a-z ]+: 1$", text, re.M), text
    res = pq.read_table(out).to_pydict()
    assert res["frame_index"] == [0, 1, 2, 3, 4]
    assert res["indexed"] == [True, True, True, True, False]
    assert res["reason"][4] and not res["reason"][0]
    assert all(abs(a - 79.1) < 0.8 for a in res["cell_a"][:4])
    assert all(r < 1.0 for r in res["rmsd_px"][:4])
    assert np.isnan(res["a11"][4])
    assert all(lp < -10 for lp in res["log10_false_probability"][:4])
    assert res["det_shift_x_mm"] == [0.0] * 5  # not refined unless --refine-shift


def test_index_significance_and_shift_options(tmp_path: Path, capsys) -> None:
    spots, geom = _spot_table(tmp_path, n_frames=2, n_junk_frames=0)
    out = tmp_path / "shift.parquet"
    rc = main(["index", str(spots), "--cell", CELL, "--space-group", SG, "--geometry", str(geom),
               "--refine-shift", "--max-false-probability", "1e-6", "-o", str(out)])
    assert rc == 0
    res = pq.read_table(out).to_pydict()
    assert res["indexed"] == [True, True]
    assert all(abs(x) <= 0.2 for x in res["det_shift_x_mm"] + res["det_shift_y_mm"])
    assert main(["index", str(spots), "--cell", CELL, "--space-group", SG, "--geometry",
                 str(geom), "--max-false-probability", "0"]) == 2
    assert "--max-false-probability '0': expected a number > 0 and <= 1" in \
        capsys.readouterr().err
    # distance refinement only against a fixed cell (a still cannot separate the two)
    assert main(["index", str(spots), "--cell", CELL, "--space-group", SG, "--geometry",
                 str(geom), "--refine-distance"]) == 2
    assert "refine_distance needs refine_cell = False" in capsys.readouterr().err
    out = tmp_path / "distance.parquet"
    assert main(["index", str(spots), "--cell", CELL, "--space-group", SG, "--geometry",
                 str(geom), "--refine-distance", "--no-refine-cell", "-o", str(out)]) == 0
    assert pq.read_table(out).column("indexed").to_pylist() == [True, True]


def test_index_user_errors_exit_2(tmp_path: Path, capsys) -> None:
    spots, geom = _spot_table(tmp_path, n_frames=1, n_junk_frames=0)
    assert main(["index", str(spots), "--cell", CELL, "--geometry", str(geom)]) == 2
    assert "--space-group" in capsys.readouterr().err
    assert main(["index", str(tmp_path / "nope.parquet"), "--cell", CELL,
                 "--space-group", SG]) == 2
    assert "nope.parquet" in capsys.readouterr().err
    assert main(["index", str(spots), "--cell", "79 79 38", "--space-group", SG,
                 "--geometry", str(geom)]) == 2
    assert "79 79 38" in capsys.readouterr().err
    # spots from a .cxi source without --geometry: which file and what is missing
    assert main(["index", str(spots), "--cell", CELL, "--space-group", SG]) == 2
    assert "--geometry" in capsys.readouterr().err


def test_index_stream_excerpt_compares_with_reference(shared_data: Path, tmp_path: Path,
                                                      capsys) -> None:
    text = (shared_data / "crystfel" / "test.stream").read_text()
    head, *chunks = text.split("----- Begin chunk -----")
    excerpt = tmp_path / "excerpt.stream"
    # the first chunks: 0, 1 and 22 are indexed by XGANDALF in the original stream
    excerpt.write_text(head + "".join("----- Begin chunk -----" + c
                                      for c in (chunks[0], chunks[1], chunks[22])))
    out = tmp_path / "r.parquet"
    rc = main(["index", str(excerpt), "--space-group", "C 2 2 21", "-o", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "reference solutions in the input: 3" in printed
    res = pq.read_table(out).to_pydict()
    assert sum(res["indexed"]) == 3
    assert max(res["reference_angle_deg"]) < 1.0
    assert all(abs(b - 122.6) / 122.6 < 0.02 for b in res["cell_b"])


def test_index_takes_a_list_of_spot_tables(tmp_path: Path, capsys) -> None:
    spots, geom = _spot_table(tmp_path)
    listing = tmp_path / "tables.lst"
    listing.write_text(f"# spot tables\n{spots}\n")
    rc = main(["index", f"@{listing}", "--cell", CELL, "--space-group", SG, "--geometry",
               str(geom), "--quiet-frames"])
    assert rc == 0
    assert "frames 5, indexed 4 (80.0%)" in capsys.readouterr().out
