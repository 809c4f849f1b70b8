"""Throughput and cost model: how long N nodes of a type take to process a data set, and its price.

The model, stated once
----------------------
* **Compute.** A measured run gives ``core_seconds_per_frame`` on its machine (summary.json:
  wall time x cores / frames), at that run's hit rate. Costs split into stages every frame pays
  (read, spots, hit) and stages only hits pay (index, which includes refinement, and integrate,
  which includes prediction: the per-frame pipeline's stage names); the split
  comes from the run's ``stage_seconds``, so a different hit fraction scales only the hit part.
  Times move between machines by ``vcpu_speed`` (per-vCPU throughput relative to the catalogue's
  reference vCPU): a unit of ``b`` bytes takes
  ``b * core_seconds_per_byte_ref / (vcpus * vcpu_speed)`` seconds on a node.
* **Transfer.** A unit is downloaded at ``bandwidth_gbit`` per node (decimal Gbit/s). With
  prefetch, downloading the next unit overlaps computing the current one
  (per unit ``max(compute, transfer)``); without, they add (see :mod:`sfxflow.cost.schedule`).
* **Variation.** Per-unit times vary by a log-normal factor of coefficient of variation
  ``spread_cv``, normalised to mean exactly 1 (the total work stays as measured); the static planner sees them through an estimate error
  ``estimate_cv``.
* **Cost.** Each node is billed from the start until its own last unit finishes (Poon et al.
  2017, Table 2: cost = nodes x *average* node time x price), at ``price_per_hour`` plus its EBS
  root volume (``root_volume_gb`` x EBS price per GB-month / 730 h). S3 storage is billed
  separately per month (GB = 2**30 bytes, as AWS bills).
* **Rates.** TB/h = data / wall time; ``TB`` is 10**12 bytes unless ``tb_bytes = TIB`` is asked
  for (Poon et al. use binary units: their 15.5 "TB" and storage figures agree only as TiB).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from sfxflow.cost.catalogue import Catalogue, Instance
from sfxflow.cost.schedule import Policy, ScheduleResult, simulate_schedule
from sfxflow.errors import ConfigError, InputError

__all__ = [
    "GB",
    "GIB",
    "HIT_ONLY_STAGES",
    "TB",
    "TIB",
    "Measurement",
    "PlanParams",
    "PlanRow",
    "ec2_cost_usd",
    "measurement_from_summary",
    "plan_run",
    "rate_tb_per_h",
    "split_units",
    "storage_cost_per_month",
    "transfer_time_s",
    "unit_times",
]

log = logging.getLogger(__name__)

GB = 1e9
TB = 1e12
GIB = float(2**30)
TIB = float(2**40)

#: summary.json ``stage_seconds`` keys whose work is done only for hits (the stages of
#: :func:`sfxflow.pipeline.frame.process_frame`; refinement is part of ``index``).
HIT_ONLY_STAGES = ("index", "integrate")


# ----------------------------------------------------------------------------------------------
# closed-form pieces


def rate_tb_per_h(total_bytes: float, seconds: float, tb_bytes: float = TB) -> float:
    """Processing rate in TB per hour.

    >>> round(rate_tb_per_h(15.5 * TB, 189_439), 3)
    0.295
    """
    if seconds <= 0:
        raise InputError(f"time {seconds} s; expected > 0")
    return total_bytes / tb_bytes / (seconds / 3600.0)


def ec2_cost_usd(node_seconds: float, price_per_hour: float,
                 root_volume_per_hour: float = 0.0) -> float:
    """Compute cost: billed node-seconds times the hourly node price (plus root volume).

    >>> round(ec2_cost_usd(16 * 189_439, 0.387), 2)
    325.84
    """
    return node_seconds / 3600.0 * (price_per_hour + root_volume_per_hour)


def storage_cost_per_month(total_bytes: float, price_per_gb_month: float) -> float:
    """Monthly object-storage cost; AWS's GB is 2**30 bytes.

    >>> round(storage_cost_per_month(15.5 * TIB, 0.023), 2)
    365.06
    """
    return total_bytes / GIB * price_per_gb_month


def transfer_time_s(total_bytes: float, gbit_per_s: float) -> float:
    """Seconds to move ``total_bytes`` at ``gbit_per_s`` (decimal gigabits per second).

    >>> round(transfer_time_s(5 * GB, 1.33), 1)
    30.1
    """
    if gbit_per_s <= 0:
        raise InputError(f"bandwidth {gbit_per_s} Gbit/s; expected > 0")
    return total_bytes * 8.0 / (gbit_per_s * 1e9)


def split_units(total_bytes: float, *, unit_bytes: float | None = None,
                n_units: int | None = None) -> NDArray[np.float64]:
    """Cut ``total_bytes`` into work units: of ``unit_bytes`` each (the last one smaller), or
    into ``n_units`` equal ones.

    >>> split_units(12.0, unit_bytes=5.0).tolist()
    [5.0, 5.0, 2.0]
    >>> split_units(12.0, n_units=4).tolist()
    [3.0, 3.0, 3.0, 3.0]
    """
    if total_bytes <= 0:
        raise InputError(f"data size {total_bytes} bytes; expected > 0")
    if (unit_bytes is None) == (n_units is None):
        raise InputError("give exactly one of unit size and number of units")
    if n_units is not None:
        if n_units < 1:
            raise InputError(f"number of units {n_units}; expected >= 1")
        return np.full(int(n_units), total_bytes / n_units)
    assert unit_bytes is not None
    if unit_bytes <= 0:
        raise InputError(f"unit size {unit_bytes} bytes; expected > 0")
    n_full = int(total_bytes // unit_bytes)
    rest = total_bytes - n_full * unit_bytes
    units = np.full(n_full, float(unit_bytes))
    if rest > 1e-9 * unit_bytes:
        units = np.append(units, rest)
    return units


# ----------------------------------------------------------------------------------------------
# measured per-frame cost


@dataclass(frozen=True)
class Measurement:
    """Per-frame processing cost measured on one machine.

    Parameters
    ----------
    core_seconds_per_frame : CPU-seconds per frame at ``hit_rate`` on the measuring machine.
    bytes_per_frame : raw bytes per frame as stored (``None``: unknown).
    hit_rate : hit fraction of the measured run (``None``: unknown).
    hit_only_fraction : share of the per-frame time spent in hit-only stages at ``hit_rate``.
    vcpu_speed : speed of the measuring machine's vCPUs relative to the catalogue reference.
    source : where the numbers came from (for messages).

    Examples
    --------
    Half of the time goes to hits at a 20 % hit rate; at 40 % hits a frame costs 1.5x:

    >>> m = Measurement(2.0, hit_rate=0.2, hit_only_fraction=0.5)
    >>> m.core_seconds_per_frame_at(0.4)
    3.0
    """

    core_seconds_per_frame: float
    bytes_per_frame: float | None = None
    hit_rate: float | None = None
    hit_only_fraction: float = 0.0
    vcpu_speed: float = 1.0
    source: str = "given"

    def __post_init__(self) -> None:
        if not self.core_seconds_per_frame > 0:
            raise InputError(f"{self.source}: core_seconds_per_frame = "
                             f"{self.core_seconds_per_frame}; expected > 0")
        if self.bytes_per_frame is not None and not self.bytes_per_frame > 0:
            raise InputError(f"{self.source}: bytes_per_frame = {self.bytes_per_frame}; "
                             "expected > 0")
        if not 0.0 <= self.hit_only_fraction <= 1.0:
            raise InputError(f"{self.source}: hit-only fraction {self.hit_only_fraction}; "
                             "expected 0..1")
        if not self.vcpu_speed > 0:
            raise InputError(f"{self.source}: vcpu_speed = {self.vcpu_speed}; expected > 0")

    def core_seconds_per_frame_at(self, hit_fraction: float | None = None) -> float:
        """Per-frame CPU-seconds at another hit fraction (on the measuring machine)."""
        if hit_fraction is None or self.hit_rate is None or self.hit_rate <= 0:
            if hit_fraction is not None and self.hit_only_fraction > 0:
                log.warning("%s: no measured hit rate; hit fraction %.3g ignored", self.source,
                            hit_fraction)
            return self.core_seconds_per_frame
        if not 0.0 <= hit_fraction <= 1.0:
            raise InputError(f"hit fraction {hit_fraction}; expected 0..1")
        phi = self.hit_only_fraction
        return self.core_seconds_per_frame * ((1.0 - phi) + phi * hit_fraction / self.hit_rate)

    def reference_core_seconds_per_byte(self, hit_fraction: float | None = None) -> float:
        """Reference-vCPU seconds per stored byte."""
        if self.bytes_per_frame is None:
            raise InputError(f"{self.source}: bytes per frame unknown; give --bytes-per-frame")
        return (self.core_seconds_per_frame_at(hit_fraction) * self.vcpu_speed
                / self.bytes_per_frame)


def _number(summary: Mapping[str, Any], key: str, source: str, *, required: bool,
            positive: bool = True) -> float | None:
    if key not in summary or summary[key] is None:
        if required:
            raise ConfigError(f"{source}: no '{key}' in the run summary; expected a number > 0 "
                              "(a summary.json written by 'sfxflow process')")
        return None
    value = summary[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or (positive and value <= 0) or value < 0:
        raise ConfigError(f"{source}: '{key}' = {value!r}; expected a number "
                          f"{'> 0' if positive else '>= 0'}")
    return float(value)


def measurement_from_summary(summary: Mapping[str, Any], source: str,
                             vcpu_speed: float = 1.0) -> Measurement:
    """A :class:`Measurement` from a run's summary.json contents (already parsed).

    Uses ``core_seconds_per_frame`` (required), ``bytes_per_frame``, ``hit_rate`` and
    ``stage_seconds`` (to split hit-only work, :data:`HIT_ONLY_STAGES`).

    >>> m = measurement_from_summary({"core_seconds_per_frame": 0.8, "bytes_per_frame": 4.6e6,
    ...     "hit_rate": 0.1, "stage_seconds": {"spots": 60.0, "index": 20.0}}, "summary.json")
    >>> m.hit_only_fraction, round(m.core_seconds_per_frame_at(0.2), 3)
    (0.25, 1.0)
    """
    if not isinstance(summary, Mapping):
        raise ConfigError(f"{source}: expected a JSON object, got {type(summary).__name__}")
    cspf = _number(summary, "core_seconds_per_frame", source, required=True)
    bpf = _number(summary, "bytes_per_frame", source, required=False)
    hit_rate = _number(summary, "hit_rate", source, required=False, positive=False)
    if hit_rate is not None and hit_rate > 1:
        raise ConfigError(f"{source}: 'hit_rate' = {hit_rate}; expected 0..1")
    stages = summary.get("stage_seconds") or {}
    if not isinstance(stages, Mapping):
        raise ConfigError(f"{source}: 'stage_seconds' = {stages!r}; expected an object")
    total = 0.0
    hit_only = 0.0
    for name in stages:
        s = _number(stages, name, f"{source} stage_seconds", required=True, positive=False)
        assert s is not None
        total += s
        if name in HIT_ONLY_STAGES:
            hit_only += s
    phi = hit_only / total if total > 0 else 0.0
    assert cspf is not None
    return Measurement(core_seconds_per_frame=cspf, bytes_per_frame=bpf, hit_rate=hit_rate,
                       hit_only_fraction=phi, vcpu_speed=vcpu_speed, source=source)


# ----------------------------------------------------------------------------------------------
# planning


@dataclass(frozen=True)
class PlanParams:
    """Everything about a planned run except the instance type and node count.

    Parameters
    ----------
    core_seconds_per_byte : reference-vCPU seconds per stored byte (see
        :meth:`Measurement.reference_core_seconds_per_byte`).
    bandwidth_gbit : download bandwidth per node, Gbit/s (``None``: data already local).
    prefetch : overlap download of the next unit with computation.
    policy : ``static`` (LPT from estimates) or ``dynamic`` (pull).
    spread_cv : coefficient of variation of per-unit compute time (log-normal, mean 1).
    estimate_cv : error of the static planner's per-unit estimates (log-normal).
    startup_s : node boot time before work starts (billed).
    seed : random seed of the per-unit variation (same units for every row of a table).
    """

    core_seconds_per_byte: float
    bandwidth_gbit: float | None = None
    prefetch: bool = True
    policy: Policy = Policy.STATIC
    spread_cv: float = 0.0
    estimate_cv: float = 0.0
    startup_s: float = 0.0
    seed: int = 0
    prices: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.core_seconds_per_byte > 0:
            raise InputError(f"core seconds per byte {self.core_seconds_per_byte}; expected > 0")
        if self.bandwidth_gbit is not None and not self.bandwidth_gbit > 0:
            raise InputError(f"bandwidth {self.bandwidth_gbit} Gbit/s; expected > 0")
        for name in ("spread_cv", "estimate_cv", "startup_s"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} = {getattr(self, name)}; expected >= 0")
        object.__setattr__(self, "policy", Policy(self.policy))


@dataclass(frozen=True)
class PlanRow:
    """One row of a plan table (one instance type at one node count)."""

    instance: str
    n_nodes: int
    n_units: int
    total_bytes: float
    mean_s: float
    sigma_s: float
    spread_s: float
    makespan_s: float
    node_hours: float
    efficiency: float
    price_per_hour: float
    cost_usd: float
    placeholder: bool
    policy: Policy

    def rate_tb_per_h(self, tb_bytes: float = TB) -> float:
        """Data processed per hour of wall time (makespan)."""
        return rate_tb_per_h(self.total_bytes, self.makespan_s, tb_bytes)


def _lognormal_factors(rng: np.random.Generator, cv: float, n: int,
                       exact_mean: bool = False) -> NDArray[np.float64]:
    if cv == 0:
        return np.ones(n)
    sigma = math.sqrt(math.log1p(cv * cv))
    factors = rng.lognormal(mean=-0.5 * sigma * sigma, sigma=sigma, size=n)
    return factors / factors.mean() if exact_mean else factors


def unit_times(
    unit_bytes: NDArray[np.float64], instance: Instance, params: PlanParams
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Per-unit (actual compute, static-plan estimate, transfer) seconds on one node.

    The per-unit random factors depend only on ``params.seed`` and the unit count, so every
    instance type and node count of one table sees the same units.

    >>> from sfxflow.cost.catalogue import Instance
    >>> w, e, d = unit_times(np.array([5e9]), Instance("x", 32, 1.0),
    ...                      PlanParams(core_seconds_per_byte=32e-9, bandwidth_gbit=1.0))
    >>> float(w[0]), float(d[0])
    (5.0, 40.0)
    """
    rng = np.random.default_rng(params.seed)
    # variation redistributes the measured total work between units, it does not change it
    variation = _lognormal_factors(rng, params.spread_cv, unit_bytes.size, exact_mean=True)
    estimate_error = _lognormal_factors(rng, params.estimate_cv, unit_bytes.size)
    nominal = unit_bytes * params.core_seconds_per_byte / instance.node_speed
    compute = nominal * variation
    estimate = compute * estimate_error
    if params.bandwidth_gbit is None:
        transfer = np.zeros_like(compute)
    else:
        transfer = unit_bytes * 8.0 / (params.bandwidth_gbit * 1e9)
    return compute, estimate, transfer


def plan_run(instance: Instance, n_nodes: int, unit_bytes: NDArray[np.float64],
             params: PlanParams, catalogue: Catalogue) -> tuple[PlanRow, ScheduleResult]:
    """Simulate one instance type at one node count and price it.

    Examples
    --------
    >>> from sfxflow.cost.catalogue import default_catalogue
    >>> cat = default_catalogue()
    >>> units = split_units(15.5 * TIB, n_units=3303)
    >>> p = PlanParams(core_seconds_per_byte=16 * 189_439 * 32 / (15.5 * TIB))
    >>> row, _ = plan_run(cat["c3.8xlarge"], 16, units, p, cat)
    >>> round(row.mean_s), round(row.rate_tb_per_h(TIB), 3), round(row.cost_usd, 2)
    (189439, 0.294, 325.84)
    """
    compute, estimate, transfer = unit_times(unit_bytes, instance, params)
    sched = simulate_schedule(compute, n_nodes, policy=params.policy, transfer_s=transfer,
                              prefetch=params.prefetch, estimate_s=estimate,
                              startup_s=params.startup_s)
    price = float(params.prices.get(instance.name, instance.price_per_hour))
    root = catalogue.root_volume_price_per_hour(instance)
    return PlanRow(
        instance=instance.name,
        n_nodes=n_nodes,
        n_units=int(unit_bytes.size),
        total_bytes=float(unit_bytes.sum()),
        mean_s=sched.mean_s,
        sigma_s=sched.sigma_s,
        spread_s=sched.spread_s,
        makespan_s=sched.makespan_s,
        node_hours=sched.node_seconds / 3600.0,
        efficiency=sched.efficiency,
        price_per_hour=price,
        cost_usd=ec2_cost_usd(sched.node_seconds, price, root),
        placeholder=instance.placeholder and instance.name not in params.prices,
        policy=sched.policy,
    ), sched
