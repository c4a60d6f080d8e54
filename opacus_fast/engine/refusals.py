"""Why a model, or one of its calls, cannot be clipped exactly: every refusal and the fix it suggests.

This is the one place to look for "why was my model refused". Refusals at attaching (``module_refusal``,
``unknown_params``, ``own_and_child_params``, ``instance_method``) are collected by
:func:`opacus_fast.engine.planning.plan_sites` and raised together before the model is changed; the others are raised
during forward or backward, before anything reaches a parameter.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..validators import converts

Tensor = torch.Tensor
#: layers that mix examples within a batch: per-example gradients do not exist
MIXING = (nn.modules.batchnorm._BatchNorm,)


class UnsupportedModuleError(ValueError):
    """The model has a part whose per-example gradients opacus_fast cannot compute exactly."""


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
    """Why ``module`` (and all inside it) cannot be captured, whatever rule or unit would apply (None if it can)."""
    if isinstance(module, MIXING):
        return (
            "mixes examples within a batch (batch statistics), so per-example gradients do not exist; replace it, "
            "e.g. with model = opacus_fast.fix(model) (BatchNorm → GroupNorm)"
            + ("" if converts(module) else "; that converts torch's own BatchNorm classes and timm's BatchNormAct2d "
               "and SyncBatchNormAct only, so replace this subclass by hand (e.g. by a GroupNorm followed by its "
               "activation)")
        )
    if isinstance(module, nn.RNNBase) and trainable(module):
        return (
            "runs a fused recurrent kernel that cannot be run per example (vmap has no batching rule for it); use "
            "Opacus' drop-in replacements from opacus.layers (DPLSTM, DPGRU, DPRNN), built from Linear layers: "
            "opacus.validators.ModuleValidator.fix(model) converts nn.LSTM and nn.GRU, replace nn.RNN by DPRNN by hand"
        )
    if parametrize.is_parametrized(module) and trainable(module.parametrizations):
        return (
            "is parametrized (torch.nn.utils.parametrize, e.g. torch.nn.utils.parametrizations.weight_norm or "
            "spectral_norm): its weights are computed outside the layer, so their per-example gradients cannot be "
            "isolated; remove the parametrization (torch.nn.utils.parametrize.remove_parametrizations) or freeze it"
        )
    return None


def unknown_params(unknown: list[str]) -> str:
    """A rule layer with trainable parameters its rule does not compute."""
    return (
        f"has trainable parameters its rule does not know ({', '.join(unknown)}), e.g. from an old-style "
        "torch.nn.utils.weight_norm (weight_g, weight_v) or spectral_norm (weight_orig); remove that "
        "reparametrization (torch.nn.utils.remove_weight_norm / remove_spectral_norm) or the extra parameters"
    )


def own_and_child_params(full: str) -> str:
    """A module with its own parameters and trainable submodules, whose parameters cannot be isolated."""
    return (
        f"has its own trainable parameters ({full}) and also trainable submodules, so its parameters' per-example "
        "gradients cannot be isolated from the rest of the model. Freeze them (p.requires_grad_(False)), move them "
        "into a small submodule of their own, or register the method that uses them with "
        "opacus_fast.grad_sample.register_unit"
    )


def instance_method(method: str) -> str:
    """A captured method replaced on the instance, which the capture would bypass."""
    return (
        f"has its own '{method}' set on the instance (by accelerate's hooks, a monkeypatch, or a make_private_fast "
        "without cleanup()), which the capture would bypass; remove it before make_private_fast, or put it on a "
        "wrapper module around this one"
    )


def parameter_unfrozen(name: str) -> UnsupportedModuleError:
    return UnsupportedModuleError(
        f"parameter '{name}' became trainable after make_private_fast, so it is not clipped; set requires_grad "
        "before calling make_private_fast (after cleanup())"
    )


# ---- units (methods run per example) ------------------------------------------------------------------------------
def unit_not_tensor(unit: str, what: str) -> UnsupportedModuleError:
    return UnsupportedModuleError(
        f"{unit} returns {what}, not a tensor: opacus_fast captures units that return one batch-first tensor; split "
        "the module so that each part returns one tensor"
    )


def unit_rows(unit: str, rows: int, shape: tuple[int, ...]) -> UnsupportedModuleError:
    return UnsupportedModuleError(
        f"{unit}, run on one example ({rows} row), returns shape {shape}: its output must have the input's rows as "
        "dim 0 (batch first), and an example must not see other examples (e.g. a whole-batch tensor held by the "
        "module)"
    )


def unit_hidden_input(unit: str, what: str) -> UnsupportedModuleError:
    """A unit whose output depends on tensors that require grad but are not its inputs."""
    return UnsupportedModuleError(
        f"{unit} uses {what} that is neither one of its own parameters nor a positional input (e.g. another module's "
        "parameter reached through an unregistered reference, or a weight computed by a forward pre-hook): the unit "
        "runs per example inside a capture that would drop that gradient path. Use a parameter only in modules that "
        "register it (tie weights by assignment, e.g. decoder.weight = embedding.weight), and pass per-example "
        "tensors positionally (batch first)"
    )


def unit_positional(unit: str) -> TypeError:
    return TypeError(
        f"{unit}: opacus_fast needs tensor positional inputs (batch first); pass other arguments by keyword"
    )


def unit_keyword_tensors(held: list[str]) -> str:
    return (
        f"keyword argument(s) {', '.join(held)} hold tensors other than the model's buffers, which every example's "
        "call would get whole (mixing examples, or losing their gradient). Pass per-example tensors positionally "
        "(batch first); keep tensors shared by all examples in the model's buffers"
    )


def unit_shared_inputs(which: str) -> str:
    return (
        f"positional input(s) {which} hold the model's parameters or buffers, shared by all examples, but each "
        "positional tensor is cut into examples along dim 0. Pass such a buffer by keyword (every example then "
        "gets it whole), or read it from this module's own buffers"
    )


def unit_unbatched_inputs(rows: list[int]) -> str:
    return (
        f"positional inputs with dim 0 of sizes {rows}; each is cut into examples along dim 0, so all must be batch "
        "first. Pass tensors shared by all examples (e.g. a position table) as the model's buffers, by keyword"
    )


def unit_inplace(unit: str) -> UnsupportedModuleError:
    return UnsupportedModuleError(f"{unit} modifies its input in place; disable that (e.g. inplace=False)")


# ---- during forward and backward ----------------------------------------------------------------------------------
def layer_extra_args(name: str) -> TypeError:
    return TypeError(f"{name}: opacus_fast captures single-input calls of this layer only")


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


def backward_twice() -> RuntimeError:
    return RuntimeError(
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


def logical_batch_pending() -> RuntimeError:
    return RuntimeError(
        "a new logical batch started while clipped gradients of an unfinished one are still pending (the loop left a "
        "logical batch before its last physical batch was stepped). Call optimizer.zero_grad() at the start of each "
        "iteration (it discards them), or optimizer.step() after every physical batch"
    )


def rows_mismatch(rows: int, batch: int) -> RuntimeError:
    return RuntimeError(
        f"the physical batch has {rows} rows but the model's layers saw {batch}: every layer input must have the "
        "batch as dim 0 (batch_first=True). A model that folds tokens or time steps into dim 0 (e.g. "
        "x.reshape(-1, d)) or runs its layers sequence-first cannot be clipped per example"
    )


def layers_disagree(name: str, rows: int, batch: int) -> RuntimeError:
    return RuntimeError(
        f"{name}: saw {rows} examples but other layers saw {batch}; opacus_fast needs the batch as dim 0 of every "
        "layer input (batch_first=True)"
    )
