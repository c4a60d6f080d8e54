"""``PrivacyEngine.make_private_fast``: Opacus' ``make_private`` with single-backward Book-Keeping clipping."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from typing import Any

import opacus
import torch
from opacus.grad_sample import GradSampleModule
from torch import nn, optim
from torch.utils.data import DataLoader

from .accounting import check_upper_bound, get_noise_multiplier
from .clipping import ClipBound
from .cpu_memory import keep_freed_memory
from .data.context import BatchContext
from .distributed import DistributedFastDPOptimizer, check_same_settings, dataset_fingerprint, unwrap_distributed
from .engine import BKEngine, plan_sites
from .fsdp import ShardedFastDPOptimizer, ShardedSetup, is_sharded, refuse_fsdp1
from .optimizer import AdaptiveClipDPOptimizer, FastDPOptimizer, check_savable

#: the keywords of ``clipping="adaptive"`` (those of Opacus' ``AdaClipDPOptimizer``)
ADAPTIVE_OPTIONS = frozenset(
    {"target_unclipped_quantile", "clipbound_learning_rate", "max_clipbound", "min_clipbound", "unclipped_num_std"}
)


class BKGradSampleModule(nn.Module):
    """The user's model with BK captures attached; ``._module`` is the user's model, ``.cleanup()`` restores it."""

    def __init__(self, module: nn.Module, engine: BKEngine) -> None:
        super().__init__()
        self._module = module
        self.__dict__["_engine"] = engine

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["_module"], name)

    def __deepcopy__(self, memo: dict) -> nn.Module:
        """A copy of the user's model, without captures (e.g. for an EMA or ``AveragedModel``): it computes with its
        own weights, and the engine, which holds autograd state, is not copied."""
        return copy.deepcopy(self._modules["_module"], memo)

    def cleanup(self) -> nn.Module:
        """Detach every capture and hook; returns the user's model, as it was before ``make_private_fast``."""
        self._engine.detach()
        return self._module


class BKHooks:
    """What ``make_private_fast(wrap_model=False)`` returns, as Opacus' ``GradSampleHooks``: the BK engine attached
    to the user's model itself, which is trained directly (every call of it is tracked through hooks the engine
    registers on it). ``._module`` is the model; ``.cleanup()`` detaches everything and returns it as it was.
    """

    def __init__(self, module: nn.Module, engine: BKEngine) -> None:
        self._module = module
        self._engine = engine

    def cleanup(self) -> nn.Module:
        """Detach every capture and hook; returns the user's model, as it was before ``make_private_fast``."""
        self._engine.detach()
        return self._module


def _check_options(
    *,
    module: nn.Module,
    optimizer: optim.Optimizer,
    noise_multiplier: float,
    max_grad_norm: float | Sequence[float],
    batch_first: bool,
    loss_reduction: str,
    clipping: str,
    grad_sample_mode: str,
    distributed: bool,
    unsupported: dict[str, Any],
) -> list[nn.Parameter]:
    """Validate everything before anything is modified; return the optimizer's trainable parameters."""
    adaptive = set(unsupported) & ADAPTIVE_OPTIONS if clipping == "adaptive" else set()
    if set(unsupported) - adaptive:
        raise TypeError(f"make_private_fast does not support the option(s) {sorted(set(unsupported) - adaptive)}")
    if grad_sample_mode != "bk":
        raise ValueError(f"grad_sample_mode={grad_sample_mode!r}: make_private_fast supports 'bk' only")
    if clipping not in ("flat", "per_layer", "adaptive"):
        raise ValueError(f"clipping={clipping!r}: make_private_fast supports 'flat', 'per_layer' and 'adaptive'")
    if clipping == "adaptive" and adaptive != ADAPTIVE_OPTIONS:
        raise TypeError(f"clipping='adaptive' needs the keyword(s) {sorted(ADAPTIVE_OPTIONS - adaptive)}")
    if clipping == "adaptive" and distributed:
        raise ValueError("clipping='adaptive' is not supported in distributed training (nor is it by Opacus)")
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if isinstance(module, (BKGradSampleModule, GradSampleModule)):
        raise TypeError("the module is already wrapped for DP training; pass the original model")
    model_params = {id(p) for p in module.parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if any(id(p) not in model_params for p in params):
        raise ValueError(
            "Module parameters are different than optimizer Parameters: the optimizer holds parameters that are not "
            "the module's (e.g. ModuleValidator.fix replaced modules after the optimizer was made). Create the "
            "optimizer from the parameters of the module you pass"
        )
    missing = _trainable_outside(module, params)
    if missing:
        raise ValueError(
            f"the module's trainable parameter(s) {missing} are not in the optimizer: they would be clipped but never "
            "noised nor updated. Add them to the optimizer, or freeze them "
            "(p.requires_grad_(False)), before make_private_fast"
        )
    if clipping == "per_layer":
        if isinstance(max_grad_norm, (int, float)) or len(max_grad_norm) != len(params):
            raise ValueError(
                f"clipping='per_layer' needs a list of {len(params)} bounds (one per trainable parameter, in "
                "optimizer order)"
            )
        bounds = list(max_grad_norm)
    else:
        if not isinstance(max_grad_norm, (int, float)):
            raise ValueError(f"clipping={clipping!r} needs a single max_grad_norm (use clipping='per_layer' for a list)")
        bounds = [max_grad_norm]
    if any(not (b > 0) for b in bounds):
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    return params


def _trainable_outside(module: nn.Module, params: Sequence[nn.Parameter]) -> list[str]:
    """Names of ``module``'s trainable parameters that are not among ``params`` (the optimizer's)."""
    held = {id(p) for p in params}
    return [name for name, p in module.named_parameters() if p.requires_grad and id(p) not in held]


def _noise_generator(generator: torch.Generator | None, params: Sequence[nn.Parameter]) -> torch.Generator | None:
    """The user's generator, or a dedicated one (seeded by the optimizer from torch's global RNG at the first noisy
    step, so the seed at that time governs the noise, as in Opacus) whose state checkpoints save: a resumed run must
    never replay noise already used. Parameters on several devices draw from torch's global RNG directly."""
    devices = {p.device for p in params}
    if generator is not None or len(devices) != 1:
        return generator
    return torch.Generator(device=devices.pop())


def _divisor(dataset_size: int, rate: float, sample_rate: float | None) -> float:
    """The expected batch size that divides a mean's noisy sum: Opacus' ``int(N / len(data_loader))`` by default,
    N·q for a ``sample_rate`` given explicitly."""
    return dataset_size * rate if sample_rate is not None else int(dataset_size * rate)


class PrivacyEngine(opacus.PrivacyEngine):
    """Opacus' PrivacyEngine plus :meth:`make_private_fast` (and its ``_with_epsilon`` variant)."""

    #: whether make_private_fast has set up training with this engine (checkpoints must then restore everything)
    _trains = False
    #: whether that training draws Poisson batches (whose sampler state a resuming checkpoint must hold)
    _poisson = False
    #: whether a checkpoint restored privacy history before make_private_fast (whose fresh sampler and noise
    #: generator would start over instead of resuming)
    _restored = False

    def make_private_fast(
        self,
        *,
        module: nn.Module,
        optimizer: optim.Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float | Sequence[float],
        batch_first: bool = True,
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        clipping: str = "flat",
        noise_generator=None,
        grad_sample_mode: str = "bk",
        criterion: Any = None,
        wrap_model: bool = True,
        rand_on_empty: bool = False,
        max_physical_batch_size: int | None = None,
        pad_physical_batches: bool | None = None,
        sample_rate: float | None = None,
        keep_cpu_memory: bool = True,
        **kwargs: Any,
    ) -> tuple[BKGradSampleModule | BKHooks, FastDPOptimizer, DataLoader]:
        """Make ``module``, ``optimizer`` and ``data_loader`` private; same keywords and return as ``make_private``.

        One forward and one ordinary ``loss.backward()`` per physical batch: per-example gradient norms and the
        clipped sum come from the BK engine, noise N(0, σ²C²) is added once per logical batch. ``criterion`` is
        accepted for drop-in compatibility and not needed. ``wrap_model=False`` attaches to ``module`` itself
        and returns a :class:`BKHooks` (train ``module``; ``hooks.cleanup()`` detaches). ``clipping="adaptive"``
        takes Opacus' keywords ``target_unclipped_quantile``, ``clipbound_learning_rate``, ``max_clipbound``,
        ``min_clipbound`` and ``unclipped_num_std`` (see :class:`~opacus_fast.optimizer.AdaptiveClipDPOptimizer`).
        ``rand_on_empty`` turns an empty batch into one random row, as in Opacus. Extra keywords:

        Args:
            max_physical_batch_size: split each Poisson logical batch into physical batches of at most this size.
            pad_physical_batches: pad every physical batch to exactly ``max_physical_batch_size`` rows with masked
                examples (default: on whenever ``max_physical_batch_size`` is set), so every step has one shape.
            sample_rate: Poisson rate q (default ``1 / len(data_loader)``, as Opacus). A mean's noisy sum is divided
                by Opacus' ``int(N / len(data_loader))`` by default, by N·q for a ``sample_rate`` given here.
            keep_cpu_memory: when the model is on the CPU, make glibc's malloc keep freed memory for reuse
                (process-wide; see :mod:`opacus_fast.cpu_memory`): BK's higher peak otherwise costs page faults
                on every step.

        Distributed training: pass the model wrapped in ``opacus_fast.distributed.DPDistributedModule`` (or in
        ``DistributedDataParallel``) on every rank; see :mod:`opacus_fast.distributed`.
        """
        if noise_generator is not None and self.secure_mode:
            raise ValueError("Passing seed is prohibited in secure mode")
        if self._restored and not self._trains:
            raise ValueError(
                "this PrivacyEngine loaded a checkpoint before make_private_fast: the new data loader and noise "
                "generator would start over (seeded as in the original run) instead of resuming, replaying batches "
                "and noise already used. Call make_private_fast first, then load_checkpoint(..., module=model, "
                "optimizer=optimizer, data_loader=data_loader) with what it returned"
            )
        check_upper_bound(self.accountant.mechanism())
        refuse_fsdp1(module)
        setup = _distributed_setup(module, poisson_sampling)
        if setup is not None:
            module = setup.module
        params = _check_options(
            module=module, optimizer=optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            batch_first=batch_first, loss_reduction=loss_reduction, clipping=clipping,
            grad_sample_mode=grad_sample_mode, distributed=setup is not None, unsupported=kwargs,
        )
        plan_sites(module)  # raises, naming every unsupported part, before anything is changed
        if isinstance(optimizer, FastDPOptimizer):
            optimizer = optimizer.original_optimizer

        context = BatchContext()
        if poisson_sampling:
            from .data import DPDataLoader

            loader = DPDataLoader.from_data_loader(
                data_loader, sample_rate=sample_rate, max_physical_batch_size=max_physical_batch_size,
                pad=pad_physical_batches, generator=None, secure_mode=self.secure_mode, context=context,
                distributed=setup is not None, rand_on_empty=rand_on_empty,
            )
            rate = loader.sample_rate
        else:
            if max_physical_batch_size is not None or sample_rate is not None:
                raise ValueError("max_physical_batch_size and sample_rate need poisson_sampling=True")
            warnings.warn(
                "poisson_sampling=False: batches are not Poisson-sampled, so the accountant's (ε, δ) guarantee "
                "does not hold for this training run",
                stacklevel=2,
            )
            loader = data_loader
            rate = 1 / len(data_loader)
        expected = _divisor(len(data_loader.dataset), rate, sample_rate)
        sharded = isinstance(setup, ShardedSetup)
        if setup is not None:
            check_same_settings({
                "dataset size": len(data_loader.dataset), "dataset contents": dataset_fingerprint(data_loader.dataset),
                "sample_rate": rate, "expected batch size": expected,
                "noise_multiplier": noise_multiplier, "max_grad_norm": max_grad_norm, "loss_reduction": loss_reduction,
                **({"physical batches": (max_physical_batch_size, pad_physical_batches)} if sharded else {}),
            })
        if self.dataset is None:
            self.dataset = data_loader.dataset

        if keep_cpu_memory and any(p.device.type == "cpu" for p in params):
            keep_freed_memory()
        bound = ClipBound(max_grad_norm, params)
        generator = self.secure_rng if self.secure_mode else _noise_generator(noise_generator, params)
        options = {
            "noise_multiplier": noise_multiplier, "bound": bound, "expected_batch_size": expected,
            "loss_reduction": loss_reduction, "generator": generator, "secure_mode": self.secure_mode,
            "seed_generator": not self.secure_mode and noise_generator is None, "context": context,
        }
        if clipping == "adaptive":
            dp_optimizer = AdaptiveClipDPOptimizer(optimizer, **options, **kwargs)
        else:
            kind = FastDPOptimizer if setup is None else ShardedFastDPOptimizer if sharded else DistributedFastDPOptimizer
            dp_optimizer = kind(optimizer, **options)
        engine = BKEngine(module, bound=bound, loss_reduction=loss_reduction, context=context,
                          batch_first=batch_first, stand_ins=setup.stand_ins if sharded else None)
        try:
            if clipping == "adaptive":
                engine.norms_listener = dp_optimizer.observe_norms
            if setup is not None:
                setup.start(engine)
            dp_optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=rate))
            model = BKGradSampleModule(module, engine) if wrap_model else BKHooks(module, engine)
        except BaseException:
            engine.detach()  # leave the user's model as it was
            raise
        self._trains, self._poisson = True, poisson_sampling
        return model, dp_optimizer, loader

    def make_private_fast_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: optim.Optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        max_grad_norm: float | Sequence[float],
        epochs: float | None = None,
        steps: int | None = None,
        epsilon_tolerance: float = 0.01,
        sample_rate: float | None = None,
        **kwargs: Any,
    ) -> tuple[BKGradSampleModule | BKHooks, FastDPOptimizer, DataLoader]:
        """:meth:`make_private_fast` with σ calibrated so that the accountant's ε after ``epochs`` (or ``steps``)
        logical steps is at most ``target_epsilon`` (the conservative side of the search)."""
        if (epochs is None) == (steps is None):
            raise ValueError("give exactly one of epochs and steps")
        rate = sample_rate if sample_rate is not None else 1 / len(data_loader)
        total_steps = steps if steps is not None else math.ceil(epochs / rate)
        if len(self.accountant) > 0:
            warnings.warn(
                "this PrivacyEngine has already spent privacy; σ is calibrated for the new run alone, while "
                "get_epsilon() reports the total",
                stacklevel=2,
            )
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=rate, steps=total_steps,
            accountant=self.accountant.mechanism(), epsilon_tolerance=epsilon_tolerance,
        )
        return self.make_private_fast(
            module=module, optimizer=optimizer, data_loader=data_loader, noise_multiplier=sigma,
            max_grad_norm=max_grad_norm, sample_rate=sample_rate, **kwargs,
        )

    def save_checkpoint(self, *, path, module: nn.Module, optimizer=None, data_loader=None, **kwargs: Any) -> None:
        """Opacus' ``save_checkpoint`` plus, with ``data_loader``, the Poisson sampler's state (same next batches).

        Refused between fetching the last physical batch of a logical batch and the ``optimizer.step()`` that
        releases it: the sampler state would already be past that logical batch and the noise generator not, so a
        resumed run would skip it and noise the next one with its noise.
        """
        checkpoint = dict(kwargs.pop("checkpoint_dict", None) or {})
        _refuse_sharded(module, "save_checkpoint")
        if data_loader is not None:
            check_savable(data_loader)
            checkpoint["data_loader_state_dict"] = data_loader.state_dict()
        given = {"optimizer": optimizer, "data_loader": data_loader}
        if any(given[name] is None for name in self._resume_parts()):
            warnings.warn(
                "this checkpoint holds no optimizer or data loader state, so training cannot resume from it (that "
                "would replay noise or batches already used); pass optimizer= and data_loader= to save one that can",
                stacklevel=2,
            )
        super().save_checkpoint(path=path, module=module, optimizer=optimizer, checkpoint_dict=checkpoint, **kwargs)

    def load_checkpoint(self, *, path, module: nn.Module, optimizer=None, data_loader=None, **kwargs: Any) -> dict:
        """Opacus' ``load_checkpoint`` plus, with ``data_loader``, the Poisson sampler's state.

        When this engine trains (``make_private_fast`` was called), the optimizer and the data loader must both be
        restored if the checkpoint holds their state, before anything is loaded: a fresh sampler would redraw
        batches already used, a fresh noise generator replay noise already used on other batches.
        """
        _refuse_sharded(module, "load_checkpoint")
        _check_restored(_peek(path, kwargs.get("torch_load_kwargs")), optimizer, data_loader,
                        needed=self._resume_parts())
        checkpoint = super().load_checkpoint(path=path, module=module, optimizer=optimizer, **kwargs)
        if data_loader is not None:
            data_loader.load_state_dict(checkpoint.pop("data_loader_state_dict"))
        self._restored = self._restored or (not self._trains and len(self.accountant) > 0)
        return checkpoint

    def _resume_parts(self) -> tuple[str, ...]:
        """The parts whose state a checkpoint needs for training to resume from it: the optimizer (noise
        generator) and, with Poisson sampling, the data loader (sampler); none when this engine does not train."""
        if not self._trains:
            return ()
        return ("optimizer", "data_loader") if self._poisson else ("optimizer",)



def _distributed_setup(module: nn.Module, poisson_sampling: bool) -> ShardedSetup | Any:
    """The setup of a model sharded with FSDP2 or wrapped for DDP (None for a plain model)."""
    if not is_sharded(module):
        return unwrap_distributed(module, poisson_sampling=poisson_sampling)
    if not poisson_sampling:
        raise ValueError(
            "FSDP2 training needs poisson_sampling=True: the global batch must be one Poisson sample split over "
            "the ranks, with the global expected batch size as divisor"
        )
    return ShardedSetup.of(module)


def _refuse_sharded(module: nn.Module, what: str) -> None:
    """Refuse a single-file checkpoint of an FSDP2 model: it would hold one rank's shards only."""
    model = getattr(module, "_module", module)
    if is_sharded(model):
        raise ValueError(
            f"{what} writes one file from one rank, but this model is sharded with FSDP2: use "
            "opacus_fast.fsdp.save_checkpoint / load_checkpoint (sharded, on every rank)"
        )


def _peek(path: Any, torch_load_kwargs: dict | None) -> dict:
    """The checkpoint's contents, leaving a file object at its start for the real load; a file on disk is memory-mapped,
    so only what is looked at is read (the real load reads it all)."""
    if hasattr(path, "seek"):
        checkpoint = torch.load(path, **(torch_load_kwargs or {}))
        path.seek(0)
        return checkpoint
    return torch.load(path, **{"mmap": True, **(torch_load_kwargs or {})})


def _check_restored(checkpoint: dict, optimizer: Any, data_loader: Any, *, needed: Sequence[str]) -> None:
    """Refuse a checkpoint load that would restore only part of a training run's randomness, or lacks a part.

    ``needed``: the parts whose state a training engine must restore (none when the engine does not train).
    """
    keys = {"optimizer": "optimizer_state_dict", "data_loader": "data_loader_state_dict"}
    absent = [name for name in needed if keys[name] not in checkpoint]
    if not absent and data_loader is not None and "data_loader_state_dict" not in checkpoint:
        raise ValueError("the checkpoint holds no data loader state: save it with save_checkpoint(..., data_loader=...)")
    if absent:
        raise ValueError(
            f"the checkpoint holds no {' and no '.join(absent)} state, so training cannot resume from it: a fresh "
            "noise generator would replay noise already used, a fresh sampler batches already used, which voids "
            "the privacy guarantee. Resume from a checkpoint saved with save_checkpoint(..., optimizer=..., "
            "data_loader=...). To load the model for evaluation only, pass torch.load(path)['module_state_dict'] "
            "to the load_state_dict of the model you evaluate"
        )
    given = {"optimizer": optimizer, "data_loader": data_loader}
    missing = [name for name in needed if given[name] is None]
    if missing:
        raise ValueError(
            f"the checkpoint holds the state of {' and '.join(missing)} but load_checkpoint was not given "
            f"{'them' if len(missing) > 1 else 'it'}: resuming training without it would redraw batches already "
            "used (data loader) or replay noise already used on other batches (optimizer's noise generator), "
            "which voids the privacy guarantee. Pass the optimizer and data_loader that make_private_fast "
            "returned. To load the model for evaluation only, pass torch.load(path)['module_state_dict'] to the "
            "load_state_dict of the model you evaluate"
        )
