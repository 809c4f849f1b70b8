"""One live ``process`` per run directory: ``run.lock`` names the host and process that own it.

Two runs writing one directory would delete each other's temporary files and overwrite each
other's manifest and summary, so a second run is refused while the first is alive. A lock is
*stale* (taken over with a warning) when

* it was written on this host and its process id is no longer alive (a crash, ``kill -9``),
  whether the run directory is local or on object storage (a lock left on an endpoint that
  was down when the run died is stale as soon as its process is gone);
* it was written on another host and its heartbeat
  (rewritten every ``heartbeat_s`` seconds by a background thread) is older than
  ``stale_after_s``: another machine's processes cannot be asked, so silence is the only
  evidence of death.

On object storage there is no atomic create-if-absent in every S3-compatible store, so the
lock is written, read back and kept only if it is still ours; two runs started within the same
second may both pass (documented, not prevented).

The lock also says which block a serial run is processing (``in_flight``): when a native
decoder kills the process, the next run learns from the stale lock which block did it. A run
that takes a stale lock over and then stops before it has recorded that (refused: other inputs,
other settings) puts the dead run's lock back, so the crash record is not lost.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from sfxflow.errors import InputError, RunDirError
from sfxflow.io.results import RunDir

__all__ = ["LOCK_NAME", "LockInfo", "RunLock", "RunLocked"]

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class RunLocked(InputError):
    """Another live run holds the run directory."""


@dataclass
class LockInfo:
    """What ``run.lock`` holds."""

    host: str
    pid: int
    token: str
    started_at: float
    updated_at: float
    in_flight: str = ""  # block id a serial run is processing ("" between blocks)

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        return f"process {self.pid} on host {self.host}, started {started}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """Hold ``run.lock`` in ``run`` for the life of a run (a context manager).

    Parameters
    ----------
    run : the run directory.
    stale_after_s : a lock from another host (or on object storage) whose heartbeat is older
        than this is taken over.
    heartbeat_s : how often the holder rewrites the lock.

    Attributes
    ----------
    previous : the stale lock that was taken over (``None`` when there was none): its
        ``in_flight`` names the block the dead run was processing.
    """

    def __init__(self, run: RunDir, *, stale_after_s: float = 600.0,
                 heartbeat_s: float = 60.0) -> None:
        self.run = run
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        now = time.time()
        self.info = LockInfo(socket.gethostname(), os.getpid(), uuid.uuid4().hex, now, now)
        self.previous: LockInfo | None = None
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False
        self._previous_recorded = False

    # ------------------------------------------------------------------------------ reading
    def _read(self) -> LockInfo | None:
        try:
            data: dict[str, Any] = json.loads(self.run.read_text(LOCK_NAME))
            return LockInfo(**data)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
            logger.warning("%s: unreadable lock (%s); taking it over", self.run.url_of(LOCK_NAME),
                           exc)
            return LockInfo("?", -1, "", 0.0, 0.0)

    def _is_stale(self, other: LockInfo) -> bool:
        if other.host == self.info.host:  # this host's processes can be asked, wherever it is
            return not _pid_alive(other.pid)
        return time.time() - other.updated_at > self.stale_after_s

    # ------------------------------------------------------------------------------ writing
    def _text(self) -> str:
        self.info.updated_at = time.time()
        return json.dumps(asdict(self.info))

    def _create_local(self) -> bool:
        path = self.run.path(LOCK_NAME)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise RunDirError(self.run.url, f"cannot create {LOCK_NAME} ({exc.strerror})") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(self._text())
        return True

    def _write(self) -> None:
        with self._write_lock:
            self.run.write_text(LOCK_NAME, self._text())

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunLocked` naming the live run that holds it."""
        for _ in range(3):
            if self.run.is_local and self._create_local():
                break
            other = self._read()
            if other is None:
                if self.run.is_local:
                    continue  # removed between our create and read: try again
                self._write()
            elif other.token == self.info.token:
                break
            elif not self._is_stale(other):
                raise RunLocked(
                    f"{self.run.url} is in use by another run ({other.describe()}); wait for it "
                    f"to finish, or use another --out (if that run is dead, delete "
                    f"{self.run.url_of(LOCK_NAME)})")
            else:
                logger.warning("%s: taking over the lock of a run that is no longer alive (%s)",
                               self.run.url, other.describe())
                self.previous = other
                self._write()
            if not self.run.is_local:
                time.sleep(0.2)  # a competing writer's put lands before we read ours back
            mine = self._read()
            if mine is not None and mine.token == self.info.token:
                break
        else:
            raise RunLocked(f"{self.run.url}: could not take {LOCK_NAME} (another run keeps "
                            "writing it)")
        self._held = True
        self._thread = threading.Thread(target=self._beat, name="sfxflow-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write()
            except Exception as exc:  # storage trouble: the run itself will report it
                logger.debug("could not refresh %s: %s", LOCK_NAME, exc)

    def set_in_flight(self, block_id: str) -> None:
        """Record (before starting it) the block this process is about to run; ``''`` after."""
        self.info.in_flight = block_id
        self._write()

    def previous_recorded(self) -> None:
        """What the taken-over lock said is now in the manifest: releasing deletes the lock."""
        self._previous_recorded = True

    def release(self) -> None:
        """Stop the heartbeat and delete the lock (when it is still ours); a taken-over lock
        whose record was not yet kept (:meth:`previous_recorded`) is put back instead."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self._held:
            return
        self._held = False
        with contextlib.suppress(Exception):  # a dead endpoint: the lock goes stale by itself
            current = self._read()
            if current is None or current.token != self.info.token:
                return
            if self.previous is not None and not self._previous_recorded:
                with self._write_lock:
                    self.run.write_text(LOCK_NAME, json.dumps(asdict(self.previous)))
            else:
                self.run.remove(LOCK_NAME)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
