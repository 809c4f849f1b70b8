#!/usr/bin/env python3
"""Write constraints.txt: exact versions of sfxflow's runtime dependency closure, as installed.

Run with the interpreter of an environment where the test suite passes (``.venv/bin/python
scripts/lock_constraints.py``); the Dockerfile and apptainer.def install exactly these versions,
so the image runs what the tests ran. Only runtime dependencies (``[project].dependencies``,
extras they request, environment markers for Linux/CPython 3.11) are followed; dev and gpu extras
are not.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def closure(root: str = "sfxflow") -> dict[str, str]:
    env = default_environment()
    env.update({"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
                "platform_python_implementation": "CPython", "implementation_name": "cpython"})
    pins: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        dist = metadata.distribution(name)
        if canonicalize_name(name) != canonicalize_name(root):
            pins[canonicalize_name(dist.metadata["Name"])] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not any(
                    req.marker.evaluate({**env, "extra": e}) for e in (extras or {""})):
                continue
            todo.append((req.name, frozenset(req.extras)))
    return dict(sorted(pins.items()))


def main() -> int:
    pins = closure()
    lines = ["# Exact runtime dependency versions for the container images (Dockerfile,",
             "# apptainer.def): the versions the test suite ran with. Regenerate with",
             "#   .venv/bin/python scripts/lock_constraints.py",
             f"# (Python {sys.version_info.major}.{sys.version_info.minor}, Linux x86_64).",
             *(f"{name}=={version}" for name, version in pins.items())]
    (ROOT / "constraints.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(pins)} pins to {ROOT / 'constraints.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
