"""Book-Keeping (BK) clipping engine: one forward, one backward, exact clipped per-example gradient sums.

capture → norms → clip factors → clipped sums. During backward every trainable layer hands its input and output
gradient to the engine (autograd never computes weight gradients); once the *whole* backward has finished, the
engine computes every example's gradient norm, the clip factors, and adds ``sum_i factor_i * G_i`` to
``p.summed_grad``. The engine knows no layer type: layer rules (``grad_sample/``) do that part.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .clipping import ClipBound, has_pending_sums
from .data.context import BatchContext
from .grad_sample import LayerRule, find_rule, find_unit, run_per_example, scratch_space, sq_norm, weighted_sum

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
        method = getattr(type(site.module), site.method).__get__(site.module)
        with torch.enable_grad():
            out, leaves, copies = run_per_example(site.module, method, list(site.params), tensors[:n_inputs], kwargs)
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


def plan_sites(model: nn.Module) -> list[Site]:
    """Decide how every trainable parameter is captured, or raise naming what cannot be handled exactly."""
    sites: list[Site] = []
    problems: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, _MIXING):
            problems.append(
                f"{_describe(name, module)} mixes examples within a batch (batch statistics), so per-example "
                "gradients do not exist; replace it, e.g. with opacus.validators.ModuleValidator.fix(model) "
                "(BatchNorm → GroupNorm)" + ("" if type(module).__module__.startswith("torch.") else
                "; that converts torch's own BatchNorm classes only, so replace this subclass by hand (e.g. by a "
                "GroupNorm followed by its activation)")
            )
            continue
        own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        if not own:
            continue
        rule = find_rule(module)
        if rule is not None:
            reason = rule.validate(module)
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
        for site in self.sites:
            setattr(site.module, site.method, self._make_call(site))
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
        engine = self
        if site.rule is not None:
            rule = site.rule

            def call(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
                if args or kwargs:
                    raise TypeError(f"{site.module_name}: opacus_fast captures single-input calls of this layer only")
                engine.forget_failed_backward()
                engine.note_forward()
                return _LayerCapture.apply(engine, site, rule.prepare(site.module, x), engine.anchor)

            return call

        def call_unit(*inputs: Any, **kwargs: Any) -> Tensor:
            if not inputs or not all(isinstance(x, Tensor) for x in inputs):
                raise TypeError(
                    f"{site.module_name}.{site.method}: opacus_fast needs tensor positional inputs (batch first); "
                    "pass other arguments by keyword"
                )
            for k, v in kwargs.items():
                if isinstance(v, Tensor) and v.requires_grad:
                    raise TypeError(f"{site.module_name}.{site.method}: keyword input '{k}' requires grad")
            engine.forget_failed_backward()
            engine.note_forward()
            versions = [x._version for x in inputs]
            out = _UnitCapture.apply(engine, site, kwargs, len(inputs), *inputs, engine.anchor)
            if [x._version for x in inputs] != versions:
                raise UnsupportedModuleError(
                    f"{site.module_name}.{site.method} modifies its input in place; disable that (e.g. inplace=False)"
                )
            return out

        return call_unit

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
        """Called from a capture's forward: note a forward pass that builds a graph, so that the optimizer can refuse
        to release a logical batch none of whose backward passes produced clipped gradients."""
        if self.context is not None and torch.is_grad_enabled():
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
                "backward pass to be clipped correctly. Add the losses together and call backward() once"
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
        rows = info.num_real if info.mask is None else info.mask.shape[0]
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
            self.context.clipped_since_release = True
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
