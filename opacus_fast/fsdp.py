"""Book-Keeping under FSDP2 (``torch.distributed.fsdp.fully_shard``): models sharded over the ranks, clipped exactly.

Every rank runs the usual loop on the model, optimizer and loader that ``make_private_fast`` returns for a model
sharded with ``fully_shard`` (each parameter a ``DTensor`` sharded in dim 0 over all ranks of the default group):

- sampling: as in :mod:`opacus_fast.distributed`, one global Poisson sample per step, split over the ranks; every
  rank runs the same number of physical batches (FSDP gathers weights in each forward and backward);
- clipping is per example, on each rank's own examples, with the weights FSDP gathers for forward and backward
  (its unsharded parameters stand in for the sharded ones: the engine maps each to the parameter it stands for);
  BK keeps layer inputs and output gradients, never weights, so FSDP frees them as usual;
- at the end of each backward, the clipped sums go into each rank's shard through one reduce-scatter per FSDP unit,
  never an all-gather of full gradients; the engine computes them layer by layer as the reduce-scatters take them,
  so about one unit's unsharded sums exist at a time; ``p.summed_grad`` is the shard, a DTensor like ``p``;
- noise: at the end of a logical step each rank adds N(0, σ²C²) to its own shard only, so every coordinate is
  noised exactly once; the ranks' generators are seeded from one seed (rank 0's draw from torch's global RNG)
  mixed with the rank, so the streams differ per shard and are reproducible; the divisor is the GLOBAL N·q;
- checkpoints: :func:`save_checkpoint` writes the sharded model and optimizer state with
  ``torch.distributed.checkpoint`` and each rank's noise generator, sampler and accountant state beside it;
  :func:`load_checkpoint` resumes with the same batches, noise and ε.

Not supported (refused when ``make_private_fast`` is called): FSDP1 (``FullyShardedDataParallel``), meshes other
than one dimension over all ranks (HSDP), placements other than ``Shard(0)``, and ``poisson_sampling=False``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .data.sampler import draw_seed
from .distributed import _guarded, _require_initialised, broadcast_from_rank0
from .optimizer import FastDPOptimizer, add_gaussian_noise, check_savable, filled_buffers

Tensor = torch.Tensor
#: reduce-scatter of one flat tensor (renamed in recent torch)
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` is the root of a model sharded with FSDP2's ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def refuse_fsdp1(module: nn.Module) -> None:
    """Raise for FSDP1's ``FullyShardedDataParallel`` anywhere in ``module``: its flat parameters hide the layers."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
        raise ValueError(
            "FullyShardedDataParallel (FSDP1) is not supported: its flattened parameters hide the layers that "
            "Book-Keeping clips. Shard the model with FSDP2 instead: torch.distributed.fsdp.fully_shard(layer) "
            "for each block, then fully_shard(model)"
        )


def _fsdp_params(module: nn.Module) -> list[list[Any]]:
    """FSDP's parameter records, one list per unit (parameter group), in module order."""
    from torch.distributed.fsdp import FSDPModule

    units = []
    for m in module.modules():
        if isinstance(m, FSDPModule):
            units += [list(group.fsdp_params) for group in m._get_fsdp_state()._fsdp_param_groups]
    return units


def _check_placement(name: str, p: Tensor, world: int) -> None:
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor):
        raise TypeError(
            f"parameter '{name}' of an FSDP2 model is not a DTensor: shard every module that owns trainable "
            "parameters with fully_shard (fully_shard(model) on the root shards the rest)"
        )
    if p.device_mesh.ndim != 1 or p.device_mesh.size() != world or tuple(p.placements) != (Shard(0),):
        raise ValueError(
            f"parameter '{name}' is placed as {tuple(p.placements)} on a mesh of shape {tuple(p.device_mesh.shape)}: "
            f"opacus_fast supports FSDP2 sharding in dim 0 over one mesh dimension of all {world} ranks (the "
            "default fully_shard(module)), without HSDP or shard_placement_fn"
        )


@dataclass
class ShardedSetup:
    """A model sharded with FSDP2 for DP training: its unsharded parameters (stand-ins) and its units."""

    module: nn.Module
    #: FSDP's unsharded parameter → the sharded parameter it stands for
    stand_ins: dict[Tensor, nn.Parameter] = field(default_factory=dict)
    #: each unit's sharded parameters (of one dtype, as FSDP requires), in module order: one reduce-scatter each
    units: list[list[nn.Parameter]] = field(default_factory=list)

    @classmethod
    def of(cls, module: nn.Module) -> ShardedSetup:
        """Check ``module`` and gather its unsharded parameters (one all-gather per unit, on every rank), leaving
        it sharded; raises, changing nothing, if it cannot be trained exactly."""
        _require_initialised()
        world = dist.get_world_size()
        for name, p in module.named_parameters():
            _check_placement(name, p, world)
        for m in module.modules():  # FSDP creates its unsharded parameters at the first all-gather, once
            if is_sharded(m):
                m.unshard()
        setup = cls(module)
        for unit in _fsdp_params(module):
            setup.units.append([f.sharded_param for f in unit])
            for f in unit:
                setup.stand_ins[f.unsharded_param] = f.sharded_param
        for m in module.modules():
            if is_sharded(m):
                m.reshard()
        return setup

    def start(self, engine: Any) -> None:
        """Make the replicated buffers rank 0's and route the engine's clipped sums into the shards."""
        buffers = list(self.module.buffers())
        if buffers:
            broadcast_from_rank0(buffers)
        engine.accumulate = self.reduce_scatter

    def reduce_scatter(self, sums: Iterator[tuple[nn.Parameter, Tensor]], params: Sequence[nn.Parameter]) -> None:
        """Add each rank's clipped sums, summed over all ranks, to this rank's shard of ``p.summed_grad``.

        One reduce-scatter per unit, on every rank for every clipped backward (a rank without examples sends zeros),
        in a fixed order (the units in reverse, as backward meets them), so the ranks' collectives always pair up.
        Sums are taken from ``sums`` only as far as the next unit needs, so about one unit's sums exist at a time.
        """
        coming = {id(p) for p in params}
        ready: dict[int, Tensor] = {}
        for unit in reversed(self.units):
            trainable = [p for p in unit if p.requires_grad]
            if not trainable:
                continue
            wanted = [p for p in trainable if id(p) in coming]
            while any(id(p) not in ready for p in wanted):
                p, total = next(sums)
                ready[id(p)] = total
            unit_sums = [ready.pop(id(p), None) for p in trainable]
            _guarded("the reduce-scatter of the clipped gradient sums",
                     lambda params=trainable, sums=unit_sums: _reduce_scatter_unit(params, sums))


def _chunk_rows(rows: int, world: int) -> int:
    """Rows per rank when dim 0 of ``rows`` rows is sharded as ``torch.chunk`` does (the last ranks may get fewer)."""
    return -(-rows // world)


def _reduce_scatter_unit(params: Sequence[nn.Parameter], sums: Sequence[Tensor | None]) -> None:
    """One reduce-scatter of a unit's full-size sums (zeros where None) into the ranks' dim-0 shards of ``params``
    (all of one dtype)."""
    from torch.distributed.tensor import DTensor

    world, rank = dist.get_world_size(), dist.get_rank()
    dtype = params[0].dtype
    blocks = []
    for p, s in zip(params, sums):
        rows = p.shape[0]
        chunk = _chunk_rows(rows, world)
        full = torch.zeros(p.shape, dtype=dtype, device=p.device) if s is None else s.reshape(p.shape).to(dtype)
        full = full.reshape(rows, -1)
        blocks.append(F.pad(full, (0, 0, 0, chunk * world - rows)).reshape(world, -1))
    flat = torch.cat(blocks, dim=1).reshape(-1) if len(blocks) > 1 else blocks[0].reshape(-1)
    out = torch.empty(flat.numel() // world, dtype=dtype, device=flat.device)
    _REDUCE_SCATTER(out, flat)
    for p, block in zip(params, out.split([b.shape[1] for b in blocks])):
        local, rows = p._local_tensor, p.shape[0]
        chunk = _chunk_rows(rows, world)
        if local.shape[0] != max(0, min(chunk, rows - rank * chunk)):
            raise RuntimeError(f"unexpected shard of {tuple(local.shape)} rows for a parameter of {tuple(p.shape)}")
        shard = block[: local.numel()].reshape(local.shape)
        if getattr(p, "summed_grad", None) is None:
            p.summed_grad = DTensor.from_local(shard, p.device_mesh, p.placements, run_check=False,
                                               shape=p.shape, stride=p.stride())
        else:
            p.summed_grad._local_tensor.add_(shard)


def shard_seed(seed: int, rank: int) -> int:
    """The noise seed of ``rank``'s shard: one seed for the run, a different stream per shard."""
    digest = hashlib.sha256(f"opacus_fast noise {seed} {rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class ShardedFastDPOptimizer(FastDPOptimizer):
    """:class:`FastDPOptimizer` for FSDP2 parameters: each rank noises and scales its own shard.

    ``p.summed_grad`` holds this rank's shard of the clipped sums of all ranks; at a logical step's end each rank
    adds N(0, σ²C²) to its shard from its own stream and divides by the GLOBAL expected batch size, so every
    coordinate of the model is noised once. Arguments: as :class:`FastDPOptimizer`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _require_initialised()
        super().__init__(*args, **kwargs)

    def ensure_seeded(self) -> None:
        """Seed each rank's generator from rank 0's draw from torch's global RNG, mixed with the rank."""
        if self._seed_pending:
            seed = [draw_seed() if dist.get_rank() == 0 else None]
            _guarded("the broadcast of the noise seed", lambda: dist.broadcast_object_list(seed, src=0))
            self.generator.manual_seed(shard_seed(seed[0], dist.get_rank()))
            self._seed_pending = False

    def add_noise(self) -> None:
        from torch.distributed.tensor import DTensor

        params = self.params
        locals_ = [p._local_tensor for p in params]
        current = [p.grad._local_tensor if isinstance(p.grad, DTensor) else None for p in params]
        shards = [p.summed_grad._local_tensor if getattr(p, "summed_grad", None) is not None else None
                  for p in params]
        grads = filled_buffers(current, shards, locals_)
        add_gaussian_noise(grads, self.gradient_noise_multiplier() * self.max_grad_norm, self.generator,
                           self.secure_mode)
        for p, grad, old in zip(params, grads, current):
            if grad is not old:
                p.grad = DTensor.from_local(grad, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                            stride=p.stride())

    def scale_grad(self) -> None:
        if self.loss_reduction == "mean":
            torch._foreach_div_([p.grad._local_tensor for p in self.params],
                                self.expected_batch_size * self.accumulated_iterations)


# ---- checkpoints ----------------------------------------------------------------------------------------------------
def save_checkpoint(privacy_engine: Any, *, path: str | os.PathLike, module: nn.Module, optimizer: Any,
                    data_loader: Any) -> None:
    """Save a resumable checkpoint of FSDP2 training into the directory ``path``, on every rank.

    The model and optimizer state are saved sharded with ``torch.distributed.checkpoint``; each rank writes its
    noise generator, and rank 0 the Poisson sampler and accountant (the same on all ranks), beside them.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    check_savable(data_loader)
    extra = {
        "world_size": dist.get_world_size(),
        "noise": optimizer.noise_state(),
        "accountant": privacy_engine.accountant.state_dict(),
        "data_loader": data_loader.state_dict(),
    }
    model = getattr(module, "_module", module)
    model_state, optimizer_state = get_state_dict(model, optimizer.original_optimizer)
    _guarded("saving the sharded checkpoint",
             lambda: dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path))
    torch.save(extra, os.path.join(path, f"opacus_fast_rank{dist.get_rank()}.pt"))
    _guarded("the barrier after saving a checkpoint", dist.barrier)


def load_checkpoint(privacy_engine: Any, *, path: str | os.PathLike, module: nn.Module, optimizer: Any,
                    data_loader: Any) -> None:
    """Resume FSDP2 training from :func:`save_checkpoint`'s directory ``path``, on every rank (same world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    extra_path = os.path.join(path, f"opacus_fast_rank{dist.get_rank()}.pt")
    if not os.path.exists(extra_path):
        raise ValueError(f"{path} holds no state for rank {dist.get_rank()}: resume with the world size it was saved "
                         "with, from a directory written by opacus_fast.fsdp.save_checkpoint")
    extra = torch.load(extra_path, weights_only=False)
    if extra["world_size"] != dist.get_world_size():
        raise ValueError(f"the checkpoint was saved by {extra['world_size']} ranks, not {dist.get_world_size()}: "
                         "each rank's noise stream belongs to its shard, so resume with the same number of ranks")
    model = getattr(module, "_module", module)
    model_state, optimizer_state = get_state_dict(model, optimizer.original_optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    _guarded("loading the sharded checkpoint", lambda: dcp.load(state, checkpoint_id=path))
    set_state_dict(model, optimizer.original_optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    optimizer.load_noise_state(extra["noise"])
    privacy_engine.accountant.load_state_dict(extra["accountant"])
    data_loader.load_state_dict(extra["data_loader"])
