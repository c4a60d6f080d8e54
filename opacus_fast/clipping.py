"""The clip bound C: one object shared by the engine (which clips with it) and the optimizer (noise std σ·C).

Opacus' schedulers change ``optimizer.max_grad_norm``; because both sides read this one object, a new bound
changes the clipping and the noise together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn


class ClipBound:
    """A flat bound C, or one bound per parameter (per-layer clipping, whose noise uses their L2 norm)."""

    def __init__(self, bound: float | Sequence[float], params: Sequence[nn.Parameter] = ()) -> None:
        if isinstance(bound, (int, float)):
            self.flat: float | None = float(bound)
            self.per_param: dict[nn.Parameter, float] = {}
        else:
            self.flat = None
            self.per_param = dict(zip(params, map(float, bound)))

    @property
    def total(self) -> float:
        """The L2 sensitivity of the clipped sum: C, or the L2 norm of the per-parameter bounds."""
        if self.flat is not None:
            return self.flat
        return math.sqrt(sum(b * b for b in self.per_param.values()))

    def set_total(self, value: float) -> None:
        """Set a new flat bound (as Opacus' GradClipScheduler does through ``optimizer.max_grad_norm``)."""
        if value == self.total:
            return
        if self.flat is None:
            raise ValueError("per-layer clip bounds cannot be changed through max_grad_norm; set each bound instead")
        if not value > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {value}")
        self.flat = float(value)
