"""Small models covering every layer family, and the special cases (tied parameters, repeated calls)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention from Linear layers (as timm's), with a key padding mask."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = ~pad[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class LayerScale(nn.Module):
    """A module with its own parameter and no rule: handled by the per-example unit fallback."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class TinyTransformer(nn.Module):
    """Embedding with padding_idx, a learned position table in a unit, LayerNorm, RMSNorm, attention, MLP."""

    def __init__(self, vocab: int = 11, dim: int = 8, tokens: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.pos = PositionTable(tokens, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads=2)
        self.ls = LayerScale(dim)
        self.norm2 = nn.RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == 0
        x = self.pos(self.embed(ids))
        x = x + self.ls(self.attn(self.norm1(x), pad))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(dim=1))


class PositionTable(nn.Module):
    """Adds a learned (1, T, d) table by broadcasting, like timm's pos_embed."""

    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(1, tokens, dim) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table


class TiedLM(nn.Module):
    """Output layer tied to the embedding (weight shared by two modules)."""

    def __init__(self, vocab: int = 9, dim: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.embed(ids))))


class RepeatedCall(nn.Module):
    """One Linear applied twice in a forward: the per-example gradient is the sum over both calls."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.shared = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared(torch.tanh(self.shared(x))))


def cnn2d() -> nn.Module:
    """Strides, dilation, groups, depthwise, 'same' padding, non-zero padding modes, GroupNorm."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.GroupNorm(4, 8),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2, padding_mode="reflect"),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        nn.Conv2d(8, 6, 2, padding="same", padding_mode="circular"),
        nn.InstanceNorm2d(6, affine=True),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 4),
    )


def cnn1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 6, 3, stride=2, padding=1),
        nn.GroupNorm(3, 6),
        nn.Conv1d(6, 6, 5, padding="same", dilation=2, groups=3),
        nn.InstanceNorm1d(6, affine=True),
        nn.Flatten(),
        nn.Linear(6 * 8, 3),
    )


def cnn3d() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding=1),
        nn.ReLU(),
        nn.Conv3d(4, 4, (1, 3, 3), groups=4, padding=(0, 1, 1), dilation=(1, 1, 1)),
        nn.Flatten(),
        nn.Linear(4 * 3 * 4 * 4, 3),
    )


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(7, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def linear4d() -> nn.Module:
    """Linear on (B, 3, 4, d) inputs: middle dims flattened into T (the Opacus 1.6 norm-sampler bug)."""
    return nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 2))
