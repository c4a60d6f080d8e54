"""The Book-Keeping (BK) clipping engine.

``planning`` decides once, at attaching, how each trainable parameter is captured; ``tracking`` follows the batch
through every model call (``layout`` holds its rules) and collects per-example gradients where parameters meet the
batch directly; ``captures`` holds the autograd Function that rule layers run through; ``bk`` turns each backward
into clipped per-example gradient sums; ``refusals`` holds every reason a model or a call is refused, with its fix.
"""

from .bk import BKEngine
from .planning import Plan, Site, plan_sites
from .refusals import UnsupportedModuleError

__all__ = ["BKEngine", "Plan", "Site", "UnsupportedModuleError", "plan_sites"]
