"""nn.Linear with inputs of any rank (B, ..., d): all middle dims are flattened into T."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .registry import (
    LayerRule,
    Norms,
    Saved,
    Tensor,
    cast,
    norm_dtype,
    register_rule,
    scale_examples,
    sq_norm,
    weighted_sum,
    weighted_sums,
)


def use_ghost(tokens: int, out_features: int, in_features: int) -> bool:
    """Mixed rule (Bu, Mao, Xu 2022): ghost norm iff its T×T Grams are smaller than one per-example gradient."""
    return 2 * tokens * tokens < out_features * in_features


#: below this many tokens the Grams are too small for the symmetric split to pay for its extra products (measured
#: on 2 CPU cores: 8–37 % slower at T = 16–32; from even to 18 % faster at T = 64–197)
SPLIT_MIN_TOKENS = 64
#: the lower block of the split is a multiple of this many tokens, the remainder rows join the upper one: GEMM kernels
#: are slow on ragged edges (measured on 2 CPU cores for a split into three blocks: 3 % less time than plain halves at
#: T = 65, 5-6 % at T = 100 and 197)
BLOCK_TOKENS = 16
#: the split saves a quarter of the Grams' FLOPs for four more GEMM launches: it is made when the FLOPs saved are worth
#: more than the launches, each counted as the FLOPs the device's GEMMs do in the host time one launch takes. CPU:
#: ~10 µs per op at ~100 GFLOP/s; CUDA (estimate for large GPUs: an H200 does ~2.5 GFLOP of bf16 GEMM in the ~5 µs
#: the host takes to issue one kernel), for other device types too
LAUNCH_FLOPS = {"cpu": 1e6, "cuda": 2.5e9}
SPLIT_LAUNCHES = 4


def _for_gram(x: Tensor) -> Tensor:
    """``x`` ready for :func:`cross`: upcast once on the CPU; on CUDA a half-precision GEMM writes float32 itself."""
    return x if x.is_cuda else cast(x, norm_dtype(x.dtype))


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


def split_point(tokens: int) -> int:
    """Row at which the symmetric Gram split cuts: below it, half of the ``BLOCK_TOKENS``-aligned tokens (rounded
    down to whole blocks); above it, the other half and the ``tokens % BLOCK_TOKENS`` remainder rows."""
    aligned = tokens - tokens % BLOCK_TOKENS
    return tokens - aligned // BLOCK_TOKENS // 2 * BLOCK_TOKENS


def split_pays(a: Tensor, g: Tensor) -> bool:
    """Whether the symmetric split of the (B, T, T) Grams of a: (B, T, d) and g: (B, T, p) is worth its launches."""
    batch, tokens = a.shape[:2]
    saved = batch * tokens * tokens * (a.shape[2] + g.shape[2]) / 2  # a quarter of 2 B T^2 (d + p)
    launch = LAUNCH_FLOPS.get(a.device.type, LAUNCH_FLOPS["cuda"])
    return tokens >= SPLIT_MIN_TOKENS and saved >= SPLIT_LAUNCHES * launch


def ghost_sq_norm(a: Tensor, g: Tensor) -> Tensor:
    """``||g_i^T a_i||_F^2 = <a_i a_i^T, g_i g_i^T>`` for a: (B, T, d), g: (B, T, p), without forming g_i^T a_i.

    Both Grams are symmetric, so where it pays (:func:`split_pays`) only the blocks on and right of the diagonal
    are computed, in two row blocks cut at :func:`split_point` (the top one as wide as the Gram, its part right of
    the diagonal counted twice, for its mirror image): a quarter fewer FLOPs for four more GEMM launches.
    """
    batch, tokens = a.shape[:2]
    a, g = _for_gram(a), _for_gram(g)
    if tokens == 1:  # Goodfellow et al.: the 1 x 1 Grams are ||a_i||^2 and ||g_i||^2
        return (cross(a, a) * cross(g, g)).reshape(batch)
    if not split_pays(a, g):
        return _dot(cross(a, a), cross(g, g))
    cut = split_point(tokens)
    top = cross(a[:, :cut], a)
    top[:, :, cut:].mul_(2)
    upper = _dot(top, cross(g[:, :cut], g))
    lower_a, lower_g = cross(a[:, cut:], a[:, cut:]), cross(g[:, cut:], g[:, cut:])
    return torch.baddbmm(upper.reshape(batch, 1, 1), lower_a.reshape(batch, 1, -1), lower_g.reshape(batch, -1, 1)
                         ).reshape(batch)


def scaled_outer_sum(factor: Tensor, g: Tensor, a: Tensor, calls: int = 1) -> Tensor:
    """``sum_i factor_i g_i^T a_i`` for g: (B, T, p), a: (B, T, d), scaling whichever side is narrower; of each of
    ``calls`` stacked calls (see ``LayerRule.stack_key``): (calls, p, d)."""
    a = cast(a, g.dtype)
    if a.shape[-1] <= g.shape[-1]:
        a = scale_examples(a, factor)
    else:
        g = scale_examples(g, factor)
    return torch.bmm(g.reshape(calls, -1, g.shape[-1]).transpose(1, 2), a.reshape(calls, -1, a.shape[-1]))


def _flat(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T, d) activations and (B, T, p) output grads."""
    if x.dim() == 3:
        return x, g
    batch = x.shape[0]
    return x.reshape(batch, -1, x.shape[-1]), g.reshape(batch, -1, g.shape[-1])


@register_rule(nn.Linear)
class LinearRule(LayerRule):
    tokenwise = True
    per_example_params = ("bias",)

    def forward(self, layer: nn.Linear, x: Tensor) -> tuple[Tensor, Saved]:
        return F.linear(x, layer.weight, layer.bias), (x,)

    def input_grad(self, layer: nn.Linear, saved: Saved, g: Tensor) -> Tensor:
        return torch.matmul(g, cast(layer.weight, g.dtype))

    def norms(self, layer: nn.Linear, saved: Saved, g: Tensor, names: Iterable[str]) -> tuple[Norms, Any]:
        a, gf = _flat(saved[0], g)
        dtype = norm_dtype(gf.dtype)
        out: Norms = {}
        cache: dict[str, Tensor | None] = {"weight": None, "bias": None}
        if "weight" in names:
            tokens, p, d = a.shape[1], gf.shape[2], a.shape[2]
            if tokens == 1 or use_ghost(tokens, p, d):
                out["weight"] = ghost_sq_norm(cast(a, gf.dtype), gf)
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
                out["weight"] = scaled_outer_sum(factors["weight"], gf, a)[0]
        if "bias" in factors:
            out["bias"] = weighted_sum(factors["bias"], cache["bias"])
        return out

    def stack_key(self, layer: nn.Linear, saved: Saved, g: Tensor) -> Hashable:
        x = saved[0]  # norms and per-example gradients read the shapes only
        return x.shape, x.dtype, x.device, g.shape, g.dtype

    def stacked_clipped_sum(
        self, layer: nn.Linear, saved: Saved, g: Tensor, factors: dict[str, Tensor], cache: Any, calls: int
    ) -> dict[str, Tensor]:
        a, gf = _flat(saved[0], g)
        out = {}
        if "weight" in factors:
            if cache["weight"] is not None:
                out["weight"] = weighted_sums(factors["weight"], cache["weight"], calls)
            else:
                out["weight"] = scaled_outer_sum(factors["weight"], gf, a, calls)
        if "bias" in factors:
            out["bias"] = weighted_sums(factors["bias"], cache["bias"], calls)
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

    def stacked_clipped_sum(
        self, layer: nn.Module, saved: Saved, g: Tensor, factors: dict[str, Tensor], cache: Any, calls: int
    ) -> dict[str, Tensor]:
        return _transposed(super().stacked_clipped_sum(layer, saved, g, factors, cache, calls), 1)

    def per_sample(self, layer: nn.Module, saved: Saved, g: Tensor, names: Iterable[str]) -> dict[str, Tensor]:
        return _transposed(super().per_sample(layer, saved, g, names), 1)


def _transposed(grads: dict[str, Tensor], first: int) -> dict[str, Tensor]:
    """The weight's entry transposed back to the stored layout (dims ``first`` and ``first + 1``)."""
    if "weight" in grads:
        grads["weight"] = grads["weight"].transpose(first, first + 1)
    return grads
