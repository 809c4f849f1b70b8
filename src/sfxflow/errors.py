"""Exceptions. ``InputError`` and its children are user errors: the CLI prints one line, exits 2.

Any other exception escaping the CLI is a bug and is shown with its traceback.
"""

from __future__ import annotations

import re


class SfxflowError(Exception):
    """Base of all sfxflow exceptions."""


class InputError(SfxflowError):
    """Bad input from the user: a file, a value, an option. The message names what and why."""


class GeometryError(InputError):
    """A detector geometry that cannot be read or does not fit the data."""


class SourceError(InputError):
    """An image source (file or object) that cannot be listed or read.

    The message always names the URL; ``url`` and ``frame`` are kept for result records.
    """

    def __init__(self, url: str, problem: str, frame: int | None = None) -> None:
        where = url if frame is None else f"{url} frame {frame}"
        super().__init__(f"{where}: {problem}")
        self.url = url
        self.frame = frame
        self.problem = problem


class ConfigError(InputError):
    """A configuration file or option with a bad key or value."""


class StorageUnavailable(SourceError):
    """Storage did not answer (refused connection, timeout, 5xx, EIO) even after retrying.

    Not a problem of the data: the frames concerned are left for a rerun instead of being
    recorded as failed for good.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch system's ``scancel``, ``kill``): handled as Ctrl-C is - what was done is
    kept and the same command resumes - and the CLI exits 143 (128 + SIGTERM)."""


class RunDirError(SfxflowError):
    """The run directory cannot be written or read (a full disk, a dead object-storage endpoint).

    Nothing is wrong with the inputs or options, and what was written so far is kept: the CLI
    prints one line and exits with :data:`EXIT_RERUN`, since rerunning the same command resumes.
    """

    def __init__(self, run_url: str, cause: str, action: str = "write to") -> None:
        super().__init__(f"cannot {action} the run directory {run_url}: {cause}; fix that and "
                         "run the same command again to resume")
        self.run_url = run_url
        self.cause = cause


#: Exit status of a run that stopped or ended with work left for a rerun (a storage outage, an
#: unwritable run directory): sysexits.h EX_TEMPFAIL, "temporary failure; the user is invited to
#: retry". Distinct from 2 (fix the command line first) and 1 (blocks failed for good).
EXIT_RERUN = 75
#: a URL's userinfo runs to the *last* ``@`` before the host (as URL parsers split it), so a
#: password may hold ``@`` itself
_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s'\"]*@")


def redact_userinfo(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL in it replaced by ``***@``.

    >>> redact_userinfo("cannot read ftp://me:secret@host/x.cxi (timeout)")
    'cannot read ftp://***@host/x.cxi (timeout)'
    >>> redact_userinfo("http://me:p@ss@host:80/g.geom and s3://bucket/k@x")
    'http://***@host:80/g.geom and s3://bucket/k@x'
    """
    return _USERINFO.sub(r"\1***@", text)


def failure_reason(exc: BaseException) -> str:
    """One line saying what went wrong: the exception's type and its message's first line.

    This is the ``reason`` recorded for a failed frame or block; a password inside a URL in it
    is replaced by ``***``.

    >>> failure_reason(ValueError("bad gain\\nsecond line"))
    'ValueError: bad gain'
    >>> failure_reason(MemoryError())
    'MemoryError'
    """
    text = str(exc).splitlines()[0] if str(exc) else ""
    return redact_userinfo(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def raise_interrupt_behind(exc: BaseException) -> None:
    """Raise the Ctrl-C or SIGTERM (:class:`KeyboardInterrupt`, ``SystemExit``) that ``exc``
    carries as its cause, if any.

    Why: a signal handler's exception raised while a numba kernel runs comes back as
    ``SystemError: CPUDispatcher(...) returned a result with an exception set``, the
    interruption as its cause; recorded as a failed frame, the SIGTERM was lost and the run went
    on to exit 0 (test_sigterm_says_so_and_leaves_the_run_resumable, 1 run in 4 on main too).
    """
    seen: set[int] = set()
    cause = exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, (KeyboardInterrupt, SystemExit)):
            raise cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__


#: the SIGTERM this process received, until :func:`clear_pending_interrupt` (one per process)
_pending: list[KeyboardInterrupt] = []


def signal_interrupt(exc: KeyboardInterrupt) -> None:
    """Raise ``exc`` from a signal handler, remembering it.

    Why remembered: a handler's exception can be swallowed where it lands (inside a numba
    kernel it comes back as a ``SystemError``; a library may catch it during a write), and the
    run then went on to exit 0. :func:`raise_pending_interrupt`, called between blocks and when
    the command ends, raises it again, so a SIGTERM always ends the run with 143.
    """
    _pending[:] = [exc]
    raise exc


def raise_pending_interrupt() -> None:
    """Raise again the interruption :func:`signal_interrupt` raised, if one was."""
    if _pending:
        raise _pending[0]


def clear_pending_interrupt() -> None:
    _pending.clear()
