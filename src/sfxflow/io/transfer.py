"""Verified, resumable, parallel copies between local storage and S3-compatible object storage.

How it works (and why)
----------------------
* **Client.** Requests go through one thread-safe *synchronous* botocore client, shared by
  the worker threads with a connection pool as large as they need: the design of
  ``aws s3 cp`` (s3transfer). It is built from the same s3fs storage options as every other
  ``s3://`` URL in sfxflow (endpoint, profile, credentials or botocore's chain, client and
  config kwargs, extra request arguments) but without s3fs itself: each request is hashed,
  signed and sent by the thread that issues it, so they run truly in parallel instead of
  queueing on s3fs's single event-loop thread (and importing s3fs/aiohttp is not needed).
  Low-level calls (not a file-like writer) let us choose the part boundaries, which the
  verification below needs.
* **Multipart.** Files up to ``part_size`` bytes are sent with one PUT; larger ones as a
  multipart upload of ``part_size`` parts (raised for very large files to stay within S3's
  10,000 parts). Parts of all files share one pool of ``streams`` threads, so one big file and
  many small ones both keep ``streams`` requests in flight; at most ``streams`` parts are held
  in memory.
* **Checksums, end to end, with as few passes over the bytes as possible.** The object carries
  ``x-amz-meta-sha256`` (SHA-256 of the file) and ``x-amz-meta-sfxflow-part-size``; every PUT
  carries the ``Content-MD5`` of its bytes (the server rejects bytes that arrive different,
  which triggers a re-send of that part) and the ETag returned (the MD5 of what the server
  stored) is compared with ours; so is the final ETag (MD5 for one PUT, ``MD5(part MD5s)-N``
  for multipart, taken from the PUT / CompleteMultipartUpload answer: no extra HEAD). Unless
  turned off, every body also carries S3's additional checksum ``x-amz-checksum-crc32``
  (what ``aws s3 cp`` sends by default; the server checks it and keeps it with the object):
  it costs little (7 GB/s) and spares servers that otherwise compute a whole-object
  CRC64NVME at completion (S3 since 2025, moto) that work. Servers that refuse the header
  are detected and the transfer goes on without it.

  - A file sent in one PUT is read **once**: its SHA-256 and MD5 are computed on the very bytes
    that are sent, in the worker thread that sends them.
  - A multipart upload must declare its metadata (the SHA-256) when it is created, before any
    part is sent. A file of up to one part per stream (160 MiB with the defaults; at most two
    such files held at once) is read into memory once, its SHA-256 and part MD5s computed
    while it is read, and its parts are sent from memory. A larger file is first hashed in one
    sequential pass (SHA-256 plus a CRC-32 per part, about 1.5 GB/s with SHA extensions); each
    part is then read again (from the page cache), checked against its CRC-32, and its MD5
    computed in the worker thread that sends it, in parallel with the other parts. Whole-file
    passes run one per core at a time, so the first file's parts go out early.
  - A file modified while it is sent is detected: its (device, inode, size, mtime) changed
    during the read or before the last part was sent, or a part read again differs from the
    hashing pass; a multipart upload is then aborted, so no object with a stale SHA-256
    appears.
  - ``verify="reread"`` also reads each object back (metadata and SHA-256 of the bytes).
* **Resume.** One HEAD per file: an object that already exists with the same size, the same
  ``sha256`` and part-size metadata and the ETag expected for the local bytes is skipped. An
  object overwritten by anything else (other bytes, lost metadata) fails this test and is sent
  again.
* **Downloads** verify too, against the SHA-256 from the manifest or the object's metadata, or
  when there is none (objects written by other tools) against the object's ETag with its part
  layout (from our metadata or a ``HEAD ?partNumber=1``). Ranged GETs carry ``If-Match`` with
  the object's ETag, so an object replaced during the download cannot be mixed with the old one.
  Bytes are checked after they are on disk, before the file is renamed into place. An
  existing local file that verifies is skipped.
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
import zlib
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
MAX_PARTS = 10_000
MANIFEST_NAME = "_sfxflow_transfer.json"
META_SHA256 = "sha256"
META_PART_SIZE = "sfxflow-part-size"
_READ_CHUNK = 8 * MiB  # sequential hashing passes read this much at a time
_PART_ATTEMPTS = 3  # sends of one part / one small object whose bytes arrive damaged
_DIGEST_ERRORS = frozenset({"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch",
                            "XAmzContentChecksumMismatch"})
#: answers of servers that do not know S3's additional checksums (x-amz-checksum-crc32)
_CHECKSUM_REFUSED = frozenset({"InvalidArgument", "InvalidRequest", "NotImplemented",
                               "BadRequest"})
_NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound"})
#: multipart files up to this many parts per stream are read into memory once (SHA-256 while
#: reading, parts sent from memory); larger ones are hashed first and their parts read again
IN_MEMORY_PARTS_PER_STREAM = 1
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
    """``part_size``, raised (to whole MiB) when the file would need more than 10,000 parts."""
    if size <= part_size * MAX_PARTS:
        return part_size
    return -(-size // (MAX_PARTS * MiB)) * MiB


@dataclass
class _Hashes:
    """Result of one sequential pass over a file (see :func:`_hash_pass`)."""

    size: int
    sha256: str
    part_md5: list[bytes]
    part_crc32: list[int]


def _hash_pass(path: str | os.PathLike[str], part_size: int, *, md5: bool, crc32: bool,
               progress: Callable[[int], None] | None = None) -> _Hashes:
    """Read a file once, to its end: SHA-256 of all of it, optionally MD5 and CRC-32 per part.

    One reusable buffer, no copies; hashlib and zlib release the GIL on large buffers, so
    passes over several files run in parallel.
    """
    sha = hashlib.sha256()
    md5s: list[bytes] = []
    crcs: list[int] = []
    buf = bytearray(min(_READ_CHUNK, part_size))
    view = memoryview(buf)
    size = 0
    with open(path, "rb", buffering=0) as fh:
        while True:
            part_md5 = hashlib.md5() if md5 else None
            crc = 0
            left = part_size
            got = 0
            while left > 0:
                n = fh.readinto(view[:min(len(buf), left)])
                if not n:
                    break
                chunk = view[:n]
                sha.update(chunk)
                if part_md5 is not None:
                    part_md5.update(chunk)
                if crc32:
                    crc = zlib.crc32(chunk, crc)
                got += n
                left -= n
                if progress is not None:
                    progress(n)
            if got == 0 and (md5s or crcs):
                break
            if part_md5 is not None:
                md5s.append(part_md5.digest())
            if crc32:
                crcs.append(crc)
            size += got
            if got < part_size:
                break
    return _Hashes(size, sha.hexdigest(), md5s, crcs)


def file_digest(path: str | os.PathLike[str], part_size: int,
                progress: Callable[[int], None] | None = None) -> Digest:
    """Read a local file once: SHA-256 of all of it and MD5 of each part.

    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile() as f:
    ...     _ = f.write(b"abc"); f.flush()
    ...     d = file_digest(f.name, 5 * 2**20)
    >>> d.sha256[:12], d.etag()
    ('ba7816bf8f01', '900150983cd24fb0d6963f7d28e17f72')
    """
    h = _hash_pass(path, part_size, md5=True, crc32=False, progress=progress)
    return Digest(size=h.size, sha256=h.sha256, part_size=part_size, part_md5=tuple(h.part_md5))


def _strip_etag(etag: str | None) -> str:
    return (etag or "").strip('"').lower()


def _is_md5_etag(etag: str) -> bool:
    head = etag.split("-", 1)[0]
    return len(head) == 32 and all(c in "0123456789abcdef" for c in head)


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _crc32_b64(crc: int) -> str:
    """S3's ``x-amz-checksum-crc32`` form of a CRC-32: 4 bytes big-endian, base64.

    >>> _crc32_b64(zlib.crc32(b"abc"))
    'NSRBwg=='
    """
    return _b64(crc.to_bytes(4, "big"))


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


def _pread_into(fd: int, offset: int, buf: bytearray) -> int:
    """Fill ``buf`` from ``offset``; returns the bytes read (fewer only at the end of the
    file)."""
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [view[got:]], offset + got)
        if not n:
            break
        got += n
    return got


class _Buffers:
    """Recycled read buffers, by exact size (full parts, files of equal sizes): a buffer is
    reused instead of fresh memory being mapped and zeroed for every part, which costs about
    6 ms of CPU per 16 MiB. At most ``max_bytes`` are kept idle."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._free: dict[int, list[bytearray]] = {}
        self._held = 0
        self._lock = threading.Lock()

    def get(self, size: int) -> bytearray:
        with self._lock:
            free = self._free.get(size)
            if free:
                self._held -= size
                return free.pop()
        return bytearray(size)

    def put(self, buf: bytearray) -> None:
        with self._lock:
            if self._held + len(buf) <= self.max_bytes:
                self._free.setdefault(len(buf), []).append(buf)
                self._held += len(buf)


@dataclass
class _Source:
    """One local file being uploaded: its layout and what is known about its bytes."""

    path: Path
    size: int
    part_size: int
    stat: tuple[int, int, int, int]  # _stat_key when its upload started
    sha256: str = ""
    part_crc32: list[int] = field(default_factory=list)  # from the hashing pass
    part_md5: list[bytes | None] = field(default_factory=list)
    blobs: list[bytearray | None] | None = None  # the parts, when read into memory
    crc32: bool = False  # its multipart upload was created with ChecksumAlgorithm CRC32

    @property
    def n_parts(self) -> int:
        return max(1, -(-self.size // self.part_size))

    def changed(self, detail: str) -> SourceError:
        return SourceError(str(self.path), f"file changed while being sent ({detail})")

    def check_unchanged(self, st: os.stat_result, when: str) -> None:
        if _stat_key(st) != self.stat:
            raise self.changed(f"size/mtime/inode differ {when}")

    def digest(self) -> Digest:
        md5s = tuple(m for m in self.part_md5 if m is not None)
        if len(md5s) != self.n_parts:
            raise RuntimeError(f"{self.path}: {len(md5s)} part MD5s for {self.n_parts} parts")
        return Digest(self.size, self.sha256, self.part_size, md5s)


class _Budget:
    """Bytes of file data that may be held in memory at once (blocking acquire)."""

    def __init__(self, n_bytes: int) -> None:
        self.free = n_bytes
        self._cond = threading.Condition()

    def acquire(self, n_bytes: int) -> None:
        with self._cond:
            while self.free < n_bytes:
                self._cond.wait()
            self.free -= n_bytes

    def release(self, n_bytes: int) -> None:
        with self._cond:
            self.free += n_bytes
            self._cond.notify_all()


class _Transfer:
    def __init__(self, client: Any, streams: int, part_size: int, verify: str,
                 progress: Callable[[int], None] | None,
                 extra_args: Mapping[str, Any] | None = None, crc32: bool = True) -> None:
        self.client = client
        self.crc32 = crc32  # send S3 additional checksums (CRC-32 per part, server-checked)
        self.parts = cf.ThreadPoolExecutor(streams, thread_name_prefix="sfxflow-part")
        self.part_size = part_size
        self.verify = verify
        self._progress = progress
        self._lock = threading.Lock()
        self._extra = dict(extra_args or {})
        self._extra_by_op: dict[str, dict[str, Any]] = {}
        # multipart files read into memory: each up to one part per stream, two such at once
        self.in_memory_bytes = int(IN_MEMORY_PARTS_PER_STREAM * streams * part_size)
        self.budget = _Budget(2 * self.in_memory_bytes)
        # whole-file passes (read + SHA-256) one per core: the first file's parts go out while
        # the next is hashed, instead of every file thread hashing at once while the
        # network waits
        self.hashing = threading.Semaphore(max(1, min(streams, os.cpu_count() or 1)))
        self.buffers = _Buffers(streams * part_size)

    def progress(self, n: int) -> None:
        if self._progress is not None:
            with self._lock:
                self._progress(n)

    def _extra_for(self, op: str) -> dict[str, Any]:
        """The extra request arguments of the storage options (``s3_additional_kwargs``,
        requester pays) that operation ``op`` accepts."""
        if op not in self._extra_by_op:
            if self._extra:
                model = self.client.meta.service_model
                name = model.operation_names[[n.lower() for n in model.operation_names]
                                             .index(op.replace("_", ""))]
                members = model.operation_model(name).input_shape.members
                self._extra_by_op[op] = {k: v for k, v in self._extra.items() if k in members}
            else:
                self._extra_by_op[op] = {}
        return self._extra_by_op[op]

    def s3(self, op: str, **kwargs: Any) -> Any:
        """One request; botocore's errors become :class:`RequestError` (an ``OSError``)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, op)(**self._extra_for(op), **kwargs)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", "") or
                       exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            where = f"s3://{kwargs.get('Bucket', '')}/{kwargs.get('Key', '')}"
            raise RequestError(f"{where}: {op} failed: {code} {err.get('Message', '')}".strip(),
                               code) from None
        except BotoCoreError as exc:
            where = f"s3://{kwargs.get('Bucket', '')}/{kwargs.get('Key', '')}"
            raise RequestError(f"{where}: {op} failed: {exc}", type(exc).__name__) from exc

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
        meta = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
        return (int(head.get("ContentLength", -1)) == digest.size
                and meta.get(META_SHA256) == digest.sha256
                and meta.get(META_PART_SIZE) == str(digest.part_size)
                and _strip_etag(head.get("ETag")) == digest.etag())

    def _checksum_refused(self, exc: RequestError, what: str) -> bool:
        """True (once, and CRC-32 checksums are off from then on) when ``exc`` looks like a
        server that does not accept S3's additional checksums."""
        if not self.crc32 or exc.code not in _CHECKSUM_REFUSED:
            return False
        with self._lock:
            self.crc32 = False
        log.warning("%s: the server refused the CRC-32 checksum header (%s): sending without "
                    "it (Content-MD5 and ETags are still checked)", what, exc.code)
        return True

    def _send(self, op: str, data: bytes | bytearray, md5: bytes, crc: int | None,
              **kwargs: Any) -> str:
        """PUT ``data`` (a whole object or one part) with its Content-MD5 (and CRC-32, which the
        server checks too); re-sends when the server says the bytes arrived different, or
        stored bytes with another MD5. Returns the stored ETag."""
        what = f"s3://{kwargs['Bucket']}/{kwargs['Key']}" + (
            f" part {kwargs['PartNumber']}" if "PartNumber" in kwargs else "")
        for attempt in range(1, _PART_ATTEMPTS + 1):
            if crc is not None:
                kwargs["ChecksumCRC32"] = _crc32_b64(crc)
                kwargs["ChecksumAlgorithm"] = "CRC32"
            try:
                resp = self.s3(op, Body=data, ContentMD5=_b64(md5), **kwargs)
            except RequestError as exc:
                if op == "put_object" and crc is not None and \
                        self._checksum_refused(exc, what):
                    crc = None
                    kwargs.pop("ChecksumCRC32", None)
                    kwargs.pop("ChecksumAlgorithm", None)
                    continue
                if exc.code not in _DIGEST_ERRORS or attempt == _PART_ATTEMPTS:
                    raise
                log.warning("%s: bytes arrived damaged (%s), sending again (attempt %d)", what,
                            exc.code, attempt)
                continue
            got = _strip_etag(resp.get("ETag"))
            if got == md5.hex() or (op == "put_object" and not _is_md5_etag(got)):
                return str(resp.get("ETag", ""))
            if attempt == _PART_ATTEMPTS:
                raise IntegrityError(f"{what}: stored with MD5 {got}, sent {md5.hex()}")
            log.warning("%s: stored with MD5 %s, sent %s: sending again (attempt %d)", what, got,
                        md5.hex(), attempt)
        raise AssertionError("unreachable")

    def _put_single(self, path: Path, bucket: str, key: str, src: _Source) -> Digest:
        """Read the whole file once, hash what was read, send it in one PUT (worker thread)."""
        data = self.buffers.get(src.size)
        try:
            with open(path, "rb", buffering=0) as fh:
                fd = fh.fileno()
                src.check_unchanged(os.fstat(fd), "before reading")
                got = _pread_into(fd, 0, data)
                if got != src.size or os.pread(fd, 1, src.size):  # shorter, or grew
                    raise src.changed(f"read {got} bytes or more, expected {src.size}")
                src.check_unchanged(os.fstat(fd), "while reading")
            md5 = hashlib.md5(data).digest()
            sha = hashlib.sha256(data).hexdigest()
            if src.sha256 and sha != src.sha256:  # hashed before (resume check): must match
                raise src.changed("SHA-256 differs from the first read")
            meta = {META_SHA256: sha, META_PART_SIZE: str(src.part_size)}
            crc = zlib.crc32(data) if self.crc32 else None
            self._send("put_object", data, md5, crc, Bucket=bucket, Key=key, Metadata=meta)
        finally:
            self.buffers.put(data)
        self.progress(src.size)
        src.sha256 = sha
        src.part_md5 = [md5]
        return src.digest()

    def _read_parts(self, path: Path, src: _Source) -> None:
        """Read the whole file into ``src.blobs`` (one buffer per part), with its SHA-256 and
        the parts' MD5s: the only pass over a file that fits in memory. (Hashing the parts
        here, as they are read, lets them go out as soon as the upload exists; measured
        faster than leaving the MD5s to the sending threads.)"""
        sha = hashlib.sha256()
        md5s: list[bytes | None] = []
        blobs: list[bytearray] = []
        try:
            with open(path, "rb", buffering=0) as fh:
                fd = fh.fileno()
                src.check_unchanged(os.fstat(fd), "before reading")
                for index in range(src.n_parts):
                    start = index * src.part_size
                    data = self.buffers.get(min(src.part_size, src.size - start))
                    blobs.append(data)
                    got = _pread_into(fd, start, data)
                    if got != len(data):
                        raise src.changed(f"part {index + 1}: read {got} bytes of {len(data)}")
                    sha.update(data)
                    md5s.append(hashlib.md5(data).digest())
                if os.pread(fd, 1, src.size):
                    raise src.changed(f"longer than {src.size} bytes")
                src.check_unchanged(os.fstat(fd), "while reading")
        except BaseException:
            for data in blobs:
                self.buffers.put(data)
            raise
        src.sha256 = sha.hexdigest()
        src.part_md5 = md5s
        src.blobs = list(blobs)

    def _put_part(self, path: Path, bucket: str, key: str, upload_id: str, index: int,
                  src: _Source) -> dict[str, Any]:
        """Send part ``index``: from memory (hashed while read), or read again, checked
        against the hashing pass and its MD5 computed here, in parallel with the other
        parts."""
        start = index * src.part_size
        length = min(src.part_size, src.size - start)
        in_memory = src.blobs is not None
        if src.blobs is not None:
            with self._lock:
                data = src.blobs[index]
                src.blobs[index] = None
            if data is None:
                raise RuntimeError(f"{path}: part {index + 1} taken twice")
        else:
            data = self.buffers.get(length)
            with open(path, "rb", buffering=0) as fh:
                got = _pread_into(fh.fileno(), start, data)
            if got != length or zlib.crc32(data) != src.part_crc32[index]:
                self.buffers.put(data)
                raise src.changed(f"part {index + 1} differs from the hashing pass")
        try:
            md5 = src.part_md5[index] or hashlib.md5(data).digest()
            crc = None
            if src.crc32:
                crc = src.part_crc32[index] if src.part_crc32 else zlib.crc32(data)
            etag = self._send("upload_part", data, md5, crc, Bucket=bucket, Key=key,
                              UploadId=upload_id, PartNumber=index + 1)
        finally:
            self.buffers.put(data)
            if in_memory:
                self.budget.release(length)
        src.part_md5[index] = md5
        self.progress(length)
        part = {"PartNumber": index + 1, "ETag": etag}
        if crc is not None:
            part["ChecksumCRC32"] = _crc32_b64(crc)
        return part

    def _create_upload(self, bucket: str, key: str, src: _Source) -> str:
        meta = {META_SHA256: src.sha256, META_PART_SIZE: str(src.part_size)}
        src.crc32 = self.crc32
        extra = {"ChecksumAlgorithm": "CRC32"} if src.crc32 else {}
        try:
            return str(self.s3("create_multipart_upload", Bucket=bucket, Key=key, Metadata=meta,
                               **extra)["UploadId"])
        except RequestError as exc:
            if not src.crc32 or not self._checksum_refused(exc, f"s3://{bucket}/{key}"):
                raise
        src.crc32 = False
        return str(self.s3("create_multipart_upload", Bucket=bucket, Key=key,
                           Metadata=meta)["UploadId"])

    def _put_multipart(self, path: Path, bucket: str, key: str, src: _Source) -> str:
        """Read or hash the file (unless hashed already), then send the parts in parallel;
        returns the final ETag."""
        in_memory = not src.part_crc32 and src.size <= self.in_memory_bytes
        if in_memory:
            self.budget.acquire(src.size)
            try:
                with self.hashing:
                    self._read_parts(path, src)
            except BaseException:
                self.budget.release(src.size)
                raise
        elif not src.part_crc32:
            with self.hashing:
                h = _hash_pass(path, src.part_size, md5=False, crc32=True)
            if h.size != src.size:
                raise src.changed(f"hashed {h.size} bytes, expected {src.size}")
            src.sha256, src.part_crc32 = h.sha256, h.part_crc32
            src.part_md5 = [None] * src.n_parts
        futures: list[cf.Future[dict[str, Any]]] = []
        upload_id = ""
        try:
            upload_id = self._create_upload(bucket, key, src)
            for i in range(src.n_parts):
                futures.append(self.parts.submit(self._put_part, path, bucket, key, upload_id,
                                                 i, src))
            parts = [f.result() for f in futures]
            src.check_unchanged(os.stat(path), "between the first read and the last part")
            resp = self.s3("complete_multipart_upload", Bucket=bucket, Key=key,
                           UploadId=upload_id, MultipartUpload={"Parts": parts})
        except BaseException:
            for f in futures:
                f.cancel()
            cf.wait(futures)
            if upload_id:
                try:
                    self.s3("abort_multipart_upload", Bucket=bucket, Key=key,
                            UploadId=upload_id)
                except OSError as exc:  # the original error matters more
                    log.warning("s3://%s/%s: could not abort multipart upload: %s", bucket,
                                key, exc)
            raise
        finally:
            if src.blobs is not None:  # parts never sent (cancelled, or failed before)
                left = [b for b in src.blobs if b is not None]
                src.blobs = None
                for data in left:
                    self.buffers.put(data)
                self.budget.release(sum(len(b) for b in left))
        return _strip_etag(resp.get("ETag"))

    def _reread_sha256(self, bucket: str, key: str) -> str:
        sha = hashlib.sha256()
        body = self.s3("get_object", Bucket=bucket, Key=key)["Body"]
        try:
            for chunk in body.iter_chunks(chunk_size=MiB):
                sha.update(chunk)
        finally:
            body.close()
        return sha.hexdigest()

    def upload(self, job: _Job) -> ObjectResult:
        path = Path(job.src)
        bucket, key = job.dst.split("/", 1)
        st = os.stat(path)
        part_size = _part_size_for(st.st_size, self.part_size)
        head = self.head(bucket, key)
        action = "sent"
        known: _Hashes | None = None
        if head is not None:
            if int(head.get("ContentLength", -1)) == st.st_size:
                with self.hashing:
                    known = _hash_pass(path, part_size, md5=True, crc32=True)
                digest = Digest(known.size, known.sha256, part_size, tuple(known.part_md5))
                if self._remote_matches(head, digest) and _stat_key(os.stat(path)) == \
                        _stat_key(st):
                    log.debug("s3://%s/%s: present and verified, skipped", bucket, key)
                    self.progress(digest.size)
                    return ObjectResult(job.name, str(path), f"s3://{job.dst}", digest.size,
                                        "skipped", digest.sha256, digest.etag())
            action = "resent"
            log.warning("s3://%s/%s exists but does not match %s (size %s vs %d, checksums "
                        "differ or missing): sending again", bucket, key, path,
                        head.get("ContentLength"), st.st_size)
        problem = ""
        for attempt in (1, 2):
            src = _Source(path, st.st_size, part_size, _stat_key(st))
            if known is not None and known.size == src.size:
                src.sha256 = known.sha256
                src.part_crc32 = list(known.part_crc32)
                src.part_md5 = list(known.part_md5)
            if src.size <= part_size:
                digest = self.parts.submit(self._put_single, path, bucket, key, src).result()
                problem = ""
            else:
                got = self._put_multipart(path, bucket, key, src)
                digest = src.digest()
                problem = "" if got == digest.etag() else \
                    f"object after upload has ETag {got}, expected {digest.etag()}"
            if not problem and self.verify == "reread":
                problem = self._reread_problem(bucket, key, digest)
            if not problem:
                return ObjectResult(job.name, str(path), f"s3://{job.dst}", digest.size, action,
                                    digest.sha256, digest.etag())
            log.warning("s3://%s/%s: %s (attempt %d)", bucket, key, problem, attempt)
        raise IntegrityError(f"s3://{bucket}/{key}: {problem}")

    def _reread_problem(self, bucket: str, key: str, digest: Digest) -> str:
        head = self.head(bucket, key)
        if not self._remote_matches(head, digest):
            got = None if head is None else (_strip_etag(head.get("ETag")),
                                             head.get("ContentLength"))
            return f"object after upload is (ETag, size) {got}, expected {digest.etag()}"
        sha = self._reread_sha256(bucket, key)
        if sha != digest.sha256:
            return f"object read back has SHA-256 {sha}, file has {digest.sha256}"
        return ""

    # -- download ---------------------------------------------------------------------------

    def _etag_part_size(self, bucket: str, key: str, head: Mapping[str, Any]) -> int | None:
        """Part size of the object's ETag layout; None when the ETag is not MD5-based."""
        meta = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
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
            got = _hash_pass(path, max(size, 1), md5=False, crc32=False).sha256
            return None if got == sha256 else f"SHA-256 {got} != expected {sha256}"
        if part_size:
            digest = file_digest(path, part_size)
            if digest.etag() != etag:
                return f"ETag {digest.etag()} != object's {etag}"
        return None

    def _get_range(self, bucket: str, key: str, fd: int, start: int, end: int,
                   if_match: str | None = None) -> None:
        extra = {"IfMatch": if_match} if if_match else {}
        body = self.s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}",
                       **extra)["Body"]
        try:
            data = body.read()
        finally:
            body.close()
        if len(data) != end - start:
            raise SourceError(f"s3://{bucket}/{key}", f"short read at {start}: {len(data)} bytes")
        view = memoryview(data)
        done = 0
        while done < len(data):
            done += os.pwrite(fd, view[done:], start + done)
        self.progress(len(data))

    def download(self, job: _Job, manifest_sha: str | None) -> ObjectResult:
        bucket, key = job.src.split("/", 1)
        src_url = f"s3://{job.src}"
        head = self.head(bucket, key)
        if head is None:
            raise SourceError(src_url, "no such object")
        size = int(head["ContentLength"])
        etag = _strip_etag(head.get("ETag"))
        meta = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
        meta_sha = meta.get(META_SHA256)
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
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                step = self.part_size  # ranges need not follow the ETag's part layout
                futures = [self.parts.submit(self._get_range, bucket, key, fd, s,
                                             min(s + step, size), head.get("ETag"))
                           for s in range(0, size, step)]
                try:
                    for f in futures:
                        f.result()
                except BaseException:
                    for f in futures:
                        f.cancel()
                    cf.wait(futures)
                    raise
            finally:
                os.close(fd)
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
            key_of = hashed_key if hash_prefix else _plain_key
            jobs = [(_Job(name, str(path), f"{bucket}/{key_of(prefix, name)}",
                          path.stat().st_size), None) for name, path in _local_files(sources)]
        else:
            jobs = _download_jobs(engine, sources, local_path(dest))
        total = sum(job.size for job, _ in jobs)
        log.info("%s %d file(s), %.3f GB, %d streams", "uploading" if upload else "downloading",
                 len(jobs), total / 1e9, streams)
        if on_start is not None:
            on_start(len(jobs), total)
        for job, sha in jobs:
            fut = (files.submit(engine.upload, job) if upload
                   else files.submit(engine.download, job, sha))
            futures[fut] = job
        for fut in cf.as_completed(futures):
            job = futures[fut]
            try:
                result = fut.result()
            except (OSError, SfxflowError) as exc:
                text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                log.error("%s: %s", job.src, text)
                result = ObjectResult(job.name, job.src, job.dst, job.size, "failed",
                                      error=text)
            report.results.append(result)
            if on_object_done is not None:
                on_object_done(result)
        completed = True
    finally:
        files.shutdown(wait=True, cancel_futures=True)
        engine.parts.shutdown(wait=True, cancel_futures=True)
        # record what finished, also when interrupted: later downloads find names/checksums
        for fut in futures:
            if fut.done() and not fut.cancelled() and fut.exception() is None \
                    and fut.result() not in report.results:
                report.results.append(fut.result())
        report.wall_s = time.perf_counter() - t0
        if upload:
            try:
                engine.write_manifest(bucket, prefix, report.results)
            except (OSError, SfxflowError) as exc:
                if completed:
                    raise
                # do not hide the error that stopped the transfer
                log.error("s3://%s: could not write the transfer manifest: %s",
                          _plain_key(f"{bucket}/{prefix}", MANIFEST_NAME), exc)
    log.info("%d sent (%d re-sent), %d skipped, %d failed; %.3f GB in %.2f s = %.3f Gbit/s",
             report.n_sent, report.n_resent, report.n_skipped, report.n_failed,
             report.bytes_sent / 1e9, report.wall_s, report.gbit_per_s)
    return report
