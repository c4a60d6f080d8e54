"""The BK engine: attaches captures to a model and turns each backward into clipped per-example gradient sums.

capture → norms → clip factors → clipped sums. During backward every trainable layer hands its input and output
gradient to the engine (autograd never computes weight gradients), and the batch tracker hands over the
per-example gradients of parameters the model uses directly; once the *whole* backward has finished, the engine
computes every example's gradient norm, the clip factors, and adds ``sum_i factor_i * G_i`` to ``p.summed_grad``.
The engine knows no layer type: layer rules (``grad_sample/``) do that part.

A step launches few kernels and never makes the host wait for the device: small per-example gradients (biases,
norm layers, parameters used directly) are clipped as one block per device, the clip factors are computed once for all parameters,
and the sums of a logical batch's later physical batches are added in one foreach kernel.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..clipping import ClipBound, has_pending_sums
from ..data.context import BatchContext, PhysicalBatchInfo
from ..grad_sample import (
    EmbeddingBagRule,
    EmbeddingRule,
    LinearRule,
    cast,
    held_bytes,
    scratch_space,
    sq_norm,
    weighted_sum,
)
from ..losses import warn_when_backpropagated
from . import refusals
from .captures import LayerCapture, check_recomputation
from .layout import Batch, Untracked, Whole, rows_to_examples, to_batch_first
from .planning import FunctionalLayer, Site, plan_sites
from .tracking import BatchTracker, ModelCall, Root, Shared

Tensor = torch.Tensor


@dataclass(eq=False)
class Record:
    """What one call of a site left for the end of backward: its saved inputs and output gradient (rows are the
    examples), or its per-example gradients."""

    site: Site
    saved: tuple[Tensor, ...] = ()
    g: Tensor | None = None
    per_sample: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.saved[0].shape[0] if self.saved else next(iter(self.per_sample.values())).shape[0]


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
        batch_first: whether the batch is dim 0 of the model's inputs (else dim 1, as with Opacus'
            ``batch_first=False``).
        stand_ins: tensors that take a parameter's place during the model's calls (FSDP's unsharded parameters),
            each mapped to the parameter it stands for: their uses are captured, clipped and named as that
            parameter's.

    ``accumulate`` (an attribute) receives each clipped backward's ``(parameter, clipped sum)`` pairs as an
    iterator, with the list of parameters it will yield, once per clipped backward, an empty one included; by
    default it adds them to ``p.summed_grad``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        bound: ClipBound,
        loss_reduction: str = "mean",
        context: BatchContext | None = None,
        batch_first: bool = True,
        stand_ins: Mapping[Tensor, nn.Parameter] | None = None,
    ) -> None:
        plan = plan_sites(model)
        self.sites = plan.layers
        self.param_sites = plan.params
        self.model = model
        self.loss_reduction = loss_reduction
        self.context = context
        self.bound = bound
        self.batch_dim = 0 if batch_first else 1
        #: ``id`` of every trainable parameter at attaching
        self.trainable = frozenset(plan.params)
        self._names = {}
        for name, p in model.named_parameters():
            self._names.setdefault(id(p), name)
        #: the stand-ins of trainable parameters (kept alive, so their ``id`` stays theirs)
        self._stand_ins = [(s, p) for s, p in (stand_ins or {}).items() if id(p) in self.trainable]
        #: ``id`` of every tensor that is a trainable parameter or stands for one → that parameter
        self._params: dict[int, nn.Parameter] = {pid: next(iter(site.params.values()))
                                                 for pid, site in plan.params.items()}
        self._params.update((id(s), p) for s, p in self._stand_ins)
        #: ``id`` of every tensor that :meth:`parameter` resolves
        self.known = frozenset(self._params)
        self.accumulate: Callable[[Iterator[tuple[nn.Parameter, Tensor]], Sequence[nn.Parameter]], None] = _accumulate
        self._functional: dict[tuple, Site] = {}
        self.tracker = BatchTracker(self)
        #: whether forward hooks that resume tracking in checkpointing recomputations are installed
        self._follows_recomputation = False
        #: called once per clipped backward with each example's gradient norm and the padding mask (flat clipping
        #: only), e.g. by adaptive clipping, which counts the examples left unclipped
        self.norms_listener: Callable[[Tensor, Tensor | None], None] | None = None
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
        model = self.model
        calls: list[contextlib.ExitStack] = []

        # Every call of the model runs inside model_call: a forward pre-hook, registered after the model's own (so
        # it sees the arguments they made), enters it, and a forward hook that runs also when the forward raises
        # leaves it. A copy of the model (an EMA) shares the hooks, which ignore calls of any other module.
        def enter(called: nn.Module, args: tuple, kwargs: dict) -> None:
            if called is model:
                calls.append(contextlib.ExitStack())
                calls[-1].enter_context(self.model_call(args, kwargs))

        def leave(called: nn.Module, args: tuple, output: Any) -> None:
            if called is model and calls:
                calls.pop().__exit__(*sys.exc_info())
                if torch.is_grad_enabled():
                    warn_when_backpropagated(output)

        self._handles.append(model.register_forward_pre_hook(enter, with_kwargs=True))
        self._handles.append(model.register_forward_hook(leave, always_call=True))
        #: parameters not trainable when attaching: a backward refuses them if they have become trainable
        self._uncaptured = [(n, p) for n, p in model.named_parameters() if id(p) not in self.trainable]
        for site in self.sites:
            site.module.forward = types.MethodType(self._make_call(site), site.module)
        for pid in self.trainable:
            p = self.param_sites[pid].params
            param = next(iter(p.values()))
            self._handles.append(param.register_hook(self._leak_guard(self._names[pid])))
        for stand_in, param in self._stand_ins:
            self._handles.append(stand_in.register_hook(self._leak_guard(self._names[id(param)])))

    def add_handle(self, handle: Any) -> None:
        """Keep a hook handle (anything with ``.remove()``) to be removed by :meth:`detach`."""
        self._handles.append(handle)

    def detach(self) -> None:
        """Restore the model exactly as it was (methods and hooks)."""
        for site in self.sites:
            site.module.__dict__.pop("forward", None)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.sites = []

    def parameter(self, t: Any) -> nn.Parameter | None:
        """The trainable parameter that ``t`` is or stands for (None if it is neither)."""
        return self._params.get(id(t)) if isinstance(t, nn.Parameter) else None

    def param_name(self, p: nn.Parameter) -> str:
        p = self._params.get(id(p), p)
        return f"parameter '{self._names.get(id(p), '?')}'"

    def describe_roots(self, roots: Any) -> str:
        names = list(dict.fromkeys(r.name for r in roots))
        return ", ".join(names) if names else "trainable parameters"

    # ---- forward ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def model_call(self, args: tuple, kwargs: dict) -> Iterator[None]:
        """The context of one call of the whole model, whose tensor arguments are the batch (entered by hooks on
        the model, so every call of it runs inside). Without gradients (evaluation) nothing is tracked."""
        if not torch.is_grad_enabled():
            yield
            return
        self.forget_failed_backward()
        self.note_forward()
        info = self.context.current if self.context is not None else None
        with self.tracker.model_call(args, kwargs, self.batch_dim, _rows(info) if info is not None else None):
            yield

    def _make_call(self, site: Site) -> Callable:
        """The ``forward`` installed on a rule layer, bound to it so that ``copy.deepcopy`` (an EMA model,
        ``AveragedModel``) rebinds it to the copy: a copy, and any call without gradients (evaluation,
        ``torch.inference_mode``), run the class's own method; only grad-enabled calls of the original are captured."""
        own = type(site.module).forward
        rule = site.rule

        def call(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if module is not site.module or not torch.is_grad_enabled():
                return own(module, *args, **kwargs)
            if args[1:] or kwargs:
                raise refusals.layer_extra_args(site.module_name)
            if self.tracker.call is None:  # a call outside the model's own (a layer alone, or a recomputation)
                self.forget_failed_backward()
                self.note_forward()
                check_recomputation(site)
            return self.run_layer(site, rule.prepare(module, args[0]))

        return call

    def run_layer(self, site: Site, x: Tensor, decided_by: Tensor | None = None) -> Tensor:
        """Run a rule layer through the capture, deciding from the tracker how its rows relate to examples: rows of
        the batch (as its layout says), or a batch-less input whose output's per-example cotangents the tracker
        collects (a root). ``decided_by``: the tensor whose rows are the output's (default ``x``)."""
        call = self.tracker.call
        how: Batch | Root | None = None
        if call is not None:
            self.watch_checkpointing()
            tag = call.tag(x if decided_by is None else decided_by)
            if isinstance(tag, Untracked):
                raise refusals.untracked_input(site.describe(), tag.why)
            if isinstance(tag, Whole):
                how = Batch(0, 1, x.shape[0]) if decided_by is None else Batch(0)
            elif isinstance(tag, Batch):
                how = tag
            else:
                how = Root(call, f"the output of {site.describe()}")
                how.rows_ok = True
        with self.tracker.paused():
            out = LayerCapture.apply(self, site, x, self.anchor, how, call.batch if call is not None else 0)
        if call is not None:
            if isinstance(how, Root):
                how.tensor = out
                call.set(out, Shared((how,)))
            else:
                call.set(out, tag)
        return out

    def capture_functional(self, func: Callable, args: tuple, kwargs: dict, call: ModelCall) -> Tensor | None:
        """``F.linear(x, weight, bias)`` or ``F.embedding(x, weight, ...)`` on the batch with a parameter as weight:
        captured with the layer's own rule (None if this call is not one of those)."""
        if func is F.linear:
            x, weight, bias = _args(args, kwargs, ("input", "weight", "bias"), (None, None, None))
            attrs = {"weight": weight, "bias": bias}
            rule, key = LinearRule(), ("linear", id(weight), id(bias))
        elif func is F.embedding:
            x, weight, padding_idx, max_norm, norm_type, by_freq, sparse = _args(
                args, kwargs, ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
                               "sparse"), (None, None, None, None, 2.0, False, False))
            if padding_idx is not None and padding_idx < 0:
                padding_idx += weight.shape[0]
            attrs = {"weight": weight, "padding_idx": padding_idx, "max_norm": max_norm, "norm_type": norm_type,
                     "scale_grad_by_freq": by_freq, "sparse": sparse, "num_embeddings": weight.shape[0]}
            rule, key = EmbeddingRule(), ("embedding", id(weight), padding_idx, max_norm, by_freq, sparse)
        elif func is F.embedding_bag:
            return self._capture_bags(args, kwargs, call)
        else:
            return None
        if isinstance(call.tag(x), Shared) or not isinstance(weight, nn.Parameter):
            return None
        used = {n: t for n, t in attrs.items() if isinstance(t, Tensor) and t.requires_grad}
        params = {n: self.parameter(t) for n, t in used.items()}
        if any(p is None for p in params.values()):
            return None
        site = self._functional.get(key)
        if site is None:
            layer = FunctionalLayer(func.__name__, **attrs)
            names = " and ".join(self.param_name(t) for t in params.values())
            site = Site(layer, f"F.{func.__name__} on {names}", params, rule)
            reason = rule.validate(layer)
            if reason:
                raise refusals.UnsupportedModuleError(f"{site.describe()}: {reason}")
            self._functional[key] = site
        return self.run_layer(site, x)

    def _capture_bags(self, args: tuple, kwargs: dict, call: ModelCall) -> Tensor | None:
        """``F.embedding_bag`` with a parameter as weight: each bag is an example (its rows come from the offsets
        with 1-D ids, from the ids' rows with 2-D ids)."""
        names = ("input", "weight", "offsets", "max_norm", "norm_type", "scale_grad_by_freq", "mode", "sparse",
                 "per_sample_weights", "include_last_offset", "padding_idx")
        x, weight, offsets, max_norm, _, by_freq, mode, sparse, psw, last, padding_idx = _args(
            args, kwargs, names, (None, None, None, None, 2.0, False, "mean", False, None, False, None))
        param = self.parameter(weight)
        if param is None:
            return None
        if padding_idx is not None and padding_idx < 0:
            padding_idx += weight.shape[0]
        layer = FunctionalLayer("embedding_bag", weight=weight, offsets=offsets, max_norm=max_norm,
                                scale_grad_by_freq=by_freq, mode=mode, sparse=sparse, per_sample_weights=psw,
                                include_last_offset=last, padding_idx=padding_idx, num_embeddings=weight.shape[0])
        site = Site(layer, f"F.embedding_bag on {self.param_name(weight)}", {"weight": param}, EmbeddingBagRule())
        reason = site.rule.validate(layer)
        if reason:
            raise refusals.UnsupportedModuleError(f"{site.describe()}: {reason}")
        return self.run_layer(site, x, decided_by=x if x.dim() == 2 else offsets)

    def watch_checkpointing(self) -> None:
        """Inside non-reentrant activation checkpointing (seen during forward), make every submodule resume the
        tracker when backward recomputes it: the recomputation must rewrite parameter uses as the forward did, or
        the tensors it recomputes would not match those the forward saved."""
        if self._follows_recomputation or torch.compiler.is_compiling():
            return
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if hooks is None or not getattr(hooks[0], "__qualname__", "").startswith("_checkpoint_hook"):
            return
        self._follows_recomputation = True
        resumed: list[contextlib.ExitStack] = []

        def enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
            stack = contextlib.ExitStack()
            if self.tracker.call is None and torch._C._current_graph_task_id() != -1:
                call = ModelCall.of(torch.utils._pytree.tree_leaves((args, kwargs)))
                if call is not None:
                    stack.enter_context(self.tracker.resumed(call))
            resumed.append(stack)

        def leave(module: nn.Module, args: tuple, output: Any) -> None:
            if resumed:
                resumed.pop().close()

        for module in self.model.modules():
            if module is not self.model:
                self._handles.append(module.register_forward_pre_hook(enter, with_kwargs=True))
                self._handles.append(module.register_forward_hook(leave, always_call=True))

    @staticmethod
    def _leak_guard(name: str) -> Callable[[Tensor], None]:
        def hook(grad: Tensor | None) -> None:
            if grad is not None:
                raise refusals.ordinary_gradient(name)

        return hook

    # ---- records -----------------------------------------------------------------------------------------------
    def record_layer(self, site: Site, saved: tuple[Tensor, ...], g: Tensor, layout: Batch | None,
                     batch: int) -> None:
        """Record a rule layer's call whose rows hold the examples as ``layout`` says (None: dim 0 as it is)."""
        rule = site.rule
        if layout is not None and (layout.dim or layout.outer != 1 or layout.inner != 1):  # not Batch(0)
            if rule.tokenwise:
                saved = tuple(to_batch_first(t, layout, batch) for t in saved)
                g = to_batch_first(g, layout, batch)
            elif layout.dim == 0:
                rows = rule.per_sample(site.module, saved, g, site.params)
                self.record(Record(site, per_sample={n: rows_to_examples(t, layout, batch) for n, t in rows.items()}))
                return
            else:
                raise refusals.layout_unsupported(site.describe(), f"in dim {layout.dim}")
        if rule.eager and g.shape[0] > 0:  # tiny parameters: per-example grads now, while x and g are hot
            self.record(Record(site, per_sample=rule.per_sample(site.module, saved, g, site.params)))
        else:
            self.record(Record(site, saved=saved, g=g))

    def record_root(self, site: Site, saved: tuple[Tensor, ...], root: Root) -> None:
        """Record a rule layer's call on a batch-less input from the per-example cotangents its output collected."""
        batch = root.call.batch
        if root.rows is not None and root.per_example is not None:
            raise refusals.shared_rows(f"the output of {site.describe()}")
        if root.rows is not None:
            self.record_layer(site, saved, root.rows, None, batch)
        elif root.per_example is not None:
            if site.rule.tokenwise:
                expanded = tuple(t.unsqueeze(0).expand(batch, *t.shape) for t in saved)
                self.record_layer(site, expanded, root.per_example, None, batch)
            else:  # every example uses all rows of the input: rows (example, row) grouped by example
                rows = saved[0].shape[0]
                repeated = tuple(t.unsqueeze(0).expand(batch, *t.shape).flatten(0, 1) for t in saved)
                self.record_layer(site, repeated, root.per_example.flatten(0, 1), Batch(0, 1, rows), batch)

    def record_param(self, p: nn.Parameter, per_example: Tensor) -> None:
        """Record the per-example gradients ``(B, *p.shape)`` of a parameter's direct uses in one model call."""
        site = self.param_sites[id(p)]
        self.record(Record(site, per_sample={next(iter(site.params)): per_example}))

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
            self.accumulate(iter(()), [])
            return
        scale = float(batch) if self.loss_reduction == "mean" else 1.0
        flat = self.bound.flat is not None
        work = _ClippingWork.collect(records)
        factors = self._clip_factors(work.sq_norms(flat), scale, mask)
        with scratch_space():
            self.accumulate(work.clipped_sums(factors, flat), work.params)

    def _clip_factors(self, sq: list[tuple[list[nn.Parameter], Tensor]], scale: float, mask: Tensor | None) -> dict:
        """Per-parameter (B,) factors ``scale * min(1, C / (||G_i|| + 1e-6)) * mask_i`` (G_i the true gradient), from
        ``sq``: parameters with the (B,) sum of their squared per-example norms (one parameter each when clipping per
        layer)."""

        def factor(sq_norms: Tensor, bound: float) -> Tensor:
            f = (bound / (sq_norms.sqrt() * scale + 1e-6)).clamp(max=1.0) * scale
            return f if mask is None else f * mask.to(f.device, non_blocking=True)  # no host sync on a GPU

        if self.bound.flat is not None:
            total = torch.stack([v for _, v in sq]).sum(dim=0)
            self.report_norms(total, scale, mask)
            shared = factor(total, self.bound.flat)
            return {p: shared for params, _ in sq for p in params}
        return {p: factor(v, self.bound.per_param[p]) for params, v in sq for p in params}

    def report_norms(self, sq_norms: Tensor, scale: float, mask: Tensor | None) -> None:
        """Hand each example's gradient norm ``sqrt(sq_norms) * scale`` and the padding mask to ``norms_listener``."""
        if self.norms_listener is not None:
            self.norms_listener(sq_norms.sqrt() * scale, mask)


#: per-example gradients of up to this many elements per example are copied into one (B, N) block per device, whose
#: squared norms and clipped sum are one kernel each (biases and norm layers: two kernels per parameter otherwise);
#: larger ones (a tied embedding's) are handled alone, not to hold them twice
BLOCK_NUMEL = 2**20
#: calls of one rule with equal ``stack_key`` (a ViT's 12 qkv layers) are stacked into one computation: a few kernels
#: for all of them instead of a few per layer. A stack is a copy of its calls' saved tensors and output gradients
#: made while they are still held, and its norms' temporaries grow with it, so its bytes (``LayerRule.stack_bytes``)
#: may be at most this fraction of all the backward's saved bytes (the peak grows by at most that much) or
#: ``STACK_BYTES``, whichever is more: small models, whose steps launches dominate, stack whole.
STACK_FRACTION = 1 / 16
STACK_BYTES = 2**23
#: a call is stacked only where copying it costs less than the launches that stacking saves it (about ten: its norm
#: and clipped-sum kernels): its saved tensors and output gradient may hold at most this many bytes per device type,
#: the bytes copied in the host time of ten launches (CPU: ~10 GB/s for ~10 µs each; CUDA, estimated for an H200:
#: ~4 TB/s for ~5 µs), for other device types too. A ViT-B/16 Linear call at batch 64 in bf16 (39–97 MB of input and
#: output gradient) is stacked on a GPU; vit_tiny's at batch 64 on a CPU (6–16 MB) is not, a launch-bound copy's (a
#: few KB) is.
STACK_CALL_BYTES = {"cpu": 10 * 100_000, "cuda": 10 * 20_000_000}


@dataclass(eq=False)
class _Stack:
    """Calls of one rule whose norms and clipped sums are computed together: their saved tensors and output
    gradients, stacked along dim 0 when there are several (``LayerRule.stack_key``), the names of the parameters the
    rule clips, and the cache its norms left."""

    sites: list[Site]
    names: list[str]
    saved: tuple[Tensor, ...]
    g: Tensor | None
    cache: Any = None

    @classmethod
    def of(cls, records: list[Record], names: list[str]) -> _Stack:
        if len(records) == 1:
            saved, g = records[0].saved, records[0].g
        else:
            saved = tuple(torch.cat(parts) for parts in zip(*(rec.saved for rec in records)))
            g = torch.cat([rec.g for rec in records])
        for rec in records:  # only the stack holds them now
            rec.saved, rec.g = (), None
        return cls([rec.site for rec in records], names, saved, g)

    def per_call(self, rows: Tensor) -> list[Tensor]:
        """``rows`` (one per stacked example) split into each call's."""
        return [rows] if len(self.sites) == 1 else list(rows.chunk(len(self.sites)))


def _worth_stacking(rec: Record, size: int) -> bool:
    """Whether stacking ``rec`` (``size`` bytes to copy and work on) costs less than the launches that saves (see
    ``STACK_CALL_BYTES``)."""
    return size <= STACK_CALL_BYTES.get(rec.g.device.type, STACK_CALL_BYTES["cuda"])


def _stacks(records: list[Record], sizes: dict[int, int], budget: int) -> list[list[Record]]:
    """``records`` of one stack key in runs of at most ``budget`` bytes (a record larger than that alone); ``sizes``:
    each record's bytes, by ``id``."""
    runs: list[list[Record]] = [[]]
    size = 0
    for rec in records:
        size += sizes[id(rec)]
        if runs[-1] and size > budget:
            runs.append([])
            size = sizes[id(rec)]
        runs[-1].append(rec)
    return runs


@dataclass
class _ClippingWork:
    """One backward's clipped parameters, split by how their norms and clipped sums are computed: by the layer rule
    from the saved (x, g) (large weights: ghost norms or instantiation), or from per-example gradients (parameters
    of eager rules and units, small ones such as biases, and parameters used several times in one pass, whose
    per-example gradients are summed over their uses first)."""

    #: calls whose rule computes the norms and sums of their ``names``, stacked where their rule allows
    ruled: list[_Stack] = field(default_factory=list)
    #: (B,) squared norms of the per-example gradients of ``ruled``'s parameters
    ruled_sq: list[tuple[nn.Parameter, Tensor]] = field(default_factory=list)
    #: per-example gradients (B, *p.shape) of all the other parameters
    examples: list[tuple[nn.Parameter, Tensor]] = field(default_factory=list)

    @classmethod
    def collect(cls, records: list[Record]) -> _ClippingWork:
        work = cls()
        uses: dict[int, int] = defaultdict(int)  # by id; frozen since attaching: 0, so neither clipped nor summed
        for rec in records:
            for p in rec.site.params.values():
                uses[id(p)] += p.requires_grad
        multi: dict[nn.Parameter, Tensor] = {}
        stackable: dict[Any, list[Record]] = defaultdict(list)
        held = sum(held_bytes(rec.saved, rec.g) for rec in records if not rec.per_sample)
        sizes = {id(rec): rec.site.rule.stack_bytes(rec.site.module, rec.saved, rec.g)
                 for rec in records if not rec.per_sample}
        for rec in records:
            site = rec.site
            single = [n for n, p in site.params.items() if uses[id(p)] == 1]
            repeated = [n for n, p in site.params.items() if uses[id(p)] > 1]
            if rec.per_sample:
                grads = rec.per_sample
            else:
                small = [n for n in single if n in site.rule.per_example_params]
                ruled = [n for n in single if n not in small]
                if ruled and not repeated:  # a call that no other may join is keyed by itself
                    worth = _worth_stacking(rec, sizes[id(rec)])
                    key = site.rule.stack_key(site.module, rec.saved, rec.g) if worth else None
                    stackable[(site.rule, tuple(ruled), tuple(small), rec if key is None else key)].append(rec)
                    continue
                if ruled:
                    work.add(_Stack.of([rec], ruled), [])
                    single = small
                wanted = single + repeated
                grads = site.rule.per_sample(site.module, rec.saved, rec.g, wanted) if wanted else {}
            work.examples += [(site.params[n], grads[n]) for n in single]
            for n in repeated:
                p = site.params[n]
                multi[p] = grads[n] if p not in multi else multi[p] + grads[n]
        budget = max(STACK_BYTES, int(held * STACK_FRACTION))
        for (_, names, small, _), same in stackable.items():
            for run in _stacks(same, sizes, budget):
                work.add(_Stack.of(run, list(names)), list(small))
        work.examples += multi.items()
        return work

    def add(self, stack: _Stack, small: list[str]) -> None:
        """Take the norms of ``stack``'s ruled parameters, and the per-example gradients of its ``small`` ones."""
        site = stack.sites[0]
        norms, stack.cache = site.rule.norms(site.module, stack.saved, stack.g, stack.names)
        self.ruled.append(stack)
        for n in stack.names:
            self.ruled_sq += zip((s.params[n] for s in stack.sites), stack.per_call(norms[n]))
        if small:
            grads = site.rule.per_sample(site.module, stack.saved, stack.g, small)
            for n in small:
                self.examples += zip((s.params[n] for s in stack.sites), stack.per_call(grads[n]))

    @functools.cached_property
    def blocks(self) -> list[tuple[list[nn.Parameter], Tensor]]:
        """``examples`` as blocks whose norms and sums are computed together: (parameters, their per-example
        gradients side by side, (B, N)); see ``BLOCK_NUMEL``."""
        shared: dict[torch.device, list[tuple[nn.Parameter, Tensor]]] = defaultdict(list)
        alone = []
        for p, grad in self.examples:
            if grad.numel() <= BLOCK_NUMEL * grad.shape[0]:  # per example (the batch is not empty here)
                shared[grad.device].append((p, grad))
            else:
                alone.append([(p, grad)])
        blocks = []
        for block in [*shared.values(), *alone]:
            flat = [grad if grad.dim() == 2 else grad.reshape(grad.shape[0], -1) for _, grad in block]
            blocks.append(([p for p, _ in block], flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)))
        return blocks

    def sq_norms(self, flat: bool) -> list[tuple[list[nn.Parameter], Tensor]]:
        """(parameters, (B,) sum of their squared per-example norms): one entry per parameter, or (``flat``, when
        only the total counts) one per block of per-example gradients."""
        sq = [([p], v) for p, v in self.ruled_sq]
        if flat:
            return sq + [(params, sq_norm(grads)) for params, grads in self.blocks]
        return sq + [([p], sq_norm(grad)) for p, grad in self.examples]

    @property
    def params(self) -> list[nn.Parameter]:
        """The parameters :meth:`clipped_sums` yields a sum for."""
        return [p for p, _ in self.ruled_sq] + [p for p, _ in self.examples]

    def clipped_sums(self, factors: dict[nn.Parameter, Tensor], flat: bool) -> Iterator[tuple[nn.Parameter, Tensor]]:
        """``(p, sum_i factor_i G_i)`` for every clipped parameter (``flat``: one factor for all): the small ones
        first, then stack by stack in backward order, each stack's saved inputs and output gradients freed as soon
        as its sums are taken (a consumer that hands each sum on at once holds one stack's sums at a time)."""
        if not flat:
            yield from ((p, weighted_sum(factors[p], grad)) for p, grad in self.examples)
        else:
            for params, grads in self.blocks:  # one GEMV for each block
                total = weighted_sum(factors[params[0]], grads)
                yield from zip(params, total.split([p.numel() for p in params]))
        while self.ruled:
            stack = self.ruled.pop(0)
            sites, rule, module = stack.sites, stack.sites[0].rule, stack.sites[0].module
            if len(sites) == 1:
                wanted = {n: factors[sites[0].params[n]] for n in stack.names}
                sums = {n: [s] for n, s in rule.clipped_sum(module, stack.saved, stack.g, wanted, stack.cache).items()}
            else:
                wanted = {n: torch.cat([factors[s.params[n]] for s in sites]) for n in stack.names}
                sums = rule.stacked_clipped_sum(module, stack.saved, stack.g, wanted, stack.cache, len(sites))
            stack.saved, stack.g, stack.cache = (), None, None
            for n, per_call in sums.items():
                yield from zip((s.params[n] for s in sites), per_call)


def _release_frozen(records: list[Record]) -> None:
    """Drop the pending sums of parameters frozen since: the optimizer never releases them (nothing is lost, since
    nothing of them was released), and they must not block later logical batches."""
    for rec in records:
        for p in rec.site.params.values():
            if not p.requires_grad:
                p.summed_grad = None


def _accumulate(sums: Iterable[tuple[nn.Parameter, Tensor]], params: Sequence[nn.Parameter] = ()) -> None:
    """Add each sum to its ``p.summed_grad``, which the engine owns: a logical batch's first sum is kept as it is,
    later ones are added in place, all in one foreach kernel (``params``, those summed, is not needed here)."""
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


def _args(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: tuple) -> list[Any]:
    """A function call's arguments by position or keyword, in the order of ``names``."""
    return [args[i] if i < len(args) else kwargs.get(n, d) for i, (n, d) in enumerate(zip(names, defaults))]
