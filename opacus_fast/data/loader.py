"""A DataLoader that draws Poisson logical batches and hands them out as physical batches with masks.

Each logical batch (one DP-SGD step) is cut into physical batches of at most P rows; with padding, every physical
batch has exactly P rows, the missing ones being masked copies of a real example appended after the user's
collate_fn has run on the real ones, so that kernels, CUDA graphs and ``torch.compile`` see a single shape. Before
yielding a physical batch the loader publishes its :class:`PhysicalBatchInfo` (mask, ``is_last``) into a
:class:`BatchContext`; the training side reads it there.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    get_worker_info,
)
from torch.utils.data.dataloader import default_collate

from .context import BatchContext, PhysicalBatchInfo
from .sampler import DistributedPoissonBatchSampler, Draw, PoissonBatchSampler, draw_seed

_FOREIGN_ITERATION_ERROR = (
    "{action} was called while the Poisson sampler is being iterated by something other than this DPDataLoader's "
    "own iteration (Opacus' BatchMemoryManager, or a DataLoader built on its batch_sampler): the sampler may be "
    "ahead of the batch being trained (workers prefetch), so a run resumed from this state would skip batches and "
    "reuse noise. Save or load outside that loop (after the epoch), or iterate the DPDataLoader itself, made with "
    "max_physical_batch_size=P instead of BatchMemoryManager"
)
_ITERABLE_ERROR = (
    "an IterableDataset cannot be Poisson-sampled (each step needs random access to any example); "
    "wrap the data in a map-style Dataset with __getitem__ and __len__"
)
_DATALOADER_OPTIONS = frozenset(
    {
        "num_workers",
        "pin_memory",
        "timeout",
        "worker_init_fn",
        "multiprocessing_context",
        "prefetch_factor",
        "persistent_workers",
        "pin_memory_device",
    }
)

Plan = tuple[list[int], PhysicalBatchInfo]


def plan_physical_batches(
    draw: Draw, max_size: int | None, pad: bool, step: int, rand_on_empty: bool = False
) -> list[Plan]:
    """Cut one logical batch into physical batches: the dataset indices of each one's real rows and its info.

    Without ``max_size`` the logical batch is one physical batch. With ``max_size`` = P it is cut into consecutive
    chunks of P, ceil(largest_part / P) of them and at least one, so every rank runs the same number of physical
    batches per step. With ``pad``, a chunk shorter than P gets the mask of P rows whose first ``len(chunk)`` are
    real: :class:`PhysicalBatchCollate` appends the padding rows after collating the real ones. Masks are None when
    every row is real. With ``rand_on_empty``, an empty chunk holds one real row of random values (Opacus'
    ``rand_on_empty``), which :class:`PhysicalBatchCollate` makes.
    """
    indices = draw.indices
    if max_size is None:
        chunks = [indices]
    else:
        count = max(1, -(-draw.largest_part // max_size))
        chunks = [indices[i * max_size : (i + 1) * max_size] for i in range(count)]
    plans = []
    for position, chunk in enumerate(chunks):
        real = len(chunk) if chunk or not rand_on_empty else 1
        mask = torch.arange(max_size) < real if pad and real < max_size else None
        info = PhysicalBatchInfo(mask=mask, num_real=real, index=position, is_last=position == len(chunks) - 1, step=step)
        plans.append((list(chunk), info))
    return plans


class PhysicalBatchSampler(Sampler[list[int]]):
    """Yields the physical batches (lists of dataset indices) of the logical batches of a Poisson sampler.

    While a :class:`DPDataLoader` iterates, ``sink`` is a FIFO that receives, for each physical batch as it is
    drawn, its info and the sampler state to resume from once it has been consumed: the state that draws the next
    logical batch after the last physical batch of one, else the state that draws its own logical batch again.
    The DataLoader keeps the order of batches, so the loader pops one entry per batch it yields, whatever the
    number of workers and the prefetching.

    Without a physical batch size this sampler yields the logical batches themselves, so Opacus'
    ``BatchMemoryManager`` can wrap it. With one it refuses to run outside its loader: its padded batches and
    logical-batch boundaries are only safe when the published masks are read.
    """

    def __init__(
        self, logical: PoissonBatchSampler, max_physical_batch_size: int | None, pad: bool, rand_on_empty: bool = False
    ) -> None:
        self.logical = logical
        self.max_physical_batch_size = max_physical_batch_size
        self.pad = pad
        self.rand_on_empty = rand_on_empty
        self.sink: deque[tuple[PhysicalBatchInfo, dict[str, Any] | None]] | None = None

    def __len__(self) -> int:
        """Logical steps, times the expected physical batches per step when split (an estimate: sizes are random)."""
        if self.max_physical_batch_size is None:
            return len(self.logical)
        world_size = getattr(self.logical, "world_size", 1)
        expected_part = self.logical.num_samples * self.logical.sample_rate / world_size
        return len(self.logical) * max(1, math.ceil(expected_part / self.max_physical_batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        sink = self.sink
        if sink is None and self.max_physical_batch_size is not None:
            raise RuntimeError(
                "this batch sampler cuts logical batches into (padded) physical ones and is only correct inside its "
                "DPDataLoader, which publishes the masks: iterate the DPDataLoader itself, or build it without "
                "max_physical_batch_size to wrap it in Opacus' BatchMemoryManager"
            )
        draws = self.logical.draws()
        before = self.logical.state_dict() if sink is not None else None  # draws the first logical batch
        for step, draw in enumerate(draws):
            after = self.logical.state_dict() if sink is not None else None  # draws the next one
            plans = plan_physical_batches(draw, self.max_physical_batch_size, self.pad, step, self.rand_on_empty)
            for rows, info in plans:
                if sink is not None:
                    sink.append((info, after if info.is_last else before))
                yield rows
            before = after


class DPDataLoader(DataLoader):
    """Poisson-sampled DataLoader that yields physical batches and publishes a :class:`PhysicalBatchInfo` for each.

    Build it with :meth:`from_data_loader`. Batches are what the user's ``collate_fn`` makes of the real rows; with
    padding, copies of the first collated row are then appended along the batch dimension up to P rows (the mask
    marks the first ``num_real`` rows as real, whatever order the collate_fn put the examples in). An empty logical
    batch still yields one batch (``is_last=True``): with padding, P fully masked rows (copies of example 0);
    without, a batch with zero rows and the structure, dtypes and trailing shapes of a normal one; with
    ``rand_on_empty``, as in Opacus, one real row of random 0/1 values (drawn from torch's global RNG) instead,
    padded like any other batch.

    Attributes:
        sample_rate: Poisson inclusion probability q.
        expected_batch_size: N·q, the expected size of a (global) logical batch.
        max_physical_batch_size: P, or None for one physical batch per logical batch.
        pad: whether physical batches are padded to exactly P rows.
        context: the :class:`BatchContext` that receives each physical batch's info (None after iteration).

    ``len(loader)`` counts physical batches: the logical steps per epoch (:attr:`steps_per_epoch`, the number to
    give an accountant), times ceil(expected part / P) when split; physical batch counts are random, so with P it
    is an estimate. Batches always arrive in order (``in_order=True``), which the published infos rely on.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        sample_rate: float,
        max_physical_batch_size: int | None = None,
        pad: bool | None = None,
        generator: torch.Generator | None = None,
        seed_source: torch.Generator | None = None,
        secure_mode: bool = False,
        context: BatchContext | None = None,
        distributed: bool = False,
        rand_on_empty: bool = False,
        steps: int | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        worker_generator: torch.Generator | None = None,
        **dataloader_options: Any,
    ) -> None:
        """See :meth:`from_data_loader`; the extra arguments are ``seed_source`` (without ``generator``, where the
        Poisson generator's seed is drawn from at the first iteration: None for torch's global RNG), ``steps``
        (logical batches per epoch, default ``int(1 / sample_rate)``), ``worker_generator`` (the DataLoader's own
        ``generator``, which seeds the workers) and the DataLoader options num_workers, pin_memory, timeout,
        worker_init_fn, multiprocessing_context, prefetch_factor, persistent_workers and pin_memory_device."""
        if isinstance(dataset, IterableDataset):
            raise TypeError(_ITERABLE_ERROR)
        unknown = set(dataloader_options) - _DATALOADER_OPTIONS
        if unknown:
            raise TypeError(f"unsupported DataLoader options {sorted(unknown)}: the Poisson sampler forms the batches")
        pad = _resolve_pad(pad, max_physical_batch_size)
        pad_to = max_physical_batch_size if pad else None
        logical = _poisson_sampler(len(dataset), sample_rate, steps, generator, seed_source, secure_mode, distributed)
        self.sample_rate = logical.sample_rate
        self.expected_batch_size = len(dataset) * logical.sample_rate
        self.max_physical_batch_size = max_physical_batch_size
        self.pad = pad
        self.context = context if context is not None else BatchContext()
        self._iteration: object | None = None  # token of the active iteration
        self._resume_state: dict[str, Any] | None = None  # during an iteration: where a run that stops now resumes
        super().__init__(
            dataset,
            batch_sampler=PhysicalBatchSampler(logical, max_physical_batch_size, pad, rand_on_empty),
            collate_fn=PhysicalBatchCollate(
                default_collate if collate_fn is None else collate_fn, dataset, pad_to, rand_on_empty
            ),
            generator=worker_generator,
            **dataloader_options,
        )

    @classmethod
    def from_data_loader(
        cls,
        data_loader: DataLoader,
        *,
        sample_rate: float | None = None,
        max_physical_batch_size: int | None = None,
        pad: bool | None = None,
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
        context: BatchContext | None = None,
        distributed: bool = False,
        rand_on_empty: bool = False,
    ) -> DPDataLoader:
        """A Poisson-sampled loader over ``data_loader``'s whole dataset, keeping its collate_fn and worker settings.

        The loader's sampler is not kept (it warns when that sampler is not a plain sequential, random or
        distributed one): each step samples every example of the dataset with probability q.

        Args:
            data_loader: the user's loader (map-style dataset); it is left untouched.
            sample_rate: q; default ``1 / len(data_loader)`` as in Opacus (so the expected logical batch is about
                the original batch size; with a DistributedSampler, about the global batch).
            max_physical_batch_size: P; cut each logical batch into physical batches of at most P rows.
            pad: pad every physical batch to exactly P rows with masked copies of a real example (default: pad
                iff P is given); the collate_fn's output must then have a clear batch dimension (else it raises).
            generator: CPU generator of the Poisson draws, used as it is. By default, as in Opacus, the seed comes
                from ``data_loader``'s generator if it has one, else from torch's global RNG, at the first
                iteration (at this call with ``distributed``, where rank 0's seed is shared); a dedicated generator
                then continues the stream. A given generator must be in the same state on every rank (checked).
            secure_mode: draw each step from OS entropy (see :class:`PoissonBatchSampler`); no generator allowed.
            context: where each physical batch's info is published (default: a new :class:`BatchContext`).
            distributed: split each global Poisson sample over the ranks of ``torch.distributed``, which must be
                initialised; every rank must call this, in the same order.
            rand_on_empty: as in Opacus, turn an empty batch into one row of random 0/1 values (shaped and typed
                like an example), trained like a real example, for models that cannot run on zero rows.
        """
        if isinstance(data_loader.dataset, IterableDataset):
            raise TypeError(_ITERABLE_ERROR)
        if data_loader.batch_sampler is None:
            raise ValueError("the loader yields single examples (batch_size=None): give it a batch_size")
        _warn_if_sampler_is_ignored(data_loader)
        collate_fn = data_loader.collate_fn
        if isinstance(collate_fn, PhysicalBatchCollate):
            collate_fn = collate_fn.collate_fn
        options = {name: getattr(data_loader, name) for name in _DATALOADER_OPTIONS}
        return cls(
            data_loader.dataset,
            sample_rate=sample_rate if sample_rate is not None else 1 / len(data_loader),
            max_physical_batch_size=max_physical_batch_size,
            pad=pad,
            generator=generator,
            seed_source=data_loader.generator,
            secure_mode=secure_mode,
            context=context,
            distributed=distributed,
            rand_on_empty=rand_on_empty,
            collate_fn=collate_fn,
            worker_generator=data_loader.generator,
            **options,
        )

    @property
    def steps_per_epoch(self) -> int:
        """Logical batches (DP-SGD steps) per epoch."""
        return self.batch_sampler.logical.steps

    def __iter__(self) -> Iterator[Any]:
        """Yield the physical batches, publishing each one's info into ``context`` first (None at the end).

        An iteration left early (``break``, or a new iteration started) rewinds the sampler's random state to the
        start of the logical batch it was in (or the next one, if it was left between two), also when workers had
        drawn batches ahead. The next iteration is a new epoch, as with any DataLoader, whose first logical batch is
        that one, drawn again: the same draws, and so the same noise on the same batches, as a run resumed from
        :meth:`state_dict`.
        """
        if self._iteration is not None:
            self._leave()  # a new iteration abandons the previous one
        token, plans = object(), deque()
        self._iteration = token
        self.context.publish(None)  # batches an abandoned iterator handed out are no longer current
        sampler = self.batch_sampler
        sampler.logical.ensure_seeded()  # before the state that a run left in this iteration resumes from
        self._resume_state = sampler.logical.state_dict()
        sampler.sink = plans
        try:
            for batch in super().__iter__():
                info, self._resume_state = plans.popleft()
                self.context.publish(info)
                yield batch
        finally:
            if self._iteration is token:
                self._leave()

    def _leave(self) -> None:
        """End this loader's iteration: rewind the sampler's random state to where a run stopped now resumes (the
        next iteration being a new epoch), clear the context."""
        sampler = self.batch_sampler
        sampler.sink = None
        sampler.logical.release()
        sampler.logical.load_state_dict({**self._resume_state, "step": 0})
        self._iteration = self._resume_state = None
        self.context.publish(None)

    def state_dict(self) -> dict[str, Any]:
        """Where the batches yielded so far leave the run, also after the loop was left early (break, return).

        A loader that loads it (:meth:`load_state_dict`) yields, at its next iteration, the batches that followed
        the last completed logical batch: a logical batch interrupted midway is drawn again from its start (its
        partial gradient sum is not part of any checkpoint), and so does this loader's own next iteration.

        Raises while the sampler is iterated by something other than this loader's own iteration (Opacus'
        ``BatchMemoryManager``, a DataLoader built on ``batch_sampler``): its position may be ahead of the trained
        batch (prefetching), so a resumed run would skip batches and reuse noise.
        """
        logical = self.batch_sampler.logical
        if self._iteration is None and logical.iterating:
            raise RuntimeError(_FOREIGN_ITERATION_ERROR.format(action="state_dict (save_checkpoint)"))
        return {"sampler": self._resume_state if self._iteration is not None else logical.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` at the next iteration (call it outside the loop)."""
        if self._iteration is not None:
            raise RuntimeError("load_state_dict was called during an iteration: call it before the next epoch's loop")
        if self.batch_sampler.logical.iterating:
            raise RuntimeError(_FOREIGN_ITERATION_ERROR.format(action="load_state_dict (load_checkpoint)"))
        self.batch_sampler.logical.load_state_dict(state["sampler"])


class PhysicalBatchCollate:
    """Wraps a collate_fn: collates the real examples, then pads the batch to ``pad_to`` rows or makes it empty.

    Padding rows are appended AFTER the user's collate_fn, as copies of the collated batch's first row, so that a
    collate_fn that reorders the examples (sorting by length, say) cannot move padding rows among the real ones:
    the mask, a prefix of real rows, always marks each real example once. The batch dimension of each tensor, array
    and per-example list is the one that grows from the collate of one example to that of two copies of it; a
    structure without a clear one raises (see :func:`_pad_rows`). An empty list of examples gives, with
    ``pad_to``, ``pad_to`` copies of example 0; without, a zero-row batch shaped like a real one (the template is
    example 0 collated once and twice: whatever grows from 1 to 2 is cut to length 0). No model runs. Opacus'
    ``BatchMemoryManager`` also relies on the empty batch, since it yields ``[]`` for empty batches. With
    ``rand_on_empty``, an empty list gives instead one row of random 0/1 values (see :func:`_random_rows`), padded
    to ``pad_to`` rows like any batch.
    """

    def __init__(
        self,
        collate_fn: Callable[[list[Any]], Any],
        dataset: Dataset,
        pad_to: int | None = None,
        rand_on_empty: bool = False,
    ) -> None:
        self.collate_fn = collate_fn
        self.dataset: Dataset | None = dataset
        self.pad_to = pad_to
        self.rand_on_empty = rand_on_empty

    def __call__(self, examples: list[Any]) -> Any:
        if examples and (self.pad_to is None or len(examples) == self.pad_to):
            return self.collate_fn(examples)
        template = examples[0] if examples else self._dataset()[0]
        one, two = self.collate_fn([template]), self.collate_fn([template, template])
        if not examples and self.rand_on_empty:
            one = batch = _random_rows(one, two)
        elif self.pad_to is None:
            return _zero_rows(one, two)
        else:
            batch = self.collate_fn(examples) if examples else one
        if self.pad_to is None:
            return batch
        return _pad_rows(batch, one, two, max(len(examples), 1), self.pad_to, "batch")

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes get the dataset anyway (from get_worker_info()); do not pickle a second copy.
        return {**self.__dict__, "dataset": None}

    def _dataset(self) -> Dataset:
        if self.dataset is not None:
            return self.dataset
        worker = get_worker_info()
        if worker is None:
            raise RuntimeError("this collate wrapper was copied without its dataset; build it again with the dataset")
        return worker.dataset


def _growing_dims(one: tuple[int, ...], two: tuple[int, ...]) -> list[int]:
    """The dimensions of size 1 in ``one`` (shape of 1 example collated) and 2 in ``two`` (2 examples collated)."""
    return [d for d, (a, b) in enumerate(zip(one, two)) if (a, b) == (1, 2)]


def _zero_rows(one: Any, two: Any) -> Any:
    """``one`` (a collated batch of 1 example) cut to zero rows, given ``two`` (the same example collated twice)."""
    if isinstance(one, (torch.Tensor, np.ndarray)):
        growing = _growing_dims(one.shape, two.shape)
        return one if not growing else one[(slice(None),) * growing[0] + (slice(0, 0),)]
    if isinstance(one, Mapping):
        items = {key: _zero_rows(one[key], two[key]) for key in one}
        return items if type(one) is dict else type(one)(items)
    if isinstance(one, (list, tuple)):
        if len(one) != len(two):
            return type(one)()
        items = [_zero_rows(a, b) for a, b in zip(one, two)]
        return type(one)(*items) if hasattr(one, "_fields") else type(one)(items)
    return one


def _random_rows(one: Any, two: Any) -> Any:
    """``one`` (a collated batch of 1 example) with each per-example tensor or array (whatever grows from ``one`` to
    ``two``, the same example collated twice) replaced by random 0/1 values of its shape and dtype, drawn from torch's
    global RNG in the order of the structure, as Opacus' ``rand_on_empty`` does; parts shared by all examples are
    kept. Per-example values of other types cannot be made random and raise."""
    if isinstance(one, (torch.Tensor, np.ndarray)):
        if tuple(one.shape) == tuple(two.shape):
            return one
        if isinstance(one, np.ndarray):
            return torch.randint(0, 2, one.shape).numpy().astype(one.dtype)
        return torch.randint(0, 2, one.shape, dtype=one.dtype, device=one.device)
    if isinstance(one, Mapping):
        items = {key: _random_rows(one[key], two[key]) for key in one}
        return items if type(one) is dict else type(one)(items)
    if isinstance(one, (list, tuple)) and len(one) == len(two):
        items = [_random_rows(a, b) for a, b in zip(one, two)]
        return type(one)(*items) if hasattr(one, "_fields") else type(one)(items)
    if _equal(one, two):
        return one
    raise TypeError(
        f"rand_on_empty cannot make a random example of {type(one).__name__} {one!r}: only tensors and arrays can be "
        "random. Pass rand_on_empty=False (an empty batch then has zero rows)"
    )


def _pad_rows(batch: Any, one: Any, two: Any, rows: int, size: int, where: str) -> Any:
    """``batch`` (``rows`` examples collated) with copies of its first row appended up to ``size`` rows.

    ``one`` and ``two`` are one example collated once and twice: a part of the batch is per example where it grows
    from one to two (a tensor or array dimension from 1 to 2, a list from 1 to 2 items), and is kept as it is where
    it does not change. Anything else (two growing dimensions, a batch dimension whose length is not ``rows``, a
    number that changes, e.g. a count of rows or packed tokens) cannot be padded safely and raises; ``where`` names
    the part in that error.
    """
    if not (type(batch) is type(one) is type(two)):
        raise _unpaddable(where, f"{type(one).__name__} for 1 example, {type(two).__name__} for 2")
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        if tuple(one.shape) == tuple(two.shape):
            return batch
        growing = _growing_dims(one.shape, two.shape)
        changed = [d for d, (a, b) in enumerate(zip(one.shape, two.shape)) if a != b]
        if len(growing) != 1 or changed != growing or one.ndim != batch.ndim or batch.shape[growing[0]] != rows:
            shapes = f"shapes {tuple(one.shape)}, {tuple(two.shape)}, {tuple(batch.shape)} for 1, 2, {rows} examples"
            raise _unpaddable(where, shapes)
        order = [*range(rows), *[0] * (size - rows)]
        if isinstance(batch, np.ndarray):
            return np.take(batch, order, axis=growing[0])
        return batch.index_select(growing[0], torch.tensor(order, device=batch.device))
    if isinstance(batch, Mapping):
        if not set(batch) == set(one) == set(two):
            raise _unpaddable(where, "its keys depend on the examples")
        items = {key: _pad_rows(batch[key], one[key], two[key], rows, size, f"{where}[{key!r}]") for key in batch}
        return items if type(batch) is dict else type(batch)(items)
    if isinstance(batch, (list, tuple)):
        if len(one) == len(two) == len(batch):
            items = [_pad_rows(*parts, rows, size, f"{where}[{i}]") for i, parts in enumerate(zip(batch, one, two))]
            return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
        if (len(one), len(two), len(batch)) == (1, 2, rows) and not hasattr(batch, "_fields"):
            return type(batch)([*batch, *[batch[0]] * (size - rows)])
        raise _unpaddable(where, f"{len(one)} items for 1 example, {len(two)} for 2, {len(batch)} for {rows}")
    if not _equal(one, two):
        raise _unpaddable(where, f"{one!r} for 1 example, {two!r} for 2")
    return batch


def _equal(a: Any, b: Any) -> bool:
    """``a == b`` as a bool; False where the comparison fails or is not a truth value."""
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return False


def _unpaddable(where: str, detail: str) -> ValueError:
    """The error for a collated batch whose padding rows could not be told from its real rows."""
    return ValueError(
        f"cannot pad this physical batch safely: the collate_fn's output {where} has no clear batch dimension "
        f"({detail}), so padding rows could mix with real ones. Pass pad_physical_batches=False to "
        "make_private_fast (pad=False to DPDataLoader): the last physical batch of each logical batch is then "
        "shorter instead of padded"
    )


def _warn_if_sampler_is_ignored(data_loader: DataLoader) -> None:
    """Warn when ``data_loader`` draws from its dataset with a sampler that the Poisson loader will not use."""
    batch_sampler = data_loader.batch_sampler
    if isinstance(batch_sampler, PhysicalBatchSampler):
        return
    sampler = getattr(batch_sampler, "sampler", None)
    if type(batch_sampler) is BatchSampler and (
        type(sampler) in (SequentialSampler, RandomSampler) or isinstance(sampler, DistributedSampler)
    ):
        return
    warnings.warn(
        f"the data loader's sampler ({type(batch_sampler if sampler is None else sampler).__name__}) is ignored: the Poisson loader "
        "samples every example of the WHOLE dataset with probability q at each step, so examples that your sampler "
        "would never draw (a held-out split, say) are trained on, and weights are lost. To train on part of a "
        "dataset, pass a DataLoader over torch.utils.data.Subset(dataset, indices) instead",
        stacklevel=3,
    )


def _resolve_pad(pad: bool | None, max_physical_batch_size: int | None) -> bool:
    """Check P and return whether to pad (default: pad iff P is given)."""
    size = max_physical_batch_size
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise ValueError(f"max_physical_batch_size must be a positive int or None, got {size!r}")
    if pad is None:
        return size is not None
    if pad and size is None:
        raise ValueError("pad=True needs max_physical_batch_size (the number of rows to pad to)")
    return bool(pad)


def _poisson_sampler(
    num_samples: int,
    sample_rate: float,
    steps: int | None,
    generator: torch.Generator | None,
    seed_source: torch.Generator | None,
    secure_mode: bool,
    distributed: bool,
) -> PoissonBatchSampler:
    """The logical-batch sampler: plain, or split over the ranks of torch.distributed."""
    if not distributed:
        return PoissonBatchSampler(
            num_samples, sample_rate, steps=steps, generator=generator, seed_source=seed_source, secure_mode=secure_mode
        )
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True needs torch.distributed initialised (init_process_group) first")
    if not secure_mode:
        generator = _shared_generator(generator, seed_source)
    return DistributedPoissonBatchSampler(
        num_samples,
        sample_rate,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        steps=steps,
        generator=generator,
        secure_mode=secure_mode,
    )


def _shared_generator(generator: torch.Generator | None, seed_source: torch.Generator | None) -> torch.Generator:
    """A generator in the same state on every rank: seeded by rank 0 (from ``seed_source``, or torch's global RNG)
    if None, else checked to agree across ranks."""
    dist = torch.distributed
    if generator is None:
        seed = [draw_seed(seed_source) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(seed, src=0)
        return torch.Generator().manual_seed(seed[0])
    digest = hashlib.sha256(generator.get_state().numpy().tobytes()).hexdigest()
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        raise ValueError(
            "the Poisson generator is in different states on different ranks: seed it with the same seed on every "
            "rank (or pass generator=None to use rank 0's seed everywhere)"
        )
    return generator
