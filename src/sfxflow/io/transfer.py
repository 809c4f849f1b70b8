"""Verified, resumable, parallel copies between local storage and S3-compatible object storage.

How it works (and why)
----------------------
* **Library.** Requests go through s3fs's botocore client (``fs.call_s3``): s3fs is already
  sfxflow's object-storage layer (same endpoint, profile, IAM-role and environment handling as
  every other ``s3://`` URL) and, unlike its file-like writer, the low-level calls let us choose
  the part boundaries, which the verification below needs. boto3's transfer manager would be an
  extra dependency whose part layout we would have to mirror anyway.
* **Multipart.** Files up to ``part_size`` bytes are sent with one PUT; larger ones as a
  multipart upload of ``part_size`` parts (raised for very large files to stay within S3's
  10,000 parts). Parts of all files share one pool of ``streams`` threads, so one big file and
  many small ones both keep ``streams`` requests in flight.
* **Checksums, end to end.** The source is hashed before sending: SHA-256 of the whole file and
  MD5 of every part. Each part is sent with its ``Content-MD5`` (S3 rejects a part that arrives
  different) and the part's ETag returned by the server (the MD5 of what it stored) is compared
  with ours. The object carries ``x-amz-meta-sha256`` and ``x-amz-meta-sfxflow-part-size``.
  After the upload the object's ETag (MD5 for one PUT, ``MD5(part MD5s)-N`` for multipart) is
  compared with the value computed locally; ``verify="reread"`` also reads the object back and
  compares its SHA-256. A source file that changes while it is sent is detected (part MD5s
  differ between the hashing pass and the sending pass).
* **Resume.** An object that already exists with the same size, the same ``sha256`` metadata and
  the ETag expected for the local bytes is skipped. An object overwritten by anything else
  (other bytes, lost metadata) fails this test and is sent again.
* **Downloads** verify too: the object's ETag (with its part layout, from our metadata or from a
  ``HEAD ?partNumber=1``) and its SHA-256 (from the metadata or the transfer manifest) are
  checked on the downloaded bytes before the file is renamed into place. An existing local file
  that verifies is skipped.
* **Manifest.** ``_sfxflow_transfer.json`` under the destination prefix maps every original
  relative name to its key, size, SHA-256 and ETag. With ``hash_prefix`` the keys start with a
  4-hex-digit hash of the name (``prefix/3fa2/run_0001.cxi``), the S3 advice of Poon et al.
  (2017) for spreading requests over partitions; downloads use the manifest to restore names.

Credentials are never logged (only bucket/key names and the endpoint are).
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
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
from sfxflow.io.storage import filesystem, is_local, local_path

__all__ = [
    "DEFAULT_PART_SIZE",
    "MANIFEST_NAME",
    "Digest",
    "IntegrityError",
    "ObjectResult",
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
_READ_CHUNK = 4 * MiB


class IntegrityError(SfxflowError):
    """Bytes at the destination differ from the source (a checksum did not match)."""


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
    sha = hashlib.sha256()
    md5s: list[bytes] = []
    size = 0
    with open(path, "rb") as fh:
        while True:
            md5 = hashlib.md5()
            left = part_size
            got = 0
            while left > 0:
                chunk = fh.read(min(_READ_CHUNK, left))
                if not chunk:
                    break
                sha.update(chunk)
                md5.update(chunk)
                got += len(chunk)
                left -= len(chunk)
                if progress is not None:
                    progress(len(chunk))
            if got == 0 and md5s:
                break
            md5s.append(md5.digest())
            size += got
            if got < part_size:
                break
    return Digest(size=size, sha256=sha.hexdigest(), part_size=part_size, part_md5=tuple(md5s))


def _strip_etag(etag: str | None) -> str:
    return (etag or "").strip('"').lower()


def _is_md5_etag(etag: str) -> bool:
    head = etag.split("-", 1)[0]
    return len(head) == 32 and all(c in "0123456789abcdef" for c in head)


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
# the transfer


class _Transfer:
    def __init__(self, fs: Any, streams: int, part_size: int, verify: str,
                 progress: Callable[[int], None] | None) -> None:
        self.fs = fs
        self.parts = cf.ThreadPoolExecutor(streams, thread_name_prefix="sfxflow-part")
        self.part_size = part_size
        self.verify = verify
        self._progress = progress
        self._lock = threading.Lock()

    def progress(self, n: int) -> None:
        if self._progress is not None:
            with self._lock:
                self._progress(n)

    def s3(self, method: str, **kwargs: Any) -> Any:
        return self.fs.call_s3(method, **kwargs)

    def head(self, bucket: str, key: str, **extra: Any) -> dict[str, Any] | None:
        try:
            return dict(self.s3("head_object", Bucket=bucket, Key=key, **extra))
        except FileNotFoundError:
            return None

    # -- upload -----------------------------------------------------------------------------

    def _remote_matches(self, head: Mapping[str, Any] | None, digest: Digest) -> bool:
        if head is None:
            return False
        meta = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
        return (int(head.get("ContentLength", -1)) == digest.size
                and meta.get(META_SHA256) == digest.sha256
                and meta.get(META_PART_SIZE) == str(digest.part_size)
                and _strip_etag(head.get("ETag")) == digest.etag())

    def _read_part(self, path: Path, index: int, digest: Digest) -> bytes:
        with open(path, "rb") as fh:
            fh.seek(index * digest.part_size)
            data = fh.read(digest.part_size)
        if hashlib.md5(data).digest() != digest.part_md5[index]:
            raise SourceError(str(path), f"file changed while being sent (part {index + 1})")
        return data

    def _put_single(self, path: Path, bucket: str, key: str, digest: Digest,
                    meta: dict[str, str]) -> None:
        data = self._read_part(path, 0, digest)
        resp = self.s3("put_object", Bucket=bucket, Key=key, Body=data, Metadata=meta,
                       ContentMD5=base64.b64encode(digest.part_md5[0]).decode())
        got = _strip_etag(resp.get("ETag"))
        if _is_md5_etag(got) and got != digest.etag():
            raise IntegrityError(f"s3://{bucket}/{key}: stored ETag {got} != MD5 of the file "
                                 f"{digest.etag()}")
        self.progress(len(data))

    def _put_part(self, path: Path, bucket: str, key: str, upload_id: str, index: int,
                  digest: Digest) -> dict[str, Any]:
        data = self._read_part(path, index, digest)
        resp = self.s3("upload_part", Bucket=bucket, Key=key, UploadId=upload_id,
                       PartNumber=index + 1, Body=data,
                       ContentMD5=base64.b64encode(digest.part_md5[index]).decode())
        got = _strip_etag(resp.get("ETag"))
        if got != digest.part_md5[index].hex():
            raise IntegrityError(f"s3://{bucket}/{key}: part {index + 1} stored with MD5 {got}, "
                                 f"sent {digest.part_md5[index].hex()}")
        self.progress(len(data))
        return {"PartNumber": index + 1, "ETag": resp["ETag"]}

    def _put_multipart(self, path: Path, bucket: str, key: str, digest: Digest,
                       meta: dict[str, str]) -> None:
        upload_id = self.s3("create_multipart_upload", Bucket=bucket, Key=key,
                            Metadata=meta)["UploadId"]
        futures: list[cf.Future[dict[str, Any]]] = []
        try:
            futures = [self.parts.submit(self._put_part, path, bucket, key, upload_id, i, digest)
                       for i in range(len(digest.part_md5))]
            parts = [f.result() for f in futures]
            self.s3("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id,
                    MultipartUpload={"Parts": parts})
        except BaseException:
            for f in futures:
                f.cancel()
            cf.wait(futures)
            try:
                self.s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
            except OSError as exc:  # the original error matters more
                log.warning("s3://%s/%s: could not abort multipart upload: %s", bucket, key, exc)
            raise

    def _reread_sha256(self, bucket: str, key: str) -> str:
        sha = hashlib.sha256()
        with self.fs.open(f"{bucket}/{key}", "rb", block_size=self.part_size,
                          cache_type="none") as fh:
            while chunk := fh.read(self.part_size):
                sha.update(chunk)
        return sha.hexdigest()

    def upload(self, job: _Job) -> ObjectResult:
        path = Path(job.src)
        bucket, key = job.dst.split("/", 1)
        part_size = _part_size_for(job.size, self.part_size)
        digest = file_digest(path, part_size)
        head = self.head(bucket, key)
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
                        head.get("ContentLength"), digest.size)
        meta = {META_SHA256: digest.sha256, META_PART_SIZE: str(part_size)}
        for attempt in (1, 2):
            if digest.multipart:
                self._put_multipart(path, bucket, key, digest, meta)
            else:
                self.parts.submit(self._put_single, path, bucket, key, digest, meta).result()
            problem = self._check_uploaded(bucket, key, digest)
            if not problem:
                return ObjectResult(job.name, str(path), f"s3://{job.dst}", digest.size, action,
                                    digest.sha256, digest.etag())
            log.warning("s3://%s/%s: %s (attempt %d)", bucket, key, problem, attempt)
        raise IntegrityError(f"s3://{bucket}/{key}: {problem}")

    def _check_uploaded(self, bucket: str, key: str, digest: Digest) -> str:
        head = self.head(bucket, key)
        if not self._remote_matches(head, digest):
            got = None if head is None else (_strip_etag(head.get("ETag")),
                                             head.get("ContentLength"))
            return f"object after upload is (ETag, size) {got}, expected {digest.etag()}"
        if self.verify == "reread":
            sha = self._reread_sha256(bucket, key)
            if sha != digest.sha256:
                return f"object read back has SHA-256 {sha}, file has {digest.sha256}"
        return ""

    # -- download ---------------------------------------------------------------------------

    def _object_layout(self, bucket: str, key: str,
                       head: Mapping[str, Any]) -> tuple[int | None, str | None]:
        """(part size of the object's ETag, expected SHA-256 from metadata)."""
        meta = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
        etag = _strip_etag(head.get("ETag"))
        size = int(head["ContentLength"])
        part_size: int | None = None
        if _is_md5_etag(etag):
            if "-" not in etag:
                part_size = max(size, 1)
            elif meta.get(META_PART_SIZE, "").isdigit():
                part_size = int(meta[META_PART_SIZE])
            else:
                first = self.head(bucket, key, PartNumber=1)
                if first is not None and int(first.get("ContentLength", 0)) > 0:
                    part_size = int(first["ContentLength"])
        return part_size, meta.get(META_SHA256)

    def _local_problem(self, path: Path, size: int, etag: str, part_size: int | None,
                       sha256: str | None) -> str | None:
        """None when the local file verifies; else what is wrong."""
        if not path.is_file():
            return "missing"
        if path.stat().st_size != size:
            return f"size {path.stat().st_size} != {size}"
        digest = file_digest(path, part_size or max(size, 1))
        if sha256 and digest.sha256 != sha256:
            return f"SHA-256 {digest.sha256} != expected {sha256}"
        if part_size and digest.etag() != etag:
            return f"ETag {digest.etag()} != object's {etag}"
        return None

    def _get_range(self, bucket: str, key: str, fd: int, start: int, end: int) -> None:
        data = self.fs.cat_file(f"{bucket}/{key}", start=start, end=end)
        if len(data) != end - start:
            raise SourceError(f"s3://{bucket}/{key}", f"short read at {start}: {len(data)} bytes")
        os.pwrite(fd, data, start)
        self.progress(len(data))

    def download(self, job: _Job, manifest_sha: str | None) -> ObjectResult:
        bucket, key = job.src.split("/", 1)
        src_url = f"s3://{job.src}"
        head = self.head(bucket, key)
        if head is None:
            raise SourceError(src_url, "no such object")
        size = int(head["ContentLength"])
        etag = _strip_etag(head.get("ETag"))
        part_size, meta_sha = self._object_layout(bucket, key, head)
        if manifest_sha and meta_sha and manifest_sha != meta_sha:
            raise IntegrityError(f"{src_url}: metadata SHA-256 {meta_sha} differs from the "
                                 f"transfer manifest's {manifest_sha}")
        sha = manifest_sha or meta_sha
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
        for attempt in (1, 2):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                step = self.part_size  # ranges need not follow the ETag's part layout
                futures = [self.parts.submit(self._get_range, bucket, key, fd, s,
                                             min(s + step, size))
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


def _manifest_entries(fs: Any, bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
    path = f"{bucket}/{_plain_key(prefix, MANIFEST_NAME)}"
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return {}
    try:
        data = json.loads(raw)
        objects = data["objects"]
        if not isinstance(objects, dict):
            raise TypeError("objects is not a mapping")
    except (ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"s3://{path}", f"not a transfer manifest ({exc})") from None
    return objects


def _write_manifest(fs: Any, bucket: str, prefix: str, results: Sequence[ObjectResult]) -> None:
    done = [r for r in results if r.action in ("sent", "resent", "skipped")]
    if not done:
        return
    entries = _manifest_entries(fs, bucket, prefix)
    for r in done:
        key = r.dst.split("://", 1)[1].split("/", 1)[1]
        entries[r.name] = {"key": key, "size": r.size, "sha256": r.sha256, "etag": r.etag}
    body = json.dumps({"format": "sfxflow-transfer-manifest", "version": 1,
                       "objects": dict(sorted(entries.items()))}, indent=1).encode()
    fs.call_s3("put_object", Bucket=bucket, Key=_plain_key(prefix, MANIFEST_NAME), Body=body,
               ContentType="application/json")


def _download_jobs(fs: Any, sources: Sequence[str], dest: Path
                   ) -> list[tuple[_Job, str | None]]:
    jobs: list[tuple[_Job, str | None]] = []
    for src in sources:
        bucket, key = _split_s3(src)
        fs.invalidate_cache()
        if key and not key.endswith("/"):
            try:
                head = fs.call_s3("head_object", Bucket=bucket, Key=key)
            except FileNotFoundError:
                head = None
            if head is not None:  # a single object
                name = key.rsplit("/", 1)[-1]
                jobs.append((_Job(name, f"{bucket}/{key}", str(dest / name),
                                  int(head["ContentLength"])), None))
                continue
        prefix = key.rstrip("/")
        manifest = _manifest_entries(fs, bucket, prefix)
        if manifest:
            for name, entry in manifest.items():
                jobs.append((_Job(name, f"{bucket}/{entry['key']}", str(dest / name),
                                  int(entry.get("size", 0))), entry.get("sha256") or None))
            continue
        listing = fs.find(f"{bucket}/{prefix}" if prefix else bucket, detail=True)
        base = f"{bucket}/{prefix}/" if prefix else f"{bucket}/"
        for path, info in sorted(listing.items()):
            name = path[len(base):] if path.startswith(base) else path.rsplit("/", 1)[-1]
            if name == MANIFEST_NAME or info.get("type") == "directory":
                continue
            jobs.append((_Job(name, path, str(dest / name), int(info.get("size", 0))), None))
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
    options = dict(storage_options or {})
    # every request already carries Content-MD5 and is checked against its ETag: skip
    # botocore's default extra CRC32 of every body (computed on s3fs's single event-loop thread)
    options["config_kwargs"] = {"request_checksum_calculation": "when_required",
                                **(options.get("config_kwargs") or {})}
    fs = filesystem(s3_url, options)
    t0 = time.perf_counter()
    engine = _Transfer(fs, streams, part_size, verify, progress)
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
            jobs = _download_jobs(fs, sources, local_path(dest))
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
                _write_manifest(fs, bucket, prefix, report.results)
            except OSError as exc:
                if completed:
                    raise
                # do not hide the error that stopped the transfer
                log.error("s3://%s: could not write the transfer manifest: %s",
                          _plain_key(f"{bucket}/{prefix}", MANIFEST_NAME), exc)
    log.info("%d sent (%d re-sent), %d skipped, %d failed; %.3f GB in %.2f s = %.3f Gbit/s",
             report.n_sent, report.n_resent, report.n_skipped, report.n_failed,
             report.bytes_sent / 1e9, report.wall_s, report.gbit_per_s)
    return report
