"""``process --help`` shows the options a user needs first; ``--help-all`` every setting; one
flag name per setting across commands, the old names kept as deprecated aliases (issue 21)."""

from __future__ import annotations

import logging

import pytest

from sfxflow.cli import main
from sfxflow.pipeline import params
from sfxflow.pipeline.config import TREES, FindSpotsConfig, IndexConfig, ProcessConfig


def _help(capsys, *argv: str) -> str:
    assert main([*argv]) == 0
    return capsys.readouterr().out


def test_process_help_is_short_and_names_the_essentials_first(capsys):
    text = _help(capsys, "process", "--help")
    assert len(text.splitlines()) < 80, len(text.splitlines())
    for flag in ("INPUT", "--geometry", "--cell", "--space-group", "--cell-file", "--out",
                 "--workers", "--cluster", "--preset", "--config", "--set", "--help-all"):
        assert flag in text, flag
    assert "--spots-sigma-strong" not in text and "--walltime TEXT" not in text
    assert "--walltime" in _help(capsys, "process", "--help-all")


def test_process_help_all_shows_every_setting(capsys):
    text = _help(capsys, "process", "--help-all")
    for leaf in params.leaves(ProcessConfig):
        assert f"--{leaf.flag}" in text, leaf.key
    assert "key spots.sigma_strong" in text  # the full help: range, default and key


def test_a_setting_hidden_from_help_still_works(tmp_path, capsys):
    assert main(["process", "--spots-sigma-strong", "4", "--print-config"]) == 0
    assert "sigma_strong = 4.0" in capsys.readouterr().out


@pytest.mark.parametrize(("command", "tree", "section"), [
    ("index", IndexConfig, "index"), ("find-spots", FindSpotsConfig, "spots")])
def test_one_flag_name_per_setting_across_commands(command, tree, section, capsys):
    process_flags = {leaf.key: leaf.flag for leaf in params.leaves(ProcessConfig)}
    for leaf in params.leaves(tree):
        assert process_flags[leaf.key] == leaf.flag, (command, leaf.key)
    text = _help(capsys, command, "--help")
    assert f"--{section}-" in text


def test_old_flag_names_are_deprecated_aliases(caplog, capsys):
    caplog.set_level(logging.WARNING)
    assert main(["index", "x.parquet", "--max-crystals", "3", "--no-profile-acceptance", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "max_crystals = 3" in out and "profile_acceptance = false" in out
    assert "--max-crystals is deprecated; use --index-max-crystals" in caplog.text
    assert "--no-profile-acceptance is deprecated; use --no-index-profile-acceptance" in caplog.text
    assert main(["find-spots", "x.cbf", "--min-snr", "6", "--print-config"]) == 0
    assert "min_snr = 6.0" in capsys.readouterr().out
    assert "--min-snr is deprecated; use --spots-min-snr" in caplog.text
    # the old names are not shown
    assert "--max-crystals " not in _help(capsys, "index", "--help")


@pytest.mark.parametrize("command", ["find-spots", "index", "merge"])
def test_every_command_help_is_short_and_help_all_shows_every_setting(command, capsys):
    short = _help(capsys, command, "--help")
    assert len(short.splitlines()) < 100, len(short.splitlines())
    assert "--help-all" in short and "--preset" in short and "--set" in short
    full = _help(capsys, command, "--help-all")
    tree = TREES[command][0]
    hidden = [leaf for leaf in params.leaves(tree) if f"--{leaf.flag}" not in short]
    assert hidden  # the expert settings are behind --help-all
    for leaf in params.leaves(tree):
        assert f"--{leaf.flag}" in full, (command, leaf.key)


def test_a_setting_has_one_flag_in_every_command():
    flags: dict[str, set[str]] = {}
    for tree, _ in TREES.values():
        for leaf in params.leaves(tree):
            flags.setdefault(leaf.key, set()).add(leaf.flag)
    assert {k: v for k, v in flags.items() if len(v) > 1} == {}


@pytest.mark.parametrize("command", ["process", "find-spots", "index"])
def test_geometry_and_out_have_the_same_short_options(command, capsys):
    text = _help(capsys, command, "--help")
    assert "-g " in text or "-g," in text, command
    assert "-o " in text or "-o," in text, command
