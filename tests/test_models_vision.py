"""Vision models from torchvision, timm and Hugging Face (tiny, random init) through make_private_fast: the
noiseless update is exact. Transformers also run with batch == tokens, where a batch-less table looks like a
batch."""

from __future__ import annotations

import pytest
import torch
from model_zoo import assert_private_step_exact
from torch import nn

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")


def images(batch: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, size, size, generator=gen, dtype=torch.float64),)


def torchvision_vit() -> nn.Module:
    """vit_b_16's architecture at 32 px, patch 8: 16 patches + class token = 17 tokens."""
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=3)


def torchvision_convnext() -> nn.Module:
    """Two stages (8 and 16 channels, one block each), with a layer scale that is not negligible."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], stochastic_depth_prob=0.0,
                    layer_scale=0.5, num_classes=3)


def timm_convnext() -> nn.Module:
    """convnext_atto's block (1x1-conv MLP), one per stage, 8 to 16 channels."""
    return timm.create_model("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), ls_init_value=0.5,
                             num_classes=3)


def timm_swin() -> nn.Module:
    """32 px, patch 4: 8x8 tokens in 4x4 windows (shifted in each second block), then 4x4 in one window."""
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=8,
                             depths=(2, 2), num_heads=(1, 2), drop_path_rate=0.0, num_classes=3)


def timm_vit() -> nn.Module:
    """16 px, patch 8: 4 patches + class token + 2 register tokens = 7 tokens; layer scale."""
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                             reg_tokens=2, init_values=0.1, num_classes=3)


def timm_deit() -> nn.Module:
    """16 px, patch 8: 4 patches + class and distillation tokens = 6 tokens."""
    return timm.create_model("deit_tiny_distilled_patch16_224", img_size=16, patch_size=8, embed_dim=16, depth=1,
                             num_heads=2, num_classes=3)


def hf_vit() -> nn.Module:
    """Hugging Face ViT at 32 px, patch 8 (17 tokens): cls_token and position_embeddings are parameters."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0, num_labels=3)
    return transformers.ViTForImageClassification(config)


#: factory, image size, tokens per image
TRANSFORMERS = {
    "torchvision_vit": (torchvision_vit, 32, 17),
    "timm_vit": (timm_vit, 16, 7),
    "timm_deit": (timm_deit, 16, 6),
    "hf_vit": (hf_vit, 32, 17),
}
CONVNETS = {"torchvision_convnext": torchvision_convnext, "timm_convnext": timm_convnext}


def _model(factory) -> nn.Module:
    torch.manual_seed(0)
    return factory()


def _batch(name: str, case: str):
    _, size, tokens = TRANSFORMERS[name]
    batch = {"batch_4": 4, "batch_eq_tokens": tokens, "batch_1": 1}[case]
    x = images(batch, size)
    return {"pixel_values": x[0]} if name == "hf_vit" else x


@pytest.mark.parametrize("case", ["batch_4", "batch_eq_tokens", "batch_1"])
@pytest.mark.parametrize("name", TRANSFORMERS)
def test_vision_transformer_exact(name: str, case: str) -> None:
    assert_private_step_exact(_model(TRANSFORMERS[name][0]), _batch(name, case))


@pytest.mark.parametrize("batch", [4, 1])
@pytest.mark.parametrize("name", CONVNETS)
def test_convnext_exact(name: str, batch: int) -> None:
    assert_private_step_exact(_model(CONVNETS[name]), images(batch))


@pytest.mark.parametrize("batch", [4, 1])
def test_timm_swin_exact(batch: int) -> None:
    """Swin cuts each image into windows stacked along dim 0 (4 per image in the first stage, 1 in the second), with
    a relative-position bias table added to every window's attention: the windows are followed back to their
    image."""
    assert_private_step_exact(_model(timm_swin), images(batch))
