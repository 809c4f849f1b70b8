"""``sfxflow demo``: simulate, process, summarise, draw (small and serial here for speed)."""

from __future__ import annotations

import json
import re

from sfxflow.cli import main


def test_demo_small_serial(tmp_path, capsys):
    rc = main(["demo", str(tmp_path / "demo"), "--frames", "10", "--files", "2",
               "--hit-fraction", "0.5", "--seed", "3", "--scheduler", "synchronous"])
    out = capsys.readouterr().out
    assert rc == 0
    summary = json.loads((tmp_path / "demo" / "run" / "summary.json").read_text())
    assert summary["frames"] == 10 and summary["failed"] == 0
    assert summary["detector"]["n_pixels"] == 64 * 185 * 194  # CSPAD
    m = re.search(r"truth check: (\d+)/(\d+) simulated crystals indexed", out)
    assert m and int(m.group(2)) == summary["hits"] and int(m.group(1)) == summary["indexed"]
    png = tmp_path / "demo" / "frame.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"frames 10: hits {summary['hits']}" in out
    # it ends with the merged data and its statistics table
    assert (tmp_path / "demo" / "run" / "merge" / "merged.mtz").exists()
    assert "CC1/2" in out and "merged.mtz" in out
    # with the half-set pairs behind each CC1/2, and a resolution estimate
    assert "pairs" in out and "resolution estimate:" in out


def test_demo_rejects_bad_counts(tmp_path, capsys):
    assert main(["demo", str(tmp_path), "--frames", "2", "--files", "3"]) == 2
    assert "--files 3" in capsys.readouterr().err
