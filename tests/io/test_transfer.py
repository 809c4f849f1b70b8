"""Verified parallel transfer against a real local S3 server (moto in server mode)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import zlib
from pathlib import Path

import pytest

from sfxflow.errors import InputError
from sfxflow.io import transfer as tr
from sfxflow.io.transfer import MANIFEST_NAME, expected_etag, file_digest, hashed_key, transfer

pytestmark = pytest.mark.s3

MiB = 2**20
PART = 5 * MiB


@pytest.fixture()
def client(s3_server: str):
    boto3 = pytest.importorskip("boto3")
    return boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    """Six small files in two folders and one 11 MiB file (3 parts of 5 MiB)."""
    rng = __import__("numpy").random.default_rng(7)
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    for i in range(5):
        (root / f"run_{i:04d}.cxi").write_bytes(rng.bytes(1000 + 937 * i))
    (root / "sub" / "geometry.geom").write_bytes(b"clen = 0.1\n")
    (root / "sub" / "big.h5").write_bytes(rng.bytes(11 * MiB + 123))
    return root


def _sizes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size
            for p in root.rglob("*") if p.is_file()}


def _keys(client, bucket: str, prefix: str) -> dict[str, dict]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = o
    return out


def _hook(monkeypatch, event: str, handler) -> None:
    """Register ``handler`` for a botocore ``event`` on the transfer's S3 client (the requests
    s3transfer makes go through it): failures and refusals injected into real requests."""
    real = tr._s3_client

    def client_with_hook(*args, **kwargs):
        client = real(*args, **kwargs)
        client.meta.events.register(event, handler)
        return client

    monkeypatch.setattr(tr, "_s3_client", client_with_hook)


def test_upload_verifies_and_second_run_skips_everything(dataset, s3_bucket, s3_storage_options,
                                                         client) -> None:
    sizes = _sizes(dataset)
    dest = f"s3://{s3_bucket}/raw"
    r = transfer([str(dataset)], dest, storage_options=s3_storage_options, streams=4,
                 part_size=PART)
    assert (r.n_objects, r.n_sent, r.n_skipped, r.n_failed) == (7, 7, 0, 0)
    assert r.bytes_sent == sum(sizes.values())
    keys = _keys(client, s3_bucket, "raw/")
    assert set(keys) == {f"raw/{n}" for n in sizes} | {f"raw/{MANIFEST_NAME}"}
    head = client.head_object(Bucket=s3_bucket, Key="raw/sub/big.h5")
    local = (dataset / "sub" / "big.h5").read_bytes()
    assert head["Metadata"]["sha256"] == hashlib.sha256(local).hexdigest()
    assert head["ETag"].strip('"').endswith("-3")  # multipart, 3 parts of 5 MiB
    assert head["ETag"].strip('"') == file_digest(dataset / "sub" / "big.h5", PART).etag()
    body = client.get_object(Bucket=s3_bucket, Key="raw/sub/big.h5")["Body"].read()
    assert body == local
    # S3's additional checksum went with every body and is kept with the objects
    small = (dataset / "run_0003.cxi").read_bytes()
    got = client.head_object(Bucket=s3_bucket, Key="raw/run_0003.cxi", ChecksumMode="ENABLED")
    assert got["ChecksumCRC32"] == base64.b64encode(zlib.crc32(small).to_bytes(4, "big")).decode()
    assert client.head_object(Bucket=s3_bucket, Key="raw/sub/big.h5",
                              ChecksumMode="ENABLED").get("ChecksumCRC32")
    manifest = json.loads(client.get_object(Bucket=s3_bucket,
                                            Key=f"raw/{MANIFEST_NAME}")["Body"].read())
    assert manifest["objects"]["sub/big.h5"]["sha256"] == head["Metadata"]["sha256"]
    assert manifest["objects"]["run_0003.cxi"]["key"] == "raw/run_0003.cxi"

    again = transfer([str(dataset)], dest, storage_options=s3_storage_options, streams=4,
                     part_size=PART)
    assert (again.n_sent, again.n_skipped, again.bytes_sent) == (0, 7, 0)
    assert again.bytes_skipped == sum(sizes.values())


@pytest.mark.parametrize("keep_metadata", [False, True])
def test_corrupted_object_is_detected_and_resent(dataset, s3_bucket, s3_storage_options, client,
                                                 keep_metadata: bool) -> None:
    dest = f"s3://{s3_bucket}/raw"
    transfer([str(dataset)], dest, storage_options=s3_storage_options, part_size=PART)
    for key in ("raw/run_0002.cxi", "raw/sub/big.h5"):
        good = client.get_object(Bucket=s3_bucket, Key=key)
        bad = bytearray(good["Body"].read())
        bad[len(bad) // 2] ^= 0xFF  # one flipped byte, same size
        meta = good["Metadata"] if keep_metadata else {}
        client.put_object(Bucket=s3_bucket, Key=key, Body=bytes(bad), Metadata=meta)
    r = transfer([str(dataset)], dest, storage_options=s3_storage_options, part_size=PART)
    assert (r.n_sent, r.n_resent, r.n_skipped, r.n_failed) == (2, 2, 5, 0)
    assert r.bytes_sent == (dataset / "run_0002.cxi").stat().st_size + \
        (dataset / "sub" / "big.h5").stat().st_size
    for key, path in (("raw/run_0002.cxi", dataset / "run_0002.cxi"),
                      ("raw/sub/big.h5", dataset / "sub" / "big.h5")):
        assert client.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == path.read_bytes()


class _Stop(Exception):
    pass


@pytest.mark.parametrize("streams", [1, 4])
def test_interrupted_upload_resumes_without_resending(dataset, s3_bucket, s3_storage_options,
                                                      client, streams: int, monkeypatch) -> None:
    for i in range(24):  # enough files that the interruption lands mid-way with 4 streams
        (dataset / f"extra_{i:02d}.bin").write_bytes(os.urandom(500 + i))
    real_put = tr._Transfer._send_file

    def slow_put(self, *args):
        time.sleep(0.02)
        return real_put(self, *args)

    monkeypatch.setattr(tr._Transfer, "_send_file", slow_put)
    sizes = _sizes(dataset)
    dest = f"s3://{s3_bucket}/raw"
    seen: list[str] = []

    def stop_after_two(result) -> None:
        seen.append(result.name)
        if len(seen) == 2:
            raise _Stop

    with pytest.raises(_Stop):
        transfer([str(dataset)], dest, storage_options=s3_storage_options, streams=streams,
                 part_size=PART, on_object_done=stop_after_two)
    present = {k.removeprefix("raw/") for k in _keys(client, s3_bucket, "raw/")} - {MANIFEST_NAME}
    assert 2 <= len(present) < len(sizes)
    monkeypatch.setattr(tr._Transfer, "_send_file", real_put)
    r = transfer([str(dataset)], dest, storage_options=s3_storage_options, streams=streams,
                 part_size=PART)
    assert r.n_skipped == len(present)
    assert r.n_sent == len(sizes) - len(present)
    assert r.bytes_sent == sum(s for n, s in sizes.items() if n not in present)
    assert {x.name for x in r.results if x.action == "skipped"} == present


def test_failure_inside_multipart_upload_leaves_no_object(dataset, s3_bucket, s3_storage_options,
                                                          client, monkeypatch) -> None:
    calls = {"n": 0}

    def reset_part_2(params, **kwargs):
        if params.get("PartNumber") == 2:
            calls["n"] += 1
            raise ConnectionResetError("connection reset by peer (simulated)")

    with monkeypatch.context() as m:
        _hook(m, "before-parameter-build.s3.UploadPart", reset_part_2)
        r = transfer([str(dataset)], f"s3://{s3_bucket}/raw", storage_options=s3_storage_options,
                     streams=2, part_size=PART)
    assert calls["n"] >= 1 and (r.n_sent, r.n_failed) == (6, 1)
    assert "big.h5" in r.failures[0] and "connection reset" in r.failures[0]
    assert "raw/sub/big.h5" not in _keys(client, s3_bucket, "raw/")
    assert not client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")  # aborted
    again = transfer([str(dataset)], f"s3://{s3_bucket}/raw", storage_options=s3_storage_options,
                     part_size=PART)
    assert (again.n_sent, again.n_skipped, again.n_failed) == (1, 6, 0)
    assert again.bytes_sent == (dataset / "sub" / "big.h5").stat().st_size


@pytest.mark.parametrize("name", ["run_0001.cxi", "sub/big.h5"])
def test_file_changing_while_sent_is_detected(dataset, s3_bucket, s3_storage_options, client,
                                              monkeypatch, name: str) -> None:
    """Another process writes into the file after it was hashed, while it is being sent (one
    PUT or multipart): its (inode, size, mtime) changed, so the object, whose bytes and SHA-256
    metadata may disagree, is removed and the file reported."""
    path = dataset / name
    os.utime(path, (1_600_000_000, 1_600_000_000))  # an old mtime: any write changes it
    real = tr._Transfer._send_file
    done = []

    def write_then_send(self, file, *args):
        if not done and Path(file) == path:
            done.append(True)
            with open(path, "r+b") as fh:
                fh.seek(10)
                fh.write(b"X")
        return real(self, file, *args)

    monkeypatch.setattr(tr._Transfer, "_send_file", write_then_send)
    r = transfer([str(path)], f"s3://{s3_bucket}/raw", storage_options=s3_storage_options,
                 part_size=PART)
    assert done and r.n_failed == 1 and "changed while being sent" in r.failures[0]
    assert f"raw/{path.name}" not in _keys(client, s3_bucket, "raw/")
    assert not client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")


def test_download_verifies_restores_and_resumes(dataset, s3_bucket, s3_storage_options, client,
                                                tmp_path) -> None:
    transfer([str(dataset)], f"s3://{s3_bucket}/raw", storage_options=s3_storage_options,
             part_size=PART, hash_prefix=True)
    keys = set(_keys(client, s3_bucket, "raw/"))
    assert f"raw/{hashed_key('', 'sub/big.h5')}" in keys
    assert all(k.split("/")[1] == hashed_key("", k.split("/", 2)[2]).split("/")[0]
               for k in keys if not k.endswith(MANIFEST_NAME))
    out = tmp_path / "restore"
    r = transfer([f"s3://{s3_bucket}/raw/"], str(out), storage_options=s3_storage_options)
    assert (r.n_sent, r.n_failed, r.n_unverified) == (7, 0, 0)
    assert _sizes(out) == _sizes(dataset)
    for name in _sizes(dataset):
        assert (out / name).read_bytes() == (dataset / name).read_bytes()
    # a damaged local copy is fetched again, the good ones are skipped
    with open(out / "run_0004.cxi", "r+b") as fh:
        fh.write(b"\0\0\0")
    again = transfer([f"s3://{s3_bucket}/raw/"], str(out), storage_options=s3_storage_options)
    assert (again.n_sent, again.n_resent, again.n_skipped) == (1, 1, 6)
    assert (out / "run_0004.cxi").read_bytes() == (dataset / "run_0004.cxi").read_bytes()


@pytest.mark.parametrize("keep_metadata", [False, True])
def test_download_detects_corrupted_source(dataset, s3_bucket, s3_storage_options, client,
                                           tmp_path, keep_metadata: bool) -> None:
    transfer([str(dataset)], f"s3://{s3_bucket}/raw", storage_options=s3_storage_options,
             part_size=PART)
    key = "raw/run_0003.cxi"
    good = client.get_object(Bucket=s3_bucket, Key=key)
    bad = bytearray(good["Body"].read())
    bad[10] ^= 0x01
    client.put_object(Bucket=s3_bucket, Key=key, Body=bytes(bad),
                      Metadata=good["Metadata"] if keep_metadata else {})
    out = tmp_path / "restore"
    r = transfer([f"s3://{s3_bucket}/raw"], str(out), storage_options=s3_storage_options)
    assert (r.n_sent, r.n_failed) == (6, 1)
    assert "run_0003.cxi" in r.failures[0] and "SHA-256" in r.failures[0]
    assert not (out / "run_0003.cxi").exists()
    assert not list(out.glob(".*sfxflow-partial"))


def test_download_of_foreign_multipart_object_verifies_by_part_layout(
        tmp_path, s3_bucket, s3_storage_options, client) -> None:
    """An object uploaded by another tool (boto3, 6 MiB parts, no sha256 metadata)."""
    from boto3.s3.transfer import TransferConfig

    src = tmp_path / "foreign.bin"
    src.write_bytes(os.urandom(13 * MiB))
    client.upload_file(str(src), s3_bucket, "other/foreign.bin",
                       Config=TransferConfig(multipart_threshold=5 * MiB,
                                             multipart_chunksize=6 * MiB))
    etag = client.head_object(Bucket=s3_bucket, Key="other/foreign.bin")["ETag"].strip('"')
    assert etag.endswith("-3")
    r = transfer([f"s3://{s3_bucket}/other/foreign.bin"], str(tmp_path / "out"),
                 storage_options=s3_storage_options)
    assert (r.n_sent, r.n_unverified, r.n_failed) == (1, 0, 0)
    assert (tmp_path / "out" / "foreign.bin").read_bytes() == src.read_bytes()


def test_etag_matches_s3_for_single_put(tmp_path, s3_bucket, client) -> None:
    data = os.urandom(3000)
    client.put_object(Bucket=s3_bucket, Key="x", Body=data)
    etag = client.head_object(Bucket=s3_bucket, Key="x")["ETag"].strip('"')
    assert etag == expected_etag([hashlib.md5(data).digest()], multipart=False)


@pytest.mark.parametrize("sources,dest,kwargs,match", [
    (["a"], "b", {}, "expected one side local and the other s3://"),
    (["s3://b/x", "local"], "out", {}, "mix local paths and URLs"),
    (["missing-dir"], "s3://bkt/p", {}, "missing-dir: no such file or folder"),
    (["x"], "s3://bkt/p", {"part_size": MiB}, "part size 1048576 bytes"),
    (["x"], "gs://bkt/p", {}, "only local paths and s3:// URLs"),
    ([], "s3://bkt/p", {}, "no sources"),
])
def test_bad_arguments(sources, dest, kwargs, match, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=match):
        transfer(sources, dest, **kwargs)


def test_file_digest_parts(tmp_path) -> None:
    data = os.urandom(2 * PART + 7)
    p = tmp_path / "f"
    p.write_bytes(data)
    d = file_digest(p, PART)
    assert d.size == len(data) and d.multipart
    assert d.part_md5 == tuple(hashlib.md5(data[i:i + PART]).digest()
                               for i in range(0, len(data), PART))
    exact = tmp_path / "g"
    exact.write_bytes(data[:PART])
    assert len(file_digest(exact, PART).part_md5) == 1
    empty = tmp_path / "e"
    empty.write_bytes(b"")
    assert file_digest(empty, PART).etag() == hashlib.md5(b"").hexdigest()


def test_download_large_single_put_object_in_ranges(tmp_path, s3_bucket, s3_storage_options,
                                                   client, monkeypatch) -> None:
    """A 12 MiB object uploaded in one PUT (ETag = MD5 of all of it) is fetched in 5 MiB ranges
    and verified against the whole-object MD5."""
    data = os.urandom(12 * MiB)
    client.put_object(Bucket=s3_bucket, Key="one/blob.bin", Body=data)
    progress: list[int] = []
    ranges: list[str] = []
    with monkeypatch.context() as m:
        _hook(m, "before-parameter-build.s3.GetObject",
              lambda params, **kw: ranges.append(params["Range"]) if "Range" in params else None)
        r = transfer([f"s3://{s3_bucket}/one/"], str(tmp_path / "o"),
                     storage_options=s3_storage_options, part_size=PART,
                     progress=progress.append)
    assert (r.n_sent, r.n_unverified, r.n_failed) == (1, 0, 0)
    # three ranged GETs of the part size (s3transfer leaves the last range open-ended)
    assert set(ranges) == {f"bytes=0-{PART - 1}", f"bytes={PART}-{2 * PART - 1}",
                           f"bytes={2 * PART}-"}
    assert sum(progress) == len(data)
    assert (tmp_path / "o" / "blob.bin").read_bytes() == data


@pytest.mark.parametrize("verify", ["etag", "reread"])
def test_multipart_upload_verified_by_etag_or_reread(
        dataset, s3_bucket, s3_storage_options, client, verify: str) -> None:
    """A multipart file gives the ETag of its local part MD5s and the SHA-256 metadata (one
    run also reads the object back to verify it); a second run skips it."""
    big = dataset / "sub" / "big.h5"
    dest = f"s3://{s3_bucket}/m-{verify}"
    r = transfer([str(big)], dest, storage_options=s3_storage_options, part_size=PART,
                 verify=verify)
    assert (r.n_sent, r.n_failed) == (1, 0)
    head = client.head_object(Bucket=s3_bucket, Key=f"m-{verify}/big.h5")
    assert head["ETag"].strip('"') == file_digest(big, PART).etag() == r.results[0].etag
    assert head["Metadata"]["sha256"] == hashlib.sha256(big.read_bytes()).hexdigest()
    body = client.get_object(Bucket=s3_bucket, Key=f"m-{verify}/big.h5")["Body"].read()
    assert body == big.read_bytes()
    again = transfer([str(big)], dest, storage_options=s3_storage_options, part_size=PART)
    assert (again.n_sent, again.n_skipped) == (0, 1)


def test_server_refusing_crc32_checksums_is_served_without(dataset, s3_bucket,
                                                           s3_storage_options, client,
                                                           monkeypatch, caplog) -> None:
    """An S3-compatible server that rejects the x-amz-checksum headers: the transfer goes on
    without them (once warned) and still verifies everything by Content-MD5 / ETag."""
    from botocore.exceptions import ClientError

    refused = []

    def picky(params, model, **kwargs):
        if "ChecksumAlgorithm" in params or "ChecksumCRC32" in params:
            refused.append(model.name)
            raise ClientError({"Error": {"Code": "InvalidArgument",
                                         "Message": "x-amz-checksum not supported"}}, model.name)

    _hook(monkeypatch, "before-parameter-build.s3.*", picky)
    r = transfer([str(dataset)], f"s3://{s3_bucket}/raw", storage_options=s3_storage_options,
                 part_size=PART, streams=1)
    assert (r.n_sent, r.n_failed) == (7, 0)
    assert len(refused) == 1  # turned off after the first refusal
    assert "refused the CRC-32 checksum" in caplog.text
    head = client.head_object(Bucket=s3_bucket, Key="raw/sub/big.h5", ChecksumMode="ENABLED")
    assert not head.get("ChecksumCRC32")
    assert head["ETag"].strip('"') == file_digest(dataset / "sub" / "big.h5", PART).etag()


def test_client_settings_from_storage_options() -> None:
    st = tr._client_settings({"key": "AKIDEXAMPLE", "secret": "s3cr3t",
                              "client_kwargs": {"region_name": "eu-west-1"},
                              "config_kwargs": {"read_timeout": 5},
                              "requester_pays": True, "default_block_size": 2**20}, "s3://b")
    assert st.client_kwargs == {"region_name": "eu-west-1", "aws_access_key_id": "AKIDEXAMPLE",
                                "aws_secret_access_key": "s3cr3t"}
    assert st.config_kwargs["read_timeout"] == 5 and st.config_kwargs["connect_timeout"] == 10
    assert st.request_extra == {"RequestPayer": "requester"}
    anon = tr._client_settings({"anon": True, "key": "k", "secret": "s"}, "s3://b")
    assert "aws_access_key_id" not in anon.client_kwargs
    from botocore import UNSIGNED

    assert anon.config_kwargs["signature_version"] is UNSIGNED
    with pytest.raises(InputError, match=r"s3://b: storage option\(s\) \['bogus'\]") as err:
        tr._client_settings({"bogus": 1, "secret": "s3cr3t"}, "s3://b")
    assert "s3cr3t" not in str(err.value)  # credentials never appear in messages
