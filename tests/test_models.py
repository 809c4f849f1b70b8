from __future__ import annotations

import math

import gemmi
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from sfxflow.models import (
    Beam,
    Crystal,
    Detector,
    Frame,
    Panel,
    SpotTable,
    as_space_group,
    as_unit_cell,
    photon_energy_ev_to_wavelength_a,
    reciprocal_basis,
)


def _panel(name: str = "p0", **kw) -> Panel:
    args = dict(origin_mm=(-10.0, -10.0, 100.0), fast_axis=(1, 0, 0), slow_axis=(0, 1, 0),
                pixel_size_mm=0.1, shape=(200, 100))
    args.update(kw)
    return Panel(name, **args)


def test_beam_energy_wavelength_round_trip():
    beam = Beam(wavelength_a=1.272607)
    assert photon_energy_ev_to_wavelength_a(beam.photon_energy_ev) == pytest.approx(1.272607)
    assert beam.s0_inv_a == pytest.approx((0.0, 0.0, 1 / 1.272607))


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan])
def test_beam_rejects_bad_wavelength(bad):
    with pytest.raises(ValueError, match="wavelength"):
        Beam(wavelength_a=bad)


def test_panel_normalises_axes_and_maps_pixels_to_lab():
    p = _panel(fast_axis=(2, 0, 0), slow_axis=(0, 3, 0))
    assert p.fast_axis == (1.0, 0.0, 0.0)
    # the centre of pixel (fs=0, ss=0) is half a pixel from the corner
    np.testing.assert_allclose(p.lab_mm(0.5, 0.5), [-9.95, -9.95, 100.0])
    np.testing.assert_allclose(p.lab_mm(100, 200), [0.0, 10.0, 100.0])
    assert p.normal == pytest.approx((0.0, 0.0, 1.0))


def test_panel_mask_shape_checked_and_read_only():
    with pytest.raises(ValueError, match="mask shape"):
        _panel(mask=np.ones((3, 3), bool))
    p = _panel(mask=np.ones((200, 100), bool))
    with pytest.raises(ValueError):
        p.mask[0, 0] = False


def test_detector_rejects_duplicate_names_and_computes_data_shape():
    with pytest.raises(ValueError, match="duplicate"):
        Detector((_panel("a"), _panel("a")))
    det = Detector((_panel("a"), _panel("b", data_origin=(200, 0))))
    assert det.data_shape() == (400, 100)
    stacked = Detector((_panel("a", data_index=(0,)), _panel("b", data_index=(2,))))
    assert stacked.data_shape() == (3, 200, 100)
    assert det.mean_distance_mm() == pytest.approx(100.0)


def test_frame_panel_data_is_a_view():
    det = Detector((_panel("a"), _panel("b", data_origin=(200, 0))))
    data = np.arange(400 * 100, dtype=np.float32).reshape(400, 100)
    frame = Frame(data, det, Beam(1.0))
    view = frame.panel_data(1)
    assert view.base is data or np.shares_memory(view, data)
    assert view[0, 0] == data[200, 0]


def test_crystal_a_matrix_gives_d_spacings_and_recovers_u():
    cell = as_unit_cell("93 93 130.5 90 90 120")
    sg = as_space_group("P6122")
    u = Rotation.random(random_state=7).as_matrix()
    xtal = Crystal.from_u(cell, sg, u)
    np.testing.assert_allclose(xtal.u_matrix, u, atol=1e-12)
    for hkl in ([1, 0, 0], [0, 0, 6], [2, -1, 3]):
        q = xtal.a_matrix @ np.array(hkl, float)
        assert 1 / np.linalg.norm(q) == pytest.approx(cell.calculate_d(hkl))
    # real-space vectors have the cell lengths
    lengths = np.linalg.norm(xtal.real_space_vectors(), axis=1)
    np.testing.assert_allclose(lengths, [93, 93, 130.5])


def test_reciprocal_basis_is_inverse_transpose_of_orthogonalisation():
    cell = gemmi.UnitCell(50, 60, 70, 80, 95, 105)
    orth = np.array(cell.orth.mat.tolist())
    np.testing.assert_allclose(reciprocal_basis(cell).T @ orth, np.eye(3), atol=1e-12)


def test_bad_cell_and_space_group_are_rejected():
    with pytest.raises(ValueError, match="6 numbers"):
        as_unit_cell("93 93 130.5")
    with pytest.raises(ValueError, match="6 numbers"):
        as_unit_cell("93 93 abc 90 90 120")
    # gemmi would turn an impossible cell into 1 1 1 90 90 90 without a word
    for bad in ("93 93 -130.5 90 90 120", "93 93 0 90 90 120", "93 93 130.5 90 90 0",
                "50 50 50 120 120 120", "50 50 50 90 90 180"):
        with pytest.raises(ValueError, match="real cell"):
            as_unit_cell(bad)
    assert as_unit_cell("60 60 60 80 80 80").alpha == 80
    with pytest.raises(ValueError, match="unknown space group"):
        as_space_group("P 7 7 7")


def test_spot_table_checks_columns():
    t = SpotTable.empty()
    assert len(t) == 0
    cols = t.to_dict()
    cols["fs_px"] = np.zeros(2)
    with pytest.raises(ValueError, match="rows"):
        SpotTable(**cols)


def test_ranges_up_to_a_machine_limit_read_in_words():
    from sfxflow.settings import Spec

    assert Spec(ge=0, le=2**63 - 1).describe("an integer") == "an integer >= 0"
    assert Spec(ge=0, le=10**12).describe("an integer") == "an integer from 0 to 1000000000000"
    assert Spec(ge=1, le=3).describe("an integer") == "an integer from 1 to 3"
