"""A run's stream chunks (pipeline/streams.py)."""

from __future__ import annotations

import pytest

_GEOM_PER_FRAME = """\
clen = /LCLS/detector_1/EncoderValue
coffset = 0.5
photon_energy = /LCLS/photon_energy_eV keV
res = 10000
p0/min_fs = 0
p0/max_fs = 9
p0/min_ss = 0
p0/max_ss = 4
p0/corner_x = -5
p0/corner_y = -2.5
p0/fs = x
p0/ss = y
"""


def test_run_stream_records_per_frame_geometry_values():
    # chunks lacked the hdf5/... values (clen read per frame from the data file), so a run's
    # own stream could not be read back with its header's geometry
    import numpy as np

    from sfxflow.io.geometry import parse_geom
    from sfxflow.io.stream import format_stream_header, parse_stream
    from sfxflow.models import Frame, FrameStatus, ImageResult
    from sfxflow.pipeline.streams import stream_chunk

    geom = parse_geom(_GEOM_PER_FRAME, "per-frame.geom")
    detector, beam = geom.resolve({"/LCLS/detector_1/EncoderValue": 120.0,
                                   "/LCLS/photon_energy_eV": 9.5})
    assert detector.panels[0].origin_mm[2] == pytest.approx(620.0)
    frame = Frame(np.zeros((5, 10), np.float32), detector, beam, "x.cxi", 3)
    chunk = stream_chunk(ImageResult("x.cxi", 3, FrameStatus.MISS), frame, geometry=geom)
    stream = parse_stream(format_stream_header(geom.text) + chunk)
    det2, beam2 = stream.resolve(next(iter(stream)))
    assert det2.panels[0].origin_mm == pytest.approx(detector.panels[0].origin_mm)
    assert beam2.wavelength_a == pytest.approx(beam.wavelength_a)
