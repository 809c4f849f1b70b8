"""pyarrow without its pandas import: :func:`pyarrow_without_pandas`."""

from __future__ import annotations

import sys

__all__ = ["pyarrow_without_pandas"]


def pyarrow_without_pandas() -> None:
    """Have pyarrow settle now, without importing pandas, that it need not check for pandas
    objects; call it before anything builds an Arrow array in this process.

    Why: the first array pyarrow builds (``pa.array``, ``pa.table``, a Parquet write or read)
    imports pandas (0.23 s of CPU, pandas 2.3) only to ask whether the values are pandas
    objects, which sfxflow never hands it: every process of a run paid it, the client before
    its cluster started and each worker in its first block. With that import refused once,
    pyarrow records that there is no pandas and its checks answer "not a DataFrame" from then
    on; what does need pandas (``Table.to_pandas``) imports it then (pyarrow retries the import
    where pandas is required). Nothing to do where pandas is imported already.

    Examples
    --------
    >>> pyarrow_without_pandas()
    >>> import pyarrow as pa
    >>> pa.table({"frame_index": [0, 1]}).num_rows
    2
    """
    if "pandas" in sys.modules:
        return
    import pyarrow as pa

    blocker = _RefusePandas()
    sys.meta_path.insert(0, blocker)
    try:
        pa.array([0])  # pyarrow's first looks for pandas (Cython and C++): refused, remembered
    finally:
        sys.meta_path.remove(blocker)


class _RefusePandas:
    """An import finder under which ``import pandas`` fails (placing ``None`` in
    ``sys.modules`` instead does not do: Cython's import returns that ``None``)."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "pandas":
            raise ModuleNotFoundError("pandas is not imported here", name=name)
        return None
