"""Instance catalogue (TOML, overrides) and the throughput/cost model pieces."""

from __future__ import annotations

import numpy as np
import pytest

from sfxflow.cost.catalogue import default_catalogue, load_catalogue, parse_catalogue
from sfxflow.cost.model import (
    GB,
    TB,
    Measurement,
    PlanParams,
    measurement_from_summary,
    plan_run,
    split_units,
    unit_times,
)
from sfxflow.errors import ConfigError, InputError


def test_shipped_catalogue_marks_current_types_as_placeholders() -> None:
    cat = default_catalogue()
    for name in ("c7i.8xlarge", "c7a.8xlarge", "c8g.8xlarge", "hpc7a.96xlarge"):
        inst = cat[name]
        assert inst.placeholder
        assert "PLACEHOLDER" in inst.price_source
        assert inst.root_volume_gb > 0
    assert cat["c8g.8xlarge"].arch == "aarch64"


def test_user_file_overrides_and_extends() -> None:
    text = """
[catalogue]
s3_price_per_gb_month = 0.021
[instance."c7i.8xlarge"]
price_per_hour = 0.61
placeholder = false
[instance."lab-node"]
vcpus = 64
price_per_hour = 0.0
vcpu_speed = 1.7
"""
    cat = load_catalogue(text, "mine.toml")
    assert cat["c7i.8xlarge"].price_per_hour == 0.61
    assert cat["c7i.8xlarge"].vcpus == 32  # untouched fields kept
    assert not cat["c7i.8xlarge"].placeholder
    assert cat["lab-node"].node_speed == pytest.approx(64 * 1.7)
    assert cat.s3_price_per_gb_month == 0.021
    assert cat.ebs_price_per_gb_month == 0.10
    assert cat.sources[-1] == "mine.toml"
    assert "c3.8xlarge" in cat


@pytest.mark.parametrize("text,match", [
    ('[instance."x"]\nvcpus = 8', r"mine.toml: new instance .*lacks \['price_per_hour'\]"),
    ('[instance."c3.8xlarge"]\nvcpu = 8', r"mine.toml: unknown key\(s\) \['vcpu'\]"),
    ('[instance."c3.8xlarge"]\nvcpus = "many"', r"vcpus = 'many'; expected a positive integer"),
    ('[instance."c3.8xlarge"]\nprice_per_hour = -1', r"price_per_hour = -1; expected a number"),
    ('[instance."c3.8xlarge"]\nvcpu_speed = 0', r"vcpu_speed = 0; expected a number > 0"),
    ("[catalogue]\nreference = 'nope'", r"catalogue.reference = 'nope' is not an instance"),
    ("[machines]\n", r"unknown table"),
    ("price = ", r"mine.toml: not valid TOML"),
])
def test_bad_catalogue_one_line_errors(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        load_catalogue(text, "mine.toml")
    assert "\n" not in str(info.value)


def test_unknown_instance_names_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"'c5.big' is not in the catalogue.*c3.8xlarge"):
        default_catalogue()["c5.big"]


def test_standalone_catalogue_needs_head() -> None:
    with pytest.raises(ConfigError, match="needs reference"):
        parse_catalogue('[instance."a"]\nvcpus = 2\nprice_per_hour = 1.0', "solo.toml")


SUMMARY = {
    "frames": 1000, "hits": 200, "hit_rate": 0.2, "core_seconds_per_frame": 0.5,
    "bytes_per_frame": 4_594_560, "stage_seconds": {"decode": 50.0, "spots": 250.0,
                                                    "index": 150.0, "integrate": 50.0},
}


def test_measurement_from_summary_splits_hit_only_work() -> None:
    m = measurement_from_summary(SUMMARY, "run/summary.json")
    assert m.hit_only_fraction == pytest.approx(200 / 500)
    assert m.core_seconds_per_frame_at(0.2) == pytest.approx(0.5)  # measured point reproduced
    assert m.core_seconds_per_frame_at(0.0) == pytest.approx(0.5 * 0.6)
    assert m.core_seconds_per_frame_at(1.0) == pytest.approx(0.5 * (0.6 + 0.4 * 5))
    assert m.reference_core_seconds_per_byte(0.2) == pytest.approx(0.5 / 4_594_560)


def test_measurement_scales_by_measuring_machine_speed() -> None:
    fast = measurement_from_summary(SUMMARY, "s.json", vcpu_speed=2.0)
    slow = measurement_from_summary(SUMMARY, "s.json")
    assert fast.reference_core_seconds_per_byte() == pytest.approx(
        2 * slow.reference_core_seconds_per_byte())


@pytest.mark.parametrize("summary,match", [
    ({}, r"s.json: no 'core_seconds_per_frame'"),
    ({"core_seconds_per_frame": 0}, r"'core_seconds_per_frame' = 0; expected a number > 0"),
    ({"core_seconds_per_frame": "fast"}, r"= 'fast'"),
    ({"core_seconds_per_frame": 1.0, "hit_rate": 1.5}, r"'hit_rate' = 1.5; expected 0..1"),
    ({"core_seconds_per_frame": 1.0, "stage_seconds": [1, 2]}, r"'stage_seconds'"),
])
def test_bad_summary_errors(summary: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        measurement_from_summary(summary, "s.json")


def test_measurement_without_bytes_per_frame_asks_for_it() -> None:
    with pytest.raises(InputError, match="--bytes-per-frame"):
        Measurement(1.0).reference_core_seconds_per_byte()


def test_split_units_conserves_bytes() -> None:
    units = split_units(15.5 * TB, unit_bytes=5 * GB)
    assert units.size == 3100
    assert units.sum() == pytest.approx(15.5 * TB)
    units = split_units(15.5 * TB + 1e9, unit_bytes=5 * GB)
    assert units.size == 3101 and units[-1] == pytest.approx(1e9)


def test_unit_times_variation_has_mean_one_and_given_cv() -> None:
    cat = default_catalogue()
    units = np.full(200_000, 1e9)
    params = PlanParams(core_seconds_per_byte=1e-6, spread_cv=0.25, seed=5)
    compute, estimate, transfer = unit_times(units, cat["c3.8xlarge"], params)
    nominal = 1e9 * 1e-6 / 32
    assert compute.mean() / nominal == pytest.approx(1.0, abs=0.005)
    assert compute.std() / compute.mean() == pytest.approx(0.25, abs=0.005)
    np.testing.assert_array_equal(estimate, compute)  # estimate_cv = 0: perfect foreknowledge
    assert not transfer.any()


def test_plan_run_prices_node_hours_with_root_volume_and_overrides() -> None:
    cat = default_catalogue()
    inst = cat["c7i.8xlarge"]  # placeholder with a 12 GB root volume on top
    units = split_units(1 * TB, unit_bytes=5 * GB)
    params = PlanParams(core_seconds_per_byte=2e-6, bandwidth_gbit=10.0, startup_s=120.0)
    row, sched = plan_run(inst, 8, units, params, cat)
    per_hour = inst.price_per_hour + 12 * 0.10 / 730
    assert row.cost_usd == pytest.approx(sched.node_seconds / 3600 * per_hour)
    assert row.placeholder
    assert row.makespan_s >= row.mean_s >= 120
    assert row.rate_tb_per_h() == pytest.approx(1 / (row.makespan_s / 3600))
    priced = plan_run(inst, 8, units, PlanParams(core_seconds_per_byte=2e-6, bandwidth_gbit=10.0,
                      startup_s=120.0, prices={"c7i.8xlarge": 0.5}), cat)[0]
    assert not priced.placeholder
    assert priced.cost_usd == pytest.approx(row.cost_usd * (0.5 + 12 * 0.1 / 730) / per_hour)


def test_faster_instance_and_more_nodes_are_faster() -> None:
    cat = default_catalogue()
    units = split_units(2 * TB, unit_bytes=5 * GB)
    params = PlanParams(core_seconds_per_byte=5e-6, bandwidth_gbit=1.33)
    t = {(name, n): plan_run(cat[name], n, units, params, cat)[0].makespan_s
         for name in ("c3.8xlarge", "c4.8xlarge") for n in (4, 8)}
    assert t[("c4.8xlarge", 4)] < t[("c3.8xlarge", 4)]
    assert t[("c3.8xlarge", 8)] < t[("c3.8xlarge", 4)]


def test_transfer_bound_plan_without_prefetch_adds_download() -> None:
    cat = default_catalogue()
    units = split_units(100 * GB, unit_bytes=5 * GB)
    base = dict(core_seconds_per_byte=32 * 10 / 5e9, bandwidth_gbit=1.0)  # 10 s compute per unit
    pre = plan_run(cat["c3.8xlarge"], 1, units, PlanParams(**base), cat)[0]
    no = plan_run(cat["c3.8xlarge"], 1, units, PlanParams(**base, prefetch=False), cat)[0]
    assert no.makespan_s == pytest.approx(20 * (40 + 10))
    assert pre.makespan_s == pytest.approx(20 * 40 + 10)
