"""``opacus_fast.fix``: timm's norm-act models train exactly after it, the converted layers compute GroupNorm then
the same drop and activation, and the refusal of an unconverted model lists each module type once."""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
from oracle import assert_exact
from timm.layers.norm_act import BatchNormAct2d, SyncBatchNormAct, convert_sync_batchnorm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import opacus_fast
from opacus_fast import PrivacyEngine, UnsupportedModuleError
from opacus_fast.validators import NormAct

TIMM_MODELS = ("efficientnet_b0", "mobilenetv3_small_100", "regnetx_002")


class Doubling(nn.Module):
    """A deterministic stand-in for a norm-act layer's drop layer: shows that it runs, and before the activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


def randomize_batch_norms(model: nn.Module, eps: float = 0.1) -> nn.Module:
    """Weights, biases and eps that differ from a GroupNorm's defaults, so that a converter which drops them fails."""
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = eps
            if m.affine:
                with torch.no_grad():
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model


def group_norm_then_act(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The function a converted norm-act layer must compute: GroupNorm with gcd(32, C) groups and the layer's eps,
    weight and bias, then its drop layer, then its activation."""
    groups = math.gcd(32, layer.num_features)
    return layer.act(layer.drop(F.group_norm(x, groups, layer.weight, layer.bias, layer.eps)))


def batch_norms(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_norm_act_models_train_exactly_after_fix(name: str) -> None:
    """One step's clipped sum equals Opacus' microbatch oracle (float64, some examples clipped, some not)."""
    torch.manual_seed(0)
    model = opacus_fast.fix(timm.create_model(name, num_classes=3)).double()
    assert batch_norms(model) == []
    assert_exact(model, torch.randn(4, 3, 32, 32, dtype=torch.float64))


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_fixed_timm_model_computes_group_norm_then_activation(name: str) -> None:
    """The whole converted model equals the original with each BatchNormAct2d computing GroupNorm + drop + act by
    hand; the original is left as it was."""
    torch.manual_seed(0)
    original = randomize_batch_norms(timm.create_model(name, num_classes=3))
    state = copy.deepcopy(original.state_dict())
    fixed = opacus_fast.fix(original)
    norm_acts = [m for m in original.modules() if isinstance(m, BatchNormAct2d)]
    assert norm_acts and len(batch_norms(original)) == len(norm_acts)
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in state.items())
    for m in norm_acts:
        m.forward = partial(group_norm_then_act, m)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fixed(x), original(x), rtol=1e-5, atol=1e-5)


def test_converted_layers_equal_hand_built_group_norm_and_activation() -> None:
    """A few layers of a converted EfficientNet against nn.GroupNorm + a copy of the activation, built by hand."""
    torch.manual_seed(0)
    original = randomize_batch_norms(timm.create_model("efficientnet_b0", num_classes=3))
    fixed = opacus_fast.fix(original)
    for name in ("bn1", "blocks.1.0.bn2", "blocks.6.0.bn3", "bn2"):
        layer, converted = original.get_submodule(name), fixed.get_submodule(name)
        channels = layer.num_features
        reference = nn.Sequential(nn.GroupNorm(math.gcd(32, channels), channels, eps=layer.eps), copy.deepcopy(layer.act))
        reference[0].load_state_dict({"weight": layer.weight, "bias": layer.bias})
        assert isinstance(converted, NormAct) and isinstance(converted.norm, nn.GroupNorm)
        assert converted.norm.eps == 0.1 and converted.norm.affine
        assert converted.norm.weight is not layer.weight and converted.norm.weight.requires_grad
        x = torch.randn(2, channels, 5, 5)
        torch.testing.assert_close(converted(x), reference(x), rtol=1e-6, atol=1e-6)


def test_each_batch_norm_kind_is_converted() -> None:
    """torch's batch norms (also frozen or without affine parameters, which Opacus' fix leaves), timm's
    BatchNormAct2d with its drop layer, and SyncBatchNormAct with and without drop and act; dtype kept."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 12, 3),
        BatchNormAct2d(12, eps=1e-3, act_layer=nn.SiLU, drop_layer=Doubling),
        nn.BatchNorm2d(12).requires_grad_(False),
        BatchNormAct2d(12, affine=False, apply_act=False),
        nn.BatchNorm2d(12, affine=False),
        nn.Flatten(2),
        nn.BatchNorm1d(12),
    ).double()
    randomize_batch_norms(model)
    model[2].weight.requires_grad_(True)  # half frozen: both flags are copied
    fixed = opacus_fast.fix(model)
    assert batch_norms(fixed) == []
    assert [type(m).__name__ for m in fixed] == [
        "Conv2d", "NormAct", "GroupNorm", "NormAct", "GroupNorm", "Flatten", "GroupNorm"
    ]
    assert [p.requires_grad for p in fixed[2].parameters()] == [True, False]
    assert all(p.dtype == torch.float64 for p in fixed.parameters())
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    h = group_norm_then_act(model[1], model[0](x))
    torch.testing.assert_close(fixed[1](model[0](x)), h)
    h = F.group_norm(h, 4, model[2].weight, model[2].bias, 0.1)
    h = group_norm_then_act(model[3], h)
    torch.testing.assert_close(fixed(x), F.group_norm(F.group_norm(h, 4, eps=0.1).flatten(2), 4, model[6].weight,
                                                      model[6].bias, 0.1))

    synced = convert_sync_batchnorm(nn.Sequential(BatchNormAct2d(8, act_layer=nn.ReLU), BatchNormAct2d(8),
                                                  nn.BatchNorm2d(8)))
    assert [type(m) for m in synced] == [SyncBatchNormAct, SyncBatchNormAct, nn.SyncBatchNorm]
    del synced[1].act, synced[1].drop  # a SyncBatchNormAct may come without them
    fixed = opacus_fast.fix(synced)
    assert isinstance(fixed[0], NormAct) and isinstance(fixed[0].act, nn.ReLU)
    assert isinstance(fixed[1], NormAct) and isinstance(fixed[1].act, nn.Identity)
    assert type(fixed[2]) is nn.GroupNorm and fixed[2].num_groups == 8


def test_fix_options_and_shared_modules() -> None:
    """num_groups and replace_bn_with_in as in Opacus; a module registered twice stays one module; a root batch
    norm is returned converted."""
    shared = BatchNormAct2d(8)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), shared, nn.Conv2d(8, 8, 1), shared)
    fixed = opacus_fast.fix(model, num_groups=2)
    assert fixed[1] is fixed[3] and fixed[1].norm.num_groups == 2
    assert opacus_fast.fix(model, replace_bn_with_in=True)[1].norm.num_groups == 8
    assert isinstance(opacus_fast.fix(nn.BatchNorm2d(64)), nn.GroupNorm)
    assert opacus_fast.fix(nn.BatchNorm2d(48)).num_groups == 16
    with pytest.raises(ValueError, match="mutually exclusive"):
        opacus_fast.fix(model, num_groups=2, replace_bn_with_in=True)
    assert isinstance(model[1], BatchNormAct2d)


def test_refusal_lists_each_module_type_once() -> None:
    """An unconverted EfficientNet: one entry for its 49 BatchNormAct2d layers (count, first names, the fix), not
    49 entries; other refused types get entries of their own."""
    model = timm.create_model("efficientnet_b0", num_classes=3)
    model.extra = nn.Sequential(nn.Embedding(4, 2, max_norm=1.0), nn.Embedding(4, 2, max_norm=1.0))
    model.lone = nn.BatchNorm1d(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32)), batch_size=4)
    with pytest.raises(UnsupportedModuleError) as error:
        PrivacyEngine().make_private_fast(module=model, optimizer=optimizer, data_loader=loader,
                                          noise_multiplier=1.0, max_grad_norm=1.0)
    message = str(error.value)
    entries = message.split("\n- ")[1:]
    assert len(entries) == 3, message
    assert entries[0].startswith(
        "BatchNormAct2d in 49 modules ('bn1', 'blocks.0.0.bn1', 'blocks.0.0.bn2' and 46 more): it mixes")
    assert "opacus_fast.fix(model)" in entries[0] and "by hand" not in entries[0]
    assert entries[1].startswith("Embedding in 2 modules ('extra.0', 'extra.1'): ") and "max_norm" in entries[1]
    assert entries[2].startswith("'lone' (BatchNorm1d): it mixes") and "opacus_fast.fix(model)" in entries[2]
    assert len(message) < 1200
