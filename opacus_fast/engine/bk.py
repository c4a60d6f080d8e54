"""The BK engine: attaches captures to a model and turns each backward into clipped per-example gradient sums.

capture → norms → clip factors → clipped sums. During backward every trainable layer hands its input and output
gradient to the engine (autograd never computes weight gradients); once the *whole* backward has finished, the
engine computes every example's gradient norm, the clip factors, and adds ``sum_i factor_i * G_i`` to
``p.summed_grad``. The engine knows no layer type: layer rules (``grad_sample/``) do that part.

A step launches few kernels and never makes the host wait for the device: small per-example gradients (biases,
norm layers, units) are clipped as one block per device, the clip factors are computed once for all parameters,
and the sums of a logical batch's later physical batches are added in one foreach kernel.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..clipping import ClipBound, has_pending_sums
from ..data.context import BatchContext, PhysicalBatchInfo
from ..grad_sample import cast, scratch_space, sq_norm, weighted_sum
from . import refusals
from .captures import LayerCapture, Record, UnitCapture, check_unit_call
from .planning import Site, plan_sites

Tensor = torch.Tensor


def _rows(info: PhysicalBatchInfo) -> int:
    """Rows of a physical batch as the model sees it (padding rows included)."""
    return info.num_real if info.mask is None else info.mask.shape[0]


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
        #: parameters not captured (frozen when attaching): a backward refuses them if they have become trainable
        self._uncaptured = [(n, p) for n, p in self.model.named_parameters() if id(p) not in self._captured]
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

    def model_call(self, args: tuple, kwargs: dict) -> contextlib.AbstractContextManager:
        """The context of one call of the whole model, whose tensor arguments are the batch: every forward of the
        user's model runs inside it (the wrapper's ``forward``, or the root module's hooks)."""
        return contextlib.nullcontext()

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
                raise refusals.layer_extra_args(site.module_name)
            return LayerCapture.apply(self, site, rule.prepare(site.module, x), self.anchor)

        return capture

    def _capture_unit(self, site: Site) -> Callable[..., Tensor]:
        def capture(*inputs: Any, **kwargs: Any) -> Tensor:
            check_unit_call(site, inputs, kwargs, self._shared, self.model)
            versions = [x._version for x in inputs]
            out = UnitCapture.apply(self, site, kwargs, len(inputs), *inputs, self.anchor)
            if [x._version for x in inputs] != versions:
                raise refusals.unit_inplace(site.describe_method())
            return out

        return capture

    @staticmethod
    def _leak_guard(name: str) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            raise refusals.ordinary_gradient(name)

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
                raise refusals.nested_backward()
            self._task = task
            self._records = []
            torch.autograd.Variable._execution_engine.queue_callback(self.finish)
        self._records.append(rec)

    def _check_coverage(self) -> None:
        """Refuse parameters made trainable after attaching: nothing captures them, so they would get noise only."""
        for name, p in self._uncaptured:
            if p.requires_grad:
                raise refusals.parameter_unfrozen(name)

    def _mask(self, batch: int) -> Tensor | None:
        info = self.context.current if self.context is not None else None
        if info is None:
            return None
        if info is self.context.trained:
            raise refusals.backward_twice()
        previous = self.context.previous
        if previous is not None and previous is not self.context.trained:
            raise refusals.batch_skipped()
        if info.index == 0 and has_pending_sums([p for site in self.sites for p in site.params.values()]):
            raise refusals.logical_batch_pending()
        self.context.mark_trained(info)
        rows = _rows(info)
        if rows != batch:
            raise refusals.rows_mismatch(rows, batch)
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
                raise refusals.layers_disagree(rec.site.module_name, rec.batch, batch)
        _release_frozen(records)
        if not any(p.requires_grad for rec in records for p in rec.site.params.values()):
            return  # e.g. a GAN generator's step through a frozen private discriminator: nothing to clip
        mask = self._mask(batch)
        if self.context is not None:
            self.context.clipped_since_release += 1
        if batch == 0:  # an empty (unpadded) logical batch: nothing to clip; the step is noise only
            return
        scale = float(batch) if self.loss_reduction == "mean" else 1.0
        flat = self.bound.flat is not None
        work = _ClippingWork.collect(records)
        factors = self._clip_factors(work.sq_norms(flat), scale, mask)
        with scratch_space():
            sums = work.clipped_sums(factors, flat)
        _accumulate(sums)

    def _clip_factors(self, sq: list[tuple[list[nn.Parameter], Tensor]], scale: float, mask: Tensor | None) -> dict:
        """Per-parameter (B,) factors ``scale * min(1, C / (||G_i|| + 1e-6)) * mask_i`` (G_i the true gradient), from
        ``sq``: parameters with the (B,) sum of their squared per-example norms (one parameter each when clipping per
        layer)."""

        def factor(sq_norms: Tensor, bound: float) -> Tensor:
            f = (bound / (sq_norms.sqrt() * scale + 1e-6)).clamp(max=1.0) * scale
            return f if mask is None else f * mask.to(f.device, non_blocking=True)  # no host sync on a GPU

        if self.bound.flat is not None:
            total = torch.stack([v for _, v in sq]).sum(dim=0)
            shared = factor(total, self.bound.flat)
            return {p: shared for params, _ in sq for p in params}
        return {p: factor(v, self.bound.per_param[p]) for params, v in sq for p in params}


#: per-example gradients of up to this many elements per example are copied into one (B, N) block per device, whose
#: squared norms and clipped sum are one kernel each (biases and norm layers: two kernels per parameter otherwise);
#: larger ones (a tied embedding's) are handled alone, not to hold them twice
BLOCK_NUMEL = 2**20


@dataclass
class _ClippingWork:
    """One backward's clipped parameters, split by how their norms and clipped sums are computed: by the layer rule
    from the saved (x, g) (large weights: ghost norms or instantiation), or from per-example gradients (parameters
    of eager rules and units, small ones such as biases, and parameters used several times in one pass, whose
    per-example gradients are summed over their uses first)."""

    #: records whose rule computes the norms and sums of these of its parameters, with the cache its norms left
    ruled: list[tuple[Record, list[str], Any]] = field(default_factory=list)
    #: (B,) squared norms of the per-example gradients of ``ruled``'s parameters
    ruled_sq: list[tuple[nn.Parameter, Tensor]] = field(default_factory=list)
    #: per-example gradients (B, *p.shape) of all the other parameters
    examples: list[tuple[nn.Parameter, Tensor]] = field(default_factory=list)

    @classmethod
    def collect(cls, records: list[Record]) -> _ClippingWork:
        work = cls()
        uses: dict[nn.Parameter, int] = defaultdict(int)  # frozen since attaching: 0, so neither clipped nor summed
        for rec in records:
            for p in rec.site.params.values():
                uses[p] += p.requires_grad
        multi: dict[nn.Parameter, Tensor] = {}
        for rec in records:
            site = rec.site
            single = [n for n, p in site.params.items() if uses[p] == 1]
            repeated = [n for n, p in site.params.items() if uses[p] > 1]
            if rec.per_sample:
                grads = rec.per_sample
            else:
                small = [n for n in single if n in site.rule.per_example_params]
                ruled = [n for n in single if n not in small]
                if ruled:
                    norms, cache = site.rule.norms(site.module, rec.saved, rec.g, ruled)
                    work.ruled.append((rec, ruled, cache))
                    work.ruled_sq += [(site.params[n], norms[n]) for n in ruled]
                    single = small
                wanted = single + repeated
                grads = site.rule.per_sample(site.module, rec.saved, rec.g, wanted) if wanted else {}
            work.examples += [(site.params[n], grads[n]) for n in single]
            for n in repeated:
                p = site.params[n]
                multi[p] = grads[n] if p not in multi else multi[p] + grads[n]
        work.examples += multi.items()
        return work

    @functools.cached_property
    def blocks(self) -> list[tuple[list[nn.Parameter], Tensor]]:
        """``examples`` as blocks whose norms and sums are computed together: (parameters, their per-example
        gradients side by side, (B, N)); see ``BLOCK_NUMEL``."""
        shared: dict[torch.device, list[tuple[nn.Parameter, Tensor]]] = defaultdict(list)
        alone = []
        for p, grad in self.examples:
            if grad[0].numel() <= BLOCK_NUMEL:
                shared[grad.device].append((p, grad))
            else:
                alone.append([(p, grad)])
        blocks = []
        for block in [*shared.values(), *alone]:
            flat = [grad.reshape(grad.shape[0], -1) for _, grad in block]
            blocks.append(([p for p, _ in block], flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)))
        return blocks

    def sq_norms(self, flat: bool) -> list[tuple[list[nn.Parameter], Tensor]]:
        """(parameters, (B,) sum of their squared per-example norms): one entry per parameter, or (``flat``, when
        only the total counts) one per block of per-example gradients."""
        sq = [([p], v) for p, v in self.ruled_sq]
        if flat:
            return sq + [(params, sq_norm(grads)) for params, grads in self.blocks]
        return sq + [([p], sq_norm(grad)) for p, grad in self.examples]

    def clipped_sums(self, factors: dict[nn.Parameter, Tensor], flat: bool) -> list[tuple[nn.Parameter, Tensor]]:
        """``(p, sum_i factor_i G_i)`` for every clipped parameter (``flat``: one factor for all)."""
        sums = []
        while self.ruled:  # each layer's saved input and output gradient are freed as soon as its sums are taken
            rec, names, cache = self.ruled.pop(0)
            site = rec.site
            wanted = {n: factors[site.params[n]] for n in names}
            sums += [(site.params[n], s) for n, s in site.rule.clipped_sum(
                site.module, rec.saved, rec.g, wanted, cache).items()]
            rec.saved, rec.g, cache = (), None, None
        if not flat:
            return sums + [(p, weighted_sum(factors[p], grad)) for p, grad in self.examples]
        for params, grads in self.blocks:  # one GEMV for each block
            total = weighted_sum(factors[params[0]], grads)
            sums += zip(params, total.split([p.numel() for p in params]))
        return sums


def _release_frozen(records: list[Record]) -> None:
    """Drop the pending sums of parameters frozen since: the optimizer never releases them (nothing is lost, since
    nothing of them was released), and they must not block later logical batches."""
    for rec in records:
        for p in rec.site.params.values():
            if not p.requires_grad:
                p.summed_grad = None


def _accumulate(sums: list[tuple[nn.Parameter, Tensor]]) -> None:
    """Add each sum to its ``p.summed_grad``, which the engine owns: a logical batch's first sum is kept as it is,
    later ones are added in place, all in one foreach kernel."""
    into, added = [], []
    for p, s in sums:
        s = cast(s, p.dtype)
        if s.shape != p.shape:
            s = s.reshape(p.shape)
        if getattr(p, "summed_grad", None) is None:
            p.summed_grad = s
        else:
            into.append(p.summed_grad)
            added.append(s)
    if into:
        torch._foreach_add_(into, added)
