"""Stand-ins on 127.0.0.1 for the benchmarks and tests that play a facility locally: a free port
to start a server on, and the child processes (scheduler, workers, runs) stopped cleanly."""

from __future__ import annotations

import socket
import subprocess

__all__ = ["free_port", "stop_processes"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_processes(procs: list[subprocess.Popen]) -> None:
    """Terminate ``procs`` (last started first: workers before their scheduler), killing those
    that do not stop in 15 s."""
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
