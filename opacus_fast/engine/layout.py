"""Where a tensor holds the examples of a model call, and how that place moves through torch operations.

A tensor derived from a model call's batch inputs has a :class:`Batch` layout: its dim ``dim`` has size
``outer * B * inner`` and, read as ``(outer, B, inner)``, example ``b`` owns index ``b`` of the middle factor. Plain
batch-first tensors are ``Batch(0)``; a sequence-first one is ``Batch(1)``; Swin's windows folded into dim 0 are
``Batch(0, inner=windows)``; ``nn.MultiheadAttention``'s ``(T * B, E)`` rows are ``Batch(0, outer=T)``. Where an
operation's effect on that place is not known, or an operation mixes examples (a reduction over the batch), the
result is :class:`Untracked`, and anything that would depend on knowing the place refuses it, naming the operation.

The rules here are pure: given an operation, its arguments, its outputs and its operands' layouts, they give the
outputs' layouts. They decide by where tensors come from, never by whether a size happens to equal the batch size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass(frozen=True, slots=True)
class Batch:
    """The examples run along the middle factor of dim ``dim``, read as ``(outer, B, inner)``."""

    dim: int
    outer: int = 1
    inner: int = 1

    def size(self, batch: int) -> int:
        return self.outer * batch * self.inner

    def moved(self, dim: int) -> Batch:
        return Batch(dim, self.outer, self.inner)


@dataclass(frozen=True, slots=True)
class Untracked:
    """Derived from the batch, but where the examples are is unknown (``mixed`` False) or they are mixed."""

    why: str
    mixed: bool = False


@dataclass(frozen=True, slots=True)
class Whole:
    """Derived from a batch of one example, which owns every element (nothing can mix, nothing needs placing)."""


WHOLE = Whole()
Layout = Batch | Untracked | Whole


def op_name(func: Callable) -> str:
    """A readable name of a torch function or method, for rules and messages (``T`` for ``x.T``)."""
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def describe_op(func: Callable) -> str:
    return f"torch operation '{op_name(func)}'"


# ---- shapes -------------------------------------------------------------------------------------------------------
def reshaped(in_shape: Sequence[int], layout: Batch, out_shape: Sequence[int], batch: int) -> Layout:
    """The layout after a reshape (view, flatten, unflatten, squeeze, ...), which keeps the row-major element order.

    In row-major order the examples' factor has stride ``inner * prod(in_shape[dim+1:])`` and extent ``batch`` times
    that. It stays whole if one output dim covers exactly a multiple of that range; then its outer and inner factors
    follow from the output dim's own stride and size.
    """
    if math.prod(in_shape) != math.prod(out_shape):
        return Untracked("reshape changed the number of elements")
    if batch == 0:  # no examples: the batch is the output's empty dim
        empty = [k for k, size in enumerate(out_shape) if size == 0]
        return Batch(empty[0]) if len(empty) == 1 else Untracked("a reshape of an empty batch")
    stride = layout.inner * math.prod(in_shape[layout.dim + 1:])
    extent = stride * batch
    for k, size in enumerate(out_shape):  # from the front: with one example, its own dim rather than a later one
        out_stride = math.prod(out_shape[k + 1:])
        top = out_stride * size
        if out_stride <= stride and top >= extent and stride % out_stride == 0 and top % extent == 0:
            return Batch(k, top // extent, stride // out_stride)
    if batch <= 1:  # one example: it owns the whole tensor, whatever the shape
        return Batch(0, 1, out_shape[0]) if out_shape else Untracked("the single example was reduced to a scalar")
    return Untracked("a reshape split the examples across dims")


def aligned_dim(dim: int, in_rank: int, out_rank: int) -> int:
    """Right-aligned broadcasting: the output dim that input dim ``dim`` lines up with."""
    return dim + out_rank - in_rank


def source_dim(out_dim: int, in_rank: int, out_rank: int) -> int | None:
    """The input dim lined up with output dim ``out_dim`` under right-aligned broadcasting (None if the input has
    fewer dims and so none there)."""
    dim = out_dim - (out_rank - in_rank)
    return dim if dim >= 0 else None


def _norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


# ---- rule helpers -------------------------------------------------------------------------------------------------
@dataclass
class Op:
    """What a rule sees: the operation, its arguments and outputs, and the layouts of its batch operands."""

    func: Callable
    name: str
    args: tuple
    kwargs: dict
    outs: list[Tensor]
    layouts: dict[int, Layout]  # id(tensor) -> layout, for the operands derived from the batch
    batch: int

    def layout(self, t: Any) -> Layout | None:
        return self.layouts.get(id(t)) if isinstance(t, Tensor) else None

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[index] if len(self.args) > index else default

    def first_layout(self) -> tuple[Tensor, Batch] | None:
        """The first positional tensor operand with a Batch layout (None if it has none)."""
        if self.args and isinstance(self.args[0], Tensor):
            lay = self.layout(self.args[0])
            if isinstance(lay, Batch):
                return self.args[0], lay
        return None

    def same(self, layout: Layout) -> list[Layout]:
        return [layout] * len(self.outs)


def _mixed(op: Op, what: str) -> list[Layout]:
    return op.same(Untracked(f"{describe_op(op.func)} {what}", mixed=True))


def _lost(op: Op, what: str = "") -> list[Layout]:
    return op.same(Untracked(f"{describe_op(op.func)}{' ' + what if what else ''}"))


def _dims_arg(value: Any, rank: int) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (_norm_dim(value, rank),)
    return tuple(_norm_dim(d, rank) for d in value)


# ---- rules --------------------------------------------------------------------------------------------------------
def _reshape(op: Op) -> list[Layout]:
    first = op.first_layout()
    if first is None:
        return _fallback(op)
    x, lay = first
    out = op.outs[0]
    if x.dtype.itemsize != out.dtype.itemsize:  # a dtype view changes the last dim only
        if lay.dim < x.dim() - 1 and tuple(x.shape[:-1]) == tuple(out.shape[:-1]):
            return [lay]
        return _lost(op)
    return [reshaped(tuple(x.shape), lay, tuple(out.shape), op.batch)]


def _permutation(op: Op) -> list[int] | None:
    """Output dim k takes input dim perm[k]."""
    x = op.args[0]
    rank = x.dim()
    name = op.name
    if name == "permute":
        dims = op.args[1:] if len(op.args) > 2 or not isinstance(op.arg(1, "dims"), (list, tuple)) else op.arg(1, "dims")
        return [_norm_dim(d, rank) for d in dims]
    if name in ("transpose", "swapaxes", "swapdims", "transpose_", "swapaxes_", "swapdims_"):
        a = _norm_dim(op.arg(1, "dim0"), rank)
        b = _norm_dim(op.arg(2, "dim1"), rank)
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    if name in ("t", "t_", "T", "H") and rank <= 2:
        return list(range(rank))[::-1]
    if name in ("mT", "mH", "adjoint"):
        perm = list(range(rank))
        perm[-1], perm[-2] = perm[-2], perm[-1]
        return perm
    if name in ("movedim", "moveaxis"):
        src = _dims_arg(op.arg(1, "source"), rank)
        dst = _dims_arg(op.arg(2, "destination"), rank)
        perm = [-1] * rank
        for s, d in zip(src, dst):
            perm[d] = s
        rest = iter(d for d in range(rank) if d not in src)
        return [p if p >= 0 else next(rest) for p in perm]
    return None


def _permute(op: Op) -> list[Layout]:
    first = op.first_layout()
    perm = _permutation(op) if first is not None else None
    if perm is None:
        return _fallback(op)
    return [first[1].moved(perm.index(first[1].dim))]


def _expand(op: Op) -> list[Layout]:
    first = op.first_layout()
    if first is None:
        return _fallback(op)
    x, lay = first
    out = op.outs[0]
    dim = aligned_dim(lay.dim, x.dim(), out.dim())
    if op.name in ("repeat", "tile"):
        if out.shape[dim] != x.shape[lay.dim]:
            return _mixed(op, "repeats the examples")
        return [lay.moved(dim)]
    if out.shape[dim] != x.shape[lay.dim]:
        return _lost(op, "expanded the batch dimension")
    return [lay.moved(dim)]


def _index_layout(x: Tensor, lay: Batch, index: Any, batch: int, out: Tensor) -> Layout | None:
    """Basic indexing (ints, slices, None, Ellipsis); None for advanced indexing (tensors, lists, bools)."""
    items = index if isinstance(index, tuple) else (index,)
    if any(not (isinstance(i, (int, slice)) or i is None or i is Ellipsis) for i in items):
        return None
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in items:
        expanded.extend([slice(None)] * (x.dim() - consumed) if i is Ellipsis else [i])
    expanded.extend([slice(None)] * (x.dim() - sum(1 for i in expanded if i is not None)))
    in_dim, out_dim = 0, 0
    for i in expanded:
        if i is None:
            out_dim += 1
            continue
        if in_dim == lay.dim:
            if isinstance(i, int):
                if batch <= 1 and lay.outer == 1 and lay.inner == 1:
                    return reshaped(tuple(x.shape), lay, tuple(out.shape), batch)
                return Untracked("indexing selects one example for all", mixed=True)
            if i.indices(x.shape[in_dim]) != (0, x.shape[in_dim], 1):
                return Untracked("indexing selects some examples only", mixed=True)
            return lay.moved(out_dim)
        in_dim += 1
        out_dim += not isinstance(i, int)
    return None


def _getitem(op: Op) -> list[Layout]:
    first = op.first_layout()
    if first is None:
        return _fallback(op)
    lay = _index_layout(first[0], first[1], op.args[1], op.batch, op.outs[0])
    return [lay] if lay is not None else _fallback(op)


def _select(op: Op) -> list[Layout]:
    """select, narrow, index_select, gather: along another dim the examples stay where they are (select removes
    its dim); along the batch dim they are mixed, unless narrow keeps them all."""
    first = op.first_layout()
    if first is None:
        return _fallback(op)
    x, lay = first
    dim = _norm_dim(op.arg(1, "dim"), x.dim())
    out = op.outs[0]
    if dim == lay.dim:
        if op.name == "narrow" and out.shape[dim] == x.shape[dim]:
            return [lay]
        return _mixed(op, "selects along the batch dimension")
    if op.name == "select":
        return [lay.moved(lay.dim - (dim < lay.dim))]
    if op.name == "gather" and out.shape[lay.dim] != x.shape[lay.dim]:
        return _lost(op)
    return [lay]


def _cat(op: Op) -> list[Layout]:
    tensors = op.arg(0, "tensors")
    lays = [(t, op.layout(t)) for t in tensors if op.layout(t) is not None]
    if any(not isinstance(lay, Batch) for _, lay in lays):
        return _fallback(op)
    rank = max(t.dim() for t in tensors)
    dim = _norm_dim(op.arg(1, "dim", 0), rank + (op.name == "stack"))
    layouts = {lay for _, lay in lays}
    if len(layouts) != 1:
        return _lost(op, "joined tensors whose examples sit in different places")
    lay = next(iter(layouts))
    if op.name == "stack":
        return [lay.moved(lay.dim + (lay.dim >= dim))]
    if lay.dim != dim:
        return [lay]
    # joined along the examples' dim: exact when every part is examples laid out alike (e.g. two views of a batch)
    if len(lays) != len(tensors):
        return _mixed(op, "joins other rows to the examples")
    return [Batch(dim, lay.outer * len(lays), lay.inner)] if lay.inner == 1 else _lost(op)


def _split(op: Op) -> list[Layout]:
    first = op.first_layout()
    if first is None:
        return _fallback(op)
    x, lay = first
    if op.name == "unbind":
        dim = _norm_dim(op.arg(1, "dim", 0), x.dim())
        if dim == lay.dim:
            return _mixed(op, "splits the examples apart")
        return op.same(lay.moved(lay.dim - (dim < lay.dim)))
    dim = _norm_dim(op.arg(2, "dim", 0), x.dim())
    if dim == lay.dim:
        return _lost(op, "splits along the batch dimension")
    return op.same(lay)


#: reductions: the position of their dim argument, and its default (None: all dims)
_REDUCTIONS: dict[str, tuple[int, int | None]] = {
    **dict.fromkeys(("sum", "mean", "prod", "amax", "amin", "max", "min", "argmax", "argmin", "std", "var",
                     "logsumexp", "all", "any", "nansum", "nanmean", "median", "nanmedian", "count_nonzero",
                     "std_mean", "var_mean"), (1, None)),
    "norm": (2, None),
    "mode": (1, -1),
    **dict.fromkeys(("kthvalue", "topk"), (2, -1)),
}


def _reduce(op: Op) -> list[Layout]:
    first = op.first_layout()
    if first is None:
        return _fallback(op)
    x, lay = first
    if op.name in ("max", "min") and isinstance(op.arg(1, "other"), Tensor):
        return _elementwise(op)
    index, default = _REDUCTIONS[op.name]
    dims = _dims_arg(op.arg(index, "dim", default), x.dim())
    if dims is None:
        return _mixed(op, "reduces over all examples")
    if lay.dim in dims:
        return _mixed(op, "reduces over the batch dimension")
    if all(o.dim() == x.dim() for o in op.outs):  # keepdim, or topk
        return op.same(lay)
    return op.same(lay.moved(lay.dim - sum(d < lay.dim for d in dims)))


_DIMWISE = frozenset({
    "softmax", "log_softmax", "cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "sort", "argsort", "flip",
    "roll", "normalize", "cumsum_", "cumprod_", "renorm", "glu",
})


def _dimwise(op: Op) -> list[Layout]:
    """Shape-keeping operations along given dims: mixing when one of them is the batch's."""
    first = op.first_layout()
    if first is None:
        return _fallback(op)
    x, lay = first
    if op.name in ("flip", "roll"):
        dims = _dims_arg(op.arg(1 if op.name == "flip" else 2, "dims"), x.dim())
        if op.name == "roll" and dims is None:
            return _mixed(op, "rolls the flattened tensor")
    elif op.name == "normalize":
        dims = _dims_arg(op.arg(2, "dim", 1), x.dim())
    elif op.name == "renorm":
        dims = _dims_arg(op.arg(2, "dim"), x.dim())
    else:
        dims = _dims_arg(op.arg(1, "dim", -1), x.dim())
    if dims is not None and lay.dim in dims:
        if op.name == "renorm":  # renorm rescales each slice along dim: rows stay whole
            return _elementwise(op)
        return _mixed(op, "works along the batch dimension")
    return _elementwise(op)


def _matmul_dim(lay: Batch, rank: int, out_rank: int, left: bool) -> int | None:
    """Output dim of a matmul operand's batch dim (None if it is contracted)."""
    if rank < 2:
        return None
    if lay.dim == rank - (1 if left else 2):
        return None
    if lay.dim == rank - (2 if left else 1):
        return out_rank - (2 if left else 1)
    return aligned_dim(lay.dim, rank - 2, out_rank - 2)


def _matmul(op: Op) -> list[Layout]:
    out = op.outs[0]
    matrices = op.args[1:3] if op.name in ("baddbmm", "addmm", "addbmm", "addmv") else op.args[:2]
    if any(isinstance(t, Tensor) and t.dim() < 2 for t in matrices):
        return _fallback(op)
    if op.name in ("baddbmm", "addmm", "addbmm", "addmv"):
        operands = [(op.args[1], True), (op.args[2], False)]
        extra = op.args[0]
    else:
        operands = [(op.args[0], True), (op.args[1], False)]
        extra = None
    if op.name.startswith("__r"):
        operands = [(operands[1][0], True), (operands[0][0], False)]
    found: set[Layout] = set()
    for t, left in operands:
        lay = op.layout(t)
        if lay is None:
            continue
        if not isinstance(lay, Batch):
            return _fallback(op)
        dim = _matmul_dim(lay, t.dim(), out.dim(), left)
        if dim is None:
            return _mixed(op, "contracts over the batch dimension")
        found.add(lay.moved(dim))
    lay = op.layout(extra)
    if isinstance(lay, Batch):
        found.add(lay.moved(aligned_dim(lay.dim, extra.dim(), out.dim())))
    elif lay is not None:
        return _fallback(op)
    if len(found) != 1:
        return _lost(op, "combined operands whose examples sit in different places")
    return [found.pop()]


def _einsum(op: Op) -> list[Layout]:
    equation = op.args[0]
    operands = op.args[1:] if not (len(op.args) == 2 and isinstance(op.args[1], (list, tuple))) else op.args[1]
    if not isinstance(equation, str) or "..." in equation or "->" not in equation:
        return _fallback(op)
    inputs, output = equation.replace(" ", "").split("->")
    found: set[Layout] = set()
    for spec, t in zip(inputs.split(","), operands):
        lay = op.layout(t)
        if lay is None:
            continue
        if not isinstance(lay, Batch):
            return _fallback(op)
        letter = spec[lay.dim]
        if letter not in output:
            return _mixed(op, "sums over the batch dimension")
        found.add(lay.moved(output.index(letter)))
    if len(found) != 1:
        return _lost(op, "combined operands whose examples sit in different places")
    return [found.pop()]


def _leading(op: Op) -> list[Layout]:
    """Operations that keep their first operand's leading dims and change the last one (linear, embedding, ...)."""
    first = op.first_layout()
    if first is None:
        return _fallback(op)
    x, lay = first
    if op.func is not F.embedding and lay.dim == x.dim() - 1:
        return _mixed(op, "contracts over the batch dimension")
    return op.same(lay)


def _attention(op: Op) -> list[Layout]:
    q = op.args[0]
    lay = op.layout(q)
    if not isinstance(lay, Batch):
        return _fallback(op)
    if lay.dim >= q.dim() - 2:
        return _mixed(op, "attends across the batch dimension")
    return op.same(lay)


def _batch_norm(op: Op) -> list[Layout]:
    training = op.arg(5, "training", False)
    if training:
        return _mixed(op, "normalises with statistics over the batch")
    return _elementwise(op)


def _elementwise(op: Op) -> list[Layout]:
    """Right-aligned broadcasting: each output whose shape is the operands' broadcast shape gets the dim the
    operands' batch dims line up with (all must agree)."""
    operands = [(t, lay) for t, lay in _operand_layouts(op)]
    if not operands or any(not isinstance(lay, Batch) for _, lay in operands):
        return _fallback(op)
    result: list[Layout] = []
    for out in op.outs:
        found = set()
        for t, lay in operands:
            dim = aligned_dim(lay.dim, t.dim(), out.dim())
            if dim < 0 or out.shape[dim] != t.shape[lay.dim]:
                found = set()
                break
            found.add(lay.moved(dim))
        if len(found) != 1:
            return _fallback(op)
        result.append(found.pop())
    return result


def _operand_layouts(op: Op) -> list[tuple[Tensor, Layout]]:
    found = []
    for a in (*op.args, *op.kwargs.values()):
        if isinstance(a, Tensor):
            lay = op.layout(a)
            if lay is not None:
                found.append((a, lay))
        elif isinstance(a, (list, tuple)):
            found.extend((t, op.layout(t)) for t in a if isinstance(t, Tensor) and op.layout(t) is not None)
    return found


def _fallback(op: Op) -> list[Layout]:
    """Unknown operations: batch first in, batch first out. When every batch operand is plainly batch first and an
    output's dim 0 still has the batch size, that output is taken as batch first (as Opacus assumes of every layer);
    anything else is Untracked and refused where it matters."""
    operands = _operand_layouts(op)
    for _, lay in operands:
        if isinstance(lay, Untracked):
            return op.same(lay)
    if operands and all(lay == Batch(0) for _, lay in operands):
        return [Batch(0) if o.dim() > 0 and o.shape[0] == op.batch else Untracked(describe_op(op.func)) for o in op.outs]
    return _lost(op)


_BY_NAME: dict[str, Callable[[Op], list[Layout]]] = {
    **dict.fromkeys(("view", "reshape", "view_as", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze",
                     "squeeze_", "unsqueeze_", "ravel", "view_copy", "reshape_copy"), _reshape),
    **dict.fromkeys(("permute", "transpose", "swapaxes", "swapdims", "transpose_", "swapaxes_", "swapdims_", "t",
                     "t_", "T", "H", "mT", "mH", "adjoint", "movedim", "moveaxis"), _permute),
    **dict.fromkeys(("expand", "expand_as", "broadcast_to", "repeat", "tile"), _expand),
    "__getitem__": _getitem,
    **dict.fromkeys(("select", "narrow", "index_select", "gather"), _select),
    **dict.fromkeys(("cat", "concat", "concatenate", "stack"), _cat),
    **dict.fromkeys(("split", "chunk", "tensor_split", "split_with_sizes", "unbind"), _split),
    **dict.fromkeys(_REDUCTIONS, _reduce),
    **dict.fromkeys(_DIMWISE, _dimwise),
    **dict.fromkeys(("matmul", "__matmul__", "__rmatmul__", "bmm", "mm", "baddbmm", "addmm", "addbmm"), _matmul),
    "einsum": _einsum,
    "batch_norm": _batch_norm,
}
_BY_FUNC: dict[Callable, Callable[[Op], list[Layout]]] = {
    F.linear: _leading,
    F.bilinear: _leading,
    F.embedding: _leading,
    F.scaled_dot_product_attention: _attention,
}


def has_rule(func: Callable, name: str) -> bool:
    """Whether ``func`` has a rule of its own (else outputs of its operands' broadcast shape keep their layout)."""
    return func in _BY_FUNC or name in _BY_NAME


def output_layouts(op: Op) -> list[Layout]:
    """The layout of each tensor output of ``op`` (whose operands in ``op.layouts`` derive from the batch)."""
    rule = _BY_FUNC.get(op.func) or _BY_NAME.get(op.name)
    if rule is not None:
        return rule(op)
    if any(isinstance(lay, Untracked) for _, lay in _operand_layouts(op)):
        return _fallback(op)
    return _elementwise(op)


# ---- operations that can meet a parameter ---------------------------------------------------------------------------
BROADCASTING = frozenset({
    "add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "floor_divide", "remainder", "fmod",
    "pow", "float_power", "maximum", "minimum", "fmax", "fmin", "atan2", "arctan2", "hypot", "copysign", "lerp",
    "addcmul", "addcdiv", "where", "masked_fill", "eq", "ne", "lt", "le", "gt", "ge", "logaddexp", "logaddexp2",
    "xlogy", "rsub", "heaviside", "clamp", "clip",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__", "__div__",
    "__rdiv__", "__pow__", "__rpow__", "__mod__", "__floordiv__", "__rfloordiv__", "__iadd__", "__isub__",
    "__imul__", "__itruediv__", "__idiv__",
    "add_", "sub_", "mul_", "div_", "true_divide_", "pow_", "lerp_", "addcmul_", "addcdiv_", "masked_fill_",
    "clamp_", "clip_",
})
JOINING = frozenset({"cat", "concat", "concatenate", "stack"})
MATMUL = frozenset({"matmul", "__matmul__", "__rmatmul__", "bmm", "mm"})


def is_inplace(name: str) -> bool:
    return name.endswith("_") and not name.endswith("__") or name.startswith("__i")


# ---- moving examples to the front ---------------------------------------------------------------------------------
def to_batch_first(t: Tensor, layout: Batch, batch: int) -> Tensor:
    """``t`` as ``(B, *rest)``: the examples' factor moved to the front, its outer and inner factors left in place
    as dims of their own (views only)."""
    if layout.dim == 0 and layout.outer == 1 and layout.inner == 1:
        return t
    t = t.unflatten(layout.dim, (layout.outer, batch, layout.inner))
    return t.movedim(layout.dim + 1, 0)


def rows_to_examples(rows: Tensor, layout: Batch, batch: int) -> Tensor:
    """Sum per-row tensors ``(outer * B * inner, ...)`` (rows along dim 0) into per-example ones ``(B, ...)``."""
    if layout.outer == 1 and layout.inner == 1:
        return rows
    return rows.unflatten(0, (layout.outer, batch, layout.inner)).sum(dim=(0, 2))
