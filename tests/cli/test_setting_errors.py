"""Every bad setting is one :class:`SettingError`, checked once, and one line with exit 2 at the CLI.

Whether the value comes from a configuration file, ``--set`` or a flag, the message names where
it came from, the key, the value and what was expected; a range declared on a ``Params`` field
is checked by that class alone (``__post_init__``), so the same words come from every surface.
"""

from __future__ import annotations

import dataclasses
import tomllib

import pytest
import tomli_w

from sfxflow.algorithms.integrate import IntegrateParams
from sfxflow.algorithms.merge.scale import MergeParams
from sfxflow.algorithms.predict import PredictParams
from sfxflow.algorithms.refine import RefineParams
from sfxflow.algorithms.simulate import SimulationParams
from sfxflow.algorithms.spots import SpotParams
from sfxflow.cli import main
from sfxflow.errors import ConfigError
from sfxflow.pipeline import params
from sfxflow.pipeline.config import TREES, load_config
from sfxflow.settings import SettingError


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(("text", "message"), [
    ("[spots]\nsigma_strong = -2\n", "spots.sigma_strong = -2: expected a number from 0 to 1000"),
    ("[spots]\nsigma_strong = 'high'\n", "spots.sigma_strong = 'high': expected a number"),
    ("[spots]\nmin_spot_pixels = 600\n",
     "spots.min_spot_pixels = 600: expected <= max_spot_pixels (500)"),
    ("[integrate]\nbackground_outer_px = 3.5\n",
     "integrate.background_outer_px = 3.5: expected > background_inner_px (4.0)"),
    ("[predict]\nmax_profile_radius_inv_a = 1e-5\n",
     "predict.max_profile_radius_inv_a = 1e-05: expected > min_profile_radius_inv_a"),
    ("[spots]\nsigmastrong = 3\n", "unknown key spots.sigmastrong"),
])
def test_config_file(text, message, tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    err = _error(["process", "in.cxi", "--config", str(path), "--print-config"], capsys)
    assert f"{path}: {message}" in err, err


@pytest.mark.parametrize(("item", "message"), [
    ("spots.window_px=4", "--set spots.window_px = 4: expected an odd integer from 3 to 63"),
    ("hit.min_spots=1e30", "--set hit.min_spots = 1e+30: expected an integer from 0 to 100000"),
    ("spots.d_min_a=-1", "--set spots.d_min_a = -1: expected a number > 0 and <= 10000 or none"),
    ("spots.d_min_a=5", None),  # a minimum alone is fine
    ("integrate.peak_radius_px=5", "--set integrate.peak_radius_px = 5: expected <= "
                                   "background_inner_px (4.0)"),
    ("index.refine.refine_distance=true", "--set index.refine.refine_distance = True: expected "
                                          "False (refine_distance needs refine_cell = False"),
])
def test_set(item, message, capsys):
    argv = ["process", "in.cxi", "--set", item, "--print-config"]
    if message is None:
        assert main(argv) == 0
        return
    assert message in _error(argv, capsys)


@pytest.mark.parametrize(("argv", "message"), [
    (["process", "in.cxi", "--spots-sigma-strong", "-2"],
     "--spots-sigma-strong '-2': expected a number from 0 to 1000 (key spots.sigma_strong)"),
    (["process", "in.cxi", "--spots-min-spot-pixels", "600"],
     "--spots-min-spot-pixels (key spots.min_spot_pixels) = 600: expected <= max_spot_pixels"),
    (["process", "in.cxi", "--integrate-background-inner-px", "2"],
     "--integrate-background-inner-px (key integrate.background_inner_px) = 2.0: expected >= "
     "peak_radius_px (3.0)"),
    (["find-spots", "in.cxi", "--spots-max-spot-pixels", "1", "--spots-min-spot-pixels", "2"],
     "--spots-max-spot-pixels (key spots.max_spot_pixels) = 1: expected >= min_spot_pixels (2)"),
    (["merge", "run", "--radius-max-inv-a", "1e-4"],
     "--radius-max-inv-a (key merge.radius_max_inv_a) = 0.0001: expected >= radius_min_inv_a"),
])
def test_flag(argv, message, capsys):
    assert message in _error([*argv, "--print-config"], capsys)


def test_every_bad_setting_is_one_error_type():
    """Conversion, unknown keys, ranges and cross-field checks: SettingError (a ConfigError for
    the CLI's exit 2, a ValueError for library callers) from every class and every layer."""
    bad_objects = [
        lambda: SpotParams(min_spot_pixels=5, max_spot_pixels=2),
        lambda: SpotParams(d_min_a=5.0, d_max_a=2.0),
        lambda: PredictParams(min_profile_radius_inv_a=1e-3, max_profile_radius_inv_a=1e-4),
        lambda: PredictParams(cutoff=float("nan")),
        lambda: IntegrateParams(peak_radius_px=5.0),
        lambda: IntegrateParams(background_inner_px=6.0, background_outer_px=6.0),
        lambda: IntegrateParams(outlier_nsigma=0.0),
        lambda: RefineParams(refine_distance=True, refine_cell=True),
        lambda: MergeParams(radius_min_inv_a=1e-3, radius_max_inv_a=1e-4),
        lambda: SimulationParams(crystal_size_min_a=5000.0, crystal_size_max_a=2000.0),
        lambda: SimulationParams(cell=(1.0, 2.0)),  # type: ignore[arg-type]
        lambda: load_config(overrides=["spots.sigma_strong=x"]),
        lambda: load_config(overrides=["spots.nope=1"]),
        lambda: load_config(overrides=["spots=1"]),
        lambda: load_config(overrides=["predict.cutoff=0"]),
        lambda: load_config(overrides=["target.cell=[93, 93, 130, 90, 90, 120]",
                                       "target.space_group=P212121"]).target_cell(),
        lambda: load_config(overrides=["target.cell=[93, 93, 130, 90, 90, 120]"]).target_cell(),
    ]
    for make in bad_objects:
        with pytest.raises(SettingError) as info:
            make()
        assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)


def test_every_section_checks_its_own_ranges():
    """Ranges are checked once, by the dataclass (``__post_init__``): a section that skipped
    check_fields would let a file or ``--set`` through unchecked, since they only convert."""
    for tree, _ in TREES.values():
        for sec in params.sections(tree):
            ranged = [leaf for leaf in params.leaves(tree)
                      if leaf.section == sec.key and leaf.spec.has_range and leaf.spec.ge is not None]
            for leaf in ranged[:1]:
                name = leaf.key.rpartition(".")[2]
                field = next(f for f in dataclasses.fields(sec.cls) if f.name == name)
                with pytest.raises(SettingError, match=rf"{sec.cls.__name__}\.{name} = "):
                    sec.cls(**{field.name: leaf.spec.ge - 1})


def test_a_minimum_above_the_default_maximum_is_reported_on_the_key_given():
    with pytest.raises(SettingError, match=r"^--set spots\.min_spot_pixels = 600: expected <= "
                                           r"max_spot_pixels \(500\)$"):
        load_config(overrides=["spots.min_spot_pixels=600"])
    with pytest.raises(SettingError, match=r"^--set spots\.max_spot_pixels = 1: expected >= "
                                           r"min_spot_pixels \(2\)$"):
        load_config(overrides=["spots.max_spot_pixels=1"])


@pytest.mark.parametrize(("old", "new", "value"), [
    ("spots.gain_adu_per_photon", "detector.gain_adu_per_photon", 9.0),
    ("spots.radial_snr", "spots.radial.snr", 4.0),
    ("spots.radial_iterations", "spots.radial.iterations", 3),
    ("spots.radial_bin_px", "spots.radial.bin_px", 2.0),
])
def test_moved_settings_keep_their_old_keys_and_flags_with_a_warning(old, new, value, tmp_path,
                                                                     caplog):
    """The gain lives with the detector and the radial method's settings in spots.radial; a
    file, --set or flag (process and find-spots) with the old name still works, and says so."""
    def get(cfg):
        obj = cfg
        for part in new.split("."):
            obj = getattr(obj, part)
        return obj

    assert get(load_config(overrides=[f"{new}={value}"])) == value
    assert get(load_config(overrides=[f"{old}={value}"])) == value
    assert f"--set: {old} is deprecated; use {new}" in caplog.text
    section, _, name = old.partition(".")
    path = tmp_path / "old.toml"
    path.write_text(f"[{section}]\n{name} = {value}\n")
    assert get(load_config(path)) == value
    assert f"{path}: {old} is deprecated; use {new}" in caplog.text
    from sfxflow.pipeline.config import ProcessConfig, config_from_toml

    # a run directory's config.toml written before the move still resumes
    data = tomllib.loads(ProcessConfig().to_toml())
    del data["detector"], data["spots"]["radial"]
    data["spots"][name] = value
    caplog.clear()
    assert get(config_from_toml(tomli_w.dumps(data))) == value
    assert "deprecated" not in caplog.text  # sfxflow wrote those keys, not the user
    old_flag = "--" + old.replace(".", "-").replace("_", "-")
    new_flag = "--" + (params.leaves_by_key(ProcessConfig)[new].flag)
    for command in (["process", "in.cxi"], ["find-spots", "in.cxi"]):
        caplog.clear()
        assert main([*command, old_flag, str(value), "--print-config"]) == 0
        if old_flag != new_flag:  # --spots-radial-snr: the flag kept its name
            assert f"{old_flag} is deprecated; use {new_flag}" in caplog.text


def test_gain_is_a_detector_setting(capsys):
    with pytest.raises(SettingError, match=r"gain_adu_per_photon = 0: expected a number > 0"):
        load_config(overrides=["detector.gain_adu_per_photon=0"])
    assert main(["process", "in.cxi", "--gain-adu-per-photon", "9", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "[detector]" in text and "gain_adu_per_photon = 9.0" in text
    assert "gain_adu_per_photon" not in text.split("[spots]")[1].split("\n[")[0]


def test_a_run_directory_made_with_another_gain_is_not_resumed(tmp_path):
    """The gain changes every intensity: like a spot-finding setting, it must match to resume."""
    from sfxflow.io.results import RunDir
    from sfxflow.pipeline.run import _check_compatible

    run = RunDir(str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text(
        load_config(overrides=["detector.gain_adu_per_photon=9"]).to_toml())
    _check_compatible(run, load_config(overrides=["detector.gain_adu_per_photon=9"]))
    with pytest.raises(ConfigError, match=r"made with detector\.gain_adu_per_photon = 9\.0, now"):
        _check_compatible(run, load_config())
