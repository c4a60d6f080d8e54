"""Layer rules (one file per layer family) and units for parameters outside any rule layer."""

from . import conv, embedding, linear, norm  # noqa: F401  (registers the rules)
from .registry import (
    LayerRule,
    cast,
    find_rule,
    norm_dtype,
    register_rule,
    scale_examples,
    scratch_space,
    sq_norm,
    weighted_sum,
)
from .units import find_unit, foreign_leaves, register_unit, run_per_example

__all__ = [
    "LayerRule",
    "cast",
    "find_rule",
    "find_unit",
    "foreign_leaves",
    "norm_dtype",
    "register_rule",
    "register_unit",
    "run_per_example",
    "scale_examples",
    "scratch_space",
    "sq_norm",
    "weighted_sum",
]
