"""Image sources on a real S3-protocol server (moto on 127.0.0.1): identical to local reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sfxflow.errors import SourceError
from sfxflow.io.geometry import read_geom
from sfxflow.io.sources import discover, open_source, plan_blocks, read_block
from sfxflow.io.storage import read_stats, reset_read_stats

pytestmark = pytest.mark.s3

CBF_DIR = "lcls-cspad-thermolysin"


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory):
    from sfxflow.algorithms import layouts
    from sfxflow.algorithms.simulate import SimulationParams
    from sfxflow.io.simulated import write_simulated_dataset

    out = tmp_path_factory.mktemp("sim")
    return write_simulated_dataset(out, layouts.simple(n_px=96), None, SimulationParams(),
                                   n_frames=7, n_files=2, seed=3, compression="bitshuffle-lz4")


def _upload(client, bucket: str, local: Path, key: str) -> str:
    client.upload_file(str(local), bucket, key)
    return f"s3://{bucket}/{key}"


@pytest.fixture()
def s3_client(s3_server: str):
    import boto3

    return boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")


def test_simulated_cxi_from_s3_equals_local(simulated, s3_client, s3_bucket: str,
                                            s3_storage_options: dict) -> None:
    geom = read_geom(simulated.geometry_path)
    for f in simulated.files:
        _upload(s3_client, s3_bucket, f, f"run1/{f.name}")
    geom_url = _upload(s3_client, s3_bucket, simulated.geometry_path, "run1/geometry.geom")
    geom_remote = read_geom(geom_url, storage_options=s3_storage_options)
    assert geom_remote.references == geom.references

    local = discover([str(f) for f in simulated.files], geom)
    remote = discover(f"s3://{s3_bucket}/run1/", geom_remote, s3_storage_options)
    assert [i.n_frames for i in remote] == [i.n_frames for i in local] == [3, 4]
    assert [i.size_bytes for i in remote] == [i.size_bytes for i in local]
    assert all(i.error is None and i.kind == "cxi" for i in remote)

    reset_read_stats()
    for lb, rb in zip(plan_blocks(local, 2), plan_blocks(remote, 2), strict=True):
        lf = read_block(lb, geom)
        rf = read_block(rb, geom_remote, s3_storage_options)
        assert len(lf) == len(rf) == rb.n_frames
        for a, b in zip(lf, rf, strict=True):
            np.testing.assert_array_equal(a.data, b.data)
            assert a.beam == b.beam and a.detector == b.detector and a.index == b.index
            assert b.source_url.startswith("s3://")
    assert read_stats().bytes_read >= sum(i.size_bytes for i in remote)

    # ranged reads (h5py through an fsspec blockcache file) give the same pixels
    with open_source(remote[1].url, geom_remote, s3_storage_options, metadata_only=True) as src:
        ranged = src.read_frames(0, 4)
    for a, b in zip(read_block(plan_blocks(local[1:], 4)[0], geom), ranged, strict=True):
        np.testing.assert_array_equal(a.data, b.data)


def test_real_cbfs_from_s3(shared_data: Path, s3_client, s3_bucket: str,
                           s3_storage_options: dict) -> None:
    from sfxflow.io.cbf import CbfSource

    urls = []
    for p in sorted((shared_data / CBF_DIR).glob("*.cbf")):
        urls.append(_upload(s3_client, s3_bucket, p, f"cspad/{p.name}"))
    infos = discover(f"s3://{s3_bucket}/cspad/*.cbf", storage_options=s3_storage_options)
    assert [i.url for i in infos] == urls and all(i.n_frames == 1 for i in infos)
    for info in infos:
        (frame,) = read_block(plan_blocks([info], 10)[0], storage_options=s3_storage_options)
        local = CbfSource(str(shared_data / CBF_DIR / info.url.rsplit("/", 1)[1])).read_frame(0)
        np.testing.assert_array_equal(frame.data, local.data)
        assert frame.detector == local.detector and frame.beam == local.beam


def test_missing_s3_object_does_not_stop_the_others(simulated, s3_client, s3_bucket: str,
                                                    s3_storage_options: dict) -> None:
    geom = read_geom(simulated.geometry_path)
    good = _upload(s3_client, s3_bucket, simulated.files[0], "x/good.cxi")
    missing = f"s3://{s3_bucket}/x/gone.cxi"
    infos = discover([good, missing, f"s3://no-such-bucket-{s3_bucket}/y.cxi"], geom,
                     s3_storage_options)
    assert infos[0].error is None and infos[0].n_frames == 3
    assert infos[1].error and "gone.cxi" in infos[1].error
    assert infos[2].error and "no-such-bucket" in infos[2].error
    assert len(read_block(plan_blocks(infos, 10)[0], geom, s3_storage_options)) == 3
    with pytest.raises(SourceError, match=r"gone\.cxi"):
        from sfxflow.io.sources import Block

        read_block(Block(missing, 0, 1), geom, s3_storage_options)
