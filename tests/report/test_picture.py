from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sfxflow.algorithms.layouts import cspad, simple
from sfxflow.errors import InputError
from sfxflow.models import Beam, Detector, Frame
from sfxflow.report.picture import (
    assemble_lab_image,
    lab_xy_mm,
    read_spot_overlay,
    render_frame_png,
)


def _labelled_cspad_frame() -> Frame:
    det = cspad()
    data = np.zeros(det.data_shape(), dtype=np.float32)
    for i, p in enumerate(det.panels):
        n_ss, n_fs = p.shape
        data[p.data_slices()] = 1000 * i + np.arange(n_fs)[None, :] % 100 + 0 * np.arange(n_ss)[:, None]
    return Frame(data, det, Beam(1.3), "mem.cxi", 0)


def test_lab_image_puts_each_panel_pixel_at_its_lab_position():
    frame = _labelled_cspad_frame()
    det = frame.detector
    lab = assemble_lab_image(frame, max_size_px=4000)
    assert lab.pixel_mm == pytest.approx(0.10992)
    rng = np.random.default_rng(0)
    panel = rng.integers(0, 64, 300)
    fs = rng.integers(1, 193, 300) + 0.5
    ss = rng.integers(1, 184, 300) + 0.5
    x, y = lab_xy_mm(det, panel, fs, ss, lab.z_mm)
    col = ((x - lab.x0_mm) / lab.pixel_mm).astype(int)
    row = ((y - lab.y0_mm) / lab.pixel_mm).astype(int)
    np.testing.assert_array_equal(lab.panel[row, col], panel)
    expected = np.array([frame.panel_data(p)[int(s), int(f)] for p, f, s in zip(panel, fs, ss, strict=True)])
    # nearest-neighbour resampling: the same panel pixel or a direct neighbour
    got = lab.values[row, col]
    assert np.all(np.abs(got - expected) <= 1.0)
    assert np.mean(got == expected) > 0.5
    # the quadrant layout: the beam centre is a gap; quadrant Q is the Q-th quarter turn
    centre = (int(-lab.y0_mm / lab.pixel_mm), int(-lab.x0_mm / lab.pixel_mm))
    assert lab.panel[centre] == -1
    for q, (qx, qy) in enumerate([(40, 40), (-40, 40), (-40, -40), (40, -40)]):
        r = int((qy - lab.y0_mm) / lab.pixel_mm)
        c = int((qx - lab.x0_mm) / lab.pixel_mm)
        hit = lab.panel[r - 30:r + 30, c - 30:c + 30]
        assert set(np.unique(hit[hit >= 0]) // 16) == {q}


def test_png_has_grey_masked_pixels_and_overlays(tmp_path):
    det0 = simple(n_px=200)
    mask = np.ones((200, 200), dtype=bool)
    mask[50:80, 20:60] = False
    det = Detector((det0.panels[0].with_mask(mask),))
    rng = np.random.default_rng(1)
    data = rng.poisson(3.0, (200, 200)).astype(np.float32)
    data[100:103, 150:153] = 500
    frame = Frame(data, det, Beam(1.3), "x.cxi", 0)
    spots = {"found": {"panel": np.array([0]), "fs_px": np.array([151.5]), "ss_px": np.array([101.5])}}
    out = render_frame_png(frame, tmp_path / "sub" / "f.png", spots=spots,
                           predicted={"panel": np.array(["p0"]), "fs_px": np.array([10.0]),
                                      "ss_px": np.array([10.0])})
    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[0] > 500 and img.shape[1] > 500
    grey = np.all(np.abs(img[..., :3] - 0.55) < 0.01, axis=-1)
    assert grey.sum() > 100  # the masked rectangle is grey
    cyan = (img[..., 0] < 0.1) & (img[..., 1] > 0.8) & (img[..., 2] > 0.9)
    assert cyan.sum() > 10  # the overlay circle
    with pytest.raises(InputError, match="scaling 'cubic'"):
        render_frame_png(frame, tmp_path / "g.png", scaling="cubic")


def test_read_spot_overlay_selects_the_frame(tmp_path):
    det = cspad()
    table = pa.table({
        "file": ["run_0000.cxi", "run_0000.cxi", "run_0001.cxi", "run_0000.cxi"],
        "frame_index": [0, 1, 1, 1],
        "panel": [3, 4, 5, 6],
        "fs_px": [1.0, 2.0, 3.0, 4.0],
        "ss_px": [5.0, 6.0, 7.0, 8.0],
        "snr_true": [1.0, 9.0, 9.0, 2.0],
    })
    path = tmp_path / "t.parquet"
    pq.write_table(table, path)
    got = read_spot_overlay(path, det, "s3://bucket/x/run_0000.cxi", 1)
    assert got["panel"].tolist() == [4, 6]
    got = read_spot_overlay(path, det, "/data/run_0000.cxi", 1, min_snr=5)
    assert got["panel"].tolist() == [4] and got["fs_px"].tolist() == [2.0]
    pq.write_table(pa.table({"source_url": ["a.cxi"], "frame_index": [0], "panel": ["q1a2"],
                             "fs_px": [1.0], "ss_px": [1.0]}), tmp_path / "s.parquet")
    got = read_spot_overlay(tmp_path / "s.parquet", det, "a.cxi", 0)
    assert got["panel"].tolist() == [det.panel_index("q1a2")]
    pq.write_table(pa.table({"x": [1.0]}), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match="lacks columns"):
        read_spot_overlay(tmp_path / "bad.parquet", det, "a.cxi", 0)
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(InputError, match=r"junk\.parquet"):
        read_spot_overlay(tmp_path / "junk.parquet", det, "a.cxi", 0)
