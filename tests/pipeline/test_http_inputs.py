"""Inputs and geometry over http with a password in the URL (issue 19, item 5): a real HTTP server
with basic auth on 127.0.0.1; the password is sent to the server and written nowhere else."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

from sfxflow.cli import main

from ..io.http_server import http_folder
from .conftest import CELL, SPACE_GROUP, comparable, read_frames

#: a password holding '@' and ':' (URL parsers split user:password@host at the last '@')
PASSWORD = "s3cr@t:pw@x"
USER = "u"


def _leaks(folder: Path, *texts: str) -> list[str]:
    """Where the password (or its basic-auth form) appears: files under ``folder``, texts."""
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode())
    needles = (PASSWORD.encode(), b"s3cr@t", b"t:pw@x", token)
    found = [str(p) for p in folder.rglob("*")
             if p.is_file() and any(n in p.read_bytes() for n in needles)]
    found += [f"text {i}" for i, t in enumerate(texts) if any(n.decode() in t for n in needles)]
    return found


def _argv(base: str, run: Path, *inputs: str) -> list[str]:
    return ["process", *inputs, "--out", str(run), "--geometry", f"{base}/geometry.geom",
            "--cell", CELL, "--space-group", SPACE_GROUP, "--scheduler", "synchronous",
            "--frames-per-block", "3", "--no-progress", "--no-report",
            "--set", "run.storage_retry_s=2"]


def test_http_input_and_geometry_with_password(sim_set, serial_run, tmp_path, capsys, caplog):
    # before: the scheme was stripped before the request (exit 2, "127.0.0.1:PORT/...: no
    # such file") and the message showed the password
    caplog.set_level("DEBUG")
    served = tmp_path / "served"
    served.mkdir()
    for p in (*sim_set.files, sim_set.geometry_path):
        shutil.copy(p, served / p.name)
    with http_folder(served, USER, PASSWORD) as (port, seen):
        base = f"http://{USER}:{PASSWORD}@127.0.0.1:{port}"
        run = tmp_path / "run"
        code = main(_argv(base, run, *(f"{base}/{p.name}" for p in sim_set.files)))
        out = capsys.readouterr()
        assert code == 0, out.err
        assert seen and all(h == seen[0] for h in seen)  # every request carried the password
        assert comparable(read_frames(run), file_names_only=True) == comparable(
            read_frames(serial_run[0]), file_names_only=True)
        urls = set(read_frames(run)["source_url"].to_pylist())
        assert urls == {f"http://***@127.0.0.1:{port}/{p.name}" for p in sim_set.files}
        # resumed: the same command finds its run directory compatible, everything done
        assert main(_argv(base, run, *(f"{base}/{p.name}" for p in sim_set.files))) == 0
        assert "12 frames" in capsys.readouterr().out

        # a missing input and geometry: one line naming the URL, without the password
        bad = tmp_path / "bad"
        code = main(_argv(base + "/nope", bad, f"{base}/missing.cxi"))
        out2 = capsys.readouterr()
        assert code == 2
        assert f"http://***@127.0.0.1:{port}/nope/geometry.geom" in out2.err
        # a wrong password: refused by the server, one line, the password not shown either
        wrong = f"http://{USER}:{PASSWORD[::-1]}@127.0.0.1:{port}"
        code = main(_argv(wrong, tmp_path / "wrong", f"{wrong}/{sim_set.files[0].name}"))
        out3 = capsys.readouterr()
        assert code == 2 and "access denied (HTTP 401)" in out3.err
        assert PASSWORD[::-1] not in out3.err + caplog.text
    assert not _leaks(tmp_path, out.out, out.err, out2.out, out2.err, out3.err, caplog.text)
