"""Normalisation layers (LayerNorm, RMSNorm, GroupNorm, InstanceNorm): tiny parameters, so per-example gradients
are instantiated directly: ``G_i(weight) = sum over non-channel positions of x̂_i * g_i`` and ``G_i(bias) = sum g_i``.
The input gradient is obtained by recomputing the (cheap) normalisation under autograd, without weight gradients.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .registry import LayerRule, Tensor, register_rule


class _AffineNormRule(LayerRule):
    """Shared logic: subclasses say how to normalise without affine and where the channel dims are."""

    def normalise(self, layer: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def affine(self, layer: nn.Module, xhat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def reduce_dims(self, layer: nn.Module, x: Tensor) -> tuple[int, ...]:
        """Dims of x (besides the batch) that a per-example gradient sums over."""
        raise NotImplementedError

    def forward(self, layer: nn.Module, x: Tensor) -> Tensor:
        return self.affine(layer, self.normalise(layer, x), layer.weight, getattr(layer, "bias", None))

    def input_grad(self, layer: nn.Module, x: Tensor, g: Tensor) -> Tensor:
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            bias = getattr(layer, "bias", None)
            out = self.affine(
                layer, self.normalise(layer, leaf), _detach(layer.weight), _detach(bias)
            )
            return torch.autograd.grad(out, leaf, g)[0]

    def per_sample(self, layer: nn.Module, x: Tensor, g: Tensor, names: Iterable[str]) -> dict[str, Tensor]:
        dims = self.reduce_dims(layer, x)
        out = {}
        if "weight" in names:
            xhat = self.normalise(layer, x.to(g.dtype))
            out["weight"] = (xhat * g).sum(dim=dims) if dims else xhat * g
        if "bias" in names:
            out["bias"] = g.sum(dim=dims) if dims else g
        return out


def _detach(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


@register_rule(nn.LayerNorm)
class LayerNormRule(_AffineNormRule):
    def normalise(self, layer: nn.LayerNorm, x: Tensor) -> Tensor:
        return F.layer_norm(x, layer.normalized_shape, None, None, layer.eps)

    def affine(self, layer: nn.LayerNorm, xhat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        out = xhat if weight is None else xhat * weight
        return out if bias is None else out + bias

    def forward(self, layer: nn.LayerNorm, x: Tensor) -> Tensor:
        return F.layer_norm(x, layer.normalized_shape, layer.weight, layer.bias, layer.eps)

    def reduce_dims(self, layer: nn.LayerNorm, x: Tensor) -> tuple[int, ...]:
        return tuple(range(1, x.dim() - len(layer.normalized_shape)))


@register_rule(nn.RMSNorm)
class RMSNormRule(LayerNormRule):
    def normalise(self, layer: nn.RMSNorm, x: Tensor) -> Tensor:
        return F.rms_norm(x, layer.normalized_shape, None, layer.eps)

    def forward(self, layer: nn.RMSNorm, x: Tensor) -> Tensor:
        return F.rms_norm(x, layer.normalized_shape, layer.weight, layer.eps)


class _ChannelNormRule(_AffineNormRule):
    """Norms whose affine parameters are per channel, channel at dim 1."""

    def affine(self, layer: nn.Module, xhat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        shape = (1, -1) + (1,) * (xhat.dim() - 2)
        out = xhat if weight is None else xhat * weight.reshape(shape)
        return out if bias is None else out + bias.reshape(shape)

    def reduce_dims(self, layer: nn.Module, x: Tensor) -> tuple[int, ...]:
        return tuple(range(2, x.dim()))


@register_rule(nn.GroupNorm)
class GroupNormRule(_ChannelNormRule):
    def normalise(self, layer: nn.GroupNorm, x: Tensor) -> Tensor:
        return F.group_norm(x, layer.num_groups, None, None, layer.eps)

    def forward(self, layer: nn.GroupNorm, x: Tensor) -> Tensor:
        return F.group_norm(x, layer.num_groups, layer.weight, layer.bias, layer.eps)


@register_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
class InstanceNormRule(_ChannelNormRule):
    def validate(self, layer: nn.modules.instancenorm._InstanceNorm) -> str | None:
        if layer.track_running_stats:
            return "track_running_stats=True averages statistics over the batch; set track_running_stats=False"
        return None

    def normalise(self, layer: nn.modules.instancenorm._InstanceNorm, x: Tensor) -> Tensor:
        return F.instance_norm(x, eps=layer.eps)
