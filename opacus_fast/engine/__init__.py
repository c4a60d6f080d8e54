"""The Book-Keeping (BK) clipping engine.

``planning`` decides once, at attaching, how each trainable parameter is captured; ``captures`` holds the autograd
Functions that captured calls run through; ``bk`` turns each backward into clipped per-example gradient sums;
``refusals`` holds every reason a model or a call is refused, with its fix.
"""

from .bk import BKEngine
from .planning import Site, plan_sites
from .refusals import UnsupportedModuleError

__all__ = ["BKEngine", "Site", "UnsupportedModuleError", "plan_sites"]
