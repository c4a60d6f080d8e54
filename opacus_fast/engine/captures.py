"""The autograd Function through which captured layer calls run.

A rule layer's call runs through :class:`LayerCapture`; its backward returns only the input gradient and hands
(saved inputs, output gradient) to the engine, so autograd never computes weight gradients. How the call's rows
relate to examples was decided in forward by the batch tracker (``how``):

* a :class:`~opacus_fast.engine.layout.Batch` layout: the input derives from the batch (rows are examples once the
  layout is undone);
* a :class:`~opacus_fast.engine.tracking.Root`: the input does not derive from the batch (a position index, a
  bucket table); the output's per-example cotangents arrive through the tracker's gates, not as ``g``;
* None: a call outside any model call (no tracker), taken batch first as it is.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch

from ..grad_sample import cast
from . import refusals
from .layout import Batch
from .planning import Site
from .tracking import Root

if TYPE_CHECKING:
    from .bk import BKEngine

Tensor = torch.Tensor


def _amp_state(x: Tensor) -> tuple[str, torch.dtype] | None:
    """The autocast state of the forward (None when autocast is off), for the input gradient in backward."""
    if not torch._C._is_any_autocast_enabled():  # the usual case, in one cheap call
        return None
    dev = x.device.type
    return (dev, torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else None


def _in_reentrant_checkpoint() -> bool:
    """Whether this call is the recomputation of reentrant checkpointing (inside its backward)."""
    backward = torch.utils.checkpoint.CheckpointFunction.backward.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is backward:
            return True
        frame = frame.f_back
    return False


def check_recomputation(site: Site) -> None:
    """A captured call during a backward pass is a checkpointing recomputation; the reentrant kind is refused."""
    if torch._C._current_graph_task_id() != -1 and _in_reentrant_checkpoint():
        raise refusals.reentrant_checkpoint(site.describe())


class LayerCapture(torch.autograd.Function):
    """Runs a rule layer; its backward returns only the input gradient and hands (saved, g) to the engine."""

    @staticmethod
    def forward(ctx, engine: BKEngine, site: Site, x: Tensor, anchor: Tensor, how: Batch | Root | None,
                batch: int) -> Tensor:
        ctx.engine, ctx.site, ctx.how, ctx.batch = engine, site, how, batch
        ctx.amp, ctx.x_dtype = _amp_state(x), x.dtype
        out, saved = site.rule.forward(site.module, x)
        ctx.save_for_backward(*saved)
        if isinstance(how, Root):
            ctx.set_materialize_grads(False)
            ctx.x = x if x.requires_grad else None
        return out

    @staticmethod
    def backward(ctx, g: Tensor | None):
        if torch.is_grad_enabled():
            raise refusals.higher_order(ctx.site.describe())
        saved = ctx.saved_tensors
        engine, site, how = ctx.engine, ctx.site, ctx.how
        if isinstance(how, Root):
            return (None, None, _root_backward(ctx, engine, site, saved, how, g), None, None, None)
        if engine.computes_param_grads():
            engine.record_layer(site, saved, g, how, ctx.batch)
        grad_x = _input_grad(ctx, site, saved, g) if ctx.needs_input_grad[2] else None
        return None, None, grad_x, None, None, None


def _input_grad(ctx, site: Site, saved: tuple[Tensor, ...], g: Tensor) -> Tensor:
    if ctx.amp is None:
        grad_x = site.rule.input_grad(site.module, saved, g)
    else:
        with torch.autocast(ctx.amp[0], dtype=ctx.amp[1]):
            grad_x = site.rule.input_grad(site.module, saved, g)
    return cast(grad_x, ctx.x_dtype)


def _root_backward(ctx, engine: BKEngine, site: Site, saved: tuple[Tensor, ...], root: Root,
                   g: Tensor | None) -> Tensor | None:
    """A layer called on a batch-less input: its output's per-example cotangents were collected by the gates where
    it met the batch; a gradient arriving here as ``g`` came from no example. The per-example input cotangents go
    on to the input's own roots (when the input is itself computed from parameters)."""
    if not engine.computes_param_grads():
        return None
    if g is not None:
        raise refusals.used_without_examples(f"the output of {site.describe()}")
    engine.record_root(site, saved, root)
    x = ctx.x
    if x is None or root.per_example is None and root.rows is None:
        return None
    if root.rows is not None:
        per_example = None
        summed = _input_grad(ctx, site, saved, root.rows)
    else:
        per_example = torch.func.vmap(lambda gb: _input_grad(ctx, site, saved, gb))(root.per_example)
        summed = None
    if root.call.tag(x) is not None and per_example is not None:
        root.call.contribute(x, per_example)
        return None
    return summed if summed is not None else per_example.sum(0)
