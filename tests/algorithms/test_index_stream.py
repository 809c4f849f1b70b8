"""Real data: the CrystFEL test stream (5-HT2B, CSPAD, XGANDALF) and the LCLS thermolysin CBFs.

Run with ``-s`` to see the per-frame tables.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pytest

from sfxflow.algorithms.index import IndexParams, TargetCell, index_spots, misorientation_deg
from sfxflow.algorithms.refine import predict_positions_px

pytestmark = [pytest.mark.needs_shared]


def _index_stream(stream, target: TargetCell, params: IndexParams):
    rows = []
    for k, chunk in enumerate(stream.chunks):
        detector, beam = stream.resolve(chunk)
        res = index_spots(chunk.peaks, detector, beam, target, params)
        ref = chunk.crystals[0].to_crystal(target.space_group) if chunk.crystals else None
        angle = misorientation_deg(res.crystal, ref) if (res.success and ref) else float("nan")
        rows.append((k, len(chunk.peaks), res, ref is not None, angle))
    return rows


@pytest.mark.slow
def test_stream_indexes_more_than_xgandalf_and_agrees(shared_data: Path) -> None:
    from sfxflow.io.stream import read_stream

    stream = read_stream(shared_data / "crystfel" / "test.stream")
    cell = stream.target_cell.cell
    target = TargetCell(cell, "C 2 2 21")
    rows = _index_stream(stream, target, IndexParams())
    print(f"\n{'chunk':>5} {'peaks':>5} {'ours':>4} {'xgandalf':>8} {'n_idx':>5} {'frac':>5} "
          f"{'rmsd px':>7} {'angle deg':>9} {'lg Pf':>6}  cell / reason")
    for k, n, res, has_ref, angle in rows:
        what = (" ".join(f"{x:.1f}" for x in res.crystal.cell.parameters[:3]) if res.success
                else res.reason)
        print(f"{k:>5} {n:>5} {'Y' if res.success else '-':>4} {'Y' if has_ref else '-':>8} "
              f"{res.n_indexed:>5} {res.fraction_indexed:>5.2f} {res.rmsd_px:>7.2f} "
              f"{angle:>9.3f} {res.log10_false_probability:>6.1f}  {what}")
    n_ours = sum(r[2].success for r in rows)
    n_ref = sum(r[3] for r in rows)
    angles = [r[4] for r in rows if r[2].success and r[3]]
    print(f"indexed: ours {n_ours}, XGANDALF {n_ref}, both {len(angles)}; angle to XGANDALF "
          f"median {statistics.median(angles):.3f} deg, max {max(angles):.3f} deg")
    assert n_ref == 32
    assert n_ours > 32
    # every solution is significant: a chance match of that many spots is below 1e-3
    assert all(r[2].log10_false_probability <= -3 for r in rows if r[2].success)
    assert len(angles) >= 28  # nearly every frame XGANDALF indexed
    assert statistics.median(angles) <= 0.5
    assert max(angles) <= 2.0  # no frame indexed by both is in a different orientation
    for _, _, res, _, _ in rows:
        if res.success:
            a, b, c = res.crystal.cell.parameters[:3]
            assert abs(a / 61.4 - 1) < 0.03 and abs(b / 122.6 - 1) < 0.03
            assert abs(c / 168.0 - 1) < 0.03


#: wrong cells for the false-solution control: the true cell scaled, and an unrelated cell
DECOYS = {f"x{s}": (" ".join(f"{x * s:.3f}" for x in (61.4, 122.6, 168.0)) + " 90 90 90",
                    "C 2 2 21") for s in (0.9, 0.95, 0.97, 1.03, 1.05, 1.1)}
DECOYS["unrelated"] = ("47.3 83.9 101.2 90 90 90", "P 21 21 21")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DECOYS))
def test_stream_decoy_cells_do_not_index(shared_data: Path, name: str) -> None:
    """Control for false solutions: a wrong cell indexes no frame, except that a cell 3% off
    is within the cell tolerance of the true one and may index a frame in the true lattice
    (same orientation and Miller indices as with the true cell)."""
    from sfxflow.io.stream import read_stream

    stream = read_stream(shared_data / "crystfel" / "test.stream")
    decoy = TargetCell(*DECOYS[name])
    true_target = TargetCell("61.4 122.6 168.0 90 90 90", "C 2 2 21")
    rows = _index_stream(stream, decoy, IndexParams())
    indexed = [(k, res) for k, _, res, _, _ in rows if res.success]
    print(f"\ndecoy cell {name}: {len(indexed)} of {len(rows)} frames indexed")
    for k, res in indexed:
        chunk = stream.chunks[k]
        detector, beam = stream.resolve(chunk)
        true_res = index_spots(chunk.peaks, detector, beam, true_target, IndexParams())
        assert name in ("x0.97", "x1.03"), f"frame {k} indexed with the wrong cell {name}"
        assert true_res.success
        assert misorientation_deg(res.crystal, true_res.crystal, true_target.space_group) < 1.0


@pytest.mark.parametrize("name", ["idx-20130301060858401.cbf", "idx-20130301060858601.cbf"])
def test_thermolysin_cbf_indexes_from_own_spots(shared_data: Path, name: str,
                                                tmp_path_factory) -> None:
    from sfxflow.algorithms.spots import SpotParams, find_spots
    from sfxflow.io.sources import open_source
    from sfxflow.report.picture import render_frame_png

    path = shared_data / "lcls-cspad-thermolysin" / name
    with open_source(str(path)) as src:
        frame = src.read_frame(0)
    spots = find_spots(frame, SpotParams())
    target = TargetCell("93 93 130.5 90 90 120", "P 61 2 2")
    res = index_spots(spots, frame.detector, frame.beam, target, IndexParams())
    assert res.success, res.reason
    a, _, c = res.crystal.cell.parameters[:3]
    print(f"\n{name}: {len(spots)} spots, {res.n_indexed} indexed "
          f"({res.fraction_indexed:.2f} of those used), rmsd {res.rmsd_px:.2f} px, "
          f"cell {a:.2f} {c:.2f}")
    assert abs(a / 93.0 - 1) < 0.01
    assert abs(c / 130.5 - 1) < 0.01
    assert res.rmsd_px <= 1.5
    assert res.n_indexed >= 30
    # picture of observed vs predicted positions of the indexed spots
    sel = np.flatnonzero(res.indexed_mask)
    fs, ss = predict_positions_px(res.crystal.a_matrix, res.miller_indices[sel],
                                  spots.panel[sel], frame.detector, frame.beam)
    out = tmp_path_factory.mktemp("index_png") / (Path(name).stem + "_indexed.png")
    render_frame_png(frame, out,
                     spots={"observed (indexed)": {"panel": spots.panel[sel],
                                                   "fs_px": spots.fs_px[sel],
                                                   "ss_px": spots.ss_px[sel]}},
                     predicted={"panel": spots.panel[sel], "fs_px": fs, "ss_px": ss})
    assert out.stat().st_size > 10_000
    print(f"picture: {out}")
