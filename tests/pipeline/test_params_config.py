"""The configuration trees: one mechanism for keys, flags, ranges, files, presets and docs."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sfxflow.errors import ConfigError
from sfxflow.pipeline import params
from sfxflow.pipeline.config import (
    TREES,
    ProcessConfig,
    changed_settings,
    config_from_toml,
    config_reference,
    load_config,
    resolve_tree,
)
from sfxflow.settings import SettingError, check_fields, setting

DOCS = Path(__file__).resolve().parents[2] / "docs" / "config.md"


@dataclass(frozen=True)
class _Inner:
    """Parameters
    ----------
    sigma : a threshold.
    limit : an optional limit.
    sizes : some sizes.
    """

    sigma: float = setting(3.0, ge=0, le=10)
    limit: float | None = setting(None, gt=0, le=5)
    sizes: tuple[int, ...] = setting((1, 2), ge=1, le=9)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    n: int = setting(1, ge=0, le=3)
    flag: bool = False


def test_from_mapping_converts_and_rejects():
    t = params.from_mapping(_Outer, {"inner": {"sigma": 2, "limit": "none", "sizes": [3, 4]},
                                     "flag": "yes"})
    assert t.inner.sigma == 2.0 and t.inner.limit is None and t.inner.sizes == (3, 4)
    assert t.flag is True
    with pytest.raises(ConfigError, match=r"unknown key inner\.sigam; accepted keys in inner: "
                                          r"limit, sigma, sizes"):
        params.from_mapping(_Outer, {"inner": {"sigam": 1}})
    with pytest.raises(ConfigError, match=r"n = 'many': expected an integer from 0 to 3"):
        params.from_mapping(_Outer, {"n": "many"})
    with pytest.raises(ConfigError, match=r"inner\.sizes = \[1, 'x'\]: expected a list, each an "
                                          r"integer from 1 to 9"):
        params.from_mapping(_Outer, {"inner": {"sizes": [1, "x"]}})
    for bad in (float("nan"), float("inf"), -1.0, 10.5):
        with pytest.raises(ConfigError, match=r"inner\.sigma = .*: expected a number from 0 to 10"):
            params.from_mapping(_Outer, {"inner": {"sigma": bad}})
    with pytest.raises(SettingError, match=r"_Inner\.limit = 6\.0: expected a number > 0 and <= 5"):
        _Inner(limit=6.0)  # built directly, the same range holds


def test_overrides_and_differences():
    t = params.apply_overrides(_Outer(), ["inner.sigma=4.5", "n = 3", "inner.limit=2"])
    assert (t.inner.sigma, t.n, t.inner.limit) == (4.5, 3, 2.0)
    assert params.differences(_Outer(), t) == {"inner.sigma": (3.0, 4.5), "n": (1, 3),
                                               "inner.limit": (None, 2.0)}
    with pytest.raises(ConfigError, match=r"expected section\.key=value"):
        params.apply_overrides(_Outer(), ["inner.sigma"])
    with pytest.raises(ConfigError, match=r"n is a value, not a section"):
        params.apply_overrides(_Outer(), ["n.x=1"])


def test_leaves_flags_and_docs_of_a_tree():
    leaves = {leaf.key: leaf for leaf in params.leaves(_Outer)}
    assert leaves["inner.sigma"].flag == "inner-sigma" and leaves["inner.sigma"].doc == "a threshold."
    assert leaves["inner.limit"].expected == "a number > 0 and <= 5 or none"
    assert leaves["n"].flag == "n"


@pytest.mark.parametrize("command", sorted(TREES))
def test_every_setting_has_a_doc_a_unique_flag_and_numbers_a_range(command):
    tree = TREES[command][0]
    leaves = params.leaves(tree)  # raises on two settings sharing a flag
    assert leaves
    for leaf in leaves:
        assert leaf.doc, f"{command}: {leaf.key} has no entry in its class's Parameters section"
        if "int" in str(leaf.type) or "float" in str(leaf.type):
            assert leaf.spec.has_range, f"{command}: {leaf.key} declares no valid range"


@pytest.mark.parametrize("command", sorted(TREES))
def test_print_config_is_a_config_file_that_reads_back(command, tmp_path):
    tree = TREES[command][0]
    if tree is ProcessConfig:
        cfg = load_config(presets=["cspad-cbf"], overrides=["target.cell=[79,79,38,90,90,90]",
                                                            "target.space_group=P43212"])
    else:
        cfg = params.resolve(tree, [])
    text = params.commented_toml(cfg)
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert resolve_tree(tree, path=path) == cfg
    assert all(line.count("#") >= 1 for line in text.splitlines() if " = " in line)


def test_process_config_round_trips_through_toml():
    cfg = load_config(overrides=["spots.sigma_strong=4", "spots.d_min_a=2.0",
                                 "index.refine.n_cycles=5", "target.cell=[79,79,38,90,90,90]",
                                 "target.space_group=P43212", "cluster.job_extra=['--gres=gpu:1']"])
    back = config_from_toml(cfg.to_toml())
    assert back == cfg
    assert set(changed_settings(cfg)) == {"spots.sigma_strong", "spots.d_min_a",
                                          "index.refine.n_cycles", "target.cell",
                                          "target.space_group", "cluster.job_extra"}
    assert config_from_toml(ProcessConfig().to_toml()) == ProcessConfig()


def test_files_presets_and_precedence(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[io]\nframes_per_block = 7\nprefetch_depth = 2\n[hit]\nmin_spots = 20\n"
                    "[spots]\nmin_snr = 4\n")
    yaml = tmp_path / "c.yaml"
    yaml.write_text("io:\n  frames_per_block: 7\nhit:\n  min_spots: 20\nspots:\n  min_snr: 4\n")
    for path in (toml, yaml):
        cfg = load_config(path, ["hit.min_spots=5"], base={"io.frames_per_block": 9},
                          presets=["cspad-cbf"])
        assert cfg.io.frames_per_block == 9 and cfg.hit.min_spots == 5
        assert cfg.spots.min_snr == 4.0 and cfg.detector.gain_adu_per_photon == 9.0  # file > preset
    bad = tmp_path / "bad.toml"
    bad.write_text("[spots]\nsigma_strong = 'high'\n")
    with pytest.raises(ConfigError, match=rf"{bad}: spots\.sigma_strong = 'high': expected a "
                                          "number from 0 to 1000"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"unknown key io\.frames; accepted keys in io:"):
        load_config(overrides=["io.frames=3"])
    with pytest.raises(ConfigError, match="no such preset"):
        load_config(presets=["pilatus"])


@pytest.mark.parametrize(("override", "message"), [
    ("io.frames_per_block=0", r"io\.frames_per_block = 0: expected an integer from 1 to"),
    ("spots.window_px=4", r"spots\.window_px = 4: expected an odd integer from 3 to 63"),
    ("cluster.kind=k8s", r"cluster\.kind = 'k8s': expected one of local, synchronous"),
    # issue 10, item 17: values that were accepted silently
    ("index.cell_length_tolerance=-0.1", r"expected a number > 0 and <= 1"),
    ("index.max_pairs=-1", r"index\.max_pairs = -1: expected an integer from 1 to"),
    ("hit.min_spots=1e30", r"hit\.min_spots = 1e\+30: expected an integer from 0 to 100000"),
    ("spots.border_px=100000", r"spots\.border_px = 100000: expected an integer from 0 to 256"),
    ("target.space_group=0", r"target\.space_group = 0: expected a space group symbol"),
    ("target.space_group=231", r"target\.space_group = 231: expected a space group"),
    ("target.space_group='0'", r"target\.space_group = '0': expected a space group"),
    ("cluster.scheduler='foo:bar'", r"cluster\.scheduler = 'foo:bar': expected a scheduler address"),
    ("cluster.memory='0GB'", r"cluster\.memory = '0GB': expected a positive amount"),
    ("cluster.memory='-1'", r"cluster\.memory = '-1'"),
    ("cluster.n_workers=99999999999999999999", r"cluster\.n_workers = .*: expected an integer "
                                                r"from 0 to 1024"),
    ("target.cell=''", r"target\.cell = '': expected six numbers a b c alpha beta gamma"),
    ("target.cell=[93,93,130,90,90,200]", r"target\.cell = .*: expected six numbers"),
    ("cluster.walltime='1h'", r"cluster\.walltime = '1h': expected HH:MM:SS"),
    ("spots.sigma_strong=nan", r"spots\.sigma_strong = nan: expected a number from 0 to 1000"),
])
def test_values_out_of_range_are_refused_naming_key_value_and_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_scheduler_addresses_accepted():
    cfg = load_config(overrides=["cluster.scheduler=synchronous"])
    assert (cfg.cluster.kind, cfg.cluster.scheduler) == ("synchronous", "")
    for address in ("tcp://10.0.0.1:8786", "tls://node-1.cluster:8786", "node1:8786",
                    "tcp://[::1]:8786"):
        assert load_config(overrides=[f"cluster.scheduler='{address}'"]).cluster.scheduler == address


def test_cspad_preset_is_the_libraries_cspad_settings():
    from sfxflow.algorithms.spots import CSPAD_CBF_GAIN_ADU_PER_PHOTON, CSPAD_CBF_SETTINGS
    from sfxflow.pipeline.config import preset

    assert preset("cspad-cbf") == {"detector": {"gain_adu_per_photon": CSPAD_CBF_GAIN_ADU_PER_PHOTON},
                                   "spots": CSPAD_CBF_SETTINGS}


def test_target_needs_space_group():
    with pytest.raises(ConfigError, match="space group"):
        load_config(overrides=["target.cell=[93,93,130.5,90,90,120]"]).target_cell()
    assert load_config().target_cell() is None


def test_docs_config_md_is_generated_from_the_code():
    assert DOCS.read_text(encoding="utf-8") == config_reference(), (
        "docs/config.md is stale: regenerate it with "
        "'python -m sfxflow.pipeline.config > docs/config.md'")
    assert "`--spots-sigma-strong`" in DOCS.read_text(encoding="utf-8")
    assert tomllib.loads("[spots]\nmin_snr = 6.0\n")  # the preset format is plain TOML
