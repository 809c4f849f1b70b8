"""pyarrow without its pandas import (each case in a fresh interpreter: pytest's own may have
imported pandas already)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import io, sys
from sfxflow.io.arrow import pyarrow_without_pandas
pyarrow_without_pandas()
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
table = pa.table({"frame_index": [0, 1], "status": ["hit", "miss"],
                  "n_spots": pa.array(np.arange(2))})
buf = io.BytesIO()
pq.write_table(table, buf)
back = pq.read_table(io.BytesIO(buf.getvalue()))
assert back.to_pydict() == table.to_pydict(), back
print("pandas" in sys.modules)
"""


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_arrays_tables_and_parquet_without_importing_pandas():
    assert _run(PROBE) == "False"


def test_to_pandas_still_works_afterwards():
    pytest.importorskip("pandas")
    out = _run(PROBE + "print(type(table.to_pandas()).__name__)\n")
    assert out.splitlines() == ["False", "DataFrame"]
