"""The clip bound C: one object shared by the engine (which clips with it) and the optimizer (noise std σ·C).

Opacus' schedulers change ``optimizer.max_grad_norm``; because both sides read this one object, a new bound
changes the clipping and the noise together. It may only change between logical batches: examples already clipped
into a pending sum used the old bound, and noise at the new one would not cover them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn


class ClipBound:
    """A flat bound C, or one bound per parameter (per-layer clipping, whose noise uses their L2 norm).

    Args:
        bound: C, or one bound per parameter of ``params`` (in that order).
        params: the clipped parameters; a pending ``p.summed_grad`` on any of them blocks a change of the bound.
    """

    def __init__(self, bound: float | Sequence[float], params: Sequence[nn.Parameter] = ()) -> None:
        self.params = tuple(params)
        if isinstance(bound, (int, float)):
            self.flat: float | None = float(bound)
            self.per_param: dict[nn.Parameter, float] = {}
        else:
            self.flat = None
            self.per_param = dict(zip(self.params, map(float, bound)))

    @property
    def total(self) -> float:
        """The L2 sensitivity of the clipped sum: C, or the L2 norm of the per-parameter bounds."""
        if self.flat is not None:
            return self.flat
        return math.sqrt(sum(b * b for b in self.per_param.values()))

    def set_total(self, value: float) -> None:
        """Set a new flat bound (as Opacus' GradClipScheduler does through ``optimizer.max_grad_norm``).

        Refused, leaving the bound unchanged, while clipped sums are pending: they were clipped at the current bound.
        """
        if value == self.total:
            return
        if self.flat is None:
            raise ValueError("per-layer clip bounds cannot be changed through max_grad_norm; set each bound instead")
        if not value > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {value}")
        if has_pending_sums(self.params):
            raise ValueError(
                f"max_grad_norm cannot change from {self.flat} to {value} in the middle of a logical batch: its "
                f"examples so far were clipped at {self.flat}, and noise scaled to {value} would not cover them. "
                "Change max_grad_norm after the optimizer.step() that ends the logical batch (e.g. step a "
                "GradClipScheduler once per logical batch, right after that optimizer.step())"
            )
        self.flat = float(value)


def has_pending_sums(params: Sequence[nn.Parameter]) -> bool:
    """Whether any of ``params`` holds a clipped sum not yet released by an optimizer step."""
    return any(p.requires_grad and _pending(getattr(p, "summed_grad", None)) for p in params)


def mark_released(params: Sequence[nn.Parameter]) -> None:
    """Mark the clipped sums that an optimizer step has just noised: they stay readable in ``p.summed_grad`` (as in
    Opacus) until ``zero_grad()``, but are no longer pending."""
    for p in params:
        if getattr(p, "summed_grad", None) is not None:
            p.summed_grad._released = True


def _pending(summed: object) -> bool:
    return summed is not None and not getattr(summed, "_released", False)
