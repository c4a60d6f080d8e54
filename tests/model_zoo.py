"""Exactness of real models through the public API, against a batch-of-one reference independent of opacus_fast.

The engine side is what a user writes: deep-copy the model, ``make_private_fast`` with plain SGD (lr = 1), take the
one batch of the returned loader, call the returned model the usual way, ``loss.backward()``, ``optimizer.step()``;
the update is ``before - after``. The reference calls the original model on each example alone, the same way,
takes ``torch.autograd.grad`` of that example's loss, clips the flat gradient to C and sums.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from oracle import median_bound
from torch import nn
from torch.utils.data import DataLoader, default_collate

from opacus_fast import PrivacyEngine

Tensor = torch.Tensor
#: model inputs: a mapping is passed by keyword (``model(**batch)``), a tuple positionally (``model(*batch)``)
Inputs = Mapping[str, Tensor] | tuple[Tensor, ...]
#: per-example losses, shape (B,), from the model's output and the inputs it was called with
LossFn = Callable[[object, Inputs], Tensor]
RTOL = 1e-9


@dataclass
class Examples:
    """The dataset as a user has it: one item per example, and the collate_fn that makes model inputs of a list of
    them (for inputs that are not batch first, e.g. EmbeddingBag's flat ids and offsets)."""

    items: Sequence[Any]
    collate: Callable[[list[Any]], Inputs] = default_collate


def as_examples(inputs: Inputs | Examples) -> Examples:
    """Batch-first inputs cut into examples: ``collate([example i])`` is ``v[i:i+1]`` for every input ``v``."""
    if isinstance(inputs, Examples):
        return inputs
    if isinstance(inputs, Mapping):
        rows = len(next(iter(inputs.values())))
        return Examples([{k: v[i] for k, v in inputs.items()} for i in range(rows)])
    return Examples([tuple(v[i] for v in inputs) for i in range(len(inputs[0]))])


def call(model: nn.Module, inputs: Inputs) -> object:
    """The usual call: keywords for a mapping (Hugging Face), positional for a tuple (vision, torch models)."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(*inputs)


def main_output(out: object) -> Tensor:
    """The tensor a loss is computed from: ``logits`` of a Hugging Face output, the first item of a tuple."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


def projection_loss(out: object, inputs: Inputs) -> Tensor:
    """Per example: the output times a fixed random projection, plus a small quadratic term so that the output
    gradient differs between examples."""
    y = main_output(out)
    proj = torch.randn(y.shape[1:], generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(y.dtype)
    return (y * proj + 0.1 * y.pow(2)).flatten(1).sum(1)


def lm_loss(out: object, inputs: Inputs) -> Tensor:
    """Per example: the mean next-token cross-entropy over the sequence's unpadded target tokens."""
    logits = main_output(out)[:, :-1]
    targets = inputs["input_ids"][:, 1:]
    mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))[:, 1:].to(logits.dtype)
    tokens = nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (tokens * mask).sum(1) / mask.sum(1)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def per_example_grads(model: nn.Module, data: Examples, loss_fn: LossFn) -> list[dict[str, Tensor]]:
    """One ``torch.autograd.grad`` per example, called alone, over the trainable parameters (zeros if unused)."""
    params = trainable(model)
    grads = []
    for item in data.items:
        one = data.collate([item])
        g = torch.autograd.grad(loss_fn(call(model, one), one).sum(), list(params.values()), allow_unused=True)
        grads.append({n: torch.zeros_like(p) if d is None else d for (n, p), d in zip(params.items(), g)})
    return grads


def flat_norms(grads: list[dict[str, Tensor]]) -> Tensor:
    return torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in ex.values())) for ex in grads])


def clipped_sum(grads: list[dict[str, Tensor]], bound: float) -> dict[str, Tensor]:
    """``sum_i min(1, C/(||G_i||+1e-6)) G_i`` over the flat per-example gradients."""
    factors = (bound / (flat_norms(grads) + 1e-6)).clamp(max=1.0)
    return {n: sum(f * ex[n] for f, ex in zip(factors, grads)) for n in grads[0]}


def choose_bound(norms: Tensor) -> float:
    """Between the smallest and largest norm (some examples clipped, some not); half the norm for one example."""
    if len(norms) == 1:
        return float(norms[0]) / 2
    bound = median_bound(norms)
    assert (norms > bound).any() and (norms < bound).any()
    return bound


def private_update(model: nn.Module, data: Examples, loss_fn: LossFn, bound: float, poisson: bool = False
                   ) -> dict[str, Tensor]:
    """``before - after`` of one noiseless private step on a deep copy of ``model``, over the whole dataset as one
    batch (with Poisson sampling the rate is 1 / len(loader) = 1, so every example is drawn)."""
    model = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = DataLoader(data.items, batch_size=len(data.items), collate_fn=data.collate)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="poisson_sampling=False")
        pmodel, optimizer, loader = PrivacyEngine().make_private_fast(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0, max_grad_norm=bound,
            poisson_sampling=poisson, loss_reduction="sum",
        )
    batches = iter(loader)  # kept alive through the step, as in a training loop
    batch = next(batches)
    batch = batch if isinstance(batch, Mapping) else tuple(batch)
    optimizer.zero_grad()
    losses = loss_fn(call(pmodel, batch), batch)
    assert losses.shape == (len(data.items),), f"the batch has {len(losses)} of the {len(data.items)} examples"
    losses.sum().backward()
    optimizer.step()
    del batches
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}


def relative_errors(got: dict[str, Tensor], expected: dict[str, Tensor]) -> dict[str, float]:
    """Per parameter ``|got - ref| / |ref|``; a parameter whose true update vanishes is measured against the total."""
    total = torch.sqrt(sum(r.pow(2).sum() for r in expected.values()))
    floor = 1e-6 * total
    return {n: float((got[n] - r).norm() / torch.maximum(r.norm(), floor)) for n, r in expected.items()}


def private_step_error(model: nn.Module, inputs: Inputs | Examples, loss_fn: LossFn = projection_loss,
                       poisson: bool = False, reference: nn.Module | None = None) -> tuple[float, str, float]:
    """The largest relative error of the noiseless private update against the clipped sum of the per-example
    gradients of ``reference`` (default: ``model`` itself; a twin with the same weights where ``model`` cannot
    give per-example gradients by itself), the parameter where it occurs and the bound used. Frozen parameters
    must not move."""
    data = as_examples(inputs)
    model = model.double().train()
    reference = model if reference is None else reference.double().train()
    grads = per_example_grads(reference, data, loss_fn)
    bound = choose_bound(flat_norms(grads))
    update = private_update(model, data, loss_fn, bound, poisson)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and update[n].abs().max() > 0]
    assert not frozen, f"frozen parameters moved: {frozen}"
    errors = relative_errors(update, clipped_sum(grads, bound))
    worst = max(errors, key=errors.get)
    return errors[worst], worst, bound


def assert_private_step_exact(model: nn.Module, inputs: Inputs | Examples, loss_fn: LossFn = projection_loss,
                              poisson: bool = False) -> None:
    """The noiseless private update equals the clipped sum of the per-example gradients to ``RTOL``."""
    error, worst, bound = private_step_error(model, inputs, loss_fn, poisson)
    assert error <= RTOL, f"relative error {error:.2e} in '{worst}' (bound {bound:.4g})"


def private_step_refusal(model: nn.Module, inputs: Inputs | Examples, loss_fn: LossFn = projection_loss,
                         poisson: bool = False, reference: nn.Module | None = None) -> Exception:
    """The error a private step raises; if it runs instead, the test fails with the update's relative error."""
    try:
        error, worst, _ = private_step_error(model, inputs, loss_fn, poisson, reference)
    except AssertionError:
        raise
    except Exception as exc:  # noqa: BLE001 - the refusal is the result
        return exc
    pytest.fail(f"not refused; the update's relative error is {error:.2e} in '{worst}'")


def exact_or_refusal(model: nn.Module, inputs: Inputs | Examples, loss_fn: LossFn = projection_loss) -> Exception | None:
    """None if the private step is exact (asserted), else the error it raised."""
    try:
        assert_private_step_exact(model, inputs, loss_fn)
    except AssertionError:
        raise
    except Exception as exc:  # noqa: BLE001 - a refusal is one of the two outcomes
        return exc
    return None


def token_batch(batch: int, length: int, vocab: int, padded: int = 0, pad_id: int = 0, seed: int = 0
                ) -> dict[str, Tensor]:
    """Random token ids (never 0 or 1) and an attention mask; example 0 ends in ``padded`` masked ``pad_id``s."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padded:
        mask[0, length - padded :] = 0
        input_ids[0, length - padded :] = pad_id
    return {"input_ids": input_ids, "attention_mask": mask}
