"""Inputs and run directory on a real S3-protocol server (moto) on 127.0.0.1."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest

from sfxflow.io.results import shard_names
from sfxflow.pipeline.config import load_config
from sfxflow.pipeline.run import run_process

from .conftest import base_overrides, comparable, read_frames

pytestmark = [pytest.mark.s3, pytest.mark.dask, pytest.mark.slow]


def test_s3_in_and_out_equals_local(sim_set, serial_run, s3_bucket, s3_storage_options):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_storage_options)
    for path in (*sim_set.files, sim_set.geometry_path):
        fs.put_file(str(path), f"{s3_bucket}/in/{path.name}")
    out = f"s3://{s3_bucket}/out/run1"
    cfg = load_config(overrides=[*base_overrides(f"s3://{s3_bucket}/in/geometry.geom"),
                                 "cluster.kind=local", "cluster.n_workers=2"])
    result = run_process([f"s3://{s3_bucket}/in/"], out, cfg, storage_options=s3_storage_options)
    assert result.complete and result.summary["frames"] == 12
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/out/run1")}
    assert {"config.toml", "manifest.json", "header.stream", "frames.parquet",
            "summary.json"} <= names
    assert len(fs.ls(f"{s3_bucket}/out/run1/shards")) == 6 * len(shard_names("any"))
    frames = pq.read_table(io.BytesIO(fs.cat_file(f"{s3_bucket}/out/run1/frames.parquet")))
    assert all(u.startswith(f"s3://{s3_bucket}/in/") for u in frames["source_url"].to_pylist())
    assert comparable(frames, file_names_only=True) == comparable(read_frames(serial_run[0]),
                                                                   file_names_only=True)
    summary = json.loads(fs.cat_file(f"{s3_bucket}/out/run1/summary.json"))
    assert summary["bytes_read"] >= sum(p.stat().st_size for p in sim_set.files) * 0.9
    # resume on S3: everything verifies against the manifest checksums, nothing recomputed
    again = run_process([f"s3://{s3_bucket}/in/"], out,
                        load_config(overrides=[*base_overrides(f"s3://{s3_bucket}/in/geometry.geom"),
                                               "cluster.kind=synchronous"]),
                        storage_options=s3_storage_options)
    assert again.blocks_skipped == 6 and again.blocks_done == 0


def test_s3_run_resumed_on_dask_with_the_live_report(sim_set, serial_run, s3_bucket,
                                                     s3_storage_options):
    # issue 19, item 1; before: the client's listing of RUN/shards (the live report) was cached,
    # so reading a shard that a worker wrote afterwards raised FileNotFoundError at the end of
    # every resumed run and of every run with --geometry s3://... (exit 1, no frames.parquet)
    import s3fs

    fs = s3fs.S3FileSystem(**s3_storage_options)
    for path in (*sim_set.files, sim_set.geometry_path):
        fs.put_file(str(path), f"{s3_bucket}/in/{path.name}")
    out = f"s3://{s3_bucket}/out/resumed"
    overrides = [*base_overrides(f"s3://{s3_bucket}/in/geometry.geom"), "cluster.kind=local",
                 "cluster.n_workers=2", "run.report=true", "run.report_interval_s=0"]
    first = run_process([f"s3://{s3_bucket}/in/"], out,
                        load_config(overrides=[*overrides, "run.max_blocks=2"]),
                        storage_options=s3_storage_options)
    assert not first.complete and first.blocks_done == 2
    again = run_process([f"s3://{s3_bucket}/in/"], out, load_config(overrides=overrides),
                        storage_options=s3_storage_options)
    assert again.complete and again.blocks_skipped == 2 and again.blocks_done == 4
    frames = pq.read_table(io.BytesIO(fs.cat_file(f"{s3_bucket}/out/resumed/frames.parquet")))
    assert comparable(frames, file_names_only=True) == comparable(read_frames(serial_run[0]),
                                                                   file_names_only=True)
