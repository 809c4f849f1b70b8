"""A run directory on the local S3 server (moto) that other processes write (issue 19, item 1)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from sfxflow.errors import RunDirError
from sfxflow.io.results import CRYSTAL_SCHEMA, RunDir, parquet_bytes, shard_names

pytestmark = pytest.mark.s3


def _other_process_writer(storage_options: dict):
    """An s3fs instance of its own, as in a Dask worker process (no shared caches)."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, **storage_options)


def test_shards_written_after_a_listing_are_read(s3_bucket, s3_storage_options):
    # before: the client's listing of RUN/shards (the live report, planning) was cached by
    # s3fs, so reading a shard a worker wrote afterwards raised FileNotFoundError at the end
    # of every resumed s3 run on Dask
    run = RunDir(f"s3://{s3_bucket}/run", s3_storage_options)
    run.write_bytes("shards/a.frames.parquet", b"first")
    assert run.list("shards") == ["a.frames.parquet"]
    worker = _other_process_writer(s3_storage_options)
    worker.pipe_file(f"{s3_bucket}/run/shards/b.frames.parquet", b"second")
    assert run.exists("shards/b.frames.parquet")
    assert run.read_bytes("shards/b.frames.parquet") == b"second"
    assert run.list("shards") == ["a.frames.parquet", "b.frames.parquet"]
    assert run.mtime("shards/b.frames.parquet") is not None


def test_a_missing_shard_of_a_done_block_is_an_error_not_a_skip(s3_bucket, s3_storage_options):
    # before: _read_tables skipped a crystals shard that exists() did not see, so the run's
    # crystals.parquet silently lost that block's crystals
    run = RunDir(f"s3://{s3_bucket}/run", s3_storage_options)
    table = CRYSTAL_SCHEMA.empty_table()
    run.write_bytes(shard_names("b1")["crystals"], parquet_bytes(table))
    assert run.read_crystals_shards(["b1"]).num_rows == 0
    with pytest.raises(RunDirError, match=r"shards/b2\.crystals\.parquet is missing"):
        run.read_crystals_shards(["b1", "b2"])
    with pytest.raises(RunDirError, match=r"shards/b2\.frames\.parquet is missing"):
        run.read_frames_shards(["b2"])
    assert isinstance(table, pa.Table)
