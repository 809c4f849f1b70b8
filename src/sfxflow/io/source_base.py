"""The base class of every image source (CBF, CXI/HDF5, NXmx readers derive from it)."""

from __future__ import annotations

from abc import ABC
from typing import TYPE_CHECKING

from sfxflow.errors import SourceError

if TYPE_CHECKING:
    from sfxflow.models import Frame

__all__ = ["ImageSource"]


class ImageSource(ABC):
    """One file or object of frames. Use as a context manager; frames are read on demand.

    Attributes
    ----------
    url : where the frames live.
    n_frames : number of frames.
    kind : ``"cbf"``, ``"cxi"`` or ``"nxmx"``.
    """

    url: str
    n_frames: int
    kind: str = "unknown"

    def __init_subclass__(cls, **kwargs: object) -> None:
        # each default below is written with the other: a source must give one of them
        super().__init_subclass__(**kwargs)
        if cls.read_frame is ImageSource.read_frame and cls.read_frames is ImageSource.read_frames:
            raise TypeError(f"{cls.__name__} must define read_frame or read_frames")

    def read_frame(self, i: int) -> Frame:
        """Frame ``i`` (0-based): by default the one-frame block (for sources read by blocks)."""
        self._check_index(i)
        return self.read_frames(i, i + 1)[0]

    def read_frames(self, start: int, stop: int) -> list[Frame]:
        """Frames ``start .. stop-1``: by default one :meth:`read_frame` each (for sources
        read frame by frame)."""
        self._check_range(start, stop)
        return [self.read_frame(i) for i in range(start, stop)]

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release open files."""

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.n_frames:
            raise SourceError(self.url, f"frame {i} out of range (file has {self.n_frames})", i)

    def _check_range(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.n_frames:
            raise SourceError(
                self.url,
                f"frame range {start}..{stop} out of range (file has {self.n_frames} frames)",
            )
