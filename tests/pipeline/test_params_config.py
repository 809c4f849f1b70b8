"""The configuration tree: files, overrides, unknown keys, round trip through config.toml."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from sfxflow.errors import ConfigError
from sfxflow.pipeline import params
from sfxflow.pipeline.config import ProcessConfig, changed_settings, config_from_toml, load_config


@dataclass(frozen=True)
class _Inner:
    sigma: float = 3.0
    limit: float | None = None
    sizes: tuple[int, ...] = (1, 2)


@dataclass(frozen=True)
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    n: int = 1
    flag: bool = False


def test_from_mapping_converts_and_rejects():
    t = params.from_mapping(_Outer, {"inner": {"sigma": 2, "limit": "none", "sizes": [3, 4]},
                                     "flag": "yes"})
    assert t.inner.sigma == 2.0 and t.inner.limit is None and t.inner.sizes == (3, 4)
    assert t.flag is True
    with pytest.raises(ConfigError, match=r"unknown key inner\.sigam; accepted keys in inner: "
                                          r"limit, sigma, sizes"):
        params.from_mapping(_Outer, {"inner": {"sigam": 1}})
    with pytest.raises(ConfigError, match=r"n = 'many' is not valid; expected an integer"):
        params.from_mapping(_Outer, {"n": "many"})
    with pytest.raises(ConfigError, match=r"inner\.sizes\[1\]"):
        params.from_mapping(_Outer, {"inner": {"sizes": [1, "x"]}})


def test_overrides_and_differences():
    t = params.apply_overrides(_Outer(), ["inner.sigma=4.5", "n = 3", "inner.limit=2"])
    assert (t.inner.sigma, t.n, t.inner.limit) == (4.5, 3, 2.0)
    assert params.differences(_Outer(), t) == {"inner.sigma": (3.0, 4.5), "n": (1, 3),
                                               "inner.limit": (None, 2.0)}
    with pytest.raises(ConfigError, match=r"expected section\.key=value"):
        params.apply_overrides(_Outer(), ["inner.sigma"])
    with pytest.raises(ConfigError, match=r"n is a value, not a section"):
        params.apply_overrides(_Outer(), ["n.x=1"])


def test_process_config_round_trips_through_toml():
    cfg = load_config(overrides=["spots.sigma_strong=4", "spots.d_min_a=2.0",
                                 "index.refine.n_cycles=5", "target.cell=[79,79,38,90,90,90]",
                                 "target.space_group=P43212", "cluster.job_extra=['--gres=gpu:1']"])
    text = cfg.to_toml()
    back = config_from_toml(text)
    assert back == cfg
    assert set(changed_settings(cfg)) == {"spots.sigma_strong", "spots.d_min_a",
                                          "index.refine.n_cycles", "target.cell",
                                          "target.space_group", "cluster.job_extra"}
    assert config_from_toml(ProcessConfig().to_toml()) == ProcessConfig()


def test_files_and_precedence(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[io]\nframes_per_block = 7\nprefetch_depth = 2\n[hit]\nmin_spots = 20\n")
    yaml = tmp_path / "c.yaml"
    yaml.write_text("io:\n  frames_per_block: 7\nhit:\n  min_spots: 20\n")
    for path in (toml, yaml):
        cfg = load_config(path, ["hit.min_spots=5"], base={"io": {"frames_per_block": 9}})
        assert cfg.io.frames_per_block == 9 and cfg.hit.min_spots == 5
    bad = tmp_path / "bad.toml"
    bad.write_text("[spots]\nsigma_strong = 'high'\n")
    with pytest.raises(ConfigError, match=rf"{bad}: spots\.sigma_strong = 'high'"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"unknown key io\.frames; accepted keys in io:"):
        load_config(overrides=["io.frames=3"])
    with pytest.raises(ConfigError, match=r"io\.frames_per_block = 0: expected >= 1"):
        load_config(overrides=["io.frames_per_block=0"])
    with pytest.raises(ConfigError, match="spot finding parameter window_px=4"):
        load_config(overrides=["spots.window_px=4"])
    with pytest.raises(ConfigError, match=r"cluster\.kind = 'k8s'"):
        load_config(overrides=["cluster.kind=k8s"])


def test_target_needs_space_group():
    with pytest.raises(ConfigError, match="space group"):
        load_config(overrides=["target.cell=[93,93,130.5,90,90,120]"]).target_cell()
    assert load_config().target_cell() is None
