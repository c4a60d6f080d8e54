"""Distributed DP-SGD on ``torch.distributed``: one Poisson sample over all ranks, one all-reduce and one noise draw
per logical step.

Every rank runs the usual loop on the model, optimizer and loader that ``make_private_fast`` returns for a model
wrapped in :class:`DPDistributedModule` (or in a plain ``DistributedDataParallel``):

- sampling: the loader draws one global Poisson sample of the whole dataset per step (rate q, identically seeded
  on all ranks) and each rank loads only its disjoint part; every rank yields every step, even with an empty part;
- clipping is local: each rank's BK engine adds its clipped per-example sums to ``p.summed_grad``;
- at the last physical batch of a logical step, :class:`DistributedFastDPOptimizer` all-reduces the sums ONCE, in
  a few large flat buckets. Rank 0 alone adds N(0, σ²C²) to its local sum before the all-reduce, so the global sum
  carries exactly one noise draw (not one per rank); then every rank divides by the GLOBAL expected batch size N·q
  and steps, and all ranks hold identical parameters. The accountant sees the global q.

Why rank-0 noise rather than identical generators on all ranks: no seed has to be shared, so ``secure_mode`` keeps
drawing from rank 0's own cryptographically secure generator, and no rank can reconstruct the noise from a seed.
The other ranks see only the noisy global sum, the same quantity a single-process run releases; the trust model
is that of one training job (ranks see each other's unnoised partial sums during the all-reduce).

Settings: every rank must pass the same FULL dataset (the sampler splits each global Poisson sample among the
ranks: do not shard it yourself), sample_rate, noise_multiplier, max_grad_norm and loss_reduction. When training
starts, the ranks compare them (the dataset by its size and :func:`dataset_fingerprint`) and, where any differs,
all raise naming each difference; ``max_physical_batch_size`` may differ (each rank splits its own part).

Checkpoints: all ranks hold the same state, so :func:`save_checkpoint` lets rank 0 write it and every rank loads
it with ``PrivacyEngine.load_checkpoint``.

Failures: every collective here times out after the process group's ``timeout`` (set it in
``init_process_group(timeout=...)``: the default is 30 minutes for gloo, 10 for NCCL). A rank that raises, dies or
stops calling ``optimizer.step()`` makes the others fail with :class:`DistributedStepError` within that time (at
once when its process exits). Every rank must call ``optimizer.step()`` for every physical batch, empty or not.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .optimizer import FastDPOptimizer, add_gaussian_noise

Tensor = torch.Tensor
BUCKET_CAP_MB = 64.0


class DistributedStepError(RuntimeError):
    """A collective of distributed DP training failed or timed out, usually because another rank failed."""


def _require_initialised() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed DP training needs torch.distributed initialised first: call "
            "torch.distributed.init_process_group(backend, timeout=...) on every rank (torchrun sets the rest)"
        )


class DPDistributedModule(nn.Module):
    """Marks ``module`` for distributed DP training with ``make_private_fast`` (what DDP is for non-private training).

    It reduces nothing itself: ``make_private_fast`` broadcasts the parameters and buffers from rank 0 and its
    optimizer all-reduces the clipped gradient sums once per logical step. Calling it runs ``module``.
    """

    def __init__(self, module: nn.Module) -> None:
        _require_initialised()
        if isinstance(module, (DistributedDataParallel, DPDistributedModule)):
            raise TypeError("the module is already wrapped for distributed training: wrap the plain model once")
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def _refuse_ddp_forward(ddp: nn.Module, args: Any) -> None:
    raise RuntimeError(
        "this DistributedDataParallel model was made private by make_private_fast: call the model that "
        "make_private_fast returned. DDP's own gradient reduction cannot work here: BK clipping never produces "
        "ordinary parameter gradients, and opacus_fast all-reduces the clipped sums itself"
    )


@dataclass
class DistributedSetup:
    """A model wrapped for distributed DP training (on the default process group): the wrapper and the user's model."""

    wrapper: nn.Module
    module: nn.Module

    def start(self, engine: Any) -> None:
        """Broadcast parameters and buffers from rank 0; make a DDP wrapper refuse to run (until cleanup)."""
        broadcast_from_rank0(list(self.module.parameters()) + list(self.module.buffers()))
        if isinstance(self.wrapper, DistributedDataParallel):
            # removed by the engine's detach(), i.e. by the returned model's cleanup()
            engine.add_handle(self.wrapper.register_forward_pre_hook(_refuse_ddp_forward))


_SETTING_HINTS = {
    "dataset size": "every rank must pass the same full dataset: the sampler splits each global Poisson sample among "
    "the ranks, so do not shard it yourself (no per-rank Subset or shard)",
    "dataset contents": "every rank must pass the same full dataset, with its examples in the same order (compared "
    "at a few fixed positions): the sampler splits each global Poisson sample among the ranks, so do not shard it "
    "yourself (no per-rank Subset or shard, even of equal sizes)",
    "sample_rate": "pass the same sample_rate on every rank (its default 1/len(data_loader) follows the dataset size "
    "and batch_size)",
    "expected batch size": "it is dataset size × sample_rate: pass the same full dataset and sample_rate on every rank",
    "noise_multiplier": "pass the same noise_multiplier on every rank (rank 0 draws the noise for all)",
    "max_grad_norm": "pass the same max_grad_norm on every rank (the noise is scaled to rank 0's)",
    "loss_reduction": "pass the same loss_reduction on every rank",
    "physical batches": "with FSDP every rank must run the same number of physical batches (each gathers weights): "
    "pass the same max_physical_batch_size and pad_physical_batches on every rank",
}


def check_same_settings(mine: dict[str, Any]) -> None:
    """Raise on every rank, naming each differing setting with its value per rank, unless all ranks agree.

    ``mine``: this rank's value of each setting named in ``_SETTING_HINTS``. Called by ``make_private_fast`` on every
    rank before anything is attached. All ranks take part in one all-gather before any raises, so none is left
    waiting in a collective.
    """
    everyone: list[dict[str, Any] | None] = [None] * dist.get_world_size()
    _guarded("the comparison of the ranks' settings", lambda: dist.all_gather_object(everyone, mine))
    differences = [
        f"- {name}: " + ", ".join(f"rank {rank}: {settings[name]}" for rank, settings in enumerate(everyone))
        + f". {_SETTING_HINTS[name]}"
        for name in mine
        if any(settings[name] != mine[name] for settings in everyone)
    ]
    if differences:
        raise ValueError(
            f"rank {dist.get_rank()}: the ranks' DP settings differ, so the sampling, the noise or the privacy "
            "accounting would be wrong; every rank raises this error:\n" + "\n".join(differences)
        )


def dataset_fingerprint(dataset: Any) -> str:
    """A short hash of the dataset's length and of its examples at 8 evenly spread positions (first, last, ...).

    Ranks that each pass their own shard of equal size, instead of the same full dataset, get different
    fingerprints, which :func:`check_same_settings` then reports; only a few examples are read, whatever the size.
    They are read under fixed seeds of torch's (CPU), NumPy's and Python's global generators, restored afterwards,
    so that random augmentations give the same examples on every rank.
    """
    size = len(dataset)
    digest = hashlib.sha256(str(size).encode())
    with _fixed_global_seeds():
        for position in _probe_positions(size):
            _hash_into(digest, dataset[position])
    return digest.hexdigest()[:16]


def _probe_positions(size: int, probes: int = 8) -> list[int]:
    """Up to ``probes`` (>= 2) distinct positions spread evenly over ``range(size)``, the first and the last included."""
    return sorted({i * (size - 1) // (probes - 1) for i in range(probes)}) if size > 0 else []


@contextmanager
def _fixed_global_seeds(seed: int = 0) -> Iterator[None]:
    """Seed torch's CPU, NumPy's and Python's global generators; restore their states on exit."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _hash_into(digest: Any, value: Any) -> None:
    """Feed ``value`` into ``digest``: tensors, arrays (and array-likes such as PIL images), numbers, strings, and
    tuples, lists and dicts of them, by type, shape and content; other objects by their type's name only (their
    repr may hold a memory address, which differs between ranks)."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        tensor = (tensor.to_dense() if tensor.layout != torch.strided else tensor).contiguous()
        digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        digest.update(f"mapping {len(value)}".encode())
        for key, item in value.items():
            _hash_into(digest, key)
            _hash_into(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__} {len(value)}".encode())
        for item in value:
            _hash_into(digest, item)
    elif isinstance(value, (str, bytes, int, float, complex, type(None))):
        digest.update(f"{type(value).__name__} {value!r}".encode())
    elif hasattr(value, "__array__"):
        array = np.ascontiguousarray(np.asarray(value))
        digest.update(f"array {array.dtype} {array.shape}".encode())
        if array.dtype == object:
            _hash_into(digest, array.ravel().tolist())
        else:
            digest.update(array.tobytes())
    else:
        digest.update(type(value).__qualname__.encode())


def unwrap_distributed(module: nn.Module, *, poisson_sampling: bool) -> DistributedSetup | None:
    """The distributed setup of ``module`` (None for a plain model); raises, changing nothing, if it is unusable."""
    if not isinstance(module, (DPDistributedModule, DistributedDataParallel)):
        return None
    _require_initialised()
    inner = module.module
    if isinstance(inner, (DPDistributedModule, DistributedDataParallel)):
        raise TypeError("the model is wrapped for distributed training twice: wrap the plain model once")
    if isinstance(module, DistributedDataParallel) and dist.get_world_size(module.process_group) != dist.get_world_size():
        raise ValueError(
            "this DistributedDataParallel uses a process group that is not the whole world, but the distributed "
            "Poisson loader samples over all ranks: build DDP on the default group, or use DPDistributedModule"
        )
    if not poisson_sampling:
        raise ValueError(
            "distributed training needs poisson_sampling=True: the global batch must be one Poisson sample split "
            "over the ranks, with the global expected batch size as divisor"
        )
    return DistributedSetup(module, inner)


def _buckets(tensors: Sequence[Tensor], cap_bytes: float) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype) into runs of at most ``cap_bytes`` (a larger one alone)."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        by_kind.setdefault((t.device, t.dtype), []).append(i)
    buckets: list[list[int]] = []
    for indices in by_kind.values():
        current: list[int] = []
        size = 0
        for i in indices:
            nbytes = tensors[i].numel() * tensors[i].element_size()
            if current and size + nbytes > cap_bytes:
                buckets.append(current)
                current, size = [], 0
            current.append(i)
            size += nbytes
        buckets.append(current)
    return buckets


def coalesced(
    tensors: Sequence[Tensor], collective: Callable[[Tensor], Any], cap_mb: float = BUCKET_CAP_MB
) -> list[Tensor]:
    """Run an in-place, asynchronous ``collective`` on ``tensors`` flattened into a few buckets; return the results.

    ``collective(flat)`` must start the operation and return its work handle (``async_op=True``). The results are
    views of the buckets, shaped like the inputs; the inputs themselves are not modified.
    """
    pending = []
    for bucket in _buckets(tensors, cap_mb * 2**20):
        flat = torch.cat([tensors[i].reshape(-1) for i in bucket])
        pending.append((bucket, flat, collective(flat)))
    out: list[Tensor] = list(tensors)
    for bucket, flat, work in pending:
        work.wait()
        for i, chunk in zip(bucket, flat.split([tensors[i].numel() for i in bucket])):
            out[i] = chunk.view(tensors[i].shape)
    return out


def broadcast_from_rank0(tensors: Sequence[Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's values (in a few flat buckets)."""
    synced = _guarded(
        "the broadcast of the initial parameters",
        lambda: coalesced(tensors, lambda flat: dist.broadcast(flat, src=0, async_op=True)),
    )
    with torch.no_grad():
        for t, value in zip(tensors, synced):
            t.copy_(value)


def _guarded(what: str, run: Callable[[], Any]) -> Any:
    """``run()``, with a collective's failure turned into a :class:`DistributedStepError` that says what to check."""
    start = time.monotonic()
    try:
        return run()
    except RuntimeError as err:
        raise DistributedStepError(
            f"rank {dist.get_rank()}: {what} failed after {time.monotonic() - start:.1f} s: another rank has "
            "probably raised, died, or left the training loop's rhythm (every rank must call optimizer.step() for "
            "every physical batch, empty ones included); look at the other ranks' errors. Collectives give up after "
            f"the process group's timeout, set by init_process_group(timeout=...). Cause: {err}"
        ) from err


class DistributedFastDPOptimizer(FastDPOptimizer):
    """:class:`FastDPOptimizer` for several ranks: at each logical step's end, one all-reduce and one noise draw.

    Rank 0 adds N(0, σ²C²) to its local clipped sums, then the sums of all ranks of the default process group are
    all-reduced in buckets of at most ``bucket_cap_mb`` (an attribute you may change); ``expected_batch_size`` must be
    the GLOBAL N·q. Only rank 0's ``generator`` is used. Arguments: as :class:`FastDPOptimizer`.
    """

    bucket_cap_mb: float = BUCKET_CAP_MB

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _require_initialised()
        super().__init__(*args, **kwargs)
        self.adds_noise = dist.get_rank() == 0
        #: logical steps completed (for error messages)
        self.logical_steps = 0

    def add_noise(self) -> None:
        """``p.grad`` = all-reduce(local clipped sums, plus the noise on rank 0): one noise draw in the global sum;
        ``p.summed_grad`` (the local sum) stays until ``zero_grad()``."""
        sums = [p.summed_grad if getattr(p, "summed_grad", None) is not None else torch.zeros_like(p)
                for p in self.params]
        if self.adds_noise:
            sums = torch._foreach_mul(sums, 1.0)  # fresh tensors: the local sums stay as they are
            std = self.gradient_noise_multiplier() * self.max_grad_norm
            add_gaussian_noise(sums, std, self.generator, self.secure_mode)
        reduced = _guarded(
            f"the all-reduce of the clipped gradient sums of logical step {self.logical_steps}",
            lambda: coalesced(sums, lambda flat: dist.all_reduce(flat, async_op=True), self.bucket_cap_mb),
        )
        for p, total in zip(self.params, reduced):
            p.grad = total
        self.logical_steps += 1


def save_checkpoint(privacy_engine: Any, **kwargs: Any) -> None:
    """On every rank: rank 0 writes ``privacy_engine.save_checkpoint(**kwargs)``, the others wait until it is written.

    Model, optimizer (with its noise generator), accountant and Poisson sampler are identical on all ranks, so rank
    0's file resumes every rank: each loads it with ``privacy_engine.load_checkpoint(path=..., module=...,
    optimizer=..., data_loader=..., torch_load_kwargs={"map_location": "cpu"})`` (the states are copied to the
    model's device; generator states must stay on the CPU).
    """
    if dist.get_rank() == 0:
        privacy_engine.save_checkpoint(**kwargs)
    _guarded("the barrier after saving a checkpoint", dist.barrier)
