"""Exact per-example gradients for parameters that no layer rule covers, computed for their owner alone.

A *unit* is one method of one module (``forward`` of a leaf module such as timm's LayerScale, or e.g. timm
VisionTransformer's ``_pos_embed``, which alone uses ``cls_token``, ``reg_token`` and ``pos_embed``). The unit runs
once, vmapped over examples with a private copy of its parameters per example, so the backward through it yields
every example's gradient directly — no per-example loop, no recomputation, and never the whole parent model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

Tensor = torch.Tensor


@dataclass(frozen=True)
class UnitSpec:
    """Which method of a module type owns which of its parameters."""

    method: str
    params: tuple[str, ...]


_UNITS: dict[str, UnitSpec] = {}


def register_unit(qualified_type: str, method: str, params: Sequence[str]) -> None:
    """Declare that ``method`` of the class named ``module.QualName`` is the only user of ``params``.

    Types are named by string so that registering timm's classes does not import timm.
    """
    _UNITS[qualified_type] = UnitSpec(method, tuple(params))


def find_unit(module: nn.Module) -> UnitSpec | None:
    """The registered unit of ``module``'s exact class (subclasses may use the parameters differently)."""
    cls = type(module)
    return _UNITS.get(f"{cls.__module__}.{cls.__qualname__}")


register_unit("timm.models.vision_transformer.VisionTransformer", "_pos_embed", ("cls_token", "reg_token", "pos_embed"))
register_unit("timm.models.deit.VisionTransformerDistilled", "_pos_embed", ("cls_token", "dist_token", "pos_embed"))


@contextlib.contextmanager
def swapped_params(module: nn.Module, tensors: dict[str, Tensor]) -> Iterator[None]:
    """Temporarily make ``module``'s own parameters ``tensors`` (plain tensors, e.g. vmapped per-example copies)."""
    saved = {name: module._parameters[name] for name in tensors}
    try:
        for name, t in tensors.items():
            module._parameters[name] = t
        yield
    finally:
        module._parameters.update(saved)


def run_per_example(
    module: nn.Module, method, names: Sequence[str], inputs: Sequence[Tensor], kwargs: dict
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Run ``method`` vmapped over examples, each with its own parameter copy.

    Returns (output, input leaves, per-example parameter leaves (B, *shape)); the output carries an autograd
    graph to both kinds of leaves.
    """
    batch = inputs[0].shape[0]
    leaves = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
    copies = [
        module._parameters[n].detach().unsqueeze(0).expand(batch, *module._parameters[n].shape).requires_grad_(True)
        for n in names
    ]

    def one(xs: tuple, ps: tuple) -> Tensor:
        with swapped_params(module, dict(zip(names, ps))):
            return method(*[x.unsqueeze(0) for x in xs], **kwargs).squeeze(0)

    if batch == 0:  # vmap cannot map over nothing; the empty output still needs its shape
        with swapped_params(module, {n: module._parameters[n].detach() for n in names}):
            return method(*leaves, **kwargs), leaves, copies
    out = torch.func.vmap(one, randomness="different")(tuple(leaves), tuple(copies))
    return out, leaves, copies


def foreign_leaves(out: Tensor, own: Sequence[Tensor]) -> list[Tensor]:
    """The leaf tensors requiring grad that ``out``'s autograd graph reaches besides ``own``.

    A unit's backward differentiates its output with respect to its input leaves and parameter copies only, so the
    gradient through any other leaf (another module's parameter read through an unregistered reference, a weight
    computed by a forward pre-hook) would be silently lost. The walk covers the unit's own graph, which starts at
    those leaves, so it is as cheap as the unit is small.
    """
    allowed = {id(t) for t in own}
    found: list[Tensor] = []
    seen: set[object] = set()
    stack = [out.grad_fn] if out.grad_fn is not None else []
    while stack:
        for node, _ in stack.pop().next_functions:
            if node is None or node in seen:
                continue
            seen.add(node)
            leaf = getattr(node, "variable", None)  # set on AccumulateGrad nodes only
            if leaf is None:
                stack.append(node)
            elif id(leaf) not in allowed:
                found.append(leaf)
    return found
