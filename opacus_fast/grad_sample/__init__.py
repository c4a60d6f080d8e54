"""Layer rules, one file per layer family: per-example gradient norms and clipped sums of each layer's parameters."""

from . import conv, embedding, linear, norm  # noqa: F401  (registers the rules)
from .embedding import EmbeddingBagRule, EmbeddingRule
from .linear import LinearRule
from .registry import (
    LayerRule,
    cast,
    find_rule,
    held_bytes,
    norm_dtype,
    register_rule,
    scale_examples,
    scratch_space,
    sq_norm,
    weighted_sum,
)

__all__ = [
    "EmbeddingBagRule",
    "EmbeddingRule",
    "LayerRule",
    "LinearRule",
    "cast",
    "find_rule",
    "held_bytes",
    "norm_dtype",
    "register_rule",
    "scale_examples",
    "scratch_space",
    "sq_norm",
    "weighted_sum",
]
