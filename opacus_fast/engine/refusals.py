"""Why a model, or one of its calls, cannot be clipped exactly: every refusal and the fix it suggests.

This is the one place to look for "why was my model refused". Refusals at attaching (``module_refusal``,
``unknown_params``, ``own_and_child_params``, ``instance_method``) are collected by
:func:`opacus_fast.engine.planning.plan_sites` and raised together before the model is changed; the others are raised
during forward or backward, before anything reaches a parameter.
"""

from __future__ import annotations

import torch
from opacus.validators.errors import UnsupportedModuleError as OpacusUnsupportedModuleError
from torch import nn
from torch.nn.utils import parametrize

from ..validators import converts

Tensor = torch.Tensor
#: layers that mix examples within a batch: per-example gradients do not exist
MIXING = (nn.modules.batchnorm._BatchNorm,)


class UnsupportedModuleError(OpacusUnsupportedModuleError):
    """The model has a part whose per-example gradients opacus_fast cannot compute exactly (also an Opacus
    ``UnsupportedModuleError``, hence a ``ValueError``, so that ``except`` clauses written for Opacus catch it)."""


def describe(name: str, module: nn.Module) -> str:
    """``'name' (Type)``, how errors name a module."""
    return f"'{name or '<root>'}' ({type(module).__name__})"


def tensor_names(model: nn.Module) -> dict[int, str]:
    """The model's parameters and buffers by ``id``, for naming them in errors."""
    return {id(t): n for n, t in (*model.named_parameters(), *model.named_buffers())}


# ---- at attaching -------------------------------------------------------------------------------------------------
def trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def module_refusal(module: nn.Module) -> str | None:
    """Why ``module`` (and all inside it) cannot be captured, whatever would apply (None if it can)."""
    if isinstance(module, MIXING):
        return (
            "it mixes examples within a batch (batch statistics), so per-example gradients do not exist; replace it, "
            "e.g. with model = opacus_fast.fix(model) (BatchNorm → GroupNorm)"
            + ("" if converts(module) else "; that converts torch's own BatchNorm classes and timm's BatchNormAct2d "
               "and SyncBatchNormAct only, so replace this subclass by hand (e.g. by a GroupNorm followed by its "
               "activation)")
        )
    if isinstance(module, nn.RNNBase) and trainable(module):
        return (
            "it runs a fused recurrent kernel that cannot be run per example (vmap has no batching rule for it); use "
            "Opacus' drop-in replacements from opacus.layers (DPLSTM, DPGRU, DPRNN), built from Linear layers: "
            "opacus.validators.ModuleValidator.fix(model) converts nn.LSTM and nn.GRU, replace nn.RNN by DPRNN by hand"
        )
    if parametrize.is_parametrized(module) and trainable(module.parametrizations):
        return (
            "it is parametrized (torch.nn.utils.parametrize, e.g. torch.nn.utils.parametrizations.weight_norm or "
            "spectral_norm): its weights are computed outside the layer, so their per-example gradients cannot be "
            "isolated; remove the parametrization (torch.nn.utils.parametrize.remove_parametrizations) or freeze it"
        )
    return None


def unknown_params(unknown: list[str]) -> str:
    """A rule layer with trainable parameters its rule does not compute."""
    return (
        f"it has trainable parameters its rule does not know ({', '.join(unknown)}), e.g. from an old-style "
        "torch.nn.utils.weight_norm (weight_g, weight_v) or spectral_norm (weight_orig); remove that "
        "reparametrization (torch.nn.utils.remove_weight_norm / remove_spectral_norm) or the extra parameters"
    )


def instance_method(method: str) -> str:
    """A captured method replaced on the instance, which the capture would bypass."""
    return (
        f"it has its own '{method}' set on the instance (by accelerate's hooks, a monkeypatch, or a make_private_fast "
        "without cleanup()), which the capture would bypass; remove it before make_private_fast, or put it on a "
        "wrapper module around this one"
    )


def parameter_unfrozen(name: str) -> UnsupportedModuleError:
    return UnsupportedModuleError(
        f"parameter '{name}' became trainable after make_private_fast, so it is not clipped; set requires_grad "
        "before calling make_private_fast (after cleanup())"
    )


def model_refused(problems: list[tuple[str, str, str]]) -> str:
    """One error for every refused part, ``(module type, module name, reason)``: each type and reason once, with
    how many modules it concerns and the first few names."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for kind, name, reason in problems:
        grouped.setdefault((kind, reason), []).append(name or "<root>")
    lines = []
    for (kind, reason), names in grouped.items():
        if len(names) == 1:
            lines.append(f"'{names[0]}' ({kind}): {reason}")
            continue
        shown = ", ".join(f"'{n}'" for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        lines.append(f"{kind} in {len(names)} modules ({shown}): {reason}")
    return "opacus_fast cannot clip this model exactly:\n- " + "\n- ".join(lines)


# ---- during forward and backward ----------------------------------------------------------------------------------
def layer_extra_args(name: str) -> TypeError:
    return TypeError(f"{name}: opacus_fast captures single-input calls of this layer only")


def used_without_examples(name: str) -> UnsupportedModuleError:
    """A parameter, or a layer's output on a batch-less input, reached by a gradient that comes from no example."""
    return UnsupportedModuleError(
        f"{name} received a gradient that does not come from the examples of the batch: the model uses it in a way "
        "that never meets the batch (e.g. a term of the loss computed from it alone, such as a penalty, or an "
        "output of the model that does not depend on the inputs), so that gradient cannot be clipped per example. "
        "Leave such terms out of private training; for weight decay use the optimizer's weight_decay"
    )


def meets_untracked(op: str, why: str) -> UnsupportedModuleError:
    """A parameter (or what depends on it) meets tensors derived from the batch whose examples cannot be placed."""
    return UnsupportedModuleError(
        f"a {op} combines trainable parameters with tensors derived from the batch, but where the examples are in "
        f"those tensors is unknown ({why}), so the parameters' per-example gradients cannot be told apart. Keep "
        "the batch as a dim of its own through the model (batch first, or sequence first with batch_first=False)"
    )


def mixes_examples(op: str, why: str) -> UnsupportedModuleError:
    """Values computed across examples (a batch mean) combined back with the examples: each example's result then
    depends on the others, so no per-example gradient bounds an example's influence."""
    return UnsupportedModuleError(
        f"a {op} combines the examples with values computed across the batch ({why}): each example's result then "
        "depends on the other examples, which per-example clipping cannot bound (as with BatchNorm). Compute such "
        "statistics per example (e.g. LayerNorm or GroupNorm instead of batch statistics)"
    )


def shared_modified(op: str) -> UnsupportedModuleError:
    return UnsupportedModuleError(
        f"a {op} modifies, in place, a tensor computed from trainable parameters alone with values from the batch; "
        "compute it out of place (e.g. a = a + x instead of a += x)"
    )


def shared_rows(names: str) -> UnsupportedModuleError:
    """A tensor computed from parameters without the batch, with a dim of the batch's size whose rows differ,
    placed against the examples: which row belongs to which example cannot be followed back to the parameters."""
    return UnsupportedModuleError(
        f"a tensor computed from {names} without the batch is combined with the examples along a dim of the batch's "
        "size whose rows are not copies of one row; opacus_fast cannot follow its rows back to those parameters per "
        "example. Compute it with one row (size 1 along the batch, broadcast by the operation) or from the batch "
        "itself"
    )


def untracked_input(site: str, why: str) -> UnsupportedModuleError:
    """A rule layer whose input derives from the batch in a way whose examples cannot be placed (or are mixed)."""
    return UnsupportedModuleError(
        f"{site}: its input derives from the batch, but {why}, so its rows cannot be assigned to examples. Keep the "
        "batch as a dim of its own through the model (batch first, or sequence first with batch_first=False) and "
        "do not combine examples before this layer"
    )


def layout_unsupported(site: str, where: str) -> UnsupportedModuleError:
    return UnsupportedModuleError(
        f"{site}: its input holds the examples {where}, which this layer's rule cannot split into examples (a "
        "convolution or group norm needs the batch in dim 0, possibly folded with other axes as (B*k, ...)); "
        "move the batch to dim 0 before this layer"
    )


def higher_order(where: str) -> UnsupportedModuleError:
    """A backward that builds a graph of its own (``create_graph=True``): a gradient of the gradient (e.g. a gradient
    penalty) would reach the parameters unclipped, or not at all."""
    return UnsupportedModuleError(
        f"{where}: backward or torch.autograd.grad with create_graph=True (higher-order gradients, e.g. a gradient "
        "penalty) is not supported: the gradient of a gradient term cannot be clipped per example. Compute such a "
        "term without create_graph=True, or leave it out of private training"
    )


def ordinary_gradient(name: str) -> UnsupportedModuleError:
    """A parameter reached by autograd outside its capture: its per-example gradient would not be clipped."""
    return UnsupportedModuleError(
        f"parameter '{name}' received an ordinary gradient: it is used outside the layer that owns it (e.g. read "
        "directly by a parent module's forward, or by a term of the loss such as a weight penalty), so its "
        "per-example gradient would not be clipped. Use it only through its module; for weight decay use the "
        "optimizer's weight_decay"
    )


def nested_backward() -> UnsupportedModuleError:
    return UnsupportedModuleError(
        "a backward pass ran inside another one (reentrant activation checkpointing, "
        "torch.utils.checkpoint(..., use_reentrant=True), or backward() called from a backward hook): each example's "
        "gradient would be clipped in separate parts. Use torch.utils.checkpoint(..., use_reentrant=False)"
    )


def reentrant_checkpoint(site: str) -> UnsupportedModuleError:
    return UnsupportedModuleError(
        f"{site} runs inside reentrant activation checkpointing (torch.utils.checkpoint(..., use_reentrant=True), "
        "also Hugging Face's gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': True}) "
        "or its default in older versions): its recomputed part gets a backward pass of its own, so each example's "
        "gradient would be clipped in separate parts. Use non-reentrant checkpointing: "
        "torch.utils.checkpoint(..., use_reentrant=False), or gradient_checkpointing_enable("
        "gradient_checkpointing_kwargs={'use_reentrant': False})"
    )


def backward_twice() -> ValueError:
    """A ValueError, as Opacus raises for a second backward without a step under Poisson sampling."""
    return ValueError(
        "backward() ran twice on the same physical batch: each example's gradient must come from one backward pass "
        "to be clipped correctly. Add the losses together and call backward() once; if the second backward is "
        "another model's step through this one (a GAN generator's), freeze this model's parameters for it "
        "(requires_grad_(False)) or take the other model's gradients with torch.autograd.grad"
    )


def batch_skipped() -> RuntimeError:
    return RuntimeError(
        "the physical batch before this one got no backward(): either the loop fetches batches ahead (a prefetcher, "
        "accelerate's prepare), which pairs one batch's rows with the next one's padding mask, or it skipped a "
        "batch, which would release part of a Poisson sample. Iterate the loader returned by make_private_fast "
        "directly and run forward and backward on every batch it yields, empty ones included"
    )


def logical_batch_pending() -> ValueError:
    """A ValueError, as Opacus raises for a second backward without a step under Poisson sampling."""
    return ValueError(
        "a new logical batch started while clipped gradients of an unfinished one are still pending (the loop left a "
        "logical batch before its last physical batch was stepped). Call optimizer.zero_grad() at the start of each "
        "iteration (it discards them), or optimizer.step() after every physical batch"
    )


def rows_mismatch(rows: int, batch: int) -> RuntimeError:
    return RuntimeError(
        f"the physical batch has {rows} rows but the model call's batch inputs have {batch} examples: call the model "
        "on the batch the data loader returned (with batch_first=False, the batch is dim 1 of each input)"
    )


def layers_disagree(name: str, rows: int, batch: int) -> RuntimeError:
    return RuntimeError(
        f"{name}: saw {rows} examples but other layers saw {batch} in the same backward pass: call the model on "
        "one batch at a time (a layer called outside the model's own call, e.g. on a batch of another size, takes "
        "dim 0 of its input as the batch)"
    )
