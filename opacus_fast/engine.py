"""Book-Keeping (BK) clipping engine: one forward, one backward, exact clipped per-example gradient sums.

capture → norms → clip factors → clipped sums. During backward every trainable layer hands its input and output
gradient to the engine (autograd never computes weight gradients); once the *whole* backward has finished, the
engine computes every example's gradient norm, the clip factors, and adds ``sum_i factor_i * G_i`` to
``p.summed_grad``. The engine knows no layer type: layer rules (``grad_sample/``) do that part.
"""

from __future__ import annotations

import types
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_leaves

from .clipping import ClipBound, has_pending_sums
from .data.context import BatchContext, PhysicalBatchInfo
from .grad_sample import (
    LayerRule,
    find_rule,
    find_unit,
    foreign_leaves,
    run_per_example,
    scratch_space,
    sq_norm,
    weighted_sum,
)

Tensor = torch.Tensor
_MIXING = (nn.modules.batchnorm._BatchNorm,)


class UnsupportedModuleError(ValueError):
    """The model has a part whose per-example gradients opacus_fast cannot compute exactly."""


@dataclass(eq=False)
class Site:
    """One captured call target: a rule layer, or a unit method, with its trainable parameters."""

    module: nn.Module
    module_name: str
    method: str
    params: dict[str, nn.Parameter]
    rule: LayerRule | None = None


@dataclass(eq=False)
class Record:
    """What one call of a site left for the end of backward."""

    site: Site
    saved: tuple[Tensor, ...] = ()
    g: Tensor | None = None
    per_sample: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.saved[0].shape[0] if self.saved else next(iter(self.per_sample.values())).shape[0]


def _amp_state(x: Tensor) -> tuple[str, bool, torch.dtype]:
    dev = x.device.type
    return dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)


class _LayerCapture(torch.autograd.Function):
    """Runs a rule layer; its backward returns only the input gradient and hands (x, g) to the engine."""

    @staticmethod
    def forward(ctx, engine: BKEngine, site: Site, x: Tensor, anchor: Tensor) -> Tensor:
        ctx.engine, ctx.site, ctx.amp, ctx.x_dtype = engine, site, _amp_state(x), x.dtype
        out, saved = site.rule.forward(site.module, x)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        _refuse_higher_order(ctx.site)
        saved = ctx.saved_tensors
        site = ctx.site
        if ctx.engine.computes_param_grads():
            if site.rule.eager and g.shape[0] > 0:  # tiny parameters: per-example grads now, while x and g are hot
                ctx.engine.record(Record(site, per_sample=site.rule.per_sample(site.module, saved, g, site.params)))
            else:
                ctx.engine.record(Record(site, saved=saved, g=g))
        grad_x = None
        if ctx.needs_input_grad[2]:
            dev, enabled, dtype = ctx.amp
            with torch.autocast(dev, dtype=dtype, enabled=enabled):
                grad_x = ctx.site.rule.input_grad(ctx.site.module, saved, g)
            grad_x = grad_x.to(ctx.x_dtype)
        return None, None, grad_x, None


class _UnitCapture(torch.autograd.Function):
    """Runs a unit vmapped per example; its backward yields input grads and per-example parameter grads."""

    @staticmethod
    def forward(ctx, engine: BKEngine, site: Site, kwargs: dict, n_inputs: int, *tensors: Tensor) -> Tensor:
        with torch.enable_grad():
            out, leaves, copies = run_per_example(
                site.module, _batch_first_method(site), list(site.params), tensors[:n_inputs], kwargs
            )
        foreign = foreign_leaves(out, leaves + copies)
        if foreign:
            raise _hidden_input_error(site, foreign, engine.model)
        ctx.engine, ctx.site, ctx.graph = engine, site, (out, leaves, copies)
        return out.detach()

    @staticmethod
    def backward(ctx, g: Tensor):
        _refuse_higher_order(ctx.site)
        out, leaves, copies = ctx.graph
        del ctx.graph
        if not ctx.engine.computes_param_grads():
            copies = []
        wanted = [x for x in leaves if x.requires_grad] + copies
        grads = list(torch.autograd.grad(out, wanted, g, allow_unused=True)) if wanted else []
        if copies:
            per_sample = {}
            for name, p, grad in zip(ctx.site.params, copies, grads[len(grads) - len(copies):]):
                per_sample[name] = torch.zeros_like(p) if grad is None else grad
            ctx.engine.record(Record(ctx.site, per_sample=per_sample))
        input_grads = iter(grads)
        grad_inputs = tuple(next(input_grads) if x.requires_grad else None for x in leaves)
        return (None, None, None, None) + grad_inputs + (None,)


def _refuse_higher_order(site: Site) -> None:
    """Refuse a backward that builds a graph of its own (``create_graph=True``): a gradient of the gradient (e.g. a
    gradient penalty) would reach the parameters unclipped, or not at all."""
    if torch.is_grad_enabled():
        raise UnsupportedModuleError(
            f"{_describe(site.module_name, site.module)}: backward or torch.autograd.grad with create_graph=True (higher-order "
            "gradients, e.g. a gradient penalty) is not supported: the gradient of a gradient term cannot be "
            "clipped per example. Compute such a term without create_graph=True, or leave it out of private training"
        )


def _describe(name: str, module: nn.Module) -> str:
    return f"'{name or '<root>'}' ({type(module).__name__})"


def _describe_unit(site: Site) -> str:
    return f"{_describe(site.module_name, site.module)}.{site.method}"


def _batch_first_method(site: Site) -> Callable[..., Tensor]:
    """The unit's own class method, refusing a result that is not one tensor with the input's batch rows: one
    example's call of a unit that mixes examples (e.g. with a whole-batch tensor it holds) returns other rows."""
    method = getattr(type(site.module), site.method).__get__(site.module)

    def run(*inputs: Tensor, **kwargs: Any) -> Tensor:
        out = method(*inputs, **kwargs)
        if not isinstance(out, Tensor):
            raise UnsupportedModuleError(
                f"{_describe_unit(site)} returns {type(out).__name__}, not a tensor: opacus_fast captures units that "
                "return one batch-first tensor; split the module so that each part returns one tensor"
            )
        if out.dim() == 0 or out.shape[0] != inputs[0].shape[0]:
            raise UnsupportedModuleError(
                f"{_describe_unit(site)}, run on one example ({inputs[0].shape[0]} row), returns shape "
                f"{tuple(out.shape)}: its output must have the input's rows as dim 0 (batch first), and an example "
                "must not see other examples (e.g. a whole-batch tensor held by the module)"
            )
        return out

    return run


def _hidden_input_error(site: Site, foreign: list[Tensor], model: nn.Module) -> UnsupportedModuleError:
    """The error for a unit whose output depends on tensors that require grad but are not its inputs."""
    names = _tensor_names(model)
    known = ", ".join(f"'{names[id(t)]}'" for t in foreign if id(t) in names)
    what = f"parameter(s) {known}" if known else "a tensor that requires grad"
    return UnsupportedModuleError(
        f"{_describe_unit(site)} uses {what} that is neither one of its own parameters nor a positional input (e.g. "
        "another module's parameter reached through an unregistered reference, or a weight computed by a forward "
        "pre-hook): the unit runs per example inside a capture that would drop that gradient path. Use a parameter "
        "only in modules that register it (tie weights by assignment, e.g. decoder.weight = embedding.weight), and "
        "pass per-example tensors positionally (batch first)"
    )


def _tensor_names(model: nn.Module) -> dict[int, str]:
    """The model's parameters and buffers by ``id``, for naming them in errors."""
    return {id(t): n for n, t in (*model.named_parameters(), *model.named_buffers())}


def _viewed(t: Tensor) -> Tensor:
    """The tensor whose memory ``t`` views (``t`` itself if it is not a view)."""
    return t if t._base is None else t._base


def _rows(info: PhysicalBatchInfo) -> int:
    """Rows of a physical batch as the model sees it (padding rows included)."""
    return info.num_real if info.mask is None else info.mask.shape[0]


def _refusal(module: nn.Module) -> str | None:
    """Why ``module`` (and all inside it) cannot be captured, whatever rule or unit would apply (None if it can)."""
    if isinstance(module, _MIXING):
        return (
            "mixes examples within a batch (batch statistics), so per-example gradients do not exist; replace it, "
            "e.g. with opacus.validators.ModuleValidator.fix(model) (BatchNorm → GroupNorm)"
            + ("" if type(module).__module__.startswith("torch.") else "; that converts torch's own BatchNorm "
               "classes only, so replace this subclass by hand (e.g. by a GroupNorm followed by its activation)")
        )
    if isinstance(module, nn.RNNBase) and _trainable(module):
        return (
            "runs a fused recurrent kernel that cannot be run per example (vmap has no batching rule for it); use "
            "Opacus' drop-in replacements from opacus.layers (DPLSTM, DPGRU, DPRNN), built from Linear layers: "
            "opacus.validators.ModuleValidator.fix(model) converts nn.LSTM and nn.GRU, replace nn.RNN by DPRNN by hand"
        )
    if parametrize.is_parametrized(module) and _trainable(module.parametrizations):
        return (
            "is parametrized (torch.nn.utils.parametrize, e.g. torch.nn.utils.parametrizations.weight_norm or "
            "spectral_norm): its weights are computed outside the layer, so their per-example gradients cannot be "
            "isolated; remove the parametrization (torch.nn.utils.parametrize.remove_parametrizations) or freeze it"
        )
    return None


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _own_trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    """``module``'s own trainable parameters, less aliases of its children's (e.g. Opacus' DPLSTM registers its
    cells' weights under nn.LSTM's names): those are captured where they are used, in the child."""
    own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    if own:
        children = {id(p) for child in module.children() for p in child.parameters()}
        own = {n: p for n, p in own.items() if id(p) not in children}
    return own


def _unknown_params(rule: LayerRule, own: dict[str, nn.Parameter]) -> str | None:
    """Why a rule layer cannot be captured if it has trainable parameters its rule does not compute (None if not)."""
    unknown = sorted(set(own) - set(rule.params))
    if not unknown:
        return None
    return (
        f"has trainable parameters its rule does not know ({', '.join(unknown)}), e.g. from an old-style "
        "torch.nn.utils.weight_norm (weight_g, weight_v) or spectral_norm (weight_orig); remove that "
        "reparametrization (torch.nn.utils.remove_weight_norm / remove_spectral_norm) or the extra parameters"
    )


def plan_sites(model: nn.Module) -> list[Site]:
    """Decide how every trainable parameter is captured, or raise naming what cannot be handled exactly."""
    sites: list[Site] = []
    problems: list[str] = []
    refused: set[int] = set()  # modules inside a refused one: reported with it
    for name, module in model.named_modules():
        if id(module) in refused:
            continue
        reason = _refusal(module)
        if reason:
            problems.append(f"{_describe(name, module)} {reason}")
            refused.update(id(m) for m in module.modules())
            continue
        own = _own_trainable(module)
        if not own:
            continue
        rule = find_rule(module)
        if rule is not None:
            reason = rule.validate(module) or _unknown_params(rule, own)
            if reason:
                problems.append(f"{_describe(name, module)}: {reason}")
            else:
                sites.append(Site(module, name, "forward", own, rule))
            continue
        unit = find_unit(module)
        if unit is not None and set(own) <= set(unit.params):
            sites.append(Site(module, name, unit.method, own))
            continue
        child_params = [
            f"{name}.{n}" if name else n
            for child_name, child in module.named_children()
            for n, p in child.named_parameters(prefix=child_name)
            if p.requires_grad
        ]
        if not child_params:
            sites.append(Site(module, name, "forward", own))
            continue
        full = ", ".join(f"{name}.{n}" if name else n for n in own)
        problems.append(
            f"{_describe(name, module)} has its own trainable parameters ({full}) and also trainable submodules, "
            "so its parameters' per-example gradients cannot be isolated from the rest of the model. Freeze them "
            "(p.requires_grad_(False)), move them into a small submodule of their own, or register the method that "
            "uses them with opacus_fast.grad_sample.register_unit"
        )
    for site in sites:
        if site.method in vars(site.module):
            problems.append(
                f"{_describe(site.module_name, site.module)} has its own '{site.method}' set on the instance (by "
                "accelerate's hooks, a monkeypatch, or a make_private_fast without cleanup()), which the capture "
                "would bypass; remove it before make_private_fast, or put it on a wrapper module around this one"
            )
    if problems:
        raise UnsupportedModuleError("opacus_fast cannot clip this model exactly:\n- " + "\n- ".join(problems))
    return sites


class BKEngine:
    """Attaches captures to a model and turns each backward into clipped per-example gradient sums.

    Args:
        model: the user's model (modified in place until :meth:`detach`).
        bound: the clip bound (shared with the optimizer, so a scheduler's change reaches both).
        loss_reduction: "mean" (the loss is averaged over the physical batch) or "sum".
        context: where the data loader publishes the current physical batch's mask.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        bound: ClipBound,
        loss_reduction: str = "mean",
        context: BatchContext | None = None,
    ) -> None:
        self.sites = plan_sites(model)
        self.model = model
        self.loss_reduction = loss_reduction
        self.context = context
        self.bound = bound
        self._records: list[Record] = []
        self._task: int | None = None
        self._handles: list[Any] = []
        #: a scalar leaf that requires grad: passed to every capture so that its output requires grad even when
        #: its input does not, while the parameters themselves stay out of the autograd graph
        self.anchor = torch.zeros((), requires_grad=True)
        #: the anchor's gradient accumulator: a backward that will not run it computes gradients of chosen inputs
        #: only (torch.autograd.grad(loss, x)), not the parameters' (held here so that it stays the same node)
        self._anchor_node = self.anchor.view_as(self.anchor).grad_fn.next_functions[0][0]
        self._attach()

    # ---- attaching -------------------------------------------------------------------------------------------
    def _attach(self) -> None:
        self._captured = frozenset(id(p) for site in self.sites for p in site.params.values())
        #: the model's parameters and buffers: shared by all examples, so never a unit's (per-example) positional input
        self._shared = frozenset(id(t) for t in (*self.model.parameters(), *self.model.buffers()))
        for site in self.sites:
            setattr(site.module, site.method, types.MethodType(self._make_call(site), site.module))
        owners = {id(p): f"{s.module_name}.{n}" if s.module_name else n for s in self.sites for n, p in s.params.items()}
        for site in self.sites:
            for p in site.params.values():
                if id(p) in owners:
                    self._handles.append(p.register_hook(self._leak_guard(owners.pop(id(p)))))

    def add_handle(self, handle: Any) -> None:
        """Keep a hook handle (anything with ``.remove()``) to be removed by :meth:`detach`."""
        self._handles.append(handle)

    def detach(self) -> None:
        """Restore the model exactly as it was (methods and hooks)."""
        for site in self.sites:
            site.module.__dict__.pop(site.method, None)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.sites = []

    def _make_call(self, site: Site) -> Callable:
        """The method installed on ``site.module``, bound to it so that ``copy.deepcopy`` (an EMA model,
        ``AveragedModel``) rebinds it to the copy: a copy, and any call without gradients (evaluation,
        ``torch.inference_mode``), run the class's own method; only grad-enabled calls of the original are captured."""
        own = getattr(type(site.module), site.method)
        capture = self._capture_layer(site) if site.rule is not None else self._capture_unit(site)

        def call(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if module is not site.module or not torch.is_grad_enabled():
                return own(module, *args, **kwargs)
            self.forget_failed_backward()
            self.note_forward()
            return capture(*args, **kwargs)

        return call

    def _capture_layer(self, site: Site) -> Callable[..., Tensor]:
        rule = site.rule

        def capture(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            if args or kwargs:
                raise TypeError(f"{site.module_name}: opacus_fast captures single-input calls of this layer only")
            return _LayerCapture.apply(self, site, rule.prepare(site.module, x), self.anchor)

        return capture

    def _capture_unit(self, site: Site) -> Callable[..., Tensor]:
        def capture(*inputs: Any, **kwargs: Any) -> Tensor:
            self._check_unit_call(site, inputs, kwargs)
            versions = [x._version for x in inputs]
            out = _UnitCapture.apply(self, site, kwargs, len(inputs), *inputs, self.anchor)
            if [x._version for x in inputs] != versions:
                raise UnsupportedModuleError(
                    f"{site.module_name}.{site.method} modifies its input in place; disable that (e.g. inplace=False)"
                )
            return out

        return capture

    def _check_unit_call(self, site: Site, inputs: tuple, kwargs: dict) -> None:
        """Refuse unit calls that running it one example at a time would get wrong: each positional tensor is cut
        into examples along dim 0, keyword arguments are passed whole to every example."""
        if not inputs or not all(isinstance(x, Tensor) and x.dim() > 0 for x in inputs):
            raise TypeError(
                f"{site.module_name}.{site.method}: opacus_fast needs tensor positional inputs (batch first); "
                "pass other arguments by keyword"
            )
        problem = self._keyword_tensors(kwargs) or self._shared_inputs(inputs) or self._unbatched_inputs(inputs)
        if problem:
            raise UnsupportedModuleError(f"{_describe_unit(site)}: {problem}")

    def _is_shared(self, t: Tensor) -> bool:
        """Whether ``t`` is (a view of) one of the model's parameters or buffers: the same for all examples."""
        return id(_viewed(t)) in self._shared

    def _keyword_tensors(self, kwargs: dict[str, Any]) -> str | None:
        """Why tensors in keyword arguments are wrong (None if there are none): every example's call gets them
        whole, which is right only for the model's buffers (or frozen parameters), shared by all examples."""
        held = [
            k for k, v in kwargs.items()
            if any(isinstance(t, Tensor) and (t.requires_grad or not self._is_shared(t)) for t in tree_leaves(v))
        ]
        if not held:
            return None
        return (
            f"keyword argument(s) {', '.join(held)} hold tensors other than the model's buffers, which every "
            "example's call would get whole (mixing examples, or losing their gradient). Pass per-example tensors "
            "positionally (batch first); keep tensors shared by all examples in the model's buffers"
        )

    def _shared_inputs(self, inputs: tuple[Tensor, ...]) -> str | None:
        """Why positional inputs that are the model's parameters or buffers are wrong (None if none is)."""
        shared = [i for i, x in enumerate(inputs) if self._is_shared(x)]
        if not shared:
            return None
        names = _tensor_names(self.model)
        which = ", ".join(f"{i} ('{names[id(_viewed(inputs[i]))]}')" for i in shared)
        return (
            f"positional input(s) {which} hold the model's parameters or buffers, shared by all examples, but each "
            "positional tensor is cut into examples along dim 0. Pass such a buffer by keyword (every example "
            "then gets it whole), or read it from this module's own buffers"
        )

    @staticmethod
    def _unbatched_inputs(inputs: tuple[Tensor, ...]) -> str | None:
        """Why positional inputs whose dim 0 differ are wrong (None if they agree). Whether that dim 0 is the
        physical batch is checked at backward, for every layer alike (a forward without backward may see others)."""
        rows = sorted({x.shape[0] for x in inputs})
        if len(rows) == 1:
            return None
        return (
            f"positional inputs with dim 0 of sizes {rows}; each is cut into examples along dim 0, so all must be "
            "batch first. Pass tensors shared by all examples (e.g. a position table) as the model's buffers, by "
            "keyword"
        )

    @staticmethod
    def _leak_guard(name: str) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            raise UnsupportedModuleError(
                f"parameter '{name}' received an ordinary gradient: it is used outside the layer that owns it "
                "(e.g. read directly by a parent module's forward, or by a term of the loss such as a weight "
                "penalty), so its per-example gradient would not be clipped. Use it only through its module; for "
                "weight decay use the optimizer's weight_decay"
            )

        return hook

    # ---- backward ------------------------------------------------------------------------------------------
    def computes_param_grads(self) -> bool:
        """Whether the running backward computes parameter gradients (``loss.backward()``), as opposed to the
        gradients of chosen inputs only (``torch.autograd.grad(loss, x)``, e.g. for adversarial examples), which
        must add nothing to the clipped sums."""
        return torch._C._will_engine_execute_node(self._anchor_node)

    def forget_failed_backward(self) -> None:
        """Called outside any backward (from a capture's forward): drop what a backward that raised left behind."""
        if self._task is not None and torch._C._current_graph_task_id() == -1:
            self._task, self._records = None, []

    def note_forward(self) -> None:
        """Called from a capture's forward (which runs with gradients enabled only): note a forward pass that builds
        a graph, so that the optimizer can refuse to release a logical batch none of whose backward passes produced
        clipped gradients."""
        if self.context is not None:
            self.context.forward_since_release = True

    def record(self, rec: Record) -> None:
        """Called from captures during backward; schedules :meth:`finish` once per backward pass."""
        task = torch._C._current_graph_task_id()
        if task != self._task:
            if self._task is not None:
                self._task, self._records = None, []
                raise UnsupportedModuleError(
                    "a backward pass ran inside another one (reentrant activation checkpointing, "
                    "torch.utils.checkpoint(..., use_reentrant=True), or backward() called from a backward hook): "
                    "each example's gradient would be clipped in separate parts. Use "
                    "torch.utils.checkpoint(..., use_reentrant=False)"
                )
            self._task = task
            self._records = []
            torch.autograd.Variable._execution_engine.queue_callback(self.finish)
        self._records.append(rec)

    def _check_coverage(self) -> None:
        """Refuse parameters made trainable after attaching: nothing captures them, so they would get noise only."""
        for name, p in self.model.named_parameters():
            if p.requires_grad and id(p) not in self._captured:
                raise UnsupportedModuleError(
                    f"parameter '{name}' became trainable after make_private_fast, so it is not clipped; set "
                    "requires_grad before calling make_private_fast (after cleanup())"
                )

    def _mask(self, batch: int) -> Tensor | None:
        info = self.context.current if self.context is not None else None
        if info is None:
            return None
        if info is self.context.trained:
            raise RuntimeError(
                "backward() ran twice on the same physical batch: each example's gradient must come from one "
                "backward pass to be clipped correctly. Add the losses together and call backward() once; if the "
                "second backward is another model's step through this one (a GAN generator's), freeze this model's "
                "parameters for it (requires_grad_(False)) or take the other model's gradients with "
                "torch.autograd.grad"
            )
        previous = self.context.previous
        if previous is not None and previous is not self.context.trained:
            raise RuntimeError(
                "the physical batch before this one got no backward(): either the loop fetches batches ahead (a "
                "prefetcher, accelerate's prepare), which pairs one batch's rows with the next one's padding mask, "
                "or it skipped a batch, which would release part of a Poisson sample. Iterate the loader returned "
                "by make_private_fast directly and run forward and backward on every batch it yields, empty ones "
                "included"
            )
        if info.index == 0 and has_pending_sums([p for site in self.sites for p in site.params.values()]):
            raise RuntimeError(
                "a new logical batch started while clipped gradients of an unfinished one are still pending (the "
                "loop left a logical batch before its last physical batch was stepped). Call optimizer.zero_grad() "
                "at the start of each iteration (it discards them), or optimizer.step() after every physical batch"
            )
        self.context.mark_trained(info)
        rows = _rows(info)
        if rows != batch:
            raise RuntimeError(
                f"the physical batch has {rows} rows but the model's layers saw {batch}: every layer input must have "
                "the batch as dim 0 (batch_first=True). A model that folds tokens or time steps into dim 0 (e.g. "
                "x.reshape(-1, d)) or runs its layers sequence-first cannot be clipped per example"
            )
        return info.mask

    def finish(self) -> None:
        """End of one backward: norms → clip factors → clipped sums added to ``p.summed_grad``."""
        records, self._records, self._task = self._records, [], None
        self._check_coverage()
        if not records:
            return
        batch = records[0].batch
        for rec in records:
            if rec.batch != batch:
                raise RuntimeError(
                    f"{rec.site.module_name}: saw {rec.batch} examples but other layers saw {batch}; opacus_fast "
                    "needs the batch as dim 0 of every layer input (batch_first=True)"
                )
        _release_frozen(records)
        if not any(p.requires_grad for rec in records for p in rec.site.params.values()):
            return  # e.g. a GAN generator's step through a frozen private discriminator: nothing to clip
        mask = self._mask(batch)
        if self.context is not None:
            self.context.clipped_since_release += 1
        if batch == 0:  # an empty (unpadded) logical batch: nothing to clip; the step is noise only
            return
        scale = float(batch) if self.loss_reduction == "mean" else 1.0

        uses: dict[nn.Parameter, int] = defaultdict(int)  # frozen since attaching: 0, so neither clipped nor summed
        for rec in records:
            for p in rec.site.params.values():
                uses[p] += p.requires_grad
        sq: dict[nn.Parameter, Tensor] = {}
        multi: dict[nn.Parameter, Tensor] = {}
        caches: list[Any] = []
        for rec in records:
            single = [n for n, p in rec.site.params.items() if uses[p] == 1]
            repeated = [n for n, p in rec.site.params.items() if uses[p] > 1]
            cache = None
            if rec.per_sample:
                for n in single:
                    sq[rec.site.params[n]] = sq_norm(rec.per_sample[n])
                grads = {n: rec.per_sample[n] for n in repeated}
            else:
                if single:
                    norms, cache = rec.site.rule.norms(rec.site.module, rec.saved, rec.g, single)
                    for n in single:
                        sq[rec.site.params[n]] = norms[n]
                grads = rec.site.rule.per_sample(rec.site.module, rec.saved, rec.g, repeated) if repeated else {}
            for n, grad in grads.items():
                p = rec.site.params[n]
                multi[p] = grad if p not in multi else multi[p] + grad
            caches.append(cache)
        for p, grad in multi.items():
            sq[p] = sq_norm(grad)

        factors = self._clip_factors(sq, scale, mask)
        with scratch_space():
            for rec, cache in zip(records, caches):
                wanted = {n: factors[p] for n, p in rec.site.params.items() if uses[p] == 1}
                if not wanted:
                    continue
                if rec.per_sample:
                    sums = {n: weighted_sum(f, rec.per_sample[n]) for n, f in wanted.items()}
                else:
                    sums = rec.site.rule.clipped_sum(rec.site.module, rec.saved, rec.g, wanted, cache)
                for n, s in sums.items():
                    _accumulate(rec.site.params[n], s)
        for p, grad in multi.items():
            _accumulate(p, weighted_sum(factors[p], grad))

    def _clip_factors(self, sq: dict[nn.Parameter, Tensor], scale: float, mask: Tensor | None) -> dict:
        """Per-parameter (B,) factors ``scale * min(1, C / (||G_i|| + 1e-6)) * mask_i`` (G_i the true gradient)."""

        def factor(sq_norms: Tensor, bound: float) -> Tensor:
            f = (bound / (sq_norms.sqrt() * scale + 1e-6)).clamp(max=1.0) * scale
            return f if mask is None else f * mask.to(f.device, f.dtype)

        if self.bound.flat is not None:
            total = torch.stack([v.to(torch.float64 if v.dtype == torch.float64 else torch.float32)
                                 for v in sq.values()]).sum(dim=0)
            shared = factor(total, self.bound.flat)
            return {p: shared for p in sq}
        return {p: factor(v, self.bound.per_param[p]) for p, v in sq.items()}


def _release_frozen(records: list[Record]) -> None:
    """Drop the pending sums of parameters frozen since: the optimizer never releases them (nothing is lost, since
    nothing of them was released), and they must not block later logical batches."""
    for rec in records:
        for p in rec.site.params.values():
            if not p.requires_grad:
                p.summed_grad = None


def _accumulate(p: nn.Parameter, s: Tensor) -> None:
    """Add ``s`` to ``p.summed_grad`` (which the engine owns: the first sum of a logical batch, then added to in place)."""
    s = s.to(p.dtype).reshape(p.shape)
    if getattr(p, "summed_grad", None) is None:
        p.summed_grad = s
    else:
        p.summed_grad.add_(s)
