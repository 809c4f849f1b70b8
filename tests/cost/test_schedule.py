"""Schedule simulator: invariants, bounds against brute force, prefetch, big runs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfxflow.cost.schedule import Policy, simulate_schedule
from sfxflow.errors import InputError

durations = st.lists(st.floats(min_value=0.01, max_value=100.0), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(work=durations, n_nodes=st.integers(1, 12), policy=st.sampled_from(list(Policy)))
def test_work_is_conserved_and_graham_bound_holds(work: list[float], n_nodes: int,
                                                  policy: Policy) -> None:
    r = simulate_schedule(work, n_nodes, policy=policy)
    assert r.node_units.sum() == len(work)
    assert r.node_compute_s.sum() == pytest.approx(sum(work))
    # no transfer: each node finishes exactly when its own work is done
    np.testing.assert_allclose(r.node_finish_s, r.node_compute_s)
    lower = max(sum(work) / n_nodes, max(work))
    assert r.makespan_s >= lower * (1 - 1e-12)
    # any list schedule: makespan <= sum/m + (1 - 1/m) max  (Graham 1966)
    assert r.makespan_s <= sum(work) / n_nodes + (1 - 1 / n_nodes) * max(work) + 1e-9


def _optimal_makespan(work: list[float], n_nodes: int) -> float:
    best = float("inf")
    for assignment in itertools.product(range(n_nodes), repeat=len(work)):
        loads = [0.0] * n_nodes
        for w, i in zip(work, assignment, strict=True):
            loads[i] += w
        best = min(best, max(loads))
    return best


@settings(max_examples=40, deadline=None)
@given(work=st.lists(st.floats(min_value=0.1, max_value=10.0), min_size=2, max_size=7),
       n_nodes=st.integers(2, 3))
def test_lpt_within_graham_four_thirds_of_optimum(work: list[float], n_nodes: int) -> None:
    opt = _optimal_makespan(work, n_nodes)
    lpt = simulate_schedule(work, n_nodes, policy="static").makespan_s
    assert opt <= lpt + 1e-9
    assert lpt <= (4 / 3 - 1 / (3 * n_nodes)) * opt + 1e-9


def test_lpt_classic_counterexample_is_reproduced() -> None:
    """Graham's tight example for 2 machines: 3,3,2,2,2 -> LPT 7, optimum 6."""
    assert simulate_schedule([3, 3, 2, 2, 2], 2, policy="static").makespan_s == 7.0
    assert _optimal_makespan([3, 3, 2, 2, 2], 2) == 6.0


def test_dynamic_pull_follows_the_given_order() -> None:
    # order matters for pull: the big unit last leaves one node working alone
    r = simulate_schedule([1, 1, 1, 1, 4], 2, policy="dynamic")
    assert r.makespan_s == 6.0
    assert simulate_schedule([4, 1, 1, 1, 1], 2, policy="dynamic").makespan_s == 4.0


@settings(max_examples=40, deadline=None)
@given(work=durations, down=st.floats(0.0, 50.0))
def test_single_node_prefetch_recurrence(work: list[float], down: float) -> None:
    d = [down] * len(work)
    no = simulate_schedule(work, 1, transfer_s=d, prefetch=False)
    pre = simulate_schedule(work, 1, transfer_s=d, prefetch=True)
    assert no.makespan_s == pytest.approx(sum(work) + down * len(work))
    # with prefetch: first download exposed, then each step is max(compute, next download)
    expected = down + sum(max(w, down) for w in work[:-1]) + work[-1]
    assert pre.makespan_s == pytest.approx(expected)
    assert pre.makespan_s <= no.makespan_s + 1e-9


def test_transfer_bound_node_waits_for_data() -> None:
    r = simulate_schedule([1.0] * 10, 1, transfer_s=[5.0] * 10)
    assert r.makespan_s == pytest.approx(5 * 10 + 1)
    assert r.efficiency == pytest.approx(10 / 51)


def test_startup_is_billed_and_delays_everything() -> None:
    r = simulate_schedule([10.0, 10.0, 10.0], 4, startup_s=100.0)
    assert r.makespan_s == 110.0
    assert r.node_seconds == pytest.approx(3 * 110 + 100)  # the idle node also booted
    assert r.node_units.tolist().count(0) == 1


def test_static_uses_estimates_but_pays_actual_times() -> None:
    actual = [10.0, 1.0, 1.0, 1.0]
    wrong_estimates = [1.0, 1.0, 1.0, 10.0]  # the planner thinks the last unit is the big one
    good = simulate_schedule(actual, 2, policy="static")
    bad = simulate_schedule(actual, 2, policy="static", estimate_s=wrong_estimates)
    assert good.makespan_s == 10.0
    assert bad.makespan_s > good.makespan_s


def test_hundred_thousand_units_on_two_thousand_nodes() -> None:
    rng = np.random.default_rng(0)
    work = rng.lognormal(0, 0.3, 100_000)
    for policy in Policy:
        r = simulate_schedule(work, 2000, policy=policy, transfer_s=np.full(work.size, 0.2))
        assert r.node_units.sum() == 100_000
        assert r.n_nodes == 2000
        assert r.efficiency > 0.9


@pytest.mark.parametrize("kwargs,match", [
    ({"n_nodes": 0}, "nodes"),
    ({"n_nodes": 2, "policy": "random"}, "policy"),
    ({"n_nodes": 2, "transfer_s": [1.0]}, "transfer_s has 1"),
    ({"n_nodes": 2, "startup_s": -1.0}, "startup_s"),
])
def test_bad_inputs_raise_input_error(kwargs: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        simulate_schedule([1.0, 2.0], **kwargs)


def test_negative_or_nan_durations_rejected() -> None:
    with pytest.raises(InputError, match="compute_s"):
        simulate_schedule([1.0, -2.0], 2)
    with pytest.raises(InputError, match="compute_s"):
        simulate_schedule([1.0, float("nan")], 2)
