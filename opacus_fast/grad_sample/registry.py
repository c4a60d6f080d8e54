"""Registry of layer rules: how each layer family yields per-example norms and clipped sums.

A rule never sees the engine. ``forward`` computes the layer's output functionally (no autograd graph to its
parameters) and returns what it needs later, ``saved`` (a tuple whose first entry is the batch-first input ``x``,
optionally followed by statistics such as a norm layer's mean and rstd). Given ``saved`` and the gradient ``g`` of
the loss with respect to the layer's output, the rule answers:

* ``input_grad``: the gradient with respect to ``x`` (so autograd never computes weight gradients);
* ``norms``: per-example squared gradient norms of the requested parameters (ghost or instantiated);
* ``clipped_sum``: ``sum_i factor_i * G_i`` for each requested parameter, as fresh tensors (the engine keeps them and
  adds later physical batches to them in place);
* ``per_sample``: the per-example gradients themselves (used when a parameter has several uses in one pass, and for
  the rule's ``per_example_params``, small ones such as a bias, which the engine clips together with all other small
  per-example gradients: one norm and one sum kernel for all of them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

Tensor = torch.Tensor
Norms = dict[str, Tensor]
Saved = tuple[Tensor, ...]


class LayerRule:
    """Base class of a layer rule; see the module docstring for the contract."""

    #: methods of the layer class that must not be overridden by a subclass for this rule to apply
    checked_methods: tuple[str, ...] = ("forward",)
    #: the layer's parameters that the rule computes gradients of (a layer with other trainable ones is refused)
    params: tuple[str, ...] = ("weight", "bias")
    #: compute per-example gradients during backward instead of keeping (x, g) until its end (tiny parameters)
    eager: bool = False
    #: the layer acts on each position of its input's leading dims alike (Linear, Embedding, LayerNorm), so the
    #: rule accepts any number of leading dims after the batch: folded or moved examples are brought to the front
    #: and the other axes become positions. Otherwise (Conv, GroupNorm) the rule needs the batch in dim 0.
    tokenwise: bool = False
    #: parameters whose per-example gradients are no larger than one example's output gradient (a bias): the engine
    #: takes them from ``per_sample`` and clips them together with the other small per-example gradients
    per_example_params: tuple[str, ...] = ()

    def validate(self, layer: nn.Module) -> str | None:
        """Return why ``layer`` cannot be handled exactly (None if it can)."""
        return None

    def prepare(self, layer: nn.Module, x: Tensor) -> Tensor:
        """Ordinary differentiable pre-processing of the input (e.g. non-zero padding) before the capture."""
        return x

    def forward(self, layer: nn.Module, x: Tensor) -> tuple[Tensor, Saved]:
        """The layer's output and the tensors to keep for backward (``x`` first)."""
        raise NotImplementedError

    def input_grad(self, layer: nn.Module, saved: Saved, g: Tensor) -> Tensor | None:
        raise NotImplementedError

    def norms(self, layer: nn.Module, saved: Saved, g: Tensor, names: Iterable[str]) -> tuple[Norms, Any]:
        """Per-example squared norms ``{name: (B,)}`` and a cache that ``clipped_sum`` may reuse."""
        grads = self.per_sample(layer, saved, g, names)
        return {n: sq_norm(gs) for n, gs in grads.items()}, grads

    def clipped_sum(
        self, layer: nn.Module, saved: Saved, g: Tensor, factors: dict[str, Tensor], cache: Any
    ) -> dict[str, Tensor]:
        grads = cache if cache is not None else self.per_sample(layer, saved, g, factors.keys())
        return {n: weighted_sum(factors[n], grads[n]) for n in factors}

    def per_sample(self, layer: nn.Module, saved: Saved, g: Tensor, names: Iterable[str]) -> dict[str, Tensor]:
        raise NotImplementedError

    def stack_key(self, layer: nn.Module, saved: Saved, g: Tensor) -> Hashable | None:
        """Calls with equal keys may be computed as one (None, the default: never): their saved tensors and output
        gradients stacked along dim 0 (call l's example i in row l * B + i), any of their layers standing for all in
        ``norms`` and ``per_sample``, and :meth:`stacked_clipped_sum` taking the sums. The key must therefore fix
        everything those two read of the layer and of the tensors' shapes."""
        return None

    def stack_bytes(self, layer: nn.Module, saved: Saved, g: Tensor) -> int:
        """Bytes a call adds to a stack: its saved tensors and output gradient, and what the rule's norms hold for
        it at once beyond them (the engine bounds stacks by this)."""
        return held_bytes(saved, g)

    def stacked_clipped_sum(
        self, layer: nn.Module, saved: Saved, g: Tensor, factors: dict[str, Tensor], cache: Any, calls: int
    ) -> dict[str, Sequence[Tensor]]:
        """``clipped_sum`` of ``calls`` stacked calls (see :meth:`stack_key`), one factor per row: each parameter's
        ``calls`` sums, in order (a tensor with a leading dim of ``calls``, or a list)."""
        raise NotImplementedError


_RULES: dict[type[nn.Module], LayerRule] = {}
_NAMED_RULES: dict[str, LayerRule] = {}


def register_rule(*layer_types: type[nn.Module] | str) -> Callable[[type[LayerRule]], type[LayerRule]]:
    """Class decorator: use this rule for the given layer types (and their subclasses that keep its methods).

    A type may be given as ``"module.QualName"`` (exact class only): a library's subclass whose own ``forward``
    computes the same function, registered without importing that library.
    """

    def decorate(rule_cls: type[LayerRule]) -> type[LayerRule]:
        rule = rule_cls()
        for layer_type in layer_types:
            if isinstance(layer_type, str):
                _NAMED_RULES[layer_type] = rule
            else:
                _RULES[layer_type] = rule
        return rule_cls

    return decorate


def find_rule(layer: nn.Module) -> LayerRule | None:
    """The rule for ``layer``: its own type's, or a base type's if the subclass overrides none of its methods."""
    cls = type(layer)
    named = _NAMED_RULES.get(f"{cls.__module__}.{cls.__qualname__}")
    if named is not None:
        return named
    for base in cls.__mro__:
        rule = _RULES.get(base)
        if rule is None:
            continue
        same = all(getattr(type(layer), m, None) is getattr(base, m, None) for m in rule.checked_methods)
        return rule if same else None
    return None


def held_bytes(saved: Saved, g: Tensor | None) -> int:
    """Bytes of a call's saved tensors and output gradient."""
    return sum(t.numel() * t.element_size() for t in (*saved, g) if isinstance(t, Tensor))


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, without a call into torch when it already is (rules run this per layer at every step)."""
    return t if t.dtype == dtype else t.to(dtype)


def sq_norm(grads: Tensor) -> Tensor:
    """Squared L2 norm of each row of a (B, ...) tensor, accumulated in at least float32."""
    flat = grads.reshape(grads.shape[0], -1)
    return flat.to(norm_dtype(flat.dtype)).pow(2).sum(dim=1)


@functools.cache
def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for norm arithmetic: float32 for half types (Gram products overflow fp16), else unchanged (cached: it
    is asked for every layer at every step, and ``torch.promote_types`` goes through the dispatcher)."""
    return torch.promote_types(dtype, torch.float32)


_SCRATCH: ContextVar[dict | None] = ContextVar("opacus_fast_scratch", default=None)


@contextmanager
def scratch_space() -> Iterator[None]:
    """Let ``scale_examples`` reuse one output tensor per shape until the block exits.

    On the CPU every fresh multi-megabyte tensor costs page faults, about as much as the multiply that fills it.
    """
    token = _SCRATCH.set({})
    try:
        yield
    finally:
        _SCRATCH.reset(token)


def scale_examples(x: Tensor, factor: Tensor) -> Tensor:
    """``x_i * factor_i`` for each example i of ``x`` (B, ...), for immediate use (the result may be overwritten by
    the next call inside a ``scratch_space``)."""
    factor = cast(factor, x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
    space = _SCRATCH.get()
    if space is None or x.device.type != "cpu":  # CUDA's caching allocator already reuses memory
        return x * factor
    key = (tuple(x.shape), x.stride(), x.dtype)
    out = space.get(key)
    if out is None:
        out = space[key] = torch.empty_like(x)
    return torch.mul(x, factor, out=out)


def weighted_sum(factor: Tensor, grads: Tensor) -> Tensor:
    """``sum_i factor_i * grads_i`` over the leading (batch) dim."""
    return torch.einsum("b,b...->...", cast(factor, grads.dtype), grads)


def weighted_sums(factor: Tensor, grads: Tensor, calls: int) -> Tensor:
    """:func:`weighted_sum` of each of ``calls`` stacked calls (rows ``l * B`` to ``(l + 1) * B - 1`` are call l's):
    ``(calls, *grads.shape[1:])``."""
    factor = cast(factor, grads.dtype).reshape(calls, -1)
    return torch.einsum("lb,lb...->l...", factor, grads.reshape(calls, -1, *grads.shape[1:]))

