"""Normalisation layers (LayerNorm, RMSNorm, GroupNorm, InstanceNorm): tiny parameters, so per-example gradients
are instantiated: ``G_i(weight) = sum over non-channel positions of x̂_i * g_i`` and ``G_i(bias) = sum g_i``.

The forward keeps the statistics (mean, rstd) that PyTorch's fused kernels return, so the input gradient comes
from the fused backward kernel and x̂ from one elementwise pass: nothing is recomputed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .registry import LayerRule, Saved, Tensor, cast, norm_dtype, register_rule

aten = torch.ops.aten


def _compute_dtype(x: Tensor) -> torch.dtype:
    """Norm layers run in at least float32 (as under autocast)."""
    return norm_dtype(x.dtype)


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else cast(t, dtype)


def _output(out: Tensor, x: Tensor) -> Tensor:
    """The layer's output in the input's dtype, as torch returns it (a bfloat16 model's next layer needs bfloat16);
    under autocast it stays in the compute dtype."""
    if out.dtype == x.dtype or torch.is_autocast_enabled(x.device.type):
        return out
    return out.to(x.dtype)


class _AffineNormRule(LayerRule):
    """Shared per-example logic; subclasses give x̂ and the dims a per-example gradient sums over."""

    eager = True

    def xhat(self, layer: nn.Module, saved: Saved) -> Tensor:
        """The normalised input, as a fresh tensor (``per_sample`` multiplies it in place)."""
        raise NotImplementedError

    def reduce_dims(self, layer: nn.Module, x: Tensor) -> tuple[int, ...]:
        raise NotImplementedError

    def per_sample(self, layer: nn.Module, saved: Saved, g: Tensor, names: Iterable[str]) -> dict[str, Tensor]:
        g = cast(g, saved[0].dtype)
        dims = self.reduce_dims(layer, saved[0])
        out = {}
        if "weight" in names:
            prod = self.xhat(layer, saved).mul_(g)
            out["weight"] = prod.sum(dim=dims) if dims else prod
        if "bias" in names:
            out["bias"] = g.sum(dim=dims) if dims else g
        return out


# timm's LayerNorm only adds an optional fused kernel for the same function
@register_rule(nn.LayerNorm, "timm.layers.norm.LayerNorm")
class LayerNormRule(_AffineNormRule):
    tokenwise = True

    def forward(self, layer: nn.LayerNorm, x: Tensor) -> tuple[Tensor, Saved]:
        dtype = _compute_dtype(x)
        xc = cast(x, dtype)
        out, mean, rstd = aten.native_layer_norm(
            xc, list(layer.normalized_shape), _cast(layer.weight, dtype), _cast(layer.bias, dtype), layer.eps
        )
        return _output(out, x), (xc, mean, rstd)

    def input_grad(self, layer: nn.LayerNorm, saved: Saved, g: Tensor) -> Tensor:
        x, mean, rstd = saved
        weight, bias = _cast(layer.weight, x.dtype), _cast(layer.bias, x.dtype)
        return aten.native_layer_norm_backward(
            cast(g, x.dtype), x, list(layer.normalized_shape), mean, rstd, weight, bias, [True, False, False]
        )[0]

    def xhat(self, layer: nn.LayerNorm, saved: Saved) -> Tensor:
        """Recomputed by the forward kernel without weight and bias: one kernel instead of two (the statistics are
        the saved ones, computed again from the same input)."""
        return aten.native_layer_norm(saved[0], list(layer.normalized_shape), None, None, layer.eps)[0]

    def reduce_dims(self, layer: nn.LayerNorm, x: Tensor) -> tuple[int, ...]:
        return tuple(range(1, x.dim() - len(layer.normalized_shape)))


@register_rule(nn.RMSNorm)
class RMSNormRule(LayerNormRule):
    def forward(self, layer: nn.RMSNorm, x: Tensor) -> tuple[Tensor, Saved]:
        dtype = _compute_dtype(x)
        xc = x.to(dtype)
        eps = layer.eps if layer.eps is not None else torch.finfo(dtype).eps
        out, rstd = aten._fused_rms_norm(xc, list(layer.normalized_shape), _cast(layer.weight, dtype), eps)
        return _output(out, x), (xc, rstd)

    def input_grad(self, layer: nn.RMSNorm, saved: Saved, g: Tensor) -> Tensor:
        """``r (g w) - x r^3 mean(g w x)`` over the normalised dims (no fused CPU backward exists)."""
        x, rstd = saved
        gw = g.to(x.dtype) if layer.weight is None else g.to(x.dtype) * layer.weight.to(x.dtype)
        dims = tuple(range(x.dim() - len(layer.normalized_shape), x.dim()))
        return rstd * (gw - x * rstd.pow(2) * (gw * x).mean(dim=dims, keepdim=True))

    def xhat(self, layer: nn.RMSNorm, saved: Saved) -> Tensor:
        x, rstd = saved
        return x * rstd


class _GroupStatsRule(_AffineNormRule):
    """GroupNorm, and InstanceNorm as GroupNorm with one group per channel (channel at dim 1)."""

    def groups(self, layer: nn.Module) -> int:
        raise NotImplementedError

    def forward(self, layer: nn.Module, x: Tensor) -> tuple[Tensor, Saved]:
        dtype = _compute_dtype(x)
        xc = x.to(dtype)
        n, c = x.shape[:2]
        out, mean, rstd = aten.native_group_norm(
            xc, _cast(layer.weight, dtype), _cast(layer.bias, dtype), n, c, math.prod(x.shape[2:]), self.groups(layer),
            layer.eps,
        )
        return _output(out, x), (xc, mean, rstd)

    def input_grad(self, layer: nn.Module, saved: Saved, g: Tensor) -> Tensor:
        x, mean, rstd = saved
        n, c = x.shape[:2]
        return aten.native_group_norm_backward(
            g.to(x.dtype).contiguous(), x, mean, rstd, _cast(layer.weight, x.dtype), n, c, math.prod(x.shape[2:]),
            self.groups(layer), [True, False, False],
        )[0]

    def per_sample(self, layer: nn.Module, saved: Saved, g: Tensor, names: Iterable[str]) -> dict[str, Tensor]:
        """One fused backward kernel for both: GroupNorm's own backward, run on the batch seen as one example with
        ``B * C`` channels in ``B * groups`` groups, sums each example's channels apart (its weight and bias
        gradients are the per-example ones)."""
        x, mean, rstd = saved
        batch, channels = x.shape[:2]
        _, weight, bias = aten.native_group_norm_backward(
            cast(g, x.dtype).reshape(1, batch * channels, -1), x.reshape(1, batch * channels, -1),
            mean.reshape(1, -1), rstd.reshape(1, -1), None, 1, batch * channels, math.prod(x.shape[2:]),
            batch * self.groups(layer), [False, "weight" in names, "bias" in names],
        )
        grads = {"weight": weight, "bias": bias}
        return {n: grads[n].reshape(batch, channels) for n in names}


@register_rule(nn.GroupNorm)
class GroupNormRule(_GroupStatsRule):
    def groups(self, layer: nn.GroupNorm) -> int:
        return layer.num_groups


@register_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
class InstanceNormRule(_GroupStatsRule):
    def validate(self, layer: nn.modules.instancenorm._InstanceNorm) -> str | None:
        if layer.track_running_stats:
            return "track_running_stats=True averages statistics over the batch; set track_running_stats=False"
        return None

    def groups(self, layer: nn.modules.instancenorm._InstanceNorm) -> int:
        return layer.num_features
