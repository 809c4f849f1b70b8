"""``sfxflow bench faults``: the fault matrix command (issue 19)."""

from __future__ import annotations

import pytest

from sfxflow.benchmarks.faults import Outcome, table
from sfxflow.cli import main


def test_an_unknown_scenario_is_one_line_and_exit_2(capsys):
    assert main(["bench", "faults", "--only", "meteor strike"]) == 2
    err = capsys.readouterr().err
    assert "'meteor strike': expected one of worker killed" in err
    assert len(err.strip().splitlines()) == 1


def test_the_table_says_what_was_skipped_and_why():
    text = table([Outcome("full disk", 2, 0, 0, 0, 3.25, "exit 75 first"),
                  Outcome("Slurm job cancelled", skipped="no Slurm here")])
    assert "| full disk | 2 | 0 | 0 | 0 | 3.2 | exit 75 first |" in text
    assert "| Slurm job cancelled | - | - | - | - | - | skipped: no Slurm here |" in text


@pytest.mark.slow
def test_a_full_disk_loses_nothing(capsys):
    # a real run under a file-size limit (the OSError path of a full disk), then the rerun
    assert main(["bench", "faults", "--only", "full disk", "--frames", "4"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| full disk"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:5] == ["0", "0", "0"] and "first run exit 75" in cells[6]
