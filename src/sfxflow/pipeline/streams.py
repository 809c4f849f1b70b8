"""CrystFEL stream output of a run: one header for the run, one chunk per frame in each shard.

``cat RUN/header.stream RUN/shards/*.stream`` is a valid stream (format 2.3): the header holds
the geometry (the ``.geom`` text, or one written from the first frame's detector for
self-describing inputs such as CBF) and the target cell; chunks are written by
:func:`sfxflow.io.stream.format_chunk` with each frame's own detector and beam. Frames that could
not be read have no chunk (as with indexamajig); they are in ``frames.parquet``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sfxflow.models import Frame, ImageResult

__all__ = ["stream_chunk", "stream_header"]


def stream_chunk(result: ImageResult, frame: Frame, geometry: Any = None) -> str:
    """The stream chunk of one processed frame; with the run's CrystFEL ``geometry``, the
    per-frame values it reads from the data files (e.g. ``clen``) are recorded as ``hdf5/...``
    lines, without which the stream could not be read back with the header's geometry."""
    from sfxflow.io.stream import format_chunk

    values = geometry.header_values(frame.detector, frame.beam) if geometry is not None else None
    return format_chunk(result, frame.detector, beam=frame.beam, header_values=values)


def _first_frame(inputs: list[str], storage_options: Mapping[str, Any] | None) -> Frame | None:
    from sfxflow.io.sources import open_source

    for url in inputs:
        try:
            with open_source(url, None, dict(storage_options or {})) as src:
                return src.read_frame(0)
        except Exception:
            continue
    return None


def stream_header(config: Any, geometry: Any, inputs: list[str] | None = None,
                  storage_options: Mapping[str, Any] | None = None,
                  command_line: str = "sfxflow process") -> str | None:
    """Header text for the run's stream; ``None`` when no geometry can be had at all."""
    from sfxflow.io.cellfile import CellFile, lattice_from_space_group
    from sfxflow.io.stream import format_stream_header

    if geometry is not None:
        geometry_text = geometry.text
    else:
        frame = _first_frame(list(inputs or []), storage_options)
        if frame is None:
            return None
        from sfxflow.io.geometry import format_geom

        geometry_text = format_geom(frame.detector, beam=frame.beam, data_path=None,
                                    frame_dim=None,
                                    header="written by sfxflow from the first image's header")
    target = config.target_cell()
    cell = None
    if target is not None:
        # the space group too, so `merge RUN/run.stream` needs no --space-group
        cell = CellFile(target.cell, target.space_group,
                        lattice_from_space_group(target.space_group))
    return format_stream_header(geometry_text, target_cell=cell, command_line=command_line)
