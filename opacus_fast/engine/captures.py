"""The autograd Functions through which captured calls run, and what each call leaves for the end of backward.

A rule layer's call runs through :class:`LayerCapture`: its backward returns only the input gradient and hands
(saved inputs, output gradient) to the engine, so autograd never computes weight gradients. A unit's call runs
through :class:`UnitCapture`: vmapped per example, its backward yields per-example parameter gradients directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_leaves

from ..grad_sample import foreign_leaves, run_per_example
from . import refusals
from .planning import Site

if TYPE_CHECKING:
    from .bk import BKEngine

Tensor = torch.Tensor


@dataclass(eq=False)
class Record:
    """What one call of a site left for the end of backward."""

    site: Site
    saved: tuple[Tensor, ...] = ()
    g: Tensor | None = None
    per_sample: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.saved[0].shape[0] if self.saved else next(iter(self.per_sample.values())).shape[0]


def _amp_state(x: Tensor) -> tuple[str, bool, torch.dtype]:
    dev = x.device.type
    return dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)


def _refuse_higher_order(site: Site) -> None:
    if torch.is_grad_enabled():
        raise refusals.higher_order(site.describe())


class LayerCapture(torch.autograd.Function):
    """Runs a rule layer; its backward returns only the input gradient and hands (x, g) to the engine."""

    @staticmethod
    def forward(ctx, engine: BKEngine, site: Site, x: Tensor, anchor: Tensor) -> Tensor:
        ctx.engine, ctx.site, ctx.amp, ctx.x_dtype = engine, site, _amp_state(x), x.dtype
        out, saved = site.rule.forward(site.module, x)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        _refuse_higher_order(ctx.site)
        saved = ctx.saved_tensors
        site = ctx.site
        if ctx.engine.computes_param_grads():
            if site.rule.eager and g.shape[0] > 0:  # tiny parameters: per-example grads now, while x and g are hot
                ctx.engine.record(Record(site, per_sample=site.rule.per_sample(site.module, saved, g, site.params)))
            else:
                ctx.engine.record(Record(site, saved=saved, g=g))
        grad_x = None
        if ctx.needs_input_grad[2]:
            dev, enabled, dtype = ctx.amp
            with torch.autocast(dev, dtype=dtype, enabled=enabled):
                grad_x = ctx.site.rule.input_grad(ctx.site.module, saved, g)
            grad_x = grad_x.to(ctx.x_dtype)
        return None, None, grad_x, None


class UnitCapture(torch.autograd.Function):
    """Runs a unit vmapped per example; its backward yields input grads and per-example parameter grads."""

    @staticmethod
    def forward(ctx, engine: BKEngine, site: Site, kwargs: dict, n_inputs: int, *tensors: Tensor) -> Tensor:
        with torch.enable_grad():
            out, leaves, copies = run_per_example(
                site.module, _batch_first_method(site), list(site.params), tensors[:n_inputs], kwargs
            )
        foreign = foreign_leaves(out, leaves + copies)
        if foreign:
            names = refusals.tensor_names(engine.model)
            known = ", ".join(f"'{names[id(t)]}'" for t in foreign if id(t) in names)
            raise refusals.unit_hidden_input(
                site.describe_method(), f"parameter(s) {known}" if known else "a tensor that requires grad"
            )
        ctx.engine, ctx.site, ctx.graph = engine, site, (out, leaves, copies)
        return out.detach()

    @staticmethod
    def backward(ctx, g: Tensor):
        _refuse_higher_order(ctx.site)
        out, leaves, copies = ctx.graph
        del ctx.graph
        if not ctx.engine.computes_param_grads():
            copies = []
        wanted = [x for x in leaves if x.requires_grad] + copies
        grads = list(torch.autograd.grad(out, wanted, g, allow_unused=True)) if wanted else []
        if copies:
            per_sample = {}
            for name, p, grad in zip(ctx.site.params, copies, grads[len(grads) - len(copies):]):
                per_sample[name] = torch.zeros_like(p) if grad is None else grad
            ctx.engine.record(Record(ctx.site, per_sample=per_sample))
        input_grads = iter(grads)
        grad_inputs = tuple(next(input_grads) if x.requires_grad else None for x in leaves)
        return (None, None, None, None) + grad_inputs + (None,)


def _batch_first_method(site: Site) -> Callable[..., Tensor]:
    """The unit's own class method, refusing a result that is not one tensor with the input's batch rows: one
    example's call of a unit that mixes examples (e.g. with a whole-batch tensor it holds) returns other rows."""
    method = getattr(type(site.module), site.method).__get__(site.module)

    def run(*inputs: Tensor, **kwargs: Any) -> Tensor:
        out = method(*inputs, **kwargs)
        if not isinstance(out, Tensor):
            raise refusals.unit_not_tensor(site.describe_method(), type(out).__name__)
        if out.dim() == 0 or out.shape[0] != inputs[0].shape[0]:
            raise refusals.unit_rows(site.describe_method(), inputs[0].shape[0], tuple(out.shape))
        return out

    return run


def _viewed(t: Tensor) -> Tensor:
    """The tensor whose memory ``t`` views (``t`` itself if it is not a view)."""
    return t if t._base is None else t._base


def check_unit_call(site: Site, inputs: tuple, kwargs: dict, shared: Iterable[int], model: torch.nn.Module) -> None:
    """Refuse unit calls that running it one example at a time would get wrong: each positional tensor is cut into
    examples along dim 0, keyword arguments are passed whole to every example. ``shared`` holds the ``id`` of the
    model's parameters and buffers (the same for all examples)."""
    if not inputs or not all(isinstance(x, Tensor) and x.dim() > 0 for x in inputs):
        raise refusals.unit_positional(site.describe_method())
    problem = _keyword_tensors(kwargs, shared) or _shared_inputs(inputs, shared, model) or _unbatched_inputs(inputs)
    if problem:
        raise refusals.UnsupportedModuleError(f"{site.describe_method()}: {problem}")


def _keyword_tensors(kwargs: dict[str, Any], shared: Iterable[int]) -> str | None:
    """Why tensors in keyword arguments are wrong (None if there are none): every example's call gets them whole,
    which is right only for the model's buffers (or frozen parameters), shared by all examples."""
    held = [
        k for k, v in kwargs.items()
        if any(isinstance(t, Tensor) and (t.requires_grad or id(_viewed(t)) not in shared) for t in tree_leaves(v))
    ]
    return refusals.unit_keyword_tensors(held) if held else None


def _shared_inputs(inputs: tuple[Tensor, ...], shared: Iterable[int], model: torch.nn.Module) -> str | None:
    """Why positional inputs that are the model's parameters or buffers are wrong (None if none is)."""
    found = [i for i, x in enumerate(inputs) if id(_viewed(x)) in shared]
    if not found:
        return None
    names = refusals.tensor_names(model)
    return refusals.unit_shared_inputs(", ".join(f"{i} ('{names[id(_viewed(inputs[i]))]}')" for i in found))


def _unbatched_inputs(inputs: tuple[Tensor, ...]) -> str | None:
    """Why positional inputs whose dim 0 differ are wrong (None if they agree). Whether that dim 0 is the physical
    batch is checked at backward, for every layer alike (a forward without backward may see others)."""
    rows = sorted({x.shape[0] for x in inputs})
    return None if len(rows) == 1 else refusals.unit_unbatched_inputs(rows)
