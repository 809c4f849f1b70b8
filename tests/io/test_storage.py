"""open_url and friends: local, file://, memory://, S3 (real local moto server), errors, counters."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from sfxflow.errors import InputError, SourceError
from sfxflow.io import storage
from sfxflow.io.storage import (
    join_url,
    object_size,
    open_url,
    read_bytes,
    read_stats,
    redact,
    reset_read_stats,
    shown_url,
    storage_options_from,
)


def test_endpoint_url_with_credentials_is_refused_without_echo():
    with pytest.raises(InputError) as info:
        storage_options_from("http://me:hunter2@127.0.0.1:9000")
    assert "hunter2" not in str(info.value)
    assert "user:password" in str(info.value)


def test_shown_url_hides_userinfo():
    assert shown_url("ftp://me:pw@host/a/b") == "ftp://***@host/a/b"
    assert shown_url("s3://bucket/k@x") == "s3://bucket/k@x"
    assert shown_url("/local/path") == "/local/path"


def test_failed_write_does_not_say_read(tmp_path):
    from sfxflow.io.storage import open_url

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot write"):
        open_url(str(blocker / "out.parquet"), "wb")



def test_local_and_file_urls_count_bytes(tmp_path: Path) -> None:
    p = tmp_path / "a.bin"
    p.write_bytes(bytes(range(256)) * 100)
    reset_read_stats()
    with open_url(str(p)) as fh:
        assert fh.read(10) == bytes(range(10))
    with open_url(f"file://{p}") as fh:
        fh.seek(256)
        assert fh.read(3) == b"\x00\x01\x02"
    assert read_stats().bytes_read >= 13
    assert object_size(str(p)) == 25600
    assert read_bytes(str(p), start=1, end=4) == b"\x01\x02\x03"


def test_write_then_read_memory_url() -> None:
    with open_url("memory://sfx-test/sub/x.bin", "wb") as fh:
        fh.write(b"payload")
    assert open_url("memory://sfx-test/sub/x.bin").read() == b"payload"
    assert object_size("memory://sfx-test/sub/x.bin") == 7


def test_missing_local_and_memory() -> None:
    with pytest.raises(SourceError, match=r"/nonexistent/x\.cbf: no such file"):
        open_url("/nonexistent/x.cbf")
    with pytest.raises(SourceError, match="memory://nothing/here: no such file"):
        open_url("memory://nothing/here")


def test_join_url_and_redact() -> None:
    assert join_url("s3://b/run/master.h5", "../data/d.h5") == "s3://b/data/d.h5"
    assert join_url("/x/y/master.h5", "d.h5") == "/x/y/d.h5"
    assert join_url("s3://b/m.h5", "s3://other/d.h5") == "s3://other/d.h5"
    opts = {"key": "AKIA", "secret": "s", "client_kwargs": {"endpoint_url": "http://h",
                                                            "aws_session_token": "t"}}
    r = redact(opts)
    assert r["key"] == r["secret"] == r["client_kwargs"]["aws_session_token"] == "***"
    assert r["client_kwargs"]["endpoint_url"] == "http://h"
    assert opts["key"] == "AKIA"  # not modified in place


def test_storage_options_from() -> None:
    assert storage_options_from("http://127.0.0.1:9000", profile="lab") == {
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}, "profile": "lab"}
    with pytest.raises(InputError, match=r"ftp://x.*expected http"):
        storage_options_from("ftp://x")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_endpoint_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    opts = storage_options_from(f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(storage, "_retry", storage.RetryPolicy(total_s=1.0, first_delay_s=0.2))
    t0 = time.perf_counter()
    with pytest.raises(SourceError, match=r"s3://bucket/k\.cbf: storage endpoint unreachable"):
        open_url("s3://bucket/k.cbf", storage_options=opts)
    assert time.perf_counter() - t0 < 20


@pytest.mark.s3
def test_s3_small_object_whole_and_large_object_ranged(
    s3_bucket: str, s3_storage_options: dict
) -> None:
    big = bytes(range(256)) * (12 * 4096)  # 12 MiB
    with open_url(f"s3://{s3_bucket}/big.bin", "wb", s3_storage_options) as fh:
        fh.write(big)
    with open_url(f"s3://{s3_bucket}/small.bin", "wb", s3_storage_options) as fh:
        fh.write(b"tiny")
    reset_read_stats()
    assert open_url(f"s3://{s3_bucket}/small.bin", storage_options=s3_storage_options).read() \
        == b"tiny"
    assert read_stats().bytes_read == 4
    reset_read_stats()
    with open_url(f"s3://{s3_bucket}/big.bin", storage_options=s3_storage_options,
                  block_size=1 << 20, whole_object_max_bytes=4 << 20) as fh:
        fh.seek(10 * 2**20 + 5)
        assert fh.read(4) == big[10 * 2**20 + 5 : 10 * 2**20 + 9]
    stats = read_stats()
    assert 0 < stats.bytes_read <= 2 << 20  # one or two 1 MiB blocks, not the 12 MiB object
    reset_read_stats()
    with open_url(f"s3://{s3_bucket}/big.bin", storage_options=s3_storage_options) as fh:
        assert fh.read() == big  # under the 64 MiB default: one whole-object request
    assert read_stats().bytes_read == len(big)


@pytest.mark.s3
def test_s3_missing_object_and_bucket(s3_bucket: str, s3_storage_options: dict) -> None:
    with pytest.raises(SourceError, match=rf"s3://{s3_bucket}/nope\.h5: no such file"):
        open_url(f"s3://{s3_bucket}/nope.h5", storage_options=s3_storage_options)
    with pytest.raises(SourceError, match=r"s3://no-such-bucket-x/a\.cbf"):
        read_bytes("s3://no-such-bucket-x/a.cbf", s3_storage_options)


@pytest.mark.s3
def test_credentials_never_logged(s3_bucket: str, s3_storage_options: dict,
                                  caplog: pytest.LogCaptureFixture) -> None:
    opts = {**s3_storage_options, "key": "testing", "secret": "SECRET-VALUE-123"}
    caplog.set_level("DEBUG")
    with open_url(f"s3://{s3_bucket}/c.bin", "wb", opts) as fh:
        fh.write(b"x" * 10)
    with pytest.raises(SourceError):
        open_url(f"s3://{s3_bucket}/missing.bin", storage_options=opts)
    assert "SECRET-VALUE-123" not in caplog.text
    assert storage.redact(opts)["secret"] == "***"


@pytest.mark.s3
def test_no_credentials(s3_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch,
                        tmp_path: Path) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    opts = {**storage_options_from(s3_server), "default_block_size": 4097}  # fresh instance
    t0 = time.perf_counter()
    with pytest.raises(SourceError, match=rf"s3://{s3_bucket}/a\.cbf: no S3 credentials"):
        open_url(f"s3://{s3_bucket}/a.cbf", storage_options=opts)
    assert time.perf_counter() - t0 < 20


def _client_error(status: int, code: str) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def test_transient_storage_errors_are_told_from_bad_requests() -> None:
    import errno

    from botocore.exceptions import EndpointConnectionError

    assert storage.is_transient(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    assert storage.is_transient(TimeoutError("timed out"))
    assert storage.is_transient(OSError(errno.EIO, "I/O error"))
    assert storage.is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert storage.is_transient(_client_error(503, "ServiceUnavailable"))
    assert not storage.is_transient(_client_error(404, "NoSuchKey"))
    assert not storage.is_transient(_client_error(403, "AccessDenied"))
    # s3fs turns unknown answers into OSError(EIO) with the ClientError as cause
    wrapped = OSError(errno.EIO, "server said no")
    wrapped.__cause__ = _client_error(400, "InvalidRequest")
    assert not storage.is_transient(wrapped)
    wrapped.__cause__ = _client_error(500, "InternalError")
    assert storage.is_transient(wrapped)
    assert not storage.is_transient(FileNotFoundError("gone"))
    assert not storage.is_transient(ValueError("corrupt chunk"))


def test_retrying_waits_out_a_short_outage_and_gives_up_on_a_long_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from sfxflow.errors import StorageUnavailable

    monkeypatch.setattr(storage, "_retry", storage.RetryPolicy(total_s=0.5, first_delay_s=0.05))
    monkeypatch.setattr(storage, "_gave_up_at", 0.0)
    calls = []

    def flaky() -> bytes:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return b"data"

    assert storage.retrying(flaky, "s3://b/k") == b"data" and len(calls) == 3

    def bad() -> bytes:
        calls.append(1)
        raise ValueError("corrupt")

    calls.clear()
    with pytest.raises(ValueError):
        storage.retrying(bad, "s3://b/k")
    assert len(calls) == 1  # bad data is not retried

    def dead() -> bytes:
        raise ConnectionRefusedError("refused")

    t0 = time.monotonic()
    with pytest.raises(StorageUnavailable, match=r"s3://b/k: storage endpoint unreachable"):
        storage.retrying(dead, "s3://b/k")
    assert 0.3 < time.monotonic() - t0 < 2
    t0 = time.monotonic()  # right after giving up, the next call does not wait it out again
    with pytest.raises(StorageUnavailable):
        storage.retrying(dead, "s3://b/k2")
    assert time.monotonic() - t0 < 0.2


def test_a_password_holding_at_signs_is_redacted_whole() -> None:
    # before: redaction stopped at the first '@' while URL parsers split at the last one, so
    # 'pw@x' of the password 's3cr:pw@x' was left in messages, frames.parquet and the log
    text = storage.redact_urls("cannot read http://u:s3cr:pw@x@host:8080/g.geom (404)")
    assert text == "cannot read http://***@host:8080/g.geom (404)"
    assert shown_url("http://u:p@w@host/x?y@z") == "http://***@host/x?y@z"
    assert storage.redact_urls("s3://bucket/key@v2 and ftp://a@b@h/x") == \
        "s3://bucket/key@v2 and ftp://***@h/x"
