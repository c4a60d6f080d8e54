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


def _embedding_options(layer: Any) -> str | None:
    """Why an embedding's options make per-example gradients impossible (None if they do not)."""
    if layer.max_norm is not None:
        return "max_norm renormalises rows of the weight in place during forward; set max_norm=None"
    if layer.scale_grad_by_freq:
        return "scale_grad_by_freq scales gradients by token counts over the whole batch (mixes examples)"
    if layer.sparse:
        return "sparse gradients are not supported; set sparse=False"
    return None


@register_rule(nn.Embedding)
class EmbeddingRule(LayerRule):
    tokenwise = True
    params = ("weight",)

    def validate(self, layer: nn.Embedding) -> str | None:
        return _embedding_options(layer)

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


_BAG_MODES = {"sum": 0, "mean": 1, "max": 2}


class EmbeddingBagRule(LayerRule):
    """``F.embedding_bag`` (what ``nn.EmbeddingBag`` runs): each bag is one example. A bag's gradient is its output
    gradient times its (weighted) token counts, ``G_r = s_r g_r^T`` with ``s_r`` over the vocabulary, so
    ``||G_r||^2 = ||g_r||^2 ||s_r||^2`` and no (V, d) tensor is formed. In "max" mode each output column comes from
    one token, so ``||G_r||^2 = ||g_r||^2``. The call's offsets and weights are the layer's attributes."""

    params = ("weight",)

    def validate(self, layer: Any) -> str | None:
        reason = _embedding_options(layer)
        if reason:
            return reason
        if layer.per_sample_weights is not None and layer.per_sample_weights.requires_grad:
            return "per_sample_weights that require grad are not supported; pass them without gradient"
        return None

    def forward(self, layer: Any, x: Tensor) -> tuple[Tensor, Saved]:
        ids, offsets = x, layer.offsets
        if ids.dim() == 2:
            offsets = torch.arange(0, ids.numel(), ids.shape[1], device=ids.device)
            ids = ids.reshape(-1)
        out, offset2bag, bag_size, max_indices = torch.embedding_bag(
            layer.weight, ids, offsets, False, _BAG_MODES[layer.mode], False, layer.per_sample_weights,
            layer.include_last_offset, layer.padding_idx,
        )
        return out, (bag_size, ids, offset2bag, max_indices)  # one bag_size entry per bag: rows first

    def input_grad(self, layer: Any, saved: Saved, g: Tensor) -> Tensor | None:
        return None

    def _tokens(self, layer: Any, saved: Saved) -> tuple[Tensor, Tensor, Tensor]:
        """Bag, id and coefficient of every token (coefficient 0 for padding)."""
        bag_size, ids, offset2bag, _ = saved
        coef = torch.ones(ids.shape[0], dtype=torch.float64 if layer.weight.dtype == torch.float64 else torch.float32,
                          device=ids.device)
        if layer.per_sample_weights is not None:
            coef = layer.per_sample_weights.to(coef.dtype)
        if layer.mode == "mean":
            coef = coef / bag_size[offset2bag].clamp(min=1).to(coef.dtype)
        if layer.padding_idx is not None:
            coef = coef.masked_fill(ids == layer.padding_idx, 0)
        return offset2bag, ids, coef

    def norms(self, layer: Any, saved: Saved, g: Tensor, names: Iterable[str]) -> tuple[Norms, Any]:
        dtype = norm_dtype(g.dtype)
        g_sq = g.to(dtype).pow(2).sum(dim=1)
        if layer.mode == "max":
            return {"weight": g_sq}, None
        bag, ids, coef = self._tokens(layer, saved)
        keys, inverse = torch.unique(bag * layer.num_embeddings + ids, return_inverse=True)
        counts = coef.new_zeros(keys.numel()).index_add_(0, inverse, coef)
        s_sq = coef.new_zeros(g.shape[0]).index_add_(0, keys // layer.num_embeddings, counts.pow(2))
        return {"weight": g_sq * s_sq.to(dtype)}, None

    def clipped_sum(
        self, layer: Any, saved: Saved, g: Tensor, factors: dict[str, Tensor], cache: Any
    ) -> dict[str, Tensor]:
        factor = factors["weight"].to(g.dtype)
        out = g.new_zeros(layer.weight.shape)
        if layer.mode == "max":
            rows = saved[3]  # (bags, d): the token row behind each output column, -1 for an empty bag
            scaled = g * factor.unsqueeze(1)
            keep = rows >= 0
            columns = torch.arange(g.shape[1], device=g.device).expand_as(rows)
            flat = (rows.clamp(min=0) * g.shape[1] + columns)[keep]
            out.view(-1).index_add_(0, flat, scaled[keep])
            return {"weight": out}
        bag, ids, coef = self._tokens(layer, saved)
        out.index_add_(0, ids, g[bag] * (factor[bag] * coef.to(g.dtype)).unsqueeze(1))
        return {"weight": out}

    def per_sample(self, layer: Any, saved: Saved, g: Tensor, names: Iterable[str]) -> dict[str, Tensor]:
        out = g.new_zeros(g.shape[0], *layer.weight.shape)
        if layer.mode == "max":
            rows = saved[3]
            bags, columns = torch.meshgrid(torch.arange(g.shape[0], device=g.device),
                                           torch.arange(g.shape[1], device=g.device), indexing="ij")
            keep = rows >= 0
            out.index_put_((bags[keep], rows[keep], columns[keep]), g[keep], accumulate=True)
            return {"weight": out}
        bag, ids, coef = self._tokens(layer, saved)
        out.index_put_((bag, ids), g[bag] * coef.to(g.dtype).unsqueeze(1), accumulate=True)
        return {"weight": out}
