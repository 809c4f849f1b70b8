"""Merging stills: the numerics of each step, unaware of where they run.

The pipeline (:mod:`sfxflow.pipeline.merge`) maps the per-shard functions over the shards and
reduces their sums; everything that decides a number lives here, one module per concept:

* :mod:`.reflections`: the asymmetric unit, ``2 * asu + minus`` codes, ambiguity operators;
* :mod:`.cell`: the merged space group and cell, the one-crystal-form check;
* :mod:`.reference`: the Wilson curve, ambiguity vectors, the first and the next reference;
* :mod:`.ambiguity`: Brehm-Diederichs resolution of an indexing ambiguity;
* :mod:`.scale`: the observation model, per-crystal fits, the error model, the per-shard sums;
* :mod:`.rejection`: crystal rejections that need every crystal (absurd scale, delta-CC1/2);
* :mod:`.statistics`: merged values and statistics per shell.
"""

from sfxflow.algorithms.merge.ambiguity import resolve_ambiguity
from sfxflow.algorithms.merge.cell import InputSymmetry, merge_target
from sfxflow.algorithms.merge.reference import (
    WilsonCurve,
    ambiguity_vectors,
    first_reference,
    next_reference,
    truth_in_best_setting,
    truth_on,
)
from sfxflow.algorithms.merge.reflections import (
    AsuIndex,
    ambiguity_operators,
    max_inv_d2,
    operator_products,
)
from sfxflow.algorithms.merge.rejection import (
    HalfSums,
    delta_cc_half,
    reasons_counted,
    reject_absurd_scales,
    reject_globally,
    with_delta_cc_half,
)
from sfxflow.algorithms.merge.scale import (
    ACCEPTED,
    REASONS,
    CrystalFits,
    MergeParams,
    PreparedShard,
    Reference,
    ShardSums,
    final_merge,
    prepare_shard,
    scale_cycle,
    scaled_columns,
)
from sfxflow.algorithms.merge.statistics import (
    balanced_halves,
    estimate_resolution,
    format_estimate,
    format_table,
    halves_of_accepted,
    pearson,
    shell_statistics,
    wilson_b,
)

__all__ = [
    "ACCEPTED",
    "REASONS",
    "AsuIndex",
    "CrystalFits",
    "HalfSums",
    "InputSymmetry",
    "MergeParams",
    "PreparedShard",
    "Reference",
    "ShardSums",
    "WilsonCurve",
    "ambiguity_operators",
    "ambiguity_vectors",
    "balanced_halves",
    "delta_cc_half",
    "estimate_resolution",
    "final_merge",
    "first_reference",
    "format_estimate",
    "format_table",
    "halves_of_accepted",
    "max_inv_d2",
    "merge_target",
    "next_reference",
    "operator_products",
    "pearson",
    "prepare_shard",
    "reasons_counted",
    "reject_absurd_scales",
    "reject_globally",
    "resolve_ambiguity",
    "scale_cycle",
    "scaled_columns",
    "shell_statistics",
    "truth_in_best_setting",
    "truth_on",
    "wilson_b",
    "with_delta_cc_half",
]
