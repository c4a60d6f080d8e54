"""Make a model trainable with DP-SGD: Opacus' ``ModuleValidator.fix``, plus every batch norm it leaves behind.

Batch normalisation mixes the examples of a batch (each example is normalised with statistics of the whole batch),
so per-example gradients do not exist. Opacus' ``ModuleValidator.fix`` replaces torch's own BatchNorm classes by
GroupNorm, but only those with trainable parameters, and not the subclasses that libraries build on them: timm's
``BatchNormAct2d`` (BatchNorm, then a drop layer and an activation, in one module; used by EfficientNet,
MobileNetV3, RegNet, ...) and ``SyncBatchNormAct`` are left in place. :func:`fix` replaces all of them.

timm's other norm-act layers need no replacement: ``GroupNormAct``, ``GroupNorm1Act``, ``LayerNormAct(2d)``,
``RmsNormAct(2d)`` normalise each example alone, and ``FrozenBatchNormAct2d`` applies fixed statistics with no
trainable parameters; opacus_fast clips them exactly as they are.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from opacus.utils.module_utils import clone_module
from opacus.validators import ModuleValidator
from torch import nn

#: torch's batch norms (exact classes: a subclass may compute something else)
TORCH_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
#: timm's batch norms fused with a drop layer and an activation, by ``module.QualName`` (timm need not be installed)
TIMM_NORM_ACTS = ("timm.layers.norm_act.BatchNormAct2d", "timm.layers.norm_act.SyncBatchNormAct")


class NormAct(nn.Sequential):
    """A normalisation followed by the drop layer and activation of the norm-act layer it replaces.

    Kept as three plain modules so that opacus_fast clips the GroupNorm with its layer rule.
    """

    def __init__(self, norm: nn.Module, drop: nn.Module, act: nn.Module) -> None:
        super().__init__(OrderedDict(norm=norm, drop=drop, act=act))


def converts(module: nn.Module) -> bool:
    """Whether :func:`fix` replaces ``module`` (a batch norm of a class whose function it knows)."""
    cls = type(module)
    return cls in TORCH_BATCH_NORMS or f"{cls.__module__}.{cls.__qualname__}" in TIMM_NORM_ACTS


def group_count(num_channels: int, num_groups: int | None = None, replace_bn_with_in: bool = False) -> int:
    """Groups of the GroupNorm that replaces a batch norm over ``num_channels``, chosen as Opacus chooses them:
    ``num_groups`` if given, else gcd(32, channels) (32 groups per the GroupNorm paper, fewer if they do not divide
    the channels); one group per channel (instance normalisation) with ``replace_bn_with_in``."""
    if replace_bn_with_in:
        return num_channels
    return num_groups if num_groups is not None else math.gcd(32, num_channels)


def group_norm_like(batch_norm: nn.modules.batchnorm._BatchNorm, num_groups: int) -> nn.GroupNorm:
    """A GroupNorm with ``batch_norm``'s channels, eps, affine flag, device and dtype, and a copy of its weight and
    bias (values and ``requires_grad``)."""
    reference = batch_norm.weight if batch_norm.affine else batch_norm.running_mean
    factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    norm = nn.GroupNorm(num_groups, batch_norm.num_features, eps=batch_norm.eps, affine=batch_norm.affine, **factory)
    if batch_norm.affine:
        with torch.no_grad():
            norm.weight.copy_(batch_norm.weight)
            norm.bias.copy_(batch_norm.bias)
        norm.weight.requires_grad_(batch_norm.weight.requires_grad)
        norm.bias.requires_grad_(batch_norm.bias.requires_grad)
    return norm.train(batch_norm.training)


def replacement(module: nn.Module, num_groups: int | None, replace_bn_with_in: bool) -> nn.Module:
    """What :func:`fix` puts in place of a module that it :func:`converts`."""
    norm = group_norm_like(module, group_count(module.num_features, num_groups, replace_bn_with_in))
    if type(module) in TORCH_BATCH_NORMS:
        return norm
    # SyncBatchNormAct gets its drop and act from timm's convert_sync_batchnorm, and may lack them
    drop, act = getattr(module, "drop", nn.Identity()), getattr(module, "act", nn.Identity())
    return NormAct(norm, drop, act).train(module.training)


def replace_in_place(model: nn.Module, num_groups: int | None, replace_bn_with_in: bool) -> nn.Module:
    """``model`` with every module that :func:`converts` replaced (the root may be returned anew); a module
    registered in several places gets one replacement, shared in all of them."""
    done: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not converts(module):
            continue
        new = done.setdefault(id(module), replacement(module, num_groups, replace_bn_with_in))
        if not name:
            return new
        parent_name, _, child = name.rpartition(".")
        model.get_submodule(parent_name)._modules[child] = new
    return model


def fix(model: nn.Module, **kwargs: Any) -> nn.Module:
    """A copy of ``model`` that DP-SGD can train; ``model`` itself is left as it was.

    Like Opacus' ``ModuleValidator.fix(model, **kwargs)`` (which it calls for everything else, e.g. LSTM → DPLSTM),
    and in addition:

    * every batch norm of torch's own classes becomes a GroupNorm, trainable or not (Opacus skips those without
      trainable parameters, which still mix examples);
    * timm's ``BatchNormAct2d`` and ``SyncBatchNormAct`` become a :class:`NormAct`: a GroupNorm, then the same
      drop layer and activation modules;
    * each GroupNorm keeps the batch norm's eps, affine flag, device and dtype, and starts from a copy of its weight
      and bias (Opacus starts from ones and zeros and the default eps).

    The number of groups is chosen as Opacus chooses it: gcd(32, channels) by default.

    Args:
        model: the model to convert.
        num_groups: the number of groups of every GroupNorm instead (it must divide every batch norm's channels).
        replace_bn_with_in: one group per channel, i.e. instance normalisation, instead.
        **kwargs: further keywords of Opacus' fixers.
    """
    num_groups, replace_bn_with_in = kwargs.get("num_groups"), kwargs.get("replace_bn_with_in", False)
    if replace_bn_with_in and num_groups is not None:
        raise ValueError("replace_bn_with_in and num_groups are mutually exclusive")
    if num_groups is not None and num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    fixed = replace_in_place(clone_module(model), num_groups, replace_bn_with_in)
    return ModuleValidator.fix(fixed, **kwargs)
