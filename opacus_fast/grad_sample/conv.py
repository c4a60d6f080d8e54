"""nn.Conv1d/2d/3d with stride, padding (ints, "same", "valid", any padding_mode), dilation and groups.

A conv is a linear layer on unfolded patches: for group k, ``G_ik = g_ik U_ik^T`` with U_ik the (D_k, T) im2col
matrix of example i. The true gradient is block-diagonal over groups, so the norm sums over groups (never mixing
them, which would over-count depthwise convs).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .linear import ghost_sq_norm, use_ghost
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
    weighted_sums,
)

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _explicit_padding(layer: nn.modules.conv._ConvNd) -> list[tuple[int, int]]:
    """(left, right) padding for each spatial dim, resolving "same" and "valid" as PyTorch does."""
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return [(0, 0)] * len(layer.kernel_size)
        pads = []
        for d, k in zip(layer.dilation, layer.kernel_size):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        return pads
    return [(p, p) for p in layer.padding]


def _geometry(layer: nn.modules.conv._ConvNd) -> tuple[list[int] | None, tuple[int, ...]]:
    """(F.pad argument to apply before the conv or None, symmetric padding the conv itself then uses)."""
    pads = _explicit_padding(layer)
    symmetric = all(left == right for left, right in pads)
    if layer.padding_mode == "zeros" and symmetric:
        return None, tuple(left for left, _ in pads)
    flat = [v for left, right in reversed(pads) for v in (left, right)]
    return flat, (0,) * len(pads)


def unfold(x: Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...], padding: tuple[int, ...],
           stride: tuple[int, ...]) -> Tensor:
    """im2col for any number of spatial dims: (B, C, *S) -> (B, C * prod(kernel), T), channel-major like the weight."""
    n = len(kernel)
    if any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
    for i in range(n):
        x = x.unfold(2 + i, dilation[i] * (kernel[i] - 1) + 1, stride[i])
    if any(d > 1 for d in dilation):
        x = x[(Ellipsis,) + tuple(slice(None, None, d) for d in dilation)]
    batch, channels = x.shape[:2]
    out_dims = list(range(2, 2 + n))
    win_dims = list(range(2 + n, 2 + 2 * n))
    x = x.permute(0, 1, *win_dims, *out_dims)
    return x.reshape(batch, channels * x[0, 0].shape[:n].numel(), -1)


def _grouped(layer: nn.modules.conv._ConvNd, x: Tensor, g: Tensor, padding: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Unfolded input (B, G, D_k, T) and output grad (B, G, p_k, T)."""
    batch, groups = x.shape[0], layer.groups
    u = unfold(x, layer.kernel_size, layer.dilation, padding, layer.stride)
    u = u.reshape(batch, groups, u.shape[1] // groups, u.shape[2])
    gg = g.reshape(batch, groups, g.shape[1] // groups, -1)
    return u, gg


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(LayerRule):
    checked_methods = ("forward", "_conv_forward")
    per_example_params = ("bias",)

    def prepare(self, layer: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
        pre_pad, _ = _geometry(layer)
        if pre_pad is None:
            return x
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        return F.pad(x, pre_pad, mode=mode)

    def forward(self, layer: nn.modules.conv._ConvNd, x: Tensor) -> tuple[Tensor, Saved]:
        _, padding = _geometry(layer)
        conv = _CONV_FN[len(layer.kernel_size)]
        return conv(x, layer.weight, layer.bias, layer.stride, padding, layer.dilation, layer.groups), (x,)

    def _backward(self, layer: nn.modules.conv._ConvNd, x: Tensor, g: Tensor, mask: list[bool]) -> tuple:
        _, padding = _geometry(layer)
        n = len(layer.kernel_size)
        weight = layer.weight.to(g.dtype)
        return torch.ops.aten.convolution_backward(
            g, x.to(g.dtype), weight, None, layer.stride, padding, layer.dilation, False, [0] * n, layer.groups, mask
        )

    def input_grad(self, layer: nn.modules.conv._ConvNd, saved: Saved, g: Tensor) -> Tensor:
        return self._backward(layer, saved[0], g, [True, False, False])[0]

    def norms(self, layer: nn.modules.conv._ConvNd, saved: Saved, g: Tensor, names: Iterable[str]) -> tuple[Norms, Any]:
        x = saved[0]
        out: Norms = {}
        cache = None
        dtype = norm_dtype(g.dtype)
        if "weight" in names:
            _, padding = _geometry(layer)
            u, gg = _grouped(layer, x.to(dtype), g.to(dtype), padding)
            tokens, p_k, d_k = u.shape[3], gg.shape[2], u.shape[2]
            if use_ghost(tokens, p_k, d_k):
                batch, groups = u.shape[:2]
                a = u.transpose(2, 3).reshape(batch * groups, tokens, d_k)
                gt = gg.transpose(2, 3).reshape(batch * groups, tokens, p_k)
                out["weight"] = ghost_sq_norm(a, gt).reshape(batch, groups).sum(dim=1)
            else:
                cache = torch.einsum("bkpt,bkdt->bkpd", gg, u).reshape(x.shape[0], *layer.weight.shape)
                out["weight"] = sq_norm(cache)
        if "bias" in names:
            out["bias"] = sq_norm(g.to(dtype).flatten(2).sum(dim=2))
        return out, cache

    def clipped_sum(
        self, layer: nn.modules.conv._ConvNd, saved: Saved, g: Tensor, factors: dict[str, Tensor], cache: Any
    ) -> dict[str, Tensor]:
        x = saved[0]
        out = {}
        if "weight" in factors:
            if cache is not None:
                out["weight"] = weighted_sum(factors["weight"], cache)
            else:
                fg = scale_examples(g, factors["weight"])
                out["weight"] = self._backward(layer, x, fg, [False, True, False])[1]
        if "bias" in factors:
            out["bias"] = torch.einsum("b,bc->c", factors["bias"].to(g.dtype), g.flatten(2).sum(dim=2))
        return out

    def stack_key(self, layer: nn.modules.conv._ConvNd, saved: Saved, g: Tensor) -> Hashable:
        x = saved[0]  # norms and per-example gradients read the geometry and the shapes only
        geometry = (layer.kernel_size, layer.stride, layer.dilation, layer.groups, _geometry(layer)[1])
        return geometry, x.shape, x.dtype, x.device, g.shape, g.dtype

    def stack_bytes(self, layer: nn.modules.conv._ConvNd, saved: Saved, g: Tensor) -> int:
        """Also the unfolded input its norms form (the input times the kernel's volume, in the norm dtype)."""
        x = saved[0]
        unfolded = x.numel() * math.prod(layer.kernel_size) * torch.finfo(norm_dtype(g.dtype)).bits // 8
        return super().stack_bytes(layer, saved, g) + unfolded

    def stacked_clipped_sum(
        self, layer: nn.modules.conv._ConvNd, saved: Saved, g: Tensor, factors: dict[str, Tensor], cache: Any,
        calls: int,
    ) -> dict[str, Sequence[Tensor]]:
        """The weight's sums one ``convolution_backward`` per call (each reads only the weight's shape, which the
        calls share), the rest for all calls at once."""
        x = saved[0]
        out: dict[str, Sequence[Tensor]] = {}
        if "weight" in factors:
            if cache is not None:
                out["weight"] = weighted_sums(factors["weight"], cache, calls)
            else:
                fg = scale_examples(g, factors["weight"])
                out["weight"] = [self._backward(layer, xc, gc, [False, True, False])[1]
                                 for xc, gc in zip(x.chunk(calls), fg.chunk(calls))]
        if "bias" in factors:
            out["bias"] = weighted_sums(factors["bias"], g.flatten(2).sum(dim=2), calls)
        return out

    def per_sample(
        self, layer: nn.modules.conv._ConvNd, saved: Saved, g: Tensor, names: Iterable[str]
    ) -> dict[str, Tensor]:
        x = saved[0]
        out = {}
        if "weight" in names:
            _, padding = _geometry(layer)
            u, gg = _grouped(layer, x.to(g.dtype), g, padding)
            out["weight"] = torch.einsum("bkpt,bkdt->bkpd", gg, u).reshape(x.shape[0], *layer.weight.shape)
        if "bias" in names:
            out["bias"] = g.flatten(2).sum(dim=2)
        return out
