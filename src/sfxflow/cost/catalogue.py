"""The instance catalogue: node types with vCPUs, price and relative speed, from TOML.

The shipped catalogue (``sfxflow/data/instances.toml``) holds the three EC2 types of Poon,
Brewster & Sauter (2017) with the prices and speeds their Tables 1 and 2 imply, plus a few
current compute-optimised types whose prices and speeds are *placeholders* (``placeholder =
true``) that must be checked before use. A user file given to :func:`load_catalogue` overrides
fields of shipped entries with the same name and adds new ones.

``vcpu_speed`` is the throughput of one vCPU relative to one vCPU of the catalogue's
``reference`` instance; a node's throughput is ``vcpus * vcpu_speed`` reference vCPUs.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from typing import Any

from sfxflow.errors import ConfigError

__all__ = [
    "Catalogue",
    "Instance",
    "default_catalogue",
    "load_catalogue",
    "parse_catalogue",
]

log = logging.getLogger(__name__)

HOURS_PER_MONTH = 730.0  #: AWS's billing month (8760 h / 12)


@dataclass(frozen=True)
class Instance:
    """One node type.

    Parameters
    ----------
    name : instance type, e.g. ``"c3.8xlarge"``.
    vcpus : hardware threads per node.
    price_per_hour : US$ per node-hour (root volume included only when ``root_volume_gb == 0``).
    vcpu_speed : throughput of one vCPU relative to one reference vCPU.
    root_volume_gb : EBS root volume billed per node on top of ``price_per_hour``.
    placeholder : price and/or speed are unchecked placeholders.

    Examples
    --------
    >>> Instance("x", vcpus=32, price_per_hour=0.4, vcpu_speed=1.5).node_speed
    48.0
    """

    name: str
    vcpus: int
    price_per_hour: float
    vcpu_speed: float = 1.0
    root_volume_gb: float = 0.0
    placeholder: bool = False
    cpu: str = ""
    arch: str = "x86_64"
    physical_cores: int | None = None
    clock_ghz: float | None = None
    memory_gb: float | None = None
    network_gbit: float | None = None
    price_source: str = ""
    speed_source: str = ""

    @property
    def node_speed(self) -> float:
        """Node throughput in reference vCPUs (``vcpus * vcpu_speed``)."""
        return float(self.vcpus) * self.vcpu_speed


@dataclass(frozen=True)
class Catalogue:
    """Instances by name, the reference instance and the storage prices (US$ per GB-month, GB =
    2**30 bytes)."""

    instances: Mapping[str, Instance]
    reference: str
    s3_price_per_gb_month: float
    ebs_price_per_gb_month: float
    sources: tuple[str, ...] = field(default=())

    def __getitem__(self, name: str) -> Instance:
        try:
            return self.instances[name]
        except KeyError:
            known = ", ".join(sorted(self.instances))
            raise ConfigError(
                f"instance type {name!r} is not in the catalogue ({' + '.join(self.sources)}); "
                f"expected one of: {known}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self.instances

    def names(self) -> list[str]:
        """Instance names in catalogue order."""
        return list(self.instances)

    def root_volume_price_per_hour(self, instance: Instance) -> float:
        """Per-node US$/h of the instance's EBS root volume (0 when included in its price).

        >>> cat = default_catalogue()
        >>> round(cat.root_volume_price_per_hour(replace(cat["c4.8xlarge"], root_volume_gb=12)), 5)
        0.00164
        """
        return instance.root_volume_gb * self.ebs_price_per_gb_month / HOURS_PER_MONTH


_INSTANCE_FIELDS = {f.name: f for f in fields(Instance)}
_REQUIRED = ("vcpus", "price_per_hour")
_NUMBER_FIELDS = {"price_per_hour", "vcpu_speed", "root_volume_gb", "clock_ghz", "memory_gb",
                  "network_gbit"}
_INT_FIELDS = {"vcpus", "physical_cores"}
_BOOL_FIELDS = {"placeholder"}
_TOP_KEYS = {"catalogue", "instance"}
_CATALOGUE_KEYS = {"reference", "s3_price_per_gb_month", "ebs_price_per_gb_month"}


def _check_value(source: str, where: str, key: str, value: Any) -> Any:
    if key in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {where}.{key} = {value!r}; expected true or false")
        return value
    if key in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{source}: {where}.{key} = {value!r}; expected a positive integer")
        return value
    if key in _NUMBER_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"{source}: {where}.{key} = {value!r}; expected a number >= 0")
        if key in ("vcpu_speed",) and value == 0:
            raise ConfigError(f"{source}: {where}.{key} = 0; expected a number > 0")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{source}: {where}.{key} = {value!r}; expected a string")
    return value


def parse_catalogue(text: str, source: str, base: Catalogue | None = None) -> Catalogue:
    """Parse catalogue TOML; entries override and extend ``base`` when given.

    Parameters
    ----------
    text : TOML text with an optional ``[catalogue]`` table and ``[instance."NAME"]`` tables.
    source : file name or URL used in error messages.
    base : catalogue to override/extend (``None``: the file must be complete on its own).

    Raises
    ------
    ConfigError : unknown keys, wrong types, missing required fields of a new instance.

    Examples
    --------
    >>> cat = parse_catalogue('[instance."c3.8xlarge"]\\nprice_per_hour = 0.5', "my.toml",
    ...                       base=default_catalogue())
    >>> cat["c3.8xlarge"].price_per_hour, cat["c3.8xlarge"].vcpus
    (0.5, 32)
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML ({exc})") from exc
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown table(s) {sorted(unknown)}; expected "
                          "[catalogue] and [instance.\"NAME\"]")
    head = data.get("catalogue", {})
    bad = set(head) - _CATALOGUE_KEYS
    if bad:
        raise ConfigError(f"{source}: unknown key(s) {sorted(bad)} in [catalogue]; expected "
                          f"{sorted(_CATALOGUE_KEYS)}")
    instances: dict[str, Instance] = dict(base.instances) if base else {}
    for name, table in data.get("instance", {}).items():
        where = f'instance."{name}"'
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {where} must be a table, got {table!r}")
        bad = set(table) - (set(_INSTANCE_FIELDS) - {"name"})
        if bad:
            raise ConfigError(f"{source}: unknown key(s) {sorted(bad)} in [{where}]; expected "
                              f"{sorted(set(_INSTANCE_FIELDS) - {'name'})}")
        values = {k: _check_value(source, where, k, v) for k, v in table.items()}
        if name in instances:
            instances[name] = replace(instances[name], **values)
        else:
            missing = [k for k in _REQUIRED if k not in values]
            if missing:
                raise ConfigError(f"{source}: new instance [{where}] lacks {missing}; expected "
                                  "at least vcpus and price_per_hour")
            instances[name] = Instance(name=name, **values)
    reference = head.get("reference", base.reference if base else None)
    s3 = head.get("s3_price_per_gb_month", base.s3_price_per_gb_month if base else None)
    ebs = head.get("ebs_price_per_gb_month", base.ebs_price_per_gb_month if base else None)
    if reference is None or s3 is None or ebs is None:
        raise ConfigError(f"{source}: [catalogue] needs reference, s3_price_per_gb_month and "
                          "ebs_price_per_gb_month")
    for key, value in (("s3_price_per_gb_month", s3), ("ebs_price_per_gb_month", ebs)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"{source}: catalogue.{key} = {value!r}; expected a number >= 0")
    if reference not in instances:
        raise ConfigError(f"{source}: catalogue.reference = {reference!r} is not an instance; "
                          f"expected one of {sorted(instances)}")
    sources = (*(base.sources if base else ()), source)
    return Catalogue(instances=instances, reference=str(reference),
                     s3_price_per_gb_month=float(s3), ebs_price_per_gb_month=float(ebs),
                     sources=sources)


def default_catalogue() -> Catalogue:
    """The catalogue shipped with sfxflow (``sfxflow/data/instances.toml``).

    >>> cat = default_catalogue()
    >>> cat.reference, cat["c3.8xlarge"].price_per_hour, cat["c7i.8xlarge"].placeholder
    ('c3.8xlarge', 0.387, True)
    """
    text = resources.files("sfxflow").joinpath("data/instances.toml").read_text("utf-8")
    return parse_catalogue(text, "sfxflow/data/instances.toml")


def load_catalogue(user_text: str | None = None, user_source: str = "catalogue") -> Catalogue:
    """The shipped catalogue, overridden/extended by a user's TOML text when given.

    The caller reads the user's file (the cost layer does no I/O on user storage).
    """
    cat = default_catalogue()
    if user_text is None:
        return cat
    return parse_catalogue(user_text, user_source, base=cat)
