"""Per-example losses for language models: one loss per sequence, the mean over that sequence's target tokens.

DP-SGD clips each example's gradient, and its privacy proof needs the loss to be a sum (or a mean with a fixed
divisor) of per-example terms: adding or removing one example may change one term only. The loss that Hugging Face
models compute themselves (``model(input_ids, labels=labels).loss``) is a mean over all target tokens of the whole
batch, so example i's term is weighted by n_i / (n_1 + ... + n_B), its share of the batch's tokens: adding one
example rescales every other example's term, and the guarantee no longer follows. Compute the loss from the
model's logits with these functions instead:

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits   # no labels=
    loss = causal_lm_loss(logits, labels)                # labels: input_ids with -100 at padding
    loss.backward()

``reduction`` must match the ``loss_reduction`` given to ``make_private_fast``: ``"mean"`` (its default) divides
the sum of the per-example losses by the number of rows of the batch, ``"sum"`` does not. An example with no target
token (all padding, or one token only in a causal LM) has loss 0 and no gradient; an empty batch gives 0.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
#: the label Hugging Face (and torch's cross_entropy) uses for positions without a target (padding, prompts)
IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum", "none")


def per_sequence_losses(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Each example's mean cross-entropy over its target tokens: ``(B,)`` from logits ``(B, T, V)`` and labels
    ``(B, T)`` aligned position by position; positions labelled ``ignore_index`` count for nothing, and an example
    without target tokens gets 0.

    The cross-entropy is computed in at least float32 (as Hugging Face does), whatever the logits' dtype.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (batch, tokens, vocabulary) and labels (batch, tokens), got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    tokens = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=ignore_index, reduction="none")
    counts = (labels != ignore_index).sum(dim=1)
    return tokens.sum(dim=1) / counts.clamp(min=1).to(tokens.dtype)


def reduce(losses: Tensor, reduction: str) -> Tensor:
    """Per-example ``losses`` (B,) reduced as ``make_private_fast``'s ``loss_reduction`` expects: ``"mean"`` divides
    their sum by B (the rows of the physical batch, padded rows included; 0 for an empty batch), ``"sum"`` adds them,
    ``"none"`` returns them."""
    if reduction == "none":
        return losses
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    total = losses.sum()
    return total / max(losses.shape[0], 1) if reduction == "mean" else total


def causal_lm_loss(
    logits: Tensor, labels: Tensor, reduction: str = "mean", ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Per-sequence token-mean loss of a causal (decoder-only) language model, reduced over the batch.

    Args:
        logits: ``(B, T, V)``, the model's ``outputs.logits``; position t predicts token t + 1.
        labels: ``(B, T)``, as Hugging Face's ``labels=``: the input ids, with ``ignore_index`` where no token is to
            be predicted (padding, a prompt); shifted by one here, as the model would.
        reduction: ``"mean"`` or ``"sum"``, the ``loss_reduction`` given to ``make_private_fast``; ``"none"`` for the
            ``(B,)`` per-example losses.
        ignore_index: the label of positions without a target.
    """
    return reduce(per_sequence_losses(logits[:, :-1], labels[:, 1:], ignore_index), reduction)


def seq2seq_lm_loss(
    logits: Tensor, labels: Tensor, reduction: str = "mean", ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Per-sequence token-mean loss of an encoder-decoder language model (T5, BART, ...), reduced over the batch.

    Args:
        logits: ``(B, T, V)``, the decoder's ``outputs.logits``.
        labels: ``(B, T)``, the target ids with ``ignore_index`` at padding, aligned with the logits (Hugging Face
            builds ``decoder_input_ids`` by shifting the labels right, so no shift here).
        reduction: as in :func:`causal_lm_loss`.
        ignore_index: the label of positions without a target.
    """
    return reduce(per_sequence_losses(logits, labels, ignore_index), reduction)


_warned = False


def warn_if_batch_token_mean(output: object) -> bool:
    """Warn (once per process) if ``output`` is a Hugging Face ``ModelOutput`` with a ``loss`` that the model
    computed itself (it was given ``labels=``): that loss is a mean over the batch's tokens, not a per-example loss.

    Returns whether ``output`` carries such a loss.
    """
    carries = is_model_output(output) and getattr(output, "loss", None) is not None
    if carries:
        _warn_batch_token_mean()
    return carries


def warn_when_backpropagated(output: object) -> None:
    """Warn (once per process) when a backward pass reaches the loss a Hugging Face model computed itself (called
    by the engine after each model call): only that loss, not the model's other outputs, is the problem."""
    loss = getattr(output, "loss", None) if is_model_output(output) else None
    if isinstance(loss, Tensor) and loss.requires_grad and not _warned:
        loss.register_hook(lambda grad: _warn_batch_token_mean())


def _warn_batch_token_mean() -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        "the model computed its own loss (outputs.loss, because it was given labels=): Hugging Face averages it "
        "over all target tokens of the batch, so each example's term is weighted by its share of the batch's "
        "tokens and adding one example rescales every other example's term. That is not a per-example loss, "
        "and DP-SGD's privacy guarantee assumes one. Call the model without labels= and compute the loss from "
        "outputs.logits with opacus_fast.losses.causal_lm_loss(logits, labels) (decoder-only models) or "
        "opacus_fast.losses.seq2seq_lm_loss(logits, labels) (encoder-decoder models)",
        UserWarning,
        stacklevel=3,
    )


def is_model_output(output: object) -> bool:
    """Whether ``output`` is a Hugging Face ``transformers`` ``ModelOutput`` (without importing transformers)."""
    return any(
        cls.__name__ == "ModelOutput" and cls.__module__.startswith("transformers.") for cls in type(output).__mro__
    )
