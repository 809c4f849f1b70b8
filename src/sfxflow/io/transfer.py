"""Verified, resumable, parallel copies between local storage and S3-compatible object storage.

How it works (and why)
----------------------
* **Bytes.** s3transfer, the transfer engine of the AWS command line (``aws s3 cp``), moves
  them: single PUTs up to ``part_size``, multipart uploads of ``part_size`` parts above (the
  part size doubled past S3's 10,000 parts), ranged GETs pinned to the object's ETag, ``streams``
  requests in flight over one thread-safe botocore client, its own retries. The client is built
  from the same s3fs storage options as every other ``s3://`` URL in sfxflow (endpoint, profile,
  credentials or botocore's chain, client and config kwargs, extra request arguments). Unless
  turned off, every body carries S3's additional checksum ``x-amz-checksum-crc32`` (what
  ``aws s3 cp`` sends by default; the server checks it); servers that refuse it are detected and
  the transfer goes on without it. This module is the layer around it:
* **Checksums, end to end.** Each file is hashed once before it is sent (SHA-256 of all of it
  and the MD5 of each part, one sequential pass, one file per core at a time). The object
  carries ``x-amz-meta-sha256`` and ``x-amz-meta-sfxflow-part-size``; after the upload its ETag
  (the MD5 of a single PUT, or ``MD5(part MD5s)-N``: what the server stored) must equal the one
  the local part MD5s give, with the same size and metadata, else it is sent once more and then
  reported. ``verify="reread"`` also reads each object back and compares its SHA-256.
  A file modified while it is sent ((device, inode, size, mtime) differ after the upload from
  before the hashing pass) is reported and its object deleted, so no object with a stale SHA-256
  stays.
* **Resume.** One HEAD per file: an object that already exists with the same size, the same
  ``sha256`` and part-size metadata and the ETag expected for the local bytes is skipped. An
  object overwritten by anything else (other bytes, lost metadata) fails this test and is sent
  again.
* **Downloads** verify too, against the SHA-256 from the manifest or the object's metadata, or
  when there is none (objects written by other tools) against the object's ETag with its part
  layout (from our metadata or a ``HEAD ?partNumber=1``). Bytes are checked after they are on
  disk, before the file is renamed into place. An existing local file that verifies is skipped.
* **Manifest.** ``_sfxflow_transfer.json`` under the destination prefix maps every original
  relative name to its key, size, SHA-256 and ETag. With ``hash_prefix`` the keys start with a
  4-hex-digit hash of the name (``prefix/3fa2/run_0001.cxi``), the S3 advice of Poon et al.
  (2017) for spreading requests over partitions; downloads use the manifest to restore names.

Credentials are never logged (only bucket/key names and the endpoint are).
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import copy
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sfxflow.errors import InputError, SfxflowError, SourceError
from sfxflow.io.storage import is_local, local_path

__all__ = [
    "DEFAULT_PART_SIZE",
    "MANIFEST_NAME",
    "Digest",
    "IntegrityError",
    "ObjectResult",
    "RequestError",
    "TransferReport",
    "expected_etag",
    "file_digest",
    "hashed_key",
    "transfer",
]

log = logging.getLogger(__name__)

MiB = 2**20
DEFAULT_PART_SIZE = 16 * MiB
MIN_PART_SIZE = 5 * MiB  # S3's minimum for all parts but the last
MANIFEST_NAME = "_sfxflow_transfer.json"
META_SHA256 = "sha256"
META_PART_SIZE = "sfxflow-part-size"
_READ_CHUNK = 8 * MiB  # sequential hashing passes read this much at a time
#: answers of servers that do not know S3's additional checksums (x-amz-checksum-crc32)
_CHECKSUM_REFUSED = frozenset({"InvalidArgument", "InvalidRequest", "NotImplemented",
                               "BadRequest"})
_NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound"})
#: options of aiobotocore's AioConfig that botocore's Config does not know
_AIO_ONLY_CONFIG = frozenset({"connector_args", "http_session_cls"})


class IntegrityError(SfxflowError):
    """Bytes at the destination differ from the source (a checksum did not match)."""


class RequestError(OSError):
    """An S3 request failed; the message names the request, the object and the server's code.

    ``code`` is the S3 error code (``"NoSuchKey"``, ``"BadDigest"``, ``"404"``...) or the
    botocore exception name for failures without an HTTP answer.
    """

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------------------
# checksums


@dataclass(frozen=True)
class Digest:
    """Checksums of one file: size, SHA-256 and the MD5 of each ``part_size`` part."""

    size: int
    sha256: str
    part_size: int
    part_md5: tuple[bytes, ...]

    @property
    def multipart(self) -> bool:
        """True when the file is sent as a multipart upload (more than one part)."""
        return self.size > self.part_size

    def etag(self) -> str:
        """The ETag S3 computes for these bytes uploaded with this layout."""
        return expected_etag(self.part_md5, self.multipart)


def expected_etag(part_md5: Sequence[bytes], multipart: bool) -> str:
    """S3's ETag: the MD5 (hex) of a single PUT, or ``MD5(concatenated part MD5s)-N``.

    >>> expected_etag([hashlib.md5(b"abc").digest()], multipart=False)
    '900150983cd24fb0d6963f7d28e17f72'
    >>> expected_etag([hashlib.md5(b"a").digest(), hashlib.md5(b"b").digest()], True)[-2:]
    '-2'
    """
    if not multipart:
        return part_md5[0].hex() if part_md5 else hashlib.md5(b"").hexdigest()
    return f"{hashlib.md5(b''.join(part_md5)).hexdigest()}-{len(part_md5)}"


def _part_size_for(size: int, part_size: int) -> int:
    """The part size s3transfer uses for a file of ``size`` bytes: ``part_size``, doubled until
    the file needs at most 10,000 parts (S3's limit).

    >>> _part_size_for(10 * 2**20, 8 * 2**20) == 8 * 2**20, _part_size_for(10**12, 8 * 2**20)
    (True, 134217728)
    """
    from s3transfer.utils import ChunksizeAdjuster

    return int(ChunksizeAdjuster().adjust_chunksize(part_size, size))


def file_digest(path: str | os.PathLike[str], part_size: int,
                progress: Callable[[int], None] | None = None, *, md5: bool = True) -> Digest:
    """Read a local file once, to its end: SHA-256 of all of it and (unless ``md5`` is false:
    ``part_md5`` is then empty) the MD5 of each part.

    One reusable buffer, no copies; hashlib releases the GIL on large buffers, so passes over
    several files run in parallel.

    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile() as f:
    ...     _ = f.write(b"abc"); f.flush()
    ...     d = file_digest(f.name, 5 * 2**20)
    >>> d.sha256[:12], d.etag()
    ('ba7816bf8f01', '900150983cd24fb0d6963f7d28e17f72')
    """
    sha = hashlib.sha256()
    md5s: list[bytes] = []
    buf = bytearray(min(_READ_CHUNK, part_size))
    view = memoryview(buf)
    size = 0
    with open(path, "rb", buffering=0) as fh:
        while True:
            part_md5 = hashlib.md5() if md5 else None
            got = 0
            while got < part_size:
                n = fh.readinto(view[:min(len(buf), part_size - got)])
                if not n:
                    break
                chunk = view[:n]
                sha.update(chunk)
                if part_md5 is not None:
                    part_md5.update(chunk)
                got += n
                if progress is not None:
                    progress(n)
            if got == 0 and md5s:
                break
            if part_md5 is not None:
                md5s.append(part_md5.digest())
            size += got
            if got < part_size:
                break
    return Digest(size, sha.hexdigest(), part_size, tuple(md5s))


def _strip_etag(etag: str | None) -> str:
    return (etag or "").strip('"').lower()


def _is_md5_etag(etag: str) -> bool:
    head = etag.split("-", 1)[0]
    return len(head) == 32 and all(c in "0123456789abcdef" for c in head)


def _metadata(head: Mapping[str, Any]) -> dict[str, str]:
    """The user metadata of a HEAD answer, keys lower-cased (servers differ in case)."""
    return {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


# ----------------------------------------------------------------------------------------------
# reports


@dataclass(frozen=True)
class ObjectResult:
    """What happened to one file: ``sent``, ``resent`` (destination was wrong), ``skipped``
    (already there and verified) or ``failed``."""

    name: str
    src: str
    dst: str
    size: int
    action: str
    sha256: str = ""
    etag: str = ""
    error: str = ""
    verified: bool = True


@dataclass
class TransferReport:
    """Counts and throughput of one :func:`transfer` call."""

    results: list[ObjectResult] = field(default_factory=list)
    wall_s: float = 0.0

    def _count(self, *actions: str) -> int:
        return sum(1 for r in self.results if r.action in actions)

    def _bytes(self, *actions: str) -> int:
        return sum(r.size for r in self.results if r.action in actions)

    @property
    def n_objects(self) -> int:
        """Files considered."""
        return len(self.results)

    @property
    def n_sent(self) -> int:
        """Files whose bytes were transferred (including re-sent ones)."""
        return self._count("sent", "resent")

    @property
    def n_resent(self) -> int:
        """Files whose destination existed but did not verify, and were sent again."""
        return self._count("resent")

    @property
    def n_skipped(self) -> int:
        """Files already present and verified."""
        return self._count("skipped")

    @property
    def n_failed(self) -> int:
        """Files that could not be transferred and verified."""
        return self._count("failed")

    @property
    def n_unverified(self) -> int:
        """Downloaded files for which no checksum was available."""
        return sum(1 for r in self.results if r.action in ("sent", "resent") and not r.verified)

    @property
    def bytes_sent(self) -> int:
        """Bytes moved over the network (file sizes of sent files)."""
        return self._bytes("sent", "resent")

    @property
    def bytes_skipped(self) -> int:
        """Bytes not moved because the destination already verified."""
        return self._bytes("skipped")

    @property
    def gbit_per_s(self) -> float:
        """Throughput of the bytes sent over the wall time, in Gbit/s (10^9 bit/s)."""
        return self.bytes_sent * 8 / self.wall_s / 1e9 if self.wall_s > 0 else 0.0

    @property
    def failures(self) -> list[str]:
        """One line per failed file."""
        return [f"{r.src}: {r.error}" for r in self.results if r.action == "failed"]


# ----------------------------------------------------------------------------------------------
# planning: which files go where


@dataclass(frozen=True)
class _Job:
    name: str  # relative name (manifest key)
    src: str  # local path or bucket/key
    dst: str  # bucket/key or local path
    size: int


def _split_s3(url: str) -> tuple[str, str]:
    rest = url.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise InputError(f"{url}: no bucket in the S3 URL; expected s3://BUCKET/PREFIX")
    return bucket, key


def hashed_key(prefix: str, name: str) -> str:
    """Key for ``name`` under ``prefix`` behind a 4-hex-digit hash of the name.

    >>> hashed_key("runs/r1", "data/run_0001.cxi")
    'runs/r1/844d/data/run_0001.cxi'
    """
    h = hashlib.sha256(name.encode("utf-8")).hexdigest()[:4]
    return "/".join(p for p in (prefix.strip("/"), h, name) if p)


def _plain_key(prefix: str, name: str) -> str:
    return "/".join(p for p in (prefix.strip("/"), name) if p)


def _local_files(sources: Iterable[str]) -> list[tuple[str, Path]]:
    """(relative name, path) of every file: a file by its name, a folder by its contents."""
    out: list[tuple[str, Path]] = []
    for src in sources:
        path = local_path(src)
        if path.is_file():
            out.append((path.name, path))
        elif path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file():
                    out.append((p.relative_to(path).as_posix(), p))
        else:
            raise InputError(f"{src}: no such file or folder; expected local files or folders")
    names = [n for n, _ in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"several sources map to the same name(s) {dupes[:3]}; expected "
                         "distinct file names")
    return out


# ----------------------------------------------------------------------------------------------
# the S3 client


#: s3fs options that change how requests are made, and how they map onto botocore
_CREDENTIAL_OPTIONS = {"key": "aws_access_key_id", "username": "aws_access_key_id",
                       "secret": "aws_secret_access_key", "password": "aws_secret_access_key",
                       "token": "aws_session_token"}
#: s3fs options about its own caches and file objects: no effect on single requests
_IGNORED_OPTIONS = frozenset({
    "default_block_size", "default_fill_cache", "default_cache_type", "cache_regions",
    "use_listings_cache", "listings_expiry_time", "max_paths", "skip_instance_cache",
    "asynchronous", "loop", "max_concurrency", "fixed_upload_size", "version_aware",
    "local_expiry_check"})
#: botocore settings of the transfer client unless config_kwargs say otherwise (awscli's)
_CLIENT_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 10,
    "read_timeout": 60,
    "retries": {"max_attempts": 5, "mode": "standard"},
    # checksums are ours: Content-MD5 (+ CRC-32) on every body, ETags checked
    "request_checksum_calculation": "when_required",
    # no SHA-256 of every body for the SigV4 signature on plain-http endpoints (botocore
    # already skips it on https): the signed Content-MD5 header, verified by the server, and
    # the ETag check carry the body's integrity; a third hash of each byte adds nothing
    "s3": {"payload_signing_enabled": False},
}


@dataclass(frozen=True)
class _ClientSettings:
    """How to build the botocore client and what to add to every request."""

    session_kwargs: dict[str, Any]
    client_kwargs: dict[str, Any]
    config_kwargs: dict[str, Any]
    request_extra: dict[str, Any]


def _client_settings(options: Mapping[str, Any], url: str) -> _ClientSettings:
    """Interpret s3fs storage options (the ones sfxflow passes everywhere) for botocore.

    >>> st = _client_settings({"client_kwargs": {"endpoint_url": "http://h:9000"},
    ...                        "profile": "lab"}, "s3://b/p")
    >>> st.client_kwargs, st.session_kwargs, st.config_kwargs["retries"]["max_attempts"]
    ({'endpoint_url': 'http://h:9000'}, {'profile': 'lab'}, 5)
    """
    opts = dict(options)
    client = dict(opts.pop("client_kwargs", None) or {})
    for name, botocore_name in _CREDENTIAL_OPTIONS.items():
        value = opts.pop(name, None)
        if value is not None:  # as in s3fs: explicit values win over client_kwargs
            client[botocore_name] = value
    if opts.get("endpoint_url") is not None:
        client["endpoint_url"] = opts.pop("endpoint_url")
    opts.pop("endpoint_url", None)
    if "use_ssl" in opts:
        client.setdefault("use_ssl", bool(opts.pop("use_ssl")))
    config = copy.deepcopy({**_CLIENT_DEFAULTS, **(opts.pop("config_kwargs", None) or {})})
    for name in _AIO_ONLY_CONFIG:
        config.pop(name, None)
    if opts.pop("anon", False):
        from botocore import UNSIGNED

        config["signature_version"] = UNSIGNED
        for name in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
            client.pop(name, None)
    extra = dict(opts.pop("s3_additional_kwargs", None) or {})
    if opts.pop("requester_pays", False):
        extra["RequestPayer"] = "requester"
    session = {k: opts.pop(k) for k in ("profile",) if opts.get(k)}
    opts.pop("profile", None)
    unknown = sorted(k for k in opts if k not in _IGNORED_OPTIONS)
    if unknown:
        raise InputError(f"{url}: storage option(s) {unknown} not supported by transfer; "
                         "expected endpoint/credential/profile/client_kwargs/config_kwargs "
                         "options")
    return _ClientSettings(session, client, config, extra)


def _s3_client(settings: _ClientSettings, max_connections: int) -> Any:
    """A thread-safe synchronous botocore S3 client; its pool holds ``max_connections``.

    Credentials come from the settings when given, otherwise from botocore's chain
    (environment, profile, instance role); they are never logged.
    """
    import botocore.session
    from botocore.config import Config

    config = copy.deepcopy(settings.config_kwargs)  # botocore edits the retries dict in place
    config["max_pool_connections"] = max(int(config.get("max_pool_connections", 10)),
                                         max_connections)
    session = botocore.session.Session(**settings.session_kwargs)
    return session.create_client("s3", config=Config(**config), **settings.client_kwargs)


# ----------------------------------------------------------------------------------------------
# the transfer


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a file is modified or replaced: (device, inode, size, mtime_ns)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _changed(path: Path, detail: str) -> SourceError:
    return SourceError(str(path), f"file changed while being sent ({detail})")


class _Progress:
    """s3transfer subscriber passing byte counts on to ``transfer``'s ``progress`` (s3transfer
    calls only the ``on_*`` methods a subscriber has)."""

    def __init__(self, report: Callable[[int], None]) -> None:
        self.report = report

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        self.report(bytes_transferred)


class _Transfer:
    """Our checks around s3transfer's :class:`~s3transfer.manager.TransferManager`, which moves
    the bytes (part layout, parallel part requests, retries, ranged downloads)."""

    def __init__(self, client: Any, streams: int, part_size: int, verify: str,
                 progress: Callable[[int], None] | None,
                 extra_args: Mapping[str, Any] | None = None, crc32: bool = True) -> None:
        from s3transfer.manager import TransferConfig, TransferManager

        self.client = client
        self.crc32 = crc32  # ask for S3 additional checksums (CRC-32, server-checked)
        self.part_size = part_size
        self.verify = verify
        self._progress = progress
        self._lock = threading.Lock()
        self._extra = dict(extra_args or {})
        self._extra_by_op: dict[str, dict[str, Any]] = {}
        # files up to part_size go in one PUT, larger ones in part_size parts: the layout our
        # ETag check expects (s3transfer raises the part size itself past 10,000 parts)
        config = TransferConfig(multipart_threshold=part_size + 1, multipart_chunksize=part_size,
                                max_request_concurrency=streams,
                                max_submission_concurrency=streams)
        self.manager = TransferManager(client, config)
        self._upload_extra = {k: v for k, v in self._extra.items()
                              if k in TransferManager.ALLOWED_UPLOAD_ARGS}
        self._download_extra = {k: v for k, v in self._extra.items()
                                if k in TransferManager.ALLOWED_DOWNLOAD_ARGS}
        # whole-file hashing passes one per core at a time, so the first file goes out early
        self.hashing = threading.Semaphore(max(1, min(streams, os.cpu_count() or 1)))

    def close(self) -> None:
        self.manager.shutdown()

    def progress(self, n: int) -> None:
        if self._progress is not None:
            with self._lock:
                self._progress(n)

    def _subscribers(self) -> list[Any]:
        return [_Progress(self.progress)] if self._progress is not None else []

    def _extra_for(self, op: str) -> dict[str, Any]:
        """The extra request arguments of the storage options (``s3_additional_kwargs``,
        requester pays) that operation ``op`` accepts."""
        if not self._extra:
            return {}
        if op not in self._extra_by_op:
            model = self.client.meta.service_model
            name = model.operation_names[[n.lower() for n in model.operation_names]
                                         .index(op.replace("_", ""))]
            members = model.operation_model(name).input_shape.members
            self._extra_by_op[op] = {k: v for k, v in self._extra.items() if k in members}
        return self._extra_by_op[op]

    @staticmethod
    def _request_error(exc: BaseException, op: str, bucket: str, key: str) -> RequestError:
        """botocore's errors as :class:`RequestError` (an ``OSError``) naming the object."""
        from botocore.exceptions import ClientError

        where = f"s3://{bucket}/{key}"
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", "") or
                       exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            return RequestError(f"{where}: {op} failed: {code} {err.get('Message', '')}".strip(),
                                code)
        return RequestError(f"{where}: {op} failed: {exc}", type(exc).__name__)

    def s3(self, op: str, **kwargs: Any) -> Any:
        """One request; botocore's errors become :class:`RequestError` (an ``OSError``)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, op)(**self._extra_for(op), **kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._request_error(exc, op, kwargs.get("Bucket", ""),
                                      kwargs.get("Key", "")) from None

    def head(self, bucket: str, key: str, **extra: Any) -> dict[str, Any] | None:
        try:
            return dict(self.s3("head_object", Bucket=bucket, Key=key, **extra))
        except RequestError as exc:
            if exc.code in _NOT_FOUND:
                return None
            raise

    # -- upload -----------------------------------------------------------------------------

    def _remote_matches(self, head: Mapping[str, Any] | None, digest: Digest) -> bool:
        if head is None:
            return False
        meta = _metadata(head)
        return (int(head.get("ContentLength", -1)) == digest.size
                and meta.get(META_SHA256) == digest.sha256
                and meta.get(META_PART_SIZE) == str(digest.part_size)
                and _strip_etag(head.get("ETag")) == digest.etag())

    def _send_file(self, path: Path, bucket: str, key: str, digest: Digest) -> None:
        """s3transfer uploads the file, declaring its SHA-256 and part size as metadata (and
        asking for server-checked CRC-32s unless the server refused them before)."""
        from botocore.exceptions import BotoCoreError, ClientError

        meta = {META_SHA256: digest.sha256, META_PART_SIZE: str(digest.part_size)}
        while True:
            crc32 = self.crc32
            extra = {**self._upload_extra, "Metadata": meta}
            if crc32:
                extra["ChecksumAlgorithm"] = "CRC32"
            future = self.manager.upload(str(path), bucket, key, extra_args=extra,
                                         subscribers=self._subscribers())
            try:
                future.result()
                return
            except (ClientError, BotoCoreError) as exc:
                error = self._request_error(exc, "upload", bucket, key)
            if not (crc32 and error.code in _CHECKSUM_REFUSED):
                raise error
            with self._lock:
                if self.crc32:
                    self.crc32 = False
                    log.warning("s3://%s/%s: the server refused the CRC-32 checksum header (%s): "
                                "sending without it (ETags and SHA-256 are still checked)",
                                bucket, key, error.code)

    def upload(self, job: _Job) -> ObjectResult:
        path = Path(job.src)
        bucket, key = job.dst.split("/", 1)
        st = os.stat(path)
        part_size = _part_size_for(st.st_size, self.part_size)
        head = self.head(bucket, key)
        with self.hashing:
            digest = file_digest(path, part_size)
        if _stat_key(os.stat(path)) != _stat_key(st) or digest.size != st.st_size:
            raise _changed(path, "size/mtime/inode differ after hashing")
        if self._remote_matches(head, digest):
            log.debug("s3://%s/%s: present and verified, skipped", bucket, key)
            self.progress(digest.size)
            return ObjectResult(job.name, str(path), f"s3://{job.dst}", digest.size, "skipped",
                                digest.sha256, digest.etag())
        action = "sent"
        if head is not None:
            action = "resent"
            log.warning("s3://%s/%s exists but does not match %s (size %s vs %d, checksums "
                        "differ or missing): sending again", bucket, key, path,
                        head.get("ContentLength"), st.st_size)
        problem = ""
        for attempt in (1, 2):
            self._send_file(path, bucket, key, digest)
            if _stat_key(os.stat(path)) != _stat_key(st):
                # the object holds bytes other than those hashed: no object with a stale
                # SHA-256 may stay
                self._delete(bucket, key)
                raise _changed(path, "size/mtime/inode differ after the upload")
            head = self.head(bucket, key)
            if self._remote_matches(head, digest):
                problem = self._reread_problem(bucket, key, digest) \
                    if self.verify == "reread" else ""
            else:
                got = None if head is None else (_strip_etag(head.get("ETag")),
                                                 head.get("ContentLength"))
                problem = f"object after upload is (ETag, size) {got}, expected " \
                          f"({digest.etag()}, {digest.size})"
            if not problem:
                return ObjectResult(job.name, str(path), f"s3://{job.dst}", digest.size, action,
                                    digest.sha256, digest.etag())
            log.warning("s3://%s/%s: %s (attempt %d)", bucket, key, problem, attempt)
        self._delete(bucket, key)
        raise IntegrityError(f"s3://{bucket}/{key}: {problem}")

    def _delete(self, bucket: str, key: str) -> None:
        try:
            self.s3("delete_object", Bucket=bucket, Key=key)
        except OSError as exc:  # the reason for deleting matters more
            log.warning("s3://%s/%s: could not delete the bad object: %s", bucket, key, exc)

    def _reread_problem(self, bucket: str, key: str, digest: Digest) -> str:
        sha = hashlib.sha256()
        body = self.s3("get_object", Bucket=bucket, Key=key)["Body"]
        try:
            for chunk in body.iter_chunks(chunk_size=MiB):
                sha.update(chunk)
        finally:
            body.close()
        if sha.hexdigest() != digest.sha256:
            return f"object read back has SHA-256 {sha.hexdigest()}, file has {digest.sha256}"
        return ""

    # -- download ---------------------------------------------------------------------------

    def _etag_part_size(self, bucket: str, key: str, head: Mapping[str, Any]) -> int | None:
        """Part size of the object's ETag layout; None when the ETag is not MD5-based."""
        meta = _metadata(head)
        etag = _strip_etag(head.get("ETag"))
        size = int(head["ContentLength"])
        if not _is_md5_etag(etag):
            return None
        if "-" not in etag:
            return max(size, 1)
        if meta.get(META_PART_SIZE, "").isdigit():
            return int(meta[META_PART_SIZE])
        first = self.head(bucket, key, PartNumber=1)
        if first is not None and int(first.get("ContentLength", 0)) > 0:
            return int(first["ContentLength"])
        return None

    @staticmethod
    def _local_problem(path: Path, size: int, etag: str, part_size: int | None,
                       sha256: str | None) -> str | None:
        """None when the local file verifies; else what is wrong. With a SHA-256 to compare
        with, one SHA-256 pass; else the MD5s of the ETag's parts."""
        if not path.is_file():
            return "missing"
        if path.stat().st_size != size:
            return f"size {path.stat().st_size} != {size}"
        if sha256:
            got = file_digest(path, max(size, 1), md5=False).sha256
            return None if got == sha256 else f"SHA-256 {got} != expected {sha256}"
        if part_size:
            digest = file_digest(path, part_size)
            if digest.etag() != etag:
                return f"ETag {digest.etag()} != object's {etag}"
        return None

    def _fetch(self, bucket: str, key: str, path: Path) -> None:
        """s3transfer downloads the object into ``path`` (ranged GETs pinned to its ETag)."""
        from botocore.exceptions import BotoCoreError, ClientError

        future = self.manager.download(bucket, key, str(path), extra_args=self._download_extra,
                                       subscribers=self._subscribers())
        try:
            future.result()
        except (ClientError, BotoCoreError) as exc:
            raise self._request_error(exc, "download", bucket, key) from None

    def download(self, job: _Job, manifest_sha: str | None) -> ObjectResult:
        bucket, key = job.src.split("/", 1)
        src_url = f"s3://{job.src}"
        head = self.head(bucket, key)
        if head is None:
            raise SourceError(src_url, "no such object")
        size = int(head["ContentLength"])
        etag = _strip_etag(head.get("ETag"))
        meta_sha = _metadata(head).get(META_SHA256)
        if manifest_sha and meta_sha and manifest_sha != meta_sha:
            raise IntegrityError(f"{src_url}: metadata SHA-256 {meta_sha} differs from the "
                                 f"transfer manifest's {manifest_sha}")
        sha = manifest_sha or meta_sha
        part_size = None if sha else self._etag_part_size(bucket, key, head)
        verified = bool(sha or part_size)
        dest = Path(job.dst)
        if dest.exists():
            problem = self._local_problem(dest, size, etag, part_size, sha)
            if problem is None and verified:
                self.progress(size)
                return ObjectResult(job.name, src_url, str(dest), size, "skipped", sha or "",
                                    etag)
            action = "resent"
            log.warning("%s exists but %s: downloading again", dest, problem or "unverifiable")
        else:
            action = "sent"
        if not verified:
            log.warning("%s: no checksum available (no sha256 metadata, no manifest entry, "
                        "non-MD5 ETag %s): downloaded UNVERIFIED", src_url, etag)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.sfxflow-partial")
        problem = None
        for attempt in (1, 2):
            self._fetch(bucket, key, tmp)
            problem = self._local_problem(tmp, size, etag, part_size, sha) if verified else None
            if problem is None:
                os.replace(tmp, dest)
                return ObjectResult(job.name, src_url, str(dest), size, action, sha or "", etag,
                                    verified=verified)
            log.warning("%s: downloaded bytes do not verify: %s (attempt %d)", src_url, problem,
                        attempt)
        tmp.unlink(missing_ok=True)
        raise IntegrityError(f"{src_url}: downloaded bytes do not verify twice: {problem}")

    # -- listing and the manifest -------------------------------------------------------------

    def manifest_entries(self, bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
        key = _plain_key(prefix, MANIFEST_NAME)
        try:
            body = self.s3("get_object", Bucket=bucket, Key=key)["Body"]
        except RequestError as exc:
            if exc.code in _NOT_FOUND:
                return {}
            raise
        try:
            raw = body.read()
        finally:
            body.close()
        try:
            data = json.loads(raw)
            objects = data["objects"]
            if not isinstance(objects, dict):
                raise TypeError("objects is not a mapping")
        except (ValueError, KeyError, TypeError) as exc:
            raise SourceError(f"s3://{bucket}/{key}", f"not a transfer manifest ({exc})") from None
        return objects

    def write_manifest(self, bucket: str, prefix: str, results: Sequence[ObjectResult]) -> None:
        done = [r for r in results if r.action in ("sent", "resent", "skipped")]
        if not done:
            return
        entries = self.manifest_entries(bucket, prefix)
        for r in done:
            key = r.dst.split("://", 1)[1].split("/", 1)[1]
            entries[r.name] = {"key": key, "size": r.size, "sha256": r.sha256, "etag": r.etag}
        body = json.dumps({"format": "sfxflow-transfer-manifest", "version": 1,
                           "objects": dict(sorted(entries.items()))}, indent=1).encode()
        self.s3("put_object", Bucket=bucket, Key=_plain_key(prefix, MANIFEST_NAME), Body=body,
                ContentType="application/json", ContentMD5=_b64(hashlib.md5(body).digest()))

    def list_objects(self, bucket: str, prefix: str) -> list[dict[str, Any]]:
        """Every object under ``prefix/`` (the whole bucket for an empty prefix)."""
        out: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": f"{prefix}/" if prefix else ""}
        while True:
            page = self.s3("list_objects_v2", **kwargs)
            out.extend(page.get("Contents") or [])
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return out
            kwargs["ContinuationToken"] = token


def _download_jobs(engine: _Transfer, sources: Sequence[str], dest: Path
                   ) -> list[tuple[_Job, str | None]]:
    jobs: list[tuple[_Job, str | None]] = []
    for src in sources:
        bucket, key = _split_s3(src)
        if key and not key.endswith("/"):
            head = engine.head(bucket, key)
            if head is not None:  # a single object
                name = key.rsplit("/", 1)[-1]
                jobs.append((_Job(name, f"{bucket}/{key}", str(dest / name),
                                  int(head["ContentLength"])), None))
                continue
        prefix = key.rstrip("/")
        manifest = engine.manifest_entries(bucket, prefix)
        if manifest:
            for name, entry in manifest.items():
                jobs.append((_Job(name, f"{bucket}/{entry['key']}", str(dest / name),
                                  int(entry.get("size", 0))), entry.get("sha256") or None))
            continue
        listing = engine.list_objects(bucket, prefix)
        base = f"{prefix}/" if prefix else ""
        for obj in sorted(listing, key=lambda o: o["Key"]):
            name = obj["Key"][len(base):]
            if name == MANIFEST_NAME or obj["Key"].endswith("/"):  # folder markers
                continue
            jobs.append((_Job(name, f"{bucket}/{obj['Key']}", str(dest / name),
                              int(obj.get("Size", 0))), None))
        if not listing:
            raise SourceError(src, "no such object or prefix (nothing listed)")
    return jobs


def _check_arguments(sources: Sequence[str], dest: str, streams: int, part_size: int,
                     verify: str) -> bool:
    """An :class:`InputError` for arguments :func:`transfer` cannot take; whether it uploads."""
    if not sources:
        raise InputError("no sources given; expected at least one file, folder or s3:// URL")
    if streams < 1:
        raise InputError(f"streams = {streams}; expected >= 1")
    if part_size < MIN_PART_SIZE:
        raise InputError(f"part size {part_size} bytes; expected >= {MIN_PART_SIZE} (5 MiB, "
                         "S3's minimum)")
    if verify not in ("etag", "reread"):
        raise InputError(f"verify = {verify!r}; expected 'etag' or 'reread'")
    remote_src = [not is_local(s) for s in sources]
    if any(remote_src) and not all(remote_src):
        raise InputError("sources mix local paths and URLs; expected all local or all s3://")
    for url in [*sources, dest]:
        if not is_local(url) and not url.startswith("s3://"):
            raise InputError(f"{url}: only local paths and s3:// URLs are supported")
    upload = not remote_src[0]
    if upload == is_local(dest):
        raise InputError(f"{sources[0]} -> {dest}: expected one side local and the other "
                         "s3://")
    return upload


def _result_of(fut: cf.Future[ObjectResult], job: _Job) -> ObjectResult:
    """A file's result; a file whose transfer raised is a failed result naming the error."""
    try:
        return fut.result()
    except (OSError, SfxflowError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.error("%s: %s", job.src, text)
        return ObjectResult(job.name, job.src, job.dst, job.size, "failed", error=text)


def _upload_jobs(sources: Sequence[str], bucket: str, prefix: str, hash_prefix: bool
                 ) -> list[tuple[_Job, str | None]]:
    key_of = hashed_key if hash_prefix else _plain_key
    return [(_Job(name, str(path), f"{bucket}/{key_of(prefix, name)}", path.stat().st_size),
             None) for name, path in _local_files(sources)]


def _write_manifest(engine: _Transfer, bucket: str, prefix: str, results: list[ObjectResult],
                    completed: bool) -> None:
    """The upload's manifest; when the transfer was stopped by an error, a manifest that
    cannot be written is logged, not raised (that would hide the error that stopped it)."""
    try:
        engine.write_manifest(bucket, prefix, results)
    except (OSError, SfxflowError) as exc:
        if completed:
            raise
        log.error("s3://%s: could not write the transfer manifest: %s",
                  _plain_key(f"{bucket}/{prefix}", MANIFEST_NAME), exc)


def _run_jobs(files: cf.ThreadPoolExecutor, engine: _Transfer, jobs: list[tuple[_Job, str | None]],
              upload: bool, futures: dict[cf.Future[ObjectResult], _Job], report: TransferReport,
              on_object_done: Callable[[ObjectResult], None] | None) -> None:
    """Submit every job to ``files`` (its future recorded in ``futures``) and add each result
    to ``report`` as it comes."""
    for job, sha in jobs:
        fut = (files.submit(engine.upload, job) if upload
               else files.submit(engine.download, job, sha))
        futures[fut] = job
    for fut in cf.as_completed(futures):
        result = _result_of(fut, futures[fut])
        report.results.append(result)
        if on_object_done is not None:
            on_object_done(result)


def _announce(jobs: list[tuple[_Job, str | None]], upload: bool, streams: int,
              on_start: Callable[[int, int], None] | None) -> None:
    """Log the number of files and bytes to move, and tell ``on_start``."""
    total = sum(job.size for job, _ in jobs)
    log.info("%s %d file(s), %.3f GB, %d streams", "uploading" if upload else "downloading",
             len(jobs), total / 1e9, streams)
    if on_start is not None:
        on_start(len(jobs), total)


def _record_finished(futures: Mapping[cf.Future[ObjectResult], _Job],
                     report: TransferReport) -> None:
    """Add to ``report`` the results of finished files it does not list yet."""
    for fut in futures:
        if fut.done() and not fut.cancelled() and fut.exception() is None \
                and fut.result() not in report.results:
            report.results.append(fut.result())


def transfer(
    sources: Sequence[str],
    dest: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    streams: int = 8,
    part_size: int = DEFAULT_PART_SIZE,
    hash_prefix: bool = False,
    verify: str = "etag",
    crc32: bool = True,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_object_done: Callable[[ObjectResult], None] | None = None,
) -> TransferReport:
    """Copy local files/folders to an ``s3://`` prefix, or ``s3://`` objects/prefixes to a local
    folder, ``streams`` requests at a time, verifying every object and skipping verified ones.

    Parameters
    ----------
    sources : local paths (files or folders: a folder's contents keep their relative names) or
        ``s3://bucket/key`` objects / ``s3://bucket/prefix/`` prefixes (all one kind).
    dest : ``s3://bucket/prefix`` (upload) or a local folder (download).
    storage_options : s3fs options (endpoint, profile); credentials come from the environment.
    streams : concurrent requests (threads).
    part_size : multipart part size in bytes (>= 5 MiB); files up to it go in one PUT.
    hash_prefix : upload under ``prefix/<4 hex digits of hash(name)>/name``; see module doc.
    verify : ``"etag"`` (ETag + metadata check) or ``"reread"`` (also read each upload back).
    crc32 : also send S3's additional checksum (``x-amz-checksum-crc32``, checked by the server
        and stored with the object; turned off by itself if the server refuses it).
    progress : called (from worker threads, serialised) with byte counts as data are moved or
        found already present and verified (for a progress bar).
    on_start : called once with (number of files, total bytes) before any data move.
    on_object_done : called in the calling thread after each file; an exception raised there
        stops the transfer (files in flight finish, nothing else starts).

    Returns
    -------
    TransferReport
        Per-file results; files that failed are listed, not raised (check ``n_failed``).

    Raises
    ------
    InputError : bad arguments, missing sources, neither side (or both) on S3.
    """
    upload = _check_arguments(sources, dest, streams, part_size, verify)
    s3_url = dest if upload else sources[0]
    settings = _client_settings(storage_options or {}, s3_url)
    t0 = time.perf_counter()
    client = _s3_client(settings, 2 * streams)  # part requests + HEADs of the file threads
    engine = _Transfer(client, streams, part_size, verify, progress, settings.request_extra,
                       crc32=crc32)
    report = TransferReport()
    files = cf.ThreadPoolExecutor(streams, thread_name_prefix="sfxflow-file")
    futures: dict[cf.Future[ObjectResult], _Job] = {}
    bucket = prefix = ""
    jobs: list[tuple[_Job, str | None]]
    completed = False
    try:
        if upload:
            bucket, prefix = _split_s3(dest)
            jobs = _upload_jobs(sources, bucket, prefix, hash_prefix)
        else:
            jobs = _download_jobs(engine, sources, local_path(dest))
        _announce(jobs, upload, streams, on_start)
        _run_jobs(files, engine, jobs, upload, futures, report, on_object_done)
        completed = True
    finally:
        files.shutdown(wait=True, cancel_futures=True)
        engine.close()
        # record what finished, also when interrupted: later downloads find names/checksums
        _record_finished(futures, report)
        report.wall_s = time.perf_counter() - t0
        if upload:
            _write_manifest(engine, bucket, prefix, report.results, completed)
    log.info("%d sent (%d re-sent), %d skipped, %d failed; %.3f GB in %.2f s = %.3f Gbit/s",
             report.n_sent, report.n_resent, report.n_skipped, report.n_failed,
             report.bytes_sent / 1e9, report.wall_s, report.gbit_per_s)
    return report
