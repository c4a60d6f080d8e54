"""nn.Linear with inputs of any rank (B, ..., d): all middle dims are flattened into T."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .registry import (
    LayerRule,
    Norms,
    Saved,
    Tensor,
    norm_dtype,
    register_rule,
    scale_examples,
    sq_norm,
    weighted_sum,
)


def use_ghost(tokens: int, out_features: int, in_features: int) -> bool:
    """Mixed rule (Bu, Mao, Xu 2022): ghost norm iff its T×T Grams are smaller than one per-example gradient."""
    return 2 * tokens * tokens < out_features * in_features


#: below this many tokens the Grams are too small for the symmetric split to pay for its extra products (measured
#: on 2 CPU cores: 8–37 % slower at T = 16–32; from even to 18 % faster at T = 64–197)
SPLIT_MIN_TOKENS = 64
#: token blocks of the split are multiples of this, the remainder tokens a thin strip of their own: GEMM kernels are
#: slow on ragged edges (measured on 2 CPU cores, order randomised: 3 % less time than plain halves at T = 65, 5-6 %
#: at T = 100 and 197)
BLOCK_TOKENS = 16


def _for_gram(x: Tensor) -> Tensor:
    """``x`` ready for :func:`cross`: upcast once on the CPU; on CUDA a half-precision GEMM writes float32 itself."""
    return x if x.is_cuda else x.to(norm_dtype(x.dtype))


def cross(x: Tensor, y: Tensor) -> Tensor:
    """Per-example ``x_i y_i^T`` (B, Tx, Ty) in at least float32, for inputs prepared by :func:`_for_gram`."""
    dtype = norm_dtype(x.dtype)
    if x.dtype != dtype:
        return torch.bmm(x, y.transpose(1, 2), out_dtype=dtype)
    return torch.bmm(x, y.transpose(1, 2))


def _dot(x: Tensor, y: Tensor) -> Tensor:
    """Per-example inner product of two (B, ...) tensors."""
    batch = x.shape[0]
    return torch.bmm(x.reshape(batch, 1, -1), y.reshape(batch, -1, 1)).reshape(batch)


def split_points(tokens: int) -> list[int]:
    """Row-block boundaries for the symmetric Gram split: a strip of ``tokens % BLOCK_TOKENS`` rows (if any), then
    the aligned rest in two parts whose sizes are multiples of ``BLOCK_TOKENS``."""
    strip = tokens % BLOCK_TOKENS
    half = ((tokens - strip) // BLOCK_TOKENS + 1) // 2 * BLOCK_TOKENS
    return sorted({0, strip, strip + half, tokens})


def _upper_dot(a: Tensor, g: Tensor, start: int, stop: int) -> Tensor:
    """``<A A^T, G G^T>`` over rows ``start:stop`` and columns ``start:`` of both (symmetric) Grams, the block
    right of the diagonal counted twice (it stands for its mirror image below the diagonal)."""
    gram_a = cross(a[:, start:stop], a[:, start:])
    gram_a[:, :, stop - start:] *= 2
    return _dot(gram_a, cross(g[:, start:stop], g[:, start:]))


def ghost_sq_norm(a: Tensor, g: Tensor) -> Tensor:
    """``||g_i^T a_i||_F^2 = <a_i a_i^T, g_i g_i^T>`` for a: (B, T, d), g: (B, T, p), without forming g_i^T a_i.

    Both Grams are symmetric, so from ``SPLIT_MIN_TOKENS`` tokens on only the blocks on and right of the diagonal
    are computed (rows cut at :func:`split_points`): about a quarter fewer FLOPs, in GEMMs of aligned sizes.
    """
    tokens = a.shape[1]
    if tokens == 1:
        dtype = norm_dtype(g.dtype)
        return a.to(dtype).pow(2).sum(dim=(1, 2)) * g.to(dtype).pow(2).sum(dim=(1, 2))
    a, g = _for_gram(a), _for_gram(g)
    points = split_points(tokens) if tokens >= SPLIT_MIN_TOKENS else [0, tokens]
    return sum(_upper_dot(a, g, start, stop) for start, stop in pairwise(points))


def scaled_outer_sum(factor: Tensor, g: Tensor, a: Tensor) -> Tensor:
    """``sum_i factor_i g_i^T a_i`` for g: (B, T, p), a: (B, T, d), scaling whichever side is narrower."""
    a = a.to(g.dtype)
    if a.shape[-1] <= g.shape[-1]:
        a = scale_examples(a, factor)
    else:
        g = scale_examples(g, factor)
    return g.reshape(-1, g.shape[-1]).t() @ a.reshape(-1, a.shape[-1])


def _flat(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T, d) activations and (B, T, p) output grads."""
    batch = x.shape[0]
    return x.reshape(batch, -1, x.shape[-1]), g.reshape(batch, -1, g.shape[-1])


@register_rule(nn.Linear)
class LinearRule(LayerRule):
    tokenwise = True

    def forward(self, layer: nn.Linear, x: Tensor) -> tuple[Tensor, Saved]:
        return F.linear(x, layer.weight, layer.bias), (x,)

    def input_grad(self, layer: nn.Linear, saved: Saved, g: Tensor) -> Tensor:
        return torch.matmul(g, layer.weight.to(g.dtype))

    def norms(self, layer: nn.Linear, saved: Saved, g: Tensor, names: Iterable[str]) -> tuple[Norms, Any]:
        a, gf = _flat(saved[0], g)
        dtype = norm_dtype(gf.dtype)
        out: Norms = {}
        cache: dict[str, Tensor | None] = {"weight": None, "bias": None}
        if "weight" in names:
            tokens, p, d = a.shape[1], gf.shape[2], a.shape[2]
            if tokens == 1 or use_ghost(tokens, p, d):
                out["weight"] = ghost_sq_norm(a.to(gf.dtype), gf)
            else:
                cache["weight"] = torch.bmm(gf.transpose(1, 2).to(dtype), a.to(dtype))
                out["weight"] = sq_norm(cache["weight"])
        if "bias" in names:
            bias = gf.sum(dim=1, dtype=dtype)
            out["bias"] = sq_norm(bias)
            cache["bias"] = bias
        return out, cache

    def clipped_sum(
        self, layer: nn.Linear, saved: Saved, g: Tensor, factors: dict[str, Tensor], cache: Any
    ) -> dict[str, Tensor]:
        a, gf = _flat(saved[0], g)
        out = {}  # ``cache`` comes from ``norms`` over the same names
        if "weight" in factors:
            if cache["weight"] is not None:
                out["weight"] = weighted_sum(factors["weight"], cache["weight"])
            else:
                out["weight"] = scaled_outer_sum(factors["weight"], gf, a)
        if "bias" in factors:
            out["bias"] = weighted_sum(factors["bias"], cache["bias"])
        return out

    def per_sample(self, layer: nn.Linear, saved: Saved, g: Tensor, names: Iterable[str]) -> dict[str, Tensor]:
        a, gf = _flat(saved[0], g)
        out = {}
        if "weight" in names:
            out["weight"] = torch.bmm(gf.transpose(1, 2), a.to(gf.dtype))
        if "bias" in names:
            out["bias"] = gf.sum(dim=1)
        return out


@register_rule("transformers.pytorch_utils.Conv1D")
class TransposedLinearRule(LinearRule):
    """Hugging Face's ``Conv1D`` (GPT-2's layers): a Linear whose weight is stored as (in_features, out_features)."""

    def forward(self, layer: nn.Module, x: Tensor) -> tuple[Tensor, Saved]:
        return F.linear(x, layer.weight.t(), layer.bias), (x,)

    def input_grad(self, layer: nn.Module, saved: Saved, g: Tensor) -> Tensor:
        return torch.matmul(g, layer.weight.t().to(g.dtype))

    def clipped_sum(
        self, layer: nn.Module, saved: Saved, g: Tensor, factors: dict[str, Tensor], cache: Any
    ) -> dict[str, Tensor]:
        return _transposed(super().clipped_sum(layer, saved, g, factors, cache), 0)

    def per_sample(self, layer: nn.Module, saved: Saved, g: Tensor, names: Iterable[str]) -> dict[str, Tensor]:
        return _transposed(super().per_sample(layer, saved, g, names), 1)


def _transposed(grads: dict[str, Tensor], first: int) -> dict[str, Tensor]:
    """The weight's entry transposed back to the stored layout (dims ``first`` and ``first + 1``)."""
    if "weight" in grads:
        grads["weight"] = grads["weight"].transpose(first, first + 1)
    return grads
