"""Batch provenance: which tensors of a model call carry its examples, and where, decided by where they come from.

During every call of the user's model a :class:`BatchTracker` (a ``TorchFunctionMode``) follows each tensor derived
from the call's batch inputs (its :class:`~opacus_fast.engine.layout.Batch` layout) and each tensor that depends on
trainable parameters without depending on the batch (:class:`Shared`: a class token, a position table, a layer
scale, a rule layer's output on a position index). Nothing is decided by sizes, so a position table whose length
happens to equal the batch size is never mistaken for examples.

Where a shared tensor first meets the batch (``x + pos_embed``, ``cat([cls_token.expand(B, -1, -1), x])``,
``x * gamma``, ``F.linear(x, weight)``), the meeting is rewritten so that autograd hands back one gradient per
example: the shared operand is expanded along the examples through a *gate*, whose backward receives the
per-example cotangents and carries them, with one batched vector-Jacobian product, back to the shared tensor's
*roots*: per-call aliases of the parameters, and the outputs of rule layers called on batch-less inputs. Gates
return no ordinary gradient, so a root that still receives one is used by something other than examples (a loss
term on a parameter) and is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import refusals
from .layout import (
    BROADCASTING,
    JOINING,
    MATMUL,
    WHOLE,
    Batch,
    Layout,
    Op,
    Untracked,
    Whole,
    aligned_dim,
    describe_op,
    has_rule,
    is_inplace,
    op_name,
    output_layouts,
    source_dim,
)

if TYPE_CHECKING:
    from .bk import BKEngine

Tensor = torch.Tensor
_TAG = "_opacus_fast_tag"
#: calls that return no tensor: never worth a look
_METADATA = frozenset({
    "size", "dim", "numel", "nelement", "stride", "storage_offset", "is_contiguous", "data_ptr", "element_size",
    "__len__", "__format__", "__repr__", "__bool__", "__int__", "__float__", "__index__", "item", "tolist", "equal",
    "is_floating_point", "is_complex", "get_device", "untyped_storage", "__hash__", "ndimension", "shape", "dtype", "device", "requires_grad", "is_leaf", "grad_fn", "ndim", "layout", "is_cuda", "names",
    "is_sparse", "is_quantized", "is_meta", "data", "grad", "_version", "__reduce_ex__", "__deepcopy__",
})
#: the most elements of the per-example cotangents of a shared tensor whose rows meet the examples one by one
_ROWS_LIMIT = 1 << 25
#: Python functions of torch whose body uses parameters through other torch functions: followed inside
_TRANSPARENT = (F.multi_head_attention_forward,)


# ---- roots and tags -------------------------------------------------------------------------------------------------
class Root:
    """A tensor whose per-example cotangents are collected: a parameter's per-call alias, or the output of a rule
    layer called on a batch-less input. ``per_example`` is ``(B, *tensor.shape)``; ``rows`` (rule outputs only) is a
    cotangent of ``tensor``'s own shape whose dim 0 rows are the examples (the output met the batch row by row)."""

    def __init__(self, call: ModelCall, name: str) -> None:
        self.call = call
        self.name = name
        self.tensor: Tensor | None = None
        #: the parameter, for a parameter's alias
        self.param: nn.Parameter | None = None
        #: whether the tensor may meet the examples row by row (a rule layer's output: its rows are its input's)
        self.rows_ok = False
        self.per_example: Tensor | None = None
        self.rows: Tensor | None = None

    def add(self, cot: Tensor) -> None:
        self.per_example = cot if self.per_example is None else self.per_example + cot

    def add_rows(self, cot: Tensor) -> None:
        self.rows = cot if self.rows is None else self.rows + cot


@dataclass(frozen=True, slots=True)
class Shared:
    """Depends on trainable parameters (through ``roots``) and not on the batch. ``source``: the shared tensor this
    one is an expansion of (``expand``, ``repeat`` of size-1 dims), with the number of dims the expansion added."""

    roots: tuple[Root, ...]
    source: tuple[Tensor, int] | None = None


Tag = Layout | Shared


class _Stamp:
    """A tensor's tag, with the model call it belongs to (tags of earlier calls are stale)."""

    __slots__ = ("call", "tag")

    def __init__(self, call: ModelCall, tag: Tag) -> None:
        self.call, self.tag = call, tag


# ---- gates ------------------------------------------------------------------------------------------------------------
class ParamAlias(torch.autograd.Function):
    """A parameter as the model call sees it: its per-example gradient is collected, no ordinary one may arrive."""

    @staticmethod
    def forward(ctx, root: Root, p: Tensor, anchor: Tensor) -> Tensor:
        ctx.set_materialize_grads(False)
        ctx.root = root
        return p.view_as(p)

    @staticmethod
    def backward(ctx, g: Tensor | None):
        root = ctx.root
        engine = root.call.engine
        if engine.computes_param_grads():
            if g is not None:
                raise refusals.used_without_examples(root.name)
            root.call.release_param(root)
        return None, None, None


class BroadcastGate(torch.autograd.Function):
    """``src`` (size 1 at ``dim`` after ``lead`` leading dims are added) expanded to the batch at ``dim``: its
    gradient arrives per example and goes to ``src``'s roots; no ordinary gradient goes back."""

    @staticmethod
    def forward(ctx, call: ModelCall, src: Tensor, lead: int, dim: int) -> Tensor:
        ctx.set_materialize_grads(False)
        ctx.call, ctx.src, ctx.dim = call, src, dim
        shape = [1] * lead + list(src.shape)
        view = src.reshape(shape)
        shape[dim] = call.batch
        return view.expand(shape)

    @staticmethod
    def backward(ctx, g: Tensor | None):
        call = ctx.call
        if g is not None and call.engine.computes_param_grads():
            cot = g.movedim(ctx.dim, 0).reshape((call.batch, *ctx.src.shape))
            call.contribute(ctx.src, cot)
        return None, None, None, None


class RowGate(torch.autograd.Function):
    """A rule layer's output on a batch-less input whose dim 0 meets the examples row by row (e.g. token type
    embeddings of an all-zero (B, T) index): its gradient rows are the examples'."""

    @staticmethod
    def forward(ctx, root: Root, y: Tensor) -> Tensor:
        ctx.set_materialize_grads(False)
        ctx.root = root
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g: Tensor | None):
        if g is not None and ctx.root.call.engine.computes_param_grads():
            ctx.root.add_rows(g)
        return None, None


class WholeGate(torch.autograd.Function):
    """A shared tensor meeting a batch of one example: its whole gradient is that example's."""

    @staticmethod
    def forward(ctx, call: ModelCall, src: Tensor) -> Tensor:
        ctx.set_materialize_grads(False)
        ctx.call, ctx.src = call, src
        return src.view_as(src)

    @staticmethod
    def backward(ctx, g: Tensor | None):
        if g is not None and ctx.call.engine.computes_param_grads():
            ctx.call.contribute(ctx.src, g.unsqueeze(0))
        return None, None


class RowsGate(torch.autograd.Function):
    """A shared tensor whose dim ``dim`` meets the examples row by row (``lay`` says which rows are whose): example
    i's cotangent is the gradient with every other example's rows zeroed."""

    @staticmethod
    def forward(ctx, call: ModelCall, src: Tensor, dim: int, lay: Batch) -> Tensor:
        ctx.set_materialize_grads(False)
        ctx.call, ctx.src, ctx.dim, ctx.lay = call, src, dim, lay
        return src.view_as(src)

    @staticmethod
    def backward(ctx, g: Tensor | None):
        call = ctx.call
        if g is not None and call.engine.computes_param_grads():
            lay, b = ctx.lay, call.batch
            owner = torch.eye(b, dtype=g.dtype, device=g.device)  # (example, example of the row)
            owner = owner.view(b, 1, b, 1).expand(b, lay.outer, b, lay.inner).reshape(b, -1)
            shape = [b] + [1] * g.dim()
            shape[ctx.dim + 1] = owner.shape[1]
            call.contribute(ctx.src, g.unsqueeze(0) * owner.view(shape))
        return None, None, None, None


class ExampleGate(torch.autograd.Function):
    """``src`` repeated per example, ``(B, *src.shape)``, for an operation run per example (vmapped)."""

    @staticmethod
    def forward(ctx, call: ModelCall, src: Tensor) -> Tensor:
        ctx.set_materialize_grads(False)
        ctx.call, ctx.src = call, src
        return src.unsqueeze(0).expand(call.batch, *src.shape)

    @staticmethod
    def backward(ctx, g: Tensor | None):
        call = ctx.call
        if g is not None and call.engine.computes_param_grads():
            call.contribute(ctx.src, g)
        return None, None


# ---- one call of the model ------------------------------------------------------------------------------------------
class ModelCall:
    """The state of one call of the user's model: its batch size, the tags of its tensors, its roots."""

    def __init__(self, engine: BKEngine, batch: int) -> None:
        self.engine = engine
        self.batch = batch
        self._aliases: dict[int, Tensor] = {}

    # tags
    def tag(self, t: Any) -> Tag | None:
        stamp = getattr(t, _TAG, None) if isinstance(t, Tensor) else None
        return stamp.tag if stamp is not None and stamp.call is self else None

    @staticmethod
    def of(tensors: Sequence[Any]) -> ModelCall | None:
        """The model call that tagged any of ``tensors`` (None if none was tagged)."""
        for t in tensors:
            stamp = getattr(t, _TAG, None) if isinstance(t, Tensor) else None
            if stamp is not None:
                return stamp.call
        return None

    def set(self, t: Tensor, tag: Tag | None) -> None:
        if tag is not None:
            setattr(t, _TAG, _Stamp(self, tag))
        elif getattr(t, _TAG, None) is not None:
            delattr(t, _TAG)

    # roots
    def alias(self, p: nn.Parameter) -> Tensor:
        """The per-call alias of a trainable parameter, whose per-example gradient is collected."""
        alias = self._aliases.get(id(p))
        if alias is None:
            root = Root(self, self.engine.param_name(p))
            root.param = self.engine.parameter(p)
            alias = ParamAlias.apply(root, p, self.engine.anchor)
            root.tensor = alias
            self.set(alias, Shared((root,)))
            self._aliases[id(p)] = alias
        return alias

    def release_param(self, root: Root) -> None:
        """A parameter's alias is done (its backward ran after every use): hand its per-example gradient over."""
        if root.per_example is not None:
            self.engine.record_param(root.param, root.per_example)
            root.per_example = None

    def contribute(self, src: Tensor, cot: Tensor) -> None:
        """Carry ``cot`` (``(B, *src.shape)``, example i's cotangent of ``src`` at i) to ``src``'s roots."""
        tag = self.tag(src)
        roots = tag.roots if isinstance(tag, Shared) else ()
        for root in roots:
            if root.tensor is src:
                root.add(cot)
                return
        wanted = [r for r in roots if r.tensor is not None and r.tensor.requires_grad]
        if not wanted:
            return
        grads = torch.autograd.grad(
            src, [r.tensor for r in wanted], cot, is_grads_batched=True, retain_graph=True, allow_unused=True
        )
        for root, grad in zip(wanted, grads):
            if grad is not None:
                root.add(grad)


class _Paused:
    """The context of :meth:`BatchTracker.paused` (a class, not a generator: it is entered several times per layer)."""

    __slots__ = ("popped", "tracker")

    def __init__(self, tracker: BatchTracker) -> None:
        self.tracker = tracker
        self.popped = False

    def __enter__(self) -> None:
        tracker = self.tracker
        if torch._C._len_torch_function_stack() and torch.overrides._get_current_function_mode() is tracker:
            torch._C._pop_torch_function_stack()
            self.popped = True
        else:
            tracker._paused += 1

    def __exit__(self, *exc: object) -> None:
        if self.popped:
            torch._C._push_on_torch_function_stack(self.tracker)
        else:
            self.tracker._paused -= 1


# ---- the tracker ----------------------------------------------------------------------------------------------------
class BatchTracker(TorchFunctionMode):
    """Follows the batch through every torch operation of a model call and rewrites where shared tensors meet it."""

    def __init__(self, engine: BKEngine) -> None:
        super().__init__()
        self.engine = engine
        self.call: ModelCall | None = None
        self._paused = 0

    def paused(self) -> _Paused:
        """Leave the operations inside untracked (the engine's own computations): the mode is taken off the stack
        when it is on top (then torch does not call it at all), else told to pass them through."""
        return _Paused(self)

    @contextmanager
    def model_call(self, args: tuple, kwargs: dict, batch_dim: int, rows: int | None) -> Iterator[ModelCall | None]:
        """Track one call of the whole model: its tensor arguments with the batch size are its examples."""
        if self.call is not None:  # a nested call of the model (e.g. wrapper and hooks): the outer one tracks
            yield self.call
            return
        roots = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor) and t.dim() > 0]
        dims = [min(batch_dim, t.dim() - 1) for t in roots]
        sizes = [t.shape[d] for t, d in zip(roots, dims)]
        if not roots:
            yield None
            return
        batch = rows if rows is not None and rows in sizes else sizes[0]
        call = ModelCall(self.engine, batch)
        for t, d, size in zip(roots, dims, sizes):
            if size == batch and not isinstance(t, nn.Parameter):
                call.set(t, WHOLE if batch == 1 else Batch(d))
        self.call = call
        try:
            with self:
                yield call
        finally:
            self.call = None

    @contextmanager
    def resumed(self, call: ModelCall) -> Iterator[None]:
        """Track a recomputation (activation checkpointing) of part of ``call`` during backward: the same tags and
        gates, so that the recomputed tensors match those the forward saved."""
        if self.call is not None:
            yield
            return
        self.call = call
        try:
            with self:
                yield
        finally:
            self.call = None

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        call = self.call
        if call is None or self._paused:
            return func(*args, **kwargs)
        name = op_name(func)
        if name in _METADATA:
            return func(*args, **kwargs)
        found = self._scan(call, args, kwargs)
        if not found:
            return func(*args, **kwargs)
        if len(found) == 1 and type(found[0][1]) is Batch and call.batch != 1 and func not in _TRANSPARENT:
            out = func(*args, **kwargs)  # the usual case: one operand from the batch, no parameter, nothing shared
            self._tag_outputs(call, func, name, args, kwargs, out, found, ())
            return out
        grad = torch.is_grad_enabled()
        if grad and func in _TRANSPARENT:
            return self._transparent(func, args, kwargs)
        if grad and any(tag is None for _, tag in found):  # trainable parameters used directly
            out = self.engine.capture_functional(func, args, kwargs, call)
            if out is not None:
                return out
            args, kwargs, found = self._alias_params(call, args, kwargs, found)
        batch = [(t, tag) for t, tag in found if isinstance(tag, (Batch, Untracked, Whole))]
        shared = [(t, tag) for t, tag in found if isinstance(tag, Shared) and t.requires_grad]
        if call.batch == 1 and batch:
            return self._one_example(call, func, args, kwargs, shared if grad else [])
        if grad and shared and batch:
            return self._meet(call, func, name, args, kwargs, batch, shared)
        out = func(*args, **kwargs)
        self._tag_outputs(call, func, name, args, kwargs, out, batch, shared)
        return out

    # ---- scanning and tagging ---------------------------------------------------------------------------------------
    def _scan(self, call: ModelCall, args: tuple, kwargs: dict) -> list[tuple[Tensor, Tag | None]]:
        """The operands that matter: tagged tensors of this call, and trainable parameters (tag None)."""
        found: list[tuple[Tensor, Tag | None]] = []
        params = self.engine.known
        for a in (*args, *kwargs.values()) if kwargs else args:
            if isinstance(a, Tensor):
                _note(found, call, params, a)
            elif isinstance(a, (list, tuple)):
                for t in a:
                    if isinstance(t, Tensor):
                        _note(found, call, params, t)
        return found

    def _alias_params(self, call: ModelCall, args: tuple, kwargs: dict, found: list) -> tuple[tuple, dict, list]:
        """Replace trainable parameters by their per-call aliases."""
        mapping = {id(t): call.alias(t) for t, tag in found if tag is None}
        args, kwargs = _replace(args, kwargs, mapping)
        found = [(mapping[id(t)], call.tag(mapping[id(t)])) if tag is None else (t, tag) for t, tag in found]
        return args, kwargs, found

    def _one_example(self, call: ModelCall, func: Callable, args: tuple, kwargs: dict, shared: list) -> Any:
        """A batch of one example: every result derived from it is its own; shared operands pass through a gate
        that hands their whole gradient to the example."""
        if shared:
            self.engine.watch_checkpointing()
            with self.paused():
                mapping = {id(t): WholeGate.apply(call, t) for t, _ in shared}
            args, kwargs = _replace(args, kwargs, mapping)
        out = func(*args, **kwargs)
        for t in _tensors(out) or ([args[0]] if op_name(func) == "__setitem__" else []):
            call.set(t, WHOLE)
        return out

    def _tag_outputs(self, call, func, name, args, kwargs, out, batch, shared) -> None:
        outs = _tensors(out) if out is not None else ([args[0]] if name == "__setitem__" else [])
        if not outs:
            return
        if len(batch) > 1:  # an operand whose rows mix examples may not meet one that keeps them apart
            mixed = next((tag for _, tag in batch if isinstance(tag, Untracked) and tag.mixed), None)
            if mixed is not None and any(isinstance(tag, Batch) for _, tag in batch):
                raise refusals.mixes_examples(describe_op(func), mixed.why)
        if batch:
            if len(batch) == 1 and len(outs) == 1 and isinstance(batch[0][1], Batch) and not has_rule(func, name) \
                    and outs[0].shape == batch[0][0].shape:  # the common elementwise case: layout unchanged
                call.set(outs[0], batch[0][1])
                return
            layouts = output_layouts(Op(func, name, args, kwargs, outs, {id(t): tag for t, tag in batch}, call.batch))
            for t, lay in zip(outs, layouts):
                call.set(t, lay)
            return
        if shared:
            roots = tuple(dict.fromkeys(r for _, tag in shared for r in tag.roots))
            source = None
            if name in ("expand", "expand_as", "broadcast_to", "repeat") and len(shared) == 1 and len(outs) == 1:
                src = shared[0][0]
                source = (src, outs[0].dim() - src.dim())
            for t in outs:
                call.set(t, Shared(roots, source) if t.requires_grad else None)
        elif is_inplace(name) or name == "__setitem__":
            call.set(outs[0], None)

    # ---- meetings -------------------------------------------------------------------------------------------------
    def _meet(self, call, func, name, args, kwargs, batch, shared) -> Any:
        self.engine.watch_checkpointing()
        for t, lay in batch:
            if isinstance(lay, Untracked):
                raise refusals.meets_untracked(describe_op(func), lay.why)
        if is_inplace(name) and args and any(t is args[0] for t, _ in shared):
            raise refusals.shared_modified(describe_op(func))
        if name in BROADCASTING:
            result = self._meet_broadcast(call, func, name, args, kwargs, batch, shared)
        elif name in JOINING:
            result = self._meet_join(call, func, name, args, kwargs, batch, shared)
        elif name in MATMUL or func is F.scaled_dot_product_attention:
            result = self._meet_leading(call, func, name, args, kwargs, batch, shared)
        else:
            result = None
        if result is None:
            result = self._meet_vmap(call, func, name, args, kwargs, batch, shared)
        return result

    def _run(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        with self.paused():
            return func(*args, **kwargs)

    def _gate(self, call: ModelCall, src: Tensor, dim: int, out_rank: int, lay: Batch, size: int) -> Tensor | None:
        """``src`` as a tensor that meets the batch at output dim ``dim`` (``src`` right-aligned to ``out_rank``),
        expanded along the examples through a gate; None if it cannot be (the caller refuses or runs per example)."""
        a = source_dim(dim, src.dim(), out_rank)
        if a is not None and src.shape[a] not in (1, size):
            return None  # the operation itself rejects these shapes
        if a is not None and src.shape[a] == size:
            return self._gate_rows(call, src, a, dim, out_rank, lay, size)
        lead = 0 if a is not None else out_rank - src.dim()
        with self.paused():
            gated = BroadcastGate.apply(call, src, lead, dim - (out_rank - src.dim() - lead))
            return _unfold(gated, dim - (out_rank - src.dim() - lead), lay)

    def _gate_all(self, call: ModelCall, shared: list, batch: list, lay: Batch, rank: int) -> dict | None:
        """Each shared operand gated to meet the batch at dim ``lay.dim`` of an output of rank ``rank``, by ``id``
        (None if one cannot be)."""
        size = next(t.shape[tag.dim] for t, tag in batch)
        mapping = {}
        for t, _ in shared:
            gated = self._gate(call, t, lay.dim, rank, lay, size)
            if gated is None:
                return None
            mapping[id(t)] = gated
        return mapping

    def _gate_rows(self, call, src, a, dim, out_rank, lay, size) -> Tensor | None:
        """``src`` already has the batch's size where it meets the examples: an expansion of a size-1 dim (gate its
        source), or a rule layer's output whose rows are the examples (row gate)."""
        tag = call.tag(src)
        if tag.source is not None:
            inner, lead = tag.source
            inner_dim = a - lead
            if inner_dim < 0 or inner.shape[inner_dim] == 1:
                gated = self._gate(call, inner, dim, out_rank, lay, size)
                if gated is not None:
                    with self.paused():
                        return gated.expand(src.shape)
        if src.stride(a) == 0:
            with self.paused():
                narrowed = src.narrow(a, 0, 1)
            call.set(narrowed, tag)
            if call.batch * narrowed.numel() * size <= 1 << 26:
                gated = self._gate(call, narrowed, dim, out_rank, lay, size)
                if gated is not None:
                    with self.paused():
                        return gated.expand(src.shape)
        root = next((r for r in tag.roots if r.tensor is src and r.rows_ok), None)
        if root is not None and a == 0 and lay.outer == 1 and lay.inner == 1:
            with self.paused():
                return RowGate.apply(root, src)
        if call.batch * src.numel() > _ROWS_LIMIT:
            raise refusals.shared_rows(call.engine.describe_roots(tag.roots))
        with self.paused():
            return RowsGate.apply(call, src, a, lay)

    def _meet_broadcast(self, call, func, name, args, kwargs, batch, shared) -> Any:
        shapes = [t.shape for t in _all_tensors(args, kwargs)]
        try:
            out_rank = len(torch.broadcast_shapes(*shapes))
        except RuntimeError:
            return self._run(func, args, kwargs)  # let the operation raise its own error
        found = {lay.moved(aligned_dim(lay.dim, t.dim(), out_rank)) for t, lay in batch}
        if len(found) != 1:
            return None
        lay = found.pop()
        mapping = self._gate_all(call, shared, batch, lay, out_rank)
        if mapping is None:
            return None
        new_args, new_kwargs = _replace(args, kwargs, mapping)
        out = self._run(func, new_args, new_kwargs)
        for o in _tensors(out) or [new_args[0]]:
            call.set(o, lay)
        return out

    def _meet_join(self, call, func, name, args, kwargs, batch, shared) -> Any:
        tensors = args[0] if args else kwargs["tensors"]
        lays = {lay for _, lay in batch}
        if len(lays) != 1 or len({t.dim() for t in tensors}) != 1:
            return None
        lay = lays.pop()
        rank = tensors[0].dim()
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        dim = dim + rank + (name == "stack") if dim < 0 else dim
        if name != "stack" and dim == lay.dim:
            raise refusals.shared_rows(call.engine.describe_roots([r for _, t in shared for r in t.roots]))
        mapping = self._gate_all(call, shared, batch, lay, rank)
        if mapping is None:
            return None
        new_tensors = [mapping.get(id(t), t) for t in tensors]
        new_args = (new_tensors, *args[1:]) if args else args
        new_kwargs = {**kwargs, "tensors": new_tensors} if "tensors" in kwargs else kwargs
        out = self._run(func, new_args, new_kwargs)
        call.set(out, lay.moved(lay.dim + (name == "stack" and lay.dim >= dim)))
        return out

    def _meet_leading(self, call, func, name, args, kwargs, batch, shared) -> Any:
        """Operations batched over their operands' leading dims (all but the last two): matmul, and attention
        (query, key, value and mask). Where the examples sit in those leading dims, each shared operand gets them
        there through a gate (else the operation runs per example)."""
        operands = _all_tensors(args, kwargs)
        if any(t.dim() < 2 for t in operands):
            return None
        lead_rank = max(t.dim() for t in operands) - 2
        found = set()
        for t, lay in batch:
            if lay.dim >= t.dim() - 2:  # the examples are rows or columns
                return None
            found.add(lay.moved(aligned_dim(lay.dim, t.dim() - 2, lead_rank)))
        if len(found) != 1:
            return None
        lay = found.pop()
        if any(p.dim() - 2 > lead_rank for p, _ in shared):
            return None
        mapping = self._gate_all(call, shared, batch, lay, lead_rank + 2)
        if mapping is None:
            return None
        new_args, new_kwargs = _replace(args, kwargs, mapping)
        out = self._run(func, new_args, new_kwargs)
        for o in _tensors(out):
            call.set(o, lay.moved(aligned_dim(lay.dim, lead_rank, o.dim() - 2)))
        return out

    def _meet_vmap(self, call, func, name, args, kwargs, batch, shared) -> Any:
        """Any other meeting: the operation runs per example (vmapped), each example with its own view of the shared
        operands, whose per-example gradients the gates collect."""
        dims = {lay.dim for _, lay in batch}
        if len(dims) != 1:
            raise refusals.meets_untracked(describe_op(func), "its operands hold the examples in different places")
        lay_dims = {(lay.dim, lay.outer, lay.inner) for _, lay in batch}
        if len(lay_dims) != 1:
            raise refusals.meets_untracked(describe_op(func), "its operands hold the examples in different places")
        dim, outer, inner = lay_dims.pop()
        if call.batch == 0:  # nothing to run per example: the shared operands get no gradient
            mapping = {id(t): t.detach() for t, _ in shared}
            new_args, new_kwargs = _replace(args, kwargs, mapping)
            out = self._run(func, new_args, new_kwargs)
            for o in _tensors(out):
                call.set(o, Batch(dim, outer, inner))
            return out
        mapped: list[Tensor] = []
        in_dims: list[int] = []
        for t, _ in batch:  # each example keeps the batch dim, with its own rows (outer * inner of them)
            mapped.append(t.unflatten(dim, (outer, call.batch, inner)))
            in_dims.append(dim + 1)
        with self.paused():
            for t, _ in shared:
                mapped.append(ExampleGate.apply(call, t))
                in_dims.append(0)
        positions = {id(t): k for k, (t, _) in enumerate([*batch, *shared])}

        def one(*items: Tensor) -> Any:
            fixed = [x.flatten(dim, dim + 1) if k < len(batch) else x for k, x in enumerate(items)]
            mapping = {tid: fixed[k] for tid, k in positions.items()}
            a, kw = _replace(args, kwargs, mapping)
            return func(*a, **kw)

        with self.paused():
            out = torch.func.vmap(one, in_dims=tuple(in_dims), out_dims=dim, randomness="different")(*mapped)
            out = _refold(out, dim, outer, inner) if isinstance(out, Tensor) else type(out)(
                _refold(o, dim, outer, inner) for o in out)
        for o in _tensors(out):
            call.set(o, Batch(dim, outer, inner))
        return out

    def _transparent(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """Run a Python function of torch with this mode active inside it, so its own parameter uses are seen."""
        module = torch.nn.functional
        original = module.has_torch_function

        def once(*a: Any) -> bool:  # the function's own dispatch check: let it run its body here
            module.has_torch_function = original
            return False

        module.has_torch_function = once
        try:
            with self:
                return func(*args, **kwargs)
        finally:
            module.has_torch_function = original


# ---- helpers --------------------------------------------------------------------------------------------------------
def _note(found: list, call: ModelCall, params: frozenset[int], t: Tensor) -> None:
    """Add ``t`` to ``found`` if it matters (see ``BatchTracker._scan``): ``call``'s tag inlined, as it runs on
    every operand of every operation."""
    stamp = getattr(t, _TAG, None)
    if stamp is not None and stamp.call is call:
        found.append((t, stamp.tag))
    elif id(t) in params and isinstance(t, nn.Parameter):
        found.append((t, None))


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [o for o in out if isinstance(o, Tensor)]
    return []


def _all_tensors(args: tuple, kwargs: dict) -> list[Tensor]:
    found = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(t for t in a if isinstance(t, Tensor))
    return found


def _replace(args: tuple, kwargs: dict, mapping: dict[int, Any]) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with the tensors whose ``id`` is in ``mapping`` replaced (one level into lists)."""
    def swap(a: Any) -> Any:
        if isinstance(a, Tensor):
            return mapping.get(id(a), a)
        if isinstance(a, (list, tuple)) and any(isinstance(t, Tensor) and id(t) in mapping for t in a):
            return type(a)(mapping.get(id(t), t) if isinstance(t, Tensor) else t for t in a)
        return a

    return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}


def _unfold(gated: Tensor, dim: int, lay: Batch) -> Tensor:
    """A gate's output (batch size at ``dim``) spread over a folded batch dim ``(outer, B, inner)``."""
    if lay.outer == 1 and lay.inner == 1:
        return gated
    b = gated.shape[dim]
    shape = list(gated.shape)
    shape[dim:dim + 1] = [lay.outer, b, lay.inner]
    return gated.unsqueeze(dim).unsqueeze(dim + 2).expand(shape).flatten(dim, dim + 2)


def _refold(out: Tensor, dim: int, outer: int, inner: int) -> Tensor:
    """A per-example result stacked at ``dim`` as ``(B, outer * inner)`` back into ``(outer, B, inner)`` order, in
    the memory layout the operation itself would have produced (models ``view`` results)."""
    return out.unflatten(dim + 1, (outer, inner)).movedim(dim + 1, dim).flatten(dim, dim + 2).contiguous()
