"""Every numeric option of every command, from the declared ranges: a bad value is one line, exit 2.

The table is generated from the parsers themselves (the same range metadata that checks the
values), so an option added later is covered, and one added without a range fails here.
"""

from __future__ import annotations

import argparse
import logging
import math
import tomllib
from collections.abc import Iterator

import pytest

from sfxflow.cli import build_parser, main


def _walk(parser: argparse.ArgumentParser, path: list[str]) -> Iterator[tuple[list[str], argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield [*path, name], sub
                yield from _walk(sub, [*path, name])


PARSER = build_parser()
COMMANDS = list(_walk(PARSER, []))


def _positionals(parser: argparse.ArgumentParser) -> list[str]:
    return ["x" for a in parser._actions
            if not a.option_strings and a.nargs not in ("?", "*", argparse.PARSER)
            and not isinstance(a, argparse._SubParsersAction)]


def _numeric_options() -> Iterator[tuple[list[str], argparse.ArgumentParser, argparse.Action]]:
    for path, parser in COMMANDS:
        for action in parser._actions:
            tp = getattr(action.type, "tp", None)
            if action.option_strings and tp is not None and (
                    tp in (int, float) or str(tp) in ("int | None", "float | None")):
                yield path, parser, action


NUMERIC = list(_numeric_options())


def _bad_values(action: argparse.Action) -> list[str]:
    spec, tp = action.type.spec, action.type.tp  # type: ignore[union-attr]
    is_int = "int" in str(tp)
    out = ["nan", "inf", "-inf", "", "abc", "1e400"]
    if is_int:
        out += ["1.5", "1e20", "99999999999999999999"]
    if spec.ge is not None:
        out.append(str(int(spec.ge) - 1) if is_int else repr(float(spec.ge) - 1.0))
    if spec.gt is not None:
        out.append(str(int(spec.gt)) if is_int else repr(float(spec.gt)))
    if spec.le is not None:
        out.append(str(int(spec.le) * 10 + 1) if is_int else repr(float(spec.le) * 10 + 1))
    if spec.lt is not None:
        out.append(str(int(spec.lt)) if is_int else repr(float(spec.lt)))
    if spec.odd:
        out.append(str(int(spec.ge or 0) + 1 if int(spec.ge or 0) % 2 else int(spec.ge or 0)))
    return out


def test_every_numeric_option_declares_a_range():
    """No option of any command converts numbers without a declared range (type=int/float)."""
    raw = [f"sfxflow {' '.join(path)} {a.option_strings[0]}" for path, parser in COMMANDS
           for a in parser._actions if a.type in (int, float)]
    assert raw == []
    assert len(NUMERIC) > 150  # every setting of every tree, and each command's own numbers
    for path, _, action in NUMERIC:
        spec = action.type.spec  # type: ignore[union-attr]
        assert spec.has_range, f"sfxflow {' '.join(path)} {action.option_strings[0]}"


@pytest.mark.parametrize(("path", "parser", "action"), NUMERIC,
                         ids=[f"{' '.join(p)} {a.option_strings[0]}" for p, _, a in NUMERIC])
def test_bad_values_exit_2_naming_option_value_and_range(path, parser, action, capsys):
    flag = action.option_strings[-1] if action.option_strings[0].startswith("-") and \
        len(action.option_strings[0]) == 2 else action.option_strings[0]
    expected = action.type.expected  # type: ignore[union-attr]
    for bad in _bad_values(action):
        argv = [*path, *_positionals(parser), f"{flag}={bad}"]  # "-inf" alone reads as an option
        with pytest.raises(SystemExit) as exc:
            PARSER.parse_args(argv)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2, argv
        assert len(err.splitlines()) == 1, err
        assert f"{flag} {bad!r}: expected {expected}" in err, (argv, err)
    # and the limits themselves are accepted
    spec = action.type.spec  # type: ignore[union-attr]
    for good in (spec.ge, spec.le):
        if good is not None and math.isfinite(good) and not spec.odd:
            action.type(str(int(good)) if "int" in str(action.type.tp) else repr(float(good)))


#: issue 10, item 17: each value gave a traceback or was accepted silently
ISSUE_10_17 = [
    (["plan", "--tb", "1e30", "--core-seconds-per-gb", "1"], "--tb '1e30': expected"),
    (["plan", "--tb", "inf", "--core-seconds-per-gb", "1"], "--tb 'inf': expected"),
    (["plan", "--tib", "inf", "--core-seconds-per-gb", "1"], "--tib 'inf': expected"),
    (["plan", "--frames", "1e20", "--bytes-per-frame", "1e6", "--core-seconds-per-gb", "1"],
     "--frames '1e20': expected an integer"),
    (["plan", "--tb", "1", "--bytes-per-frame", "1e30", "--core-seconds-per-frame", "1"],
     "--bytes-per-frame '1e30': expected"),
    (["plan", "--tb", "1", "--file-gb", "inf", "--core-seconds-per-gb", "1"], "--file-gb 'inf'"),
    (["plan", "--tb", "1", "--files", "1e20", "--core-seconds-per-gb", "1"], "--files '1e20'"),
    (["plan", "--tb", "1", "--block-frames", "1e20", "--bytes-per-frame", "1e6",
      "--core-seconds-per-gb", "1"], "--block-frames '1e20'"),
    (["plan", "--tb", "1", "--frames-per-block", "1", "--bytes-per-frame", "1",
      "--core-seconds-per-gb", "1"], "units of work"),
    (["plan", "--tb", "1", "--core-seconds-per-gb", "1", "--seed", "-1"], "--seed '-1'"),
    (["plan", "--tb", "1", "--core-seconds-per-gb", "1", "--startup-s", "nan"],
     "--startup-s 'nan'"),
    (["plan", "--tb", "1", "--core-seconds-per-gb", "1", "--s3-price", "-1"], "--s3-price '-1'"),
    (["simulate", "out", "--frames", "99999999999999999999"], "--frames '99999999999999999999'"),
    (["simulate", "out", "--seed", "-1"], "--seed '-1'"),
    (["transfer", "a", "s3://b/c", "--part-size-mb", "nan"], "--part-size-mb 'nan'"),
    (["transfer", "a", "s3://b/c", "--part-size-mib", "inf"], "--part-size-mib 'inf'"),
    (["process", "in.cxi", "--scheduler", "foo:bar"], "--scheduler 'foo:bar': expected a scheduler"),
    (["process", "--cluster", "slurm", "--dry-run", "--memory", "0GB"], "--memory '0GB'"),
    (["process", "--cluster", "slurm", "--dry-run", "--memory", "-1"], "--memory '-1'"),
    (["process", "--cluster", "slurm", "--dry-run", "--memory", ""], "--memory ''"),
    (["process", "in.cxi", "--space-group", "0", "--cell", "93 93 130 90 90 120"],
     "--space-group '0': expected a space group"),
    (["process", "in.cxi", "--set", "index.cell_length_tolerance=-0.1"],
     "--set index.cell_length_tolerance = -0.1: expected a number > 0 and <= 1"),
    (["process", "in.cxi", "--set", "index.max_pairs=-1"], "index.max_pairs = -1"),
    (["process", "in.cxi", "--set", "hit.min_spots=1e30"], "hit.min_spots = 1e+30"),
    (["process", "in.cxi", "--set", "spots.border_px=100000"], "spots.border_px = 100000"),
    (["process", "in.cxi", "--cell", "", "--space-group", "P1"], "--cell '': expected six"),
    (["process", "in.cxi", "--workers", "99999999999999999999"],
     "--workers '99999999999999999999': expected an integer from 0 to 1024"),
]


@pytest.mark.parametrize(("argv", "message"), ISSUE_10_17, ids=[" ".join(a) for a, _ in ISSUE_10_17])
def test_issue_10_17_values_are_one_line_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_verbosity_after_the_subcommand():
    assert PARSER.parse_args(["process", "-v", "-v"]).verbose == 2
    assert PARSER.parse_args(["-q", "plan", "--list"]).quiet is True
    assert PARSER.parse_args(["plan", "--list", "-q"]).quiet is True
    assert PARSER.parse_args(["-v", "plan", "--list"]).verbose == 1


def test_renamed_options_still_work_and_say_so(capsys, caplog):
    caplog.set_level(logging.WARNING, logger="sfxflow.cli")
    base = ["plan", "--tb", "1", "--core-seconds-per-gb", "1", "--instances", "c3.8xlarge",
            "--nodes", "1"]
    assert main([*base, "--spread-cv", "0.1"]) == 0
    new = capsys.readouterr().out
    assert main([*base, "--spread", "0.1"]) == 0
    assert capsys.readouterr().out == new
    assert "--spread is deprecated; use --spread-cv" in caplog.text


def test_print_config_shows_the_resolved_tree_with_docs(capsys):
    assert main(["process", "--preset", "cspad-cbf", "--frames-per-block", "20",
                 "--print-config"]) == 0
    text = capsys.readouterr().out
    data = tomllib.loads(text)
    assert data["detector"]["gain_adu_per_photon"] == 9.0 and data["io"]["frames_per_block"] == 20
    line = next(ln for ln in text.splitlines() if ln.startswith("frames_per_block"))
    assert "frames per block" in line and "--frames-per-block" in line and "default 10" in line
    assert "[integrate]" in text or "integrate" not in data  # sections added later show up
