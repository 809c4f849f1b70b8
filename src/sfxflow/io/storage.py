"""Opening files and objects by URL: local paths, ``file://``, ``memory://``, ``s3://`` and any fsspec URL.

Reading strategy
----------------
* Local files are opened with the built-in :func:`open` (no fsspec layer).
* Remote objects smaller than ``whole_object_max_bytes`` (64 MiB by default) are fetched with one
  request into memory: one round trip is cheaper than many ranged reads for a typical CBF or a
  small HDF5 file, and HDF5 then seeks in RAM.
* Larger objects are read with ranged requests of ``block_size`` (8 MiB by default) through
  fsspec's ``blockcache`` (random access friendly: HDF5 metadata and chunk reads jump around).

The HDF5 reader always asks for ranged reads (a block of frames rarely needs the whole file; see
:mod:`sfxflow.io.hdf5`); CBF files, one frame each, are fetched whole with :func:`read_bytes`.

Deadlines
---------
Every read, ranged read, lookup, listing and write of a remote object is one operation that
succeeds or raises within ``storage_retry_s`` plus one connect timeout (:func:`deadline_s`):
:func:`retrying` is the only retry loop (botocore and s3fs make one attempt each), and each
attempt's coroutine runs on fsspec's event loop with the time left as its timeout
(:func:`call_fs`), so that neither fsspec's ``sync`` nor botocore, aiohttp or h5py underneath
wait longer; a request cut there closes its connection instead of returning it to the pool.
botocore's read timeout (a quarter of the retry period) ends a silent connection in time for a
retry on a new one.

Every byte fetched from storage is counted (:func:`read_stats`), so a run can report
``bytes_read`` and MB/s.

S3 is configured the standard AWS way: environment variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, ...), the shared config and
credentials files, or explicit storage options (see :func:`storage_options_from`). Credentials
are never logged: :func:`redact` is applied to anything that is.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import errno
import inspect
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

from sfxflow.errors import InputError, SourceError, StorageUnavailable, redact_userinfo

__all__ = [
    "CONNECT_TIMEOUT_S",
    "DEFAULT_BLOCK_SIZE",
    "WHOLE_OBJECT_MAX_BYTES",
    "ReadStats",
    "RetryPolicy",
    "add_bytes_read",
    "call_fs",
    "deadline_s",
    "filesystem",
    "is_local",
    "is_transient",
    "join_url",
    "local_path",
    "object_size",
    "object_stamp",
    "open_url",
    "read_bytes",
    "read_stats",
    "redact",
    "redact_urls",
    "reset_read_stats",
    "retry_policy",
    "retrying",
    "set_retry_policy",
    "shown_url",
    "storage_options_from",
]

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 8 * 2**20
WHOLE_OBJECT_MAX_BYTES = 64 * 2**20

#: seconds allowed to open a connection to an endpoint; one of them is part of every storage
#: operation's deadline (:func:`deadline_s`)
CONNECT_TIMEOUT_S = 3.0
#: botocore settings: a dead endpoint fails in seconds, and botocore makes one attempt per call
#: (:func:`retrying` is the only retry loop: retry loops stacked on each other multiply)
_S3_FAST_FAIL_CONFIG: dict[str, Any] = {
    "connect_timeout": CONNECT_TIMEOUT_S,
    "retries": {"total_max_attempts": 1, "mode": "standard"},
}
#: the longest a request waits for its next bytes (botocore's read_timeout): a quarter of the
#: retry period within these bounds, so that a connection whose packets are dropped silently
#: (a blackhole) is given up in time for retries on a new one
_READ_IDLE_S = (CONNECT_TIMEOUT_S, 30.0)
_S3_FS_RETRIES = 1  # s3fs's own retry loop: one attempt
_MAX_CACHED_BLOCKS = 8  # per open remote file: at most 8 x block_size bytes held

_SECRET_WORDS = ("secret", "token", "password", "key", "credential", "session")


@dataclass
class ReadStats:
    """Bytes and requests fetched from storage by this process (all threads)."""

    bytes_read: int = 0
    requests: int = 0
    files_opened: int = 0


_stats = ReadStats()
_stats_lock = threading.Lock()


def _count(n_bytes: int, requests: int = 1, files: int = 0) -> None:
    with _stats_lock:
        _stats.bytes_read += int(n_bytes)
        _stats.requests += requests
        _stats.files_opened += files


# --------------------------------------------------------------------------------------------
# transient errors and retrying them

#: errno values of a storage hiccup (the endpoint or a disk that may come back), as opposed to
#: a missing object or a refused permission
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name) for name in ("EIO", "ECONNREFUSED", "ECONNRESET", "ECONNABORTED",
                                      "ETIMEDOUT", "EHOSTUNREACH", "ENETUNREACH", "ENETDOWN",
                                      "EPIPE", "EAGAIN")
    if hasattr(errno, name))
#: exception class names of botocore / aiohttp / urllib3 connection trouble (matched by name so
#: that this module imports none of them)
_TRANSIENT_NAMES = frozenset((
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ResponseStreamingError", "IncompleteReadError", "ClientConnectorError",
    "ServerDisconnectedError", "ClientOSError", "ClientPayloadError", "ServerTimeoutError",
    "ProtocolError", "NewConnectionError",
))
#: of those, the errors of a request that got no bytes in time (:func:`_went_silent`)
_SILENT_NAMES = frozenset(("ReadTimeoutError", "ServerTimeoutError"))
_TRANSIENT_CODES = frozenset(("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                              "Throttling", "RequestTimeTooSkewed"))


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, Mapping):
        return None
    meta = response.get("ResponseMetadata") or {}
    status = meta.get("HTTPStatusCode")
    return int(status) if isinstance(status, int) else None


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen and len(out) < 16:
        seen.add(id(cur))
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _named(exc: BaseException, names: frozenset[str]) -> bool:
    """Whether ``exc``'s class or one it derives from has one of ``names`` (botocore's and
    aiohttp's errors are matched by name: neither is imported here)."""
    return any(cls.__name__ in names for cls in type(exc).__mro__)


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) is a storage outage worth retrying: a refused or
    reset connection, a timeout, an HTTP 5xx or throttling answer, EIO.

    A missing object, a refused permission or bad data are not transient.

    >>> is_transient(ConnectionRefusedError(111, "refused")), is_transient(FileNotFoundError("x"))
    (True, False)
    >>> is_transient(OSError(errno.EIO, "I/O error")), is_transient(ValueError("corrupt"))
    (True, False)
    """
    chain = _chain(exc)
    for e in chain:
        if isinstance(e, StorageUnavailable):
            return True
        status = _http_status(e)
        if status is not None:  # the server answered: only its own trouble is transient
            code = str((getattr(e, "response", {}).get("Error") or {}).get("Code", ""))
            return status >= 500 or status == 429 or code in _TRANSIENT_CODES
    for e in chain:
        if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError):
            return False
        if isinstance(e, ConnectionError | TimeoutError):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        if _named(e, _TRANSIENT_NAMES):
            return True
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep retrying transient storage errors (exponential back-off).

    Parameters
    ----------
    total_s : give up once this many seconds have passed since the first failure (0: no retry).
    first_delay_s : the first wait; each later wait doubles, up to ``max_delay_s``.
    max_delay_s : the longest single wait.
    """

    total_s: float = 60.0
    first_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def __post_init__(self) -> None:
        if not (0 <= self.total_s < float("inf") and 0 < self.first_delay_s <= self.max_delay_s):
            raise ValueError(f"retry policy {self}: expected 0 <= total_s < inf and "
                             "0 < first_delay_s <= max_delay_s")


_retry = RetryPolicy()
_gave_up_at = 0.0  # time.monotonic() when a call last gave up on unreachable storage


def set_retry_policy(policy: RetryPolicy) -> None:
    """Set the process-wide policy for retrying transient storage errors (every reader and
    writer of this module uses it; a run sets it on each worker from its configuration)."""
    global _retry, _gave_up_at
    _retry = policy
    _gave_up_at = 0.0


def retry_policy() -> RetryPolicy:
    """The process-wide retry policy."""
    return _retry


T = TypeVar("T")


#: time.monotonic() by which the storage operation running in this thread (or task) must end
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("sfxflow_storage_deadline",
                                                                         default=None)


def deadline_s(policy: RetryPolicy | None = None) -> float:
    """The longest one storage operation (a read, a listing, a write) takes before it succeeds
    or raises: the retry period plus one connect timeout, whatever the layers below do.

    >>> deadline_s(RetryPolicy(total_s=10))
    13.0
    """
    return (policy or _retry).total_s + CONNECT_TIMEOUT_S


def _remaining() -> float:
    """Seconds left to the current operation's deadline (a fresh deadline outside one)."""
    deadline = _deadline.get()
    if deadline is None:
        return deadline_s()
    return deadline - time.monotonic()


class _StorageTimeout(TimeoutError):
    """A storage call that did not end by its operation's deadline (transient)."""


def _run_coroutine(loop: asyncio.AbstractEventLoop, coro: Any, timeout: float) -> Any:
    """Run ``coro`` on fsspec's event loop ``loop`` (another thread) for at most ``timeout`` s;
    cancelled when over (aiohttp then closes its connection: it does not go back to the pool).

    fsspec's own ``sync`` waits without a limit unless told one, and checks it once a second.
    """
    if timeout <= 0:
        coro.close()
        raise _StorageTimeout("no time left before the storage deadline")
    future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), loop)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:  # also asyncio's: the same class since Python 3.11
        future.cancel()
        raise _StorageTimeout(f"no answer within {timeout:.1f} s") from None
    except concurrent.futures.CancelledError:
        raise _StorageTimeout(f"cancelled after {timeout:.1f} s") from None


def call_fs(fs: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """``fs.<method>(*args, **kwargs)``, ended by the current operation's deadline.

    On an asynchronous filesystem (s3fs, http) the coroutine behind ``method`` runs with a
    timeout of the time left to the deadline of the :func:`retrying` call around it (or a whole
    :func:`deadline_s` outside one), so that no layer below (botocore, aiohttp, s3fs) waits longer.
    """
    coro_fn = getattr(fs, "_" + method, None)
    loop = getattr(fs, "loop", None) if getattr(fs, "async_impl", False) else None
    if loop is not None and not getattr(fs, "asynchronous", False) \
            and inspect.iscoroutinefunction(coro_fn):
        try:
            return _run_coroutine(loop, coro_fn(*args, **kwargs), _remaining())
        except Exception as exc:
            if _went_silent(exc):
                _new_client(fs, loop)
            raise
    return getattr(fs, method)(*args, **kwargs)


def _went_silent(exc: BaseException) -> bool:
    """A request that waited for bytes that never came (botocore's or aiohttp's read timeout,
    or our deadline; also where s3fs wraps it), rather than one the endpoint refused or
    answered with an error. Matched by name, as :func:`is_transient` does."""
    return any(isinstance(e, _StorageTimeout) or _named(e, _SILENT_NAMES) for e in _chain(exc))


def _new_client(fs: Any, loop: asyncio.AbstractEventLoop) -> None:
    """Give an S3 filesystem a new client (its own connection pool) after a request went
    silent: the next attempt must not wait on anything the silent connection's client still
    holds. The old client is left to the requests other threads have in flight on it."""
    set_session = getattr(fs, "set_session", None)
    if set_session is None or getattr(fs, "_s3", None) is None:
        return
    # up to the operation's deadline, not one connect timeout: a new client takes 0.06-0.2 s
    # idle and up to 1 s with 4 busy loops on 2 cores (botocore loads its S3 model again); cut
    # short, the old client and its dead connections were kept for the attempt after this one
    left_s = _remaining()
    if left_s <= 0:  # the operation's deadline is spent: its caller gives up anyway
        return
    try:
        _run_coroutine(loop, set_session(refresh=True), left_s)
    except Exception as exc:  # the attempt after this one reports what is wrong
        log.info("could not make a new storage client: %s", exc)


def retrying(call: Callable[[], T], url: str, action: str = "read") -> T:
    """``call()``, retried with back-off while it fails with a transient storage error, and
    ended by one deadline: :func:`deadline_s` seconds after it starts (storage calls made
    through :func:`call_fs` inside ``call`` are cut at that deadline).

    Raises
    ------
    StorageUnavailable
        Still failing when the policy's time is spent; names the URL, the last error and how
        long it was retried.
    """
    global _gave_up_at
    policy = _retry
    t0 = time.monotonic()
    outer = _deadline.get()
    deadline = t0 + deadline_s(policy)
    if outer is not None:
        deadline = min(deadline, outer)
    token = _deadline.set(deadline)
    delay = policy.first_delay_s
    attempt = 0
    try:
        while True:
            try:
                result = call()
                _gave_up_at = 0.0
                return result
            except Exception as exc:
                if not is_transient(exc):
                    raise
                attempt += 1
                now = time.monotonic()
                waited = now - t0
                # storage that just outlasted a whole retry period is not waited for again by
                # every following call (hundreds of files or blocks): they fail at once until it
                # answers
                recently_dead = attempt == 1 and now - _gave_up_at < policy.total_s
                if recently_dead or waited + delay > policy.total_s or now + delay >= deadline:
                    _gave_up_at = now
                    if isinstance(exc, StorageUnavailable):
                        raise
                    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    raise StorageUnavailable(
                        shown_url(url), f"storage endpoint unreachable: cannot {action} "
                        f"({type(exc).__name__}: {redact_urls(text)}) after {attempt} "
                        f"attempt(s) over {waited:.1f} s") from exc
                log.info("%s: %s failed (%s); retrying in %.1f s", shown_url(url), action,
                         type(exc).__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, policy.max_delay_s)
    finally:
        _deadline.reset(token)


def add_bytes_read(n_bytes: int, requests: int = 0) -> None:
    """Add bytes read outside :func:`open_url` (e.g. by the native HDF5 driver) to the counters."""
    _count(n_bytes, requests)


def read_stats() -> ReadStats:
    """A copy of the process-wide read counters.

    >>> s = read_stats(); s.bytes_read >= 0
    True
    """
    with _stats_lock:
        return ReadStats(_stats.bytes_read, _stats.requests, _stats.files_opened)


def reset_read_stats() -> None:
    """Zero the process-wide read counters."""
    with _stats_lock:
        _stats.bytes_read = 0
        _stats.requests = 0
        _stats.files_opened = 0


def redact(options: Any) -> Any:
    """Copy of ``options`` with every credential-looking value replaced by ``'***'``.

    >>> redact({"key": "AKIA...", "client_kwargs": {"endpoint_url": "http://x"}})
    {'key': '***', 'client_kwargs': {'endpoint_url': 'http://x'}}
    """
    if isinstance(options, Mapping):
        out = {}
        for k, v in options.items():
            lk = str(k).lower()
            if any(w in lk for w in _SECRET_WORDS) and not isinstance(v, Mapping):
                out[k] = "***"
            else:
                out[k] = redact(v)
        return out
    if isinstance(options, list | tuple):
        return type(options)(redact(v) for v in options)
    return options


def storage_options_from(
    endpoint_url: str | None = None, profile: str | None = None
) -> dict[str, Any]:
    """fsspec/s3fs storage options from the usual AWS knobs.

    Parameters
    ----------
    endpoint_url : an S3-compatible endpoint (MinIO, Ceph RGW, a local test server). ``None``
        leaves botocore's own resolution (``AWS_ENDPOINT_URL`` or AWS itself).
    profile : a named profile from ``~/.aws/config`` / ``~/.aws/credentials``.

    Credentials themselves are never passed here: botocore finds them in the environment, the
    profile, or the instance metadata.

    >>> storage_options_from("http://127.0.0.1:9000")
    {'client_kwargs': {'endpoint_url': 'http://127.0.0.1:9000'}}
    >>> storage_options_from()
    {}
    """
    opts: dict[str, Any] = {}
    if endpoint_url:
        parts = urlsplit(endpoint_url)
        if parts.username is not None or parts.password is not None:
            # never echo (or keep, e.g. in config.toml) a password given inside a URL
            shown = f"{parts.scheme}://***@{parts.hostname or ''}"
            raise InputError(
                f"S3 endpoint URL {shown!r} carries user:password; expected http(s)://host[:port] "
                "with credentials from the AWS environment or profile"
            )
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InputError(
                f"S3 endpoint URL {endpoint_url!r} is not valid: expected http(s)://host[:port]"
            )
        opts["client_kwargs"] = {"endpoint_url": endpoint_url}
    if profile:
        opts["profile"] = profile
    return opts


def _protocol(url: str) -> str:
    if "://" not in url:
        return "file"
    return url.split("://", 1)[0].lower()


def is_local(url: str) -> bool:
    """True for plain paths and ``file://`` URLs.

    >>> is_local("/data/run.cxi"), is_local("file:///data/run.cxi"), is_local("s3://b/k")
    (True, True, False)
    """
    return _protocol(url) in ("file", "local")


def local_path(url: str) -> Path:
    """Filesystem path of a local URL (``file://`` stripped)."""
    if "://" in url:
        return Path(urlsplit(url).path)
    return Path(url)


def join_url(base_url: str, relative: str) -> str:
    """Resolve ``relative`` (e.g. an HDF5 external link target) against the folder of ``base_url``.

    >>> join_url("s3://bucket/run1/master.h5", "data_000001.h5")
    's3://bucket/run1/data_000001.h5'
    >>> join_url("/data/run1/master.h5", "../x.h5")
    '/data/x.h5'
    """
    if "://" in relative or relative.startswith("/"):
        return relative
    if is_local(base_url):
        return os.path.normpath(str(local_path(base_url).parent / relative))
    head, _, _ = base_url.rpartition("/")
    parts: list[str] = []
    for seg in relative.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if parts:
                parts.pop()
            else:
                head = head.rpartition("/")[0]
            continue
        parts.append(seg)
    return "/".join([head, *parts])


def _s3_options(options: Mapping[str, Any]) -> dict[str, Any]:
    opts = dict(options)
    config = dict(_S3_FAST_FAIL_CONFIG)
    low, high = _READ_IDLE_S
    config["read_timeout"] = min(max(low, _retry.total_s / 4), high)
    config.update(opts.get("config_kwargs") or {})
    opts["config_kwargs"] = config
    return opts


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None, *,
               cache_listings: bool = True) -> Any:
    """The fsspec filesystem for ``url`` (cached instances are reused across calls).

    ``cache_listings=False`` for a folder that other processes write (a run directory): its
    listings, and the lookups answered from them, always ask the store.
    """
    import fsspec

    proto = _protocol(url)
    opts = dict(storage_options or {})
    if proto in ("s3", "s3a"):
        opts = _s3_options(opts)
    if not cache_listings and proto not in ("file", "local"):
        opts["use_listings_cache"] = False
    try:
        fs = fsspec.filesystem(proto, **opts)
    except (ImportError, ValueError, TypeError) as exc:  # TypeError: a backend needing a host
        raise SourceError(shown_url(url),
                          f"no storage backend for protocol {proto!r}: {exc}") from exc
    if proto in ("s3", "s3a"):
        fs.retries = _S3_FS_RETRIES  # s3fs's own retry loop on top of botocore's
    return fs


def shown_url(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@`` (for messages and logs).

    >>> shown_url("ftp://me:secret@host/data"), shown_url("s3://bucket/key")
    ('ftp://***@host/data', 's3://bucket/key')
    """
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    netloc, sep, path = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return f"{scheme}://{netloc}{sep}{path}"


def redact_urls(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL in it replaced by ``***@``.

    >>> redact_urls("cannot read ftp://me:secret@host/x.cxi (timeout)")
    'cannot read ftp://***@host/x.cxi (timeout)'
    """
    return redact_userinfo(text)


def _strip(url: str, fs: Any) -> str:
    """The path of ``url`` as ``fs`` names it: without the scheme for s3 or memory, the whole URL
    for http(s) (whose requests need it, userinfo included)."""
    return str(fs._strip_protocol(url))


def _wrap_storage_error(url: str, exc: BaseException, action: str = "read") -> SourceError:
    if isinstance(exc, SourceError):
        return exc
    url = shown_url(url)
    if isinstance(exc, FileNotFoundError):
        return SourceError(url, "no such file or object")
    if isinstance(exc, PermissionError):
        return SourceError(url, f"access denied ({exc})")
    if getattr(exc, "status", None) in (401, 403):  # aiohttp (http inputs): wrong credentials
        return SourceError(url, f"access denied (HTTP {exc.status})")  # type: ignore[attr-defined]
    name = type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else name
    if "NoCredentials" in name or "Unable to locate credentials" in text:
        return SourceError(
            url,
            "no S3 credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
            "or use anonymous access)",
        )
    text = redact_urls(text)
    if is_transient(exc) or "Could not connect" in text:
        return StorageUnavailable(url, f"storage endpoint unreachable ({name}: {text})")
    return SourceError(url, f"cannot {action} ({name}: {text})")


def object_size(url: str, storage_options: Mapping[str, Any] | None = None) -> int:
    """Size in bytes of a file or object; :class:`SourceError` when it cannot be listed."""
    return object_stamp(url, storage_options)[0]


def _remote_info(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    fs = filesystem(url, storage_options)
    try:
        info: dict[str, Any] = retrying(lambda: call_fs(fs, "info", _strip(url, fs)), url, "list")
    except Exception as exc:  # storage backends raise many unrelated types
        raise _wrap_storage_error(url, exc) from exc
    if info.get("type") == "directory":
        raise SourceError(shown_url(url), "is a directory, expected a file or object")
    return info


def object_stamp(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[int, str]:
    """``(size, version)`` of a file or object: what tells that its content changed.

    The version is the modification time in nanoseconds for a local file, the ETag (or a
    modification time where a store has none) for an object.
    """
    if is_local(url):
        try:
            st = local_path(url).stat()
        except OSError as exc:
            raise _wrap_storage_error(url, exc) from exc
        return int(st.st_size), f"mtime_ns:{st.st_mtime_ns}"
    info = _remote_info(url, storage_options)
    for key in ("ETag", "etag", "md5", "checksum"):
        if info.get(key):
            return int(info.get("size") or 0), f"etag:{str(info[key]).strip(chr(34))}"
    for key in ("LastModified", "mtime", "last_modified", "created"):
        v = info.get(key)
        if v is not None:
            stamp = v.timestamp() if hasattr(v, "timestamp") else float(v)
            return int(info.get("size") or 0), f"mtime:{stamp}"
    return int(info.get("size") or 0), ""


def read_bytes(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    start: int | None = None,
    end: int | None = None,
) -> bytes:
    """The whole object (or the byte range ``[start, end)``) in one request; counted."""
    try:
        if is_local(url):
            with open(local_path(url), "rb") as fh:
                if start:
                    fh.seek(start)
                data = fh.read() if end is None else fh.read(end - (start or 0))
        else:
            fs = filesystem(url, storage_options)
            data = retrying(lambda: call_fs(fs, "cat_file", _strip(url, fs), start=start, end=end),
                            url)
    except SourceError:
        raise
    except Exception as exc:
        raise _wrap_storage_error(url, exc) from exc
    _count(len(data), 1, 1)
    return data


class _CountingLocalFile(io.FileIO):
    """A local file whose reads are added to the process read counters."""

    def readinto(self, b: Any) -> int | None:  # type: ignore[override]
        n = super().readinto(b)
        if n:
            _count(n, 0)
        return n

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        data = super().read(size)
        _count(len(data), 0)
        return data

    def readall(self) -> bytes:
        data = super().readall()
        _count(len(data), 0)
        return data


def open_url(
    url: str,
    mode: str = "rb",
    storage_options: Mapping[str, Any] | None = None,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    whole_object_max_bytes: int = WHOLE_OBJECT_MAX_BYTES,
) -> IO[bytes]:
    """Open a local path or any fsspec URL as a binary file object.

    Parameters
    ----------
    url : path, ``file://``, ``memory://``, ``s3://bucket/key`` or another fsspec URL.
    mode : ``"rb"`` or ``"wb"``.
    storage_options : fsspec options (e.g. from :func:`storage_options_from`).
    block_size : ranged-read size for large remote objects.
    whole_object_max_bytes : remote objects up to this size are fetched whole into memory.

    Returns
    -------
    A seekable binary file object (context manager). Reads are counted in :func:`read_stats`.

    Raises
    ------
    SourceError
        Missing object, unreachable endpoint, missing credentials; the message names the URL.

    Examples
    --------
    >>> with open_url("memory://doc/x.bin", "wb") as fh:
    ...     _ = fh.write(b"abc")
    >>> open_url("memory://doc/x.bin").read()
    b'abc'
    """
    if mode not in ("rb", "wb"):
        raise ValueError(f"mode must be 'rb' or 'wb', got {mode!r}")
    if is_local(url):
        path = local_path(url)
        try:
            if mode == "wb":
                path.parent.mkdir(parents=True, exist_ok=True)
                return open(path, "wb")
            fh = _CountingLocalFile(path, "r")
        except OSError as exc:
            raise _wrap_storage_error(url, exc, "read" if mode == "rb" else "write") from exc
        _count(0, 0, 1)
        return io.BufferedReader(fh, buffer_size=1 << 20)  # type: ignore[return-value]
    fs = filesystem(url, storage_options)
    path_in_fs = _strip(url, fs)
    if mode == "wb":
        return _UploadOnClose(fs, path_in_fs, url)  # type: ignore[return-value]
    size = object_size(url, storage_options)
    if size <= whole_object_max_bytes:
        return io.BytesIO(read_bytes(url, storage_options))
    try:
        # the size is given: no lookup without a deadline inside fs.open
        fh = fs.open(path_in_fs, "rb", block_size=block_size, cache_type="blockcache",
                     cache_options={"maxblocks": _MAX_CACHED_BLOCKS}, size=size)
    except Exception as exc:
        raise _wrap_storage_error(url, exc) from exc
    _count(0, 0, 1)
    cache = getattr(fh, "cache", None)
    if cache is None or getattr(cache, "fetcher", None) is None:  # e.g. memory://: no requests
        return fh  # type: ignore[no-any-return]

    def fetch(start: int, end: int) -> bytes:
        # every ranged read (h5py asks for them) is one operation with its own deadline; an
        # outage is retried here, below the decoder, so that the HDF5 library never sees a
        # half-failed read it cannot resume
        data = retrying(lambda: bytes(call_fs(fs, "cat_file", path_in_fs, start=start,
                                              end=min(end, size))), url)
        _count(len(data))
        return data

    cache.fetcher = fetch
    log.debug("opened %s (%d bytes) with %d-byte ranged reads", shown_url(url), size, block_size)
    return fh


class _UploadOnClose(io.BytesIO):
    """A remote file being written: held in memory, uploaded in one request (retried, within
    one deadline) when closed without an error."""

    def __init__(self, fs: Any, path: str, url: str) -> None:
        super().__init__()
        self._fs, self._path, self._url = fs, path, url

    def close(self) -> None:
        if not self.closed:
            data = self.getvalue()
            super().close()
            try:
                retrying(lambda: call_fs(self._fs, "pipe_file", self._path, data), self._url,
                         "write")
            except SourceError:
                raise
            except Exception as exc:
                raise _wrap_storage_error(self._url, exc, "write") from exc

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is not None:  # a failed write uploads nothing
            super().close()
            return
        self.close()
