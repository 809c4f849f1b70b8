"""The container recipes (Dockerfile, apptainer.def) install what pyproject.toml declares.

No container engine runs here, so the recipes are checked by reading them: the same package,
the same Python version, pinned dependencies that satisfy pyproject, a non-root user, the
``sfxflow`` entry point. The slow test resolves the image's install steps with pip in a clean
virtual environment (needs PyPI; skipped without it); scripts/container_check.sh runs them fully.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _dockerfile_lines() -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def _pip_installs(commands: list[str]) -> list[list[str]]:
    """Arguments of every ``pip install`` in the commands (split on && / ;)."""
    out = []
    for cmd in commands:
        for part in re.split(r"&&|;", cmd):
            words = shlex.split(part)
            if words[:2] == ["pip", "install"]:
                out.append(words[2:])
    return out


def _docker_runs() -> list[str]:
    return [ln[4:] for ln in _dockerfile_lines() if ln.startswith("RUN ")]


def _apptainer_post() -> list[str]:
    text = (ROOT / "apptainer.def").read_text()
    post = text.split("%post", 1)[1]
    post = re.split(r"^%\w+", post, maxsplit=1, flags=re.M)[0]
    return [ln.strip() for ln in post.splitlines() if ln.strip()]


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version
    return pins


def test_base_image_python_matches_pyproject() -> None:
    lines = _dockerfile_lines()
    froms = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    assert len(froms) == 1
    # the base is a build argument whose default is the pinned Python image
    defaults = dict(ln[4:].split("=", 1) for ln in lines if ln.startswith("ARG ") and "=" in ln)
    froms = [re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m[1], m[0]), f) for f in froms]
    m = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-(\w+)", froms[0])
    assert m, f"base image {froms[0]!r} is not a pinned python:X.Y.Z-slim-DIST"
    version = ".".join(m.groups()[:3])
    assert version in SpecifierSet(_pyproject()["project"]["requires-python"])
    assert f"{m[1]}.{m[2]}" == f"{sys.version_info[0]}.{sys.version_info[1]}"  # as tested
    app = (ROOT / "apptainer.def").read_text()
    assert re.search(r"^Bootstrap:\s*docker$", app, re.M)
    assert re.search(rf"^From:\s*{re.escape(froms[0])}$", app, re.M)


def test_install_steps_are_the_same_in_both_recipes() -> None:
    docker = _pip_installs(_docker_runs())
    apptainer = _pip_installs(_apptainer_post())
    assert docker == apptainer
    assert docker == [
        ["--require-virtualenv", "-r", "$CONSTRAINTS"],
        ["--require-virtualenv", "--no-deps", "-c", "$CONSTRAINTS", "$SFXFLOW_SRC"],
    ]
    for commands in (_docker_runs(), _apptainer_post()):
        joined = " ".join(commands)
        assert "pip check" in joined and "sfxflow --help" in joined


def test_package_copied_is_this_project() -> None:
    lines = _dockerfile_lines()
    copies = [ln for ln in lines if ln.startswith("COPY ")]
    copied = {ln.split()[1] for ln in copies}
    assert {"pyproject.toml", "constraints.txt", "src"} <= copied
    readme = _pyproject()["project"]["readme"]
    assert any(readme in ln for ln in copies)
    files = (ROOT / "apptainer.def").read_text().split("%files", 1)[1].split("%", 1)[0]
    assert {w.split()[0] for w in files.strip().splitlines()} == {
        "constraints.txt", "pyproject.toml", readme, "src"}
    assert _pyproject()["project"]["scripts"]["sfxflow"] == "sfxflow.cli:command"


def test_runs_as_non_root_with_sfxflow_entrypoint() -> None:
    lines = _dockerfile_lines()
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(ln.startswith("RUN useradd") and users[-1] in ln for ln in lines)
    entry = [ln for ln in lines if ln.startswith("ENTRYPOINT ")]
    assert json.loads(entry[-1].split(" ", 1)[1]) == ["sfxflow"]
    assert "exec sfxflow" in (ROOT / "apptainer.def").read_text()


def test_dockerignore_keeps_needed_files() -> None:
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert not ignored & {"src", "pyproject.toml", "README.md", "constraints.txt"}
    assert {".git", ".venv"} <= ignored


def test_constraints_pin_every_runtime_dependency_within_pyproject() -> None:
    pins = _constraints()
    for text in _pyproject()["project"]["dependencies"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, pyproject wants {req.specifier}")
    for dev_only in ("pytest", "moto", "ruff", "mypy", "awscli", "fabio"):
        assert dev_only not in pins


@pytest.mark.slow
def test_install_steps_resolve_in_a_clean_venv(tmp_path: Path) -> None:
    """pip resolves the image's two install steps in a fresh venv (metadata only, --dry-run)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    report = tmp_path / "report.json"
    deps = subprocess.run([*pip, "install", "--dry-run", "--quiet", "--report", str(report),
                           "-r", str(ROOT / "constraints.txt")],
                          capture_output=True, text=True, timeout=240, check=False)
    if deps.returncode != 0 and any(s in deps.stderr for s in (
            "Could not find a version", "NewConnectionError", "Temporary failure",
            "No matching distribution", "Network is unreachable")):
        pytest.skip(f"package index not reachable: {deps.stderr.strip().splitlines()[-1]}")
    assert deps.returncode == 0, deps.stderr
    would = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
             for i in json.loads(report.read_text())["install"]}
    assert would == _constraints()  # nothing more, nothing different
