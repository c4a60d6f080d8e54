"""nn.Embedding: a per-example gradient is a sum of output grads scattered into the rows of the tokens used.

``||G_i||^2`` sums, over the distinct tokens of example i, the squared norm of the summed output grads of that
token's positions: O(B·T·(d + log T)) time and O(B·T·d) memory, never a (B, V, d) tensor, and no host sync. Rows
at ``padding_idx`` get no gradient.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .registry import LayerRule, Norms, Saved, Tensor, norm_dtype, register_rule


def _grads(layer: nn.Embedding, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B·T,) example index and token id of every position, and its (B·T, d) output grad (zero at ``padding_idx``)."""
    ids = x.reshape(-1)
    example = torch.arange(x.shape[0], device=x.device).repeat_interleave(x[0].numel() if x.shape[0] else 0)
    rows = g.reshape(-1, g.shape[-1])
    if layer.padding_idx is not None:
        rows = rows.masked_fill((ids == layer.padding_idx).unsqueeze(1), 0)
    return example, ids, rows


@register_rule(nn.Embedding)
class EmbeddingRule(LayerRule):
    params = ("weight",)

    def validate(self, layer: nn.Embedding) -> str | None:
        if layer.max_norm is not None:
            return "max_norm renormalises rows of the weight in place during forward; set max_norm=None"
        if layer.scale_grad_by_freq:
            return "scale_grad_by_freq scales gradients by token counts over the whole batch (mixes examples)"
        if layer.sparse:
            return "sparse gradients are not supported; set sparse=False"
        return None

    def forward(self, layer: nn.Embedding, x: Tensor) -> tuple[Tensor, Saved]:
        return F.embedding(x, layer.weight, layer.padding_idx), (x,)

    def input_grad(self, layer: nn.Embedding, saved: Saved, g: Tensor) -> Tensor | None:
        return None

    def norms(self, layer: nn.Embedding, saved: Saved, g: Tensor, names: Iterable[str]) -> tuple[Norms, Any]:
        """Output grads summed per (example, token), squared, summed per example. Each (example, token) pair sums
        into the row of its first place in the sorted pairs, found by a binary search: every size is known before
        the values are (no ``torch.unique``, whose output size makes the host wait for the device)."""
        example, ids, rows = _grads(layer, saved[0], g)
        rows = rows.to(norm_dtype(rows.dtype))
        keys = example * layer.num_embeddings + ids
        ordered = torch.sort(keys).values
        summed = torch.zeros_like(rows).index_add_(0, torch.searchsorted(ordered, keys), rows)
        owner = ordered // layer.num_embeddings  # the example of each row of ``summed`` (rows no pair uses are 0)
        sq = rows.new_zeros(saved[0].shape[0]).index_add_(0, owner, summed.pow(2).sum(dim=1))
        return {"weight": sq}, None

    def clipped_sum(
        self, layer: nn.Embedding, saved: Saved, g: Tensor, factors: dict[str, Tensor], cache: Any
    ) -> dict[str, Tensor]:
        example, ids, rows = _grads(layer, saved[0], g)
        per_row = factors["weight"].to(rows.dtype)[example]
        out = rows.new_zeros(layer.weight.shape).index_add_(0, ids, rows * per_row.unsqueeze(1))
        return {"weight": out}

    def per_sample(self, layer: nn.Embedding, saved: Saved, g: Tensor, names: Iterable[str]) -> dict[str, Tensor]:
        example, ids, rows = _grads(layer, saved[0], g)
        out = rows.new_zeros(saved[0].shape[0], *layer.weight.shape)
        out.index_put_((example, ids), rows, accumulate=True)
        return {"weight": out}
