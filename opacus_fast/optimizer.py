"""DP optimizer for the BK engine: noise exactly once per logical batch, std σ·C, then the wrapped step.

The clipping engine has already put each parameter's clipped per-example sum into ``p.summed_grad`` (summed over
all physical batches of the logical batch). This optimizer only decides when a logical batch ends, adds the noise,
scales, calls the accountant hook and steps. As in Opacus, ``p.summed_grad`` stays readable after the step until
``zero_grad()``, and a backward pass after a step needs a ``zero_grad()`` in between.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _generate_noise
from torch._utils import _unflatten_dense_tensors
from torch.optim import Optimizer

from .clipping import ClipBound, has_pending_sums, mark_released
from .data.context import BatchContext, PhysicalBatchInfo
from .data.sampler import draw_seed

#: Opacus' message for a backward pass after a step without zero_grad() in between
NOT_CLEARED = (
    "Gradients haven't been cleared since the last optimizer step. In order to obtain privacy guarantees you must "
    "call optimizer.zero_grad() on each step: call it between optimizer.step() and the next backward(), also "
    "between the physical batches of Opacus' BatchMemoryManager"
)


class FastDPOptimizer(DPOptimizer):
    """An Opacus ``DPOptimizer`` whose clipping happens in the BK engine during backward.

    Args:
        optimizer: the user's optimizer.
        noise_multiplier: σ; the noise std is σ·C with C the (flat or L2-combined per-layer) clip bound.
        bound: the clip bound shared with the engine; ``max_grad_norm`` reads and sets it.
        expected_batch_size: the divisor of the noisy sum when ``loss_reduction="mean"``.
        generator: the noise generator.
        seed_generator: seed ``generator`` from torch's global RNG at the first step that draws noise (as in
            Opacus, the seed at the time of the step governs the noise), after which it continues its own stream,
            which checkpoints restore.
        context: where the data loader publishes the current physical batch and the engine records the one
            trained last (whose logical batch decides whether a step ends it).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        noise_multiplier: float,
        bound: ClipBound,
        expected_batch_size: float | None,
        loss_reduction: str = "mean",
        generator: torch.Generator | None = None,
        seed_generator: bool = False,
        secure_mode: bool = False,
        context: BatchContext | None = None,
    ) -> None:
        self.bound = bound
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=bound.total,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=generator,
            secure_mode=secure_mode,
        )
        self.context = context
        #: whether ``generator`` still waits for its seed from torch's global RNG
        self._seed_pending = seed_generator and generator is not None
        #: clipped backward passes counted at the last zero_grad(): those since then are this step's batches
        self._clipped_at_zero_grad = 0
        #: whether step() ran since the last zero_grad(), and the clipped backward passes counted then
        self._stepped = False
        self._clipped_at_step = 0

    @property
    def max_grad_norm(self) -> float:
        """C for the noise std σ·C; setting it changes the engine's clipping too (one source of truth)."""
        return self.bound.total

    @max_grad_norm.setter
    def max_grad_norm(self, value: float) -> None:
        """Change C (e.g. from a GradClipScheduler) between logical batches; sums that a loop left behind (break)
        are discarded first, since they will never be released."""
        if value != self.bound.total:
            self._discard_abandoned()
        self.bound.set_total(value)

    @property
    def accumulated_iterations(self) -> int:
        """Batches of the data loader summed into this step, as Opacus counts them (the accountant's rate and the
        divisor of a mean scale with it): a Poisson logical batch is one, however many physical batches it was cut
        into; with another loader every clipped backward pass since zero_grad() is one batch (gradient
        accumulation)."""
        if self.context is None or self.context.trained is not None:
            return 1
        return max(1, self.context.clipped_since_release - self._clipped_at_zero_grad)

    @property
    def grad_samples(self) -> list[torch.Tensor]:
        """The BK engine never materialises per-sample gradients."""
        return []

    def clip_and_accumulate(self) -> None:
        """Nothing to do: the engine clipped and accumulated during backward."""

    def _infos(self) -> tuple[PhysicalBatchInfo | None, PhysicalBatchInfo | None]:
        """The physical batch trained last and the one handed to the loop now (None, None without a context)."""
        if self.context is None:
            return None, None
        return self.context.trained, self.context.current

    def _logical_batch_continues(self) -> bool:
        """Whether this step is not the end of a logical batch: Opacus' skip signal, or the pending sums belong to a
        physical batch that is not the last of its logical batch (also after the loop was left, e.g. by break)."""
        signalled = self._check_skip_next_step()
        trained, _ = self._infos()
        return signalled or (trained is not None and not trained.is_last)

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool:
        """At the end of a logical batch: noise, scaling and the accountant hook (True); before it, nothing."""
        self._check_cleared()
        if self._logical_batch_continues():
            self._is_last_step_skipped = True
            self._note_step()
            return False
        if self.context is not None:
            _check_clipped(self.context)
            self.context.released = self.context.trained
        if self.noise_multiplier > 0:
            self.ensure_seeded()
        self.add_noise()
        self.scale_grad()
        mark_released(self.params)
        if self.step_hook:
            self.step_hook(self)
        if self.context is not None:
            self.context.forward_since_release, self.context.clipped_since_release = False, 0
        self._clipped_at_zero_grad = 0
        self._is_last_step_skipped = False
        self._note_step()
        return True

    def _clipped(self) -> int:
        """Clipped backward passes since the last release (0 without a context)."""
        return self.context.clipped_since_release if self.context is not None else 0

    def _note_step(self) -> None:
        self._stepped, self._clipped_at_step = True, self._clipped()

    def _check_cleared(self) -> None:
        """Refuse, as Opacus does (ValueError), a step whose batch was trained after a step without zero_grad() in
        between: its sums would count the earlier batch again, or be divided as if several batches were one."""
        if self._stepped and self._clipped() > self._clipped_at_step:
            raise ValueError(NOT_CLEARED)

    def ensure_seeded(self) -> None:
        """Seed the noise generator from torch's global RNG if it still waits for its seed (see ``seed_generator``)."""
        if self._seed_pending:
            self.generator.manual_seed(draw_seed())
            self._seed_pending = False

    def gradient_noise_multiplier(self) -> float:
        """σ of the gradient noise, whose std is σ·C (adaptive clipping lowers it; the accountant reads
        ``noise_multiplier``)."""
        return self.noise_multiplier

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Clear gradients; partial sums are kept between physical batches of one logical batch.

        Partial sums still pending when the loop has moved past their logical batch (left before its last physical
        batch, then a new batch or the end of the loop) were never released, so they are discarded (with a
        warning) rather than added to another batch, where an example drawn twice would count twice. Without any
        trained physical batch from the loader (a plain loader, Opacus' BatchMemoryManager), Opacus' rule applies.
        """
        self._discard_abandoned()
        self._clipped_at_zero_grad = self._clipped()
        self._stepped = False
        trained, current = self._infos()
        if not continues(trained, current):
            super().zero_grad(set_to_none)
            return
        for p in self.params:
            p.grad_sample = None
        self.original_optimizer.zero_grad(set_to_none)

    def _discard_abandoned(self) -> None:
        """Drop, with a warning, the pending sums of a logical batch the loop left before its last physical batch."""
        if abandoned(*self._infos()) and has_pending_sums(self.params):
            warnings.warn(
                "discarding the clipped gradients of a logical batch that was left before its last physical batch",
                stacklevel=3,
            )
            for p in self.params:
                p.summed_grad = None

    def add_noise(self) -> None:
        """``p.grad = summed clipped grads + N(0, σ²C²)``, one draw per logical batch (:func:`add_gaussian_noise`);
        ``p.summed_grad`` stays, without noise, until ``zero_grad()``."""
        params = self.params
        sums = [getattr(p, "summed_grad", None) for p in params]
        std = self.gradient_noise_multiplier() * self.max_grad_norm
        if std > 0 and all(p.grad is None for p in params):  # after zero_grad(set_to_none=True): the draw is p.grad
            grads = gaussian_noise(params, std, self.generator, self.secure_mode)
            summed = [(grad, s) for grad, s in zip(grads, sums) if s is not None]
            if summed:
                torch._foreach_add_([grad for grad, _ in summed], [s for _, s in summed])
        else:
            grads = filled_buffers([p.grad for p in params], sums, params)
            add_gaussian_noise(grads, std, self.generator, self.secure_mode)
        for p, grad in zip(params, grads):
            p.grad = grad

    def scale_grad(self) -> None:
        if self.loss_reduction == "mean":
            torch._foreach_div_([p.grad for p in self.params], self.expected_batch_size * self.accumulated_iterations)

    def state_dict(self) -> dict:
        """The wrapped optimizer's state plus the noise generator's state (for an identical resumed run).

        Partial sums of an unfinished logical batch are not saved: the Poisson loader redraws an interrupted
        logical batch from its start on resume, so keeping them would count its first examples twice.
        """
        state = self.original_optimizer.state_dict()
        state["opacus_fast"] = self.noise_state()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        extra = state.pop("opacus_fast", {})
        self.original_optimizer.load_state_dict(state)
        self.load_noise_state(extra)

    def noise_state(self) -> dict:
        """The noise generator's state (None in secure mode, whose draws cannot be replayed) and whether it still
        waits for its seed."""
        noise = self.generator.get_state() if self.generator is not None and not self.secure_mode else None
        return {"noise_generator": noise, "seed_pending": self._seed_pending}

    def load_noise_state(self, extra: dict) -> None:
        """Restore :meth:`noise_state`; pending sums and step bookkeeping start afresh, as after a step."""
        if extra.get("noise_generator") is not None and self.generator is not None:
            self.generator.set_state(extra["noise_generator"].cpu())
            self._seed_pending = extra.get("seed_pending", False)
        for p in self.params:
            p.summed_grad = None
        self._is_last_step_skipped = False
        self._step_skip_queue.clear()
        self._stepped = False


class AdaptiveClipDPOptimizer(FastDPOptimizer):
    """Adaptive clipping (Andrew et al. 2021, arXiv:1905.03871) with the parameters and accounting of Opacus'
    ``AdaClipDPOptimizer`` (``clipping="adaptive"``), on the per-example norms the BK engine computes anyway.

    After each logical batch the bound C moves towards the ``target_unclipped_quantile`` γ of the per-example norms:
    C ← clamp(C · exp(-η (b̃ - γ)), ``min_clipbound``, ``max_clipbound``), with η the ``clipbound_learning_rate``
    and b̃ = (number of examples whose norm was at most C + N(0, σ_b²)) / expected batch size, σ_b the
    ``unclipped_num_std``. The gradient noise uses σ_eff = (σ⁻² - (2σ_b)⁻²)^(-1/2), so that the gradient and the
    count together cost what σ alone does (Theorem 1 of the paper); the accountant records σ. Two differences from
    Opacus, both for correctness: b̃ divides by the expected batch size, not the drawn one (whose size would be
    released without noise; with fixed-size batches they agree), and the count covers the whole logical batch, not
    only its last physical batch. The count noise is drawn from the noise generator right after the gradient noise.

    Args:
        ``norms_listener`` of the BK engine must be :meth:`observe_norms`. Other arguments: as
        :class:`FastDPOptimizer`, whose ``bound`` must be flat.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        target_unclipped_quantile: float,
        clipbound_learning_rate: float,
        max_clipbound: float,
        min_clipbound: float,
        unclipped_num_std: float,
        **kwargs,
    ) -> None:
        super().__init__(optimizer, **kwargs)
        if max_clipbound <= min_clipbound:
            raise ValueError("max_clipbound must be larger than min_clipbound.")
        if self.noise_multiplier >= 2 * unclipped_num_std:
            raise ValueError(
                "noise_multiplier must be smaller than 2 * unclipped_num_std. This is a requirement stemming from "
                "Theorem 1 in https://arxiv.org/pdf/1905.03871.pdf"
            )
        if self.bound.flat is None:
            raise ValueError("clipping='adaptive' adapts one flat bound: give a single max_grad_norm")
        if self.expected_batch_size is None:
            raise ValueError("clipping='adaptive' needs expected_batch_size (the divisor of the unclipped count)")
        self.target_unclipped_quantile = target_unclipped_quantile
        self.clipbound_learning_rate = clipbound_learning_rate
        self.max_clipbound = max_clipbound
        self.min_clipbound = min_clipbound
        self.unclipped_num_std = unclipped_num_std
        #: examples of the pending clipped sums whose norm was at most the bound (a tensor once counted)
        self.unclipped_num: torch.Tensor | int = 0

    def observe_norms(self, norms: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Count the examples of one backward left unclipped (the BK engine calls this before adding its sums):
        clip factor min(1, C / (norm + 1e-6)) equal to 1, as Opacus counts them; padding rows do not count."""
        unclipped = (self.max_grad_norm / (norms + 1e-6)) >= 1
        if mask is not None:
            unclipped = unclipped & mask.to(unclipped.device)
        counted = unclipped.sum()
        self.unclipped_num = self.unclipped_num + counted if has_pending_sums(self.params) else counted

    def gradient_noise_multiplier(self) -> float:
        """σ_eff = (σ⁻² - (2σ_b)⁻²)^(-1/2) (0 without noise)."""
        if self.noise_multiplier <= 0:
            return 0.0
        return (self.noise_multiplier**-2 - (2 * self.unclipped_num_std) ** -2) ** -0.5

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool:
        """:meth:`FastDPOptimizer.pre_step`, then, at the end of a logical batch, the new bound."""
        batches = self.accumulated_iterations
        if not super().pre_step(closure):
            return False
        self._update_bound(batches)
        return True

    def _update_bound(self, batches: int) -> None:
        self.ensure_seeded()
        device = self.params[0].device if self.params else None
        count = torch.as_tensor(self.unclipped_num, device=device).float()
        noise = _generate_noise(
            std=self.unclipped_num_std, reference=count, generator=self.generator, secure_mode=self.secure_mode
        )
        fraction = float(count + noise) / (self.expected_batch_size * batches)
        bound = self.max_grad_norm * math.exp(-self.clipbound_learning_rate * (fraction - self.target_unclipped_quantile))
        self.max_grad_norm = min(max(bound, self.min_clipbound), self.max_clipbound)
        self.unclipped_num = 0

    def state_dict(self) -> dict:
        """:meth:`FastDPOptimizer.state_dict` plus the current bound, which training has moved."""
        state = super().state_dict()
        state["opacus_fast"]["max_grad_norm"] = self.max_grad_norm
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        bound = state_dict.get("opacus_fast", {}).get("max_grad_norm")
        super().load_state_dict(state_dict)
        if bound is not None:
            self.max_grad_norm = bound
        self.unclipped_num = 0


def filled_buffers(current: list[torch.Tensor | None], sums: list[torch.Tensor | None],
                   like: list[torch.Tensor]) -> list[torch.Tensor]:
    """A copy of each sum (zeros where None), shaped like ``like``: written into the ``current`` tensor where it can
    hold it (a zeroed ``p.grad``: its memory is reused rather than held beside a new copy), else into a new one;
    one foreach kernel for the copies, one for the zeros."""
    out = []
    for old, ref in zip(current, like):
        fits = (old is not None and old.shape == ref.shape and old.dtype == ref.dtype and old.device == ref.device
                and old.layout == torch.strided and not old.requires_grad)
        out.append(old if fits else torch.empty_like(ref, memory_format=torch.contiguous_format))
    copied = [(t, s) for t, s in zip(out, sums) if s is not None]
    if copied:
        torch._foreach_copy_([t for t, _ in copied], [s for _, s in copied])
    zeroed = [t for t, s in zip(out, sums) if s is None]
    if zeroed:
        torch._foreach_zero_(zeroed)
    return out


#: the noise is drawn in flat buffers of at most this many elements (a few kernels for all parameters, with a bounded
#: extra memory)
NOISE_BUCKET_NUMEL = 2**24
#: on the CPU a larger draw is made in chunks of this many elements, each from its own generator seeded from the
#: caller's, drawn in parallel on torch's intra-op threads: one Mersenne Twister draws about 130 M/s (85 ms for
#: ResNet-18's 11 M parameters, half an SGD step). The chunks do not depend on the thread count, so a seed gives the
#: same noise on any machine.
NOISE_CHUNK_NUMEL = 2**21


def add_gaussian_noise(
    tensors: list[torch.Tensor], std: float, generator: torch.Generator | None, secure_mode: bool
) -> None:
    """Add independent N(0, std²) noise to every element of ``tensors``, in place (:func:`gaussian_noise`, then one
    foreach add)."""
    if std == 0:
        return
    torch._foreach_add_(tensors, gaussian_noise(tensors, std, generator, secure_mode))


def gaussian_noise(
    like: list[torch.Tensor], std: float, generator: torch.Generator | None, secure_mode: bool
) -> list[torch.Tensor]:
    """Fresh tensors of independent N(0, std²) elements, shaped like ``like``'s.

    One draw per (device, dtype) of a flat buffer (in buckets of at most ``NOISE_BUCKET_NUMEL`` elements, a larger
    tensor alone), whose views are the tensors: a handful of kernels instead of several per parameter. Every element
    gets its own draw from ``generator`` in the tensors' dtype, as Opacus draws per parameter; with ``secure_mode``,
    Opacus' own secure draw makes the buffer.
    """
    buckets: list[list] = []  # [indices into ``like``, their total numel]
    open_buckets: dict[tuple[torch.device, torch.dtype], list] = {}
    for i, t in enumerate(like):
        bucket = open_buckets.get((t.device, t.dtype))
        if bucket is None or bucket[1] + t.numel() > NOISE_BUCKET_NUMEL:
            bucket = open_buckets[(t.device, t.dtype)] = [[], 0]
            buckets.append(bucket)
        bucket[0].append(i)
        bucket[1] += t.numel()
    out: list[torch.Tensor] = [None] * len(like)  # type: ignore[list-item]
    for indices, total in buckets:
        device, dtype = like[indices[0]].device, like[indices[0]].dtype
        if secure_mode:
            shape_of = torch.empty((), device=device, dtype=dtype).expand(total)
            noise = _generate_noise(std=std, reference=shape_of, generator=generator, secure_mode=True)
        else:
            noise = _normal(total, std, generator, device, dtype)
        for i, view in zip(indices, _unflatten_dense_tensors(noise, [like[i] for i in indices])):
            out[i] = view
    return out


def _normal(total: int, std: float, generator: torch.Generator | None, device: torch.device,
            dtype: torch.dtype) -> torch.Tensor:
    """``total`` independent N(0, std²) draws: in one call, or on the CPU in ``NOISE_CHUNK_NUMEL`` chunks drawn in
    parallel, each from a generator seeded by one draw of ``generator``."""
    if device.type != "cpu" or total <= NOISE_CHUNK_NUMEL:
        return torch.normal(0.0, std, size=(total,), generator=generator, device=device, dtype=dtype)
    out = torch.empty(total, device=device, dtype=dtype)
    chunks = out.split(NOISE_CHUNK_NUMEL)
    seeds = torch.randint(0, 2**62, (len(chunks),), generator=generator).tolist()

    def fill(i: int) -> None:
        chunks[i].normal_(0.0, std, generator=torch.Generator().manual_seed(seeds[i]))

    list(_threads().map(fill, range(len(chunks))))  # list(): a worker's exception is raised here
    return out


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _threads() -> ThreadPoolExecutor:
    """A pool of as many threads as torch's intra-op threads (torch releases the GIL while it draws), per process: a
    forked child (a rank, a worker) has none of its parent's threads, so it gets a pool of its own."""
    key = (os.getpid(), max(1, torch.get_num_threads()))
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(key[1], thread_name_prefix="opacus_fast_noise")
    return _POOLS[key]


def check_savable(data_loader: Any) -> None:
    """Refuse a checkpoint between fetching the last physical batch of a logical batch and the ``optimizer.step()``
    that releases it: the sampler state would already be past that logical batch and the noise generator not, so a
    resumed run would skip it and noise the next one with its noise."""
    context = getattr(data_loader, "context", None)
    current = context.current if context is not None else None
    if current is not None and current.is_last and context.released is not current:
        raise RuntimeError(
            "save_checkpoint was called between fetching the last physical batch of a logical batch and "
            "the optimizer.step() that ends it: the resumed run would skip that batch and reuse its noise. "
            "Save after optimizer.step() (e.g. at the end of the loop body) or outside the loop"
        )


def _check_clipped(context: BatchContext) -> None:
    """Refuse to release a logical batch that no backward pass clipped gradients for (as Opacus refuses a step
    without per-sample gradients, with a ValueError): the step would add noise to nothing, silently. An empty Poisson
    batch still gets its forward and backward (on zero rows), so it passes."""
    if context.clipped_since_release:
        return
    if context.forward_since_release:
        raise ValueError(
            "optimizer.step() found no clipped gradients: the model ran forward, but no backward pass since the last "
            "step computed its parameters' gradients (loss.backward(inputs=...) and torch.autograd.grad(...) "
            "compute no parameter gradients with opacus_fast). Call loss.backward() without inputs="
        )
    raise ValueError(
        "optimizer.step() found no clipped gradients: no backward pass ran since the last step (a second step() "
        "for one batch, or step() before backward()). Run forward and loss.backward() on a batch before each "
        "step(), empty batches included"
    )


def continues(trained: PhysicalBatchInfo | None, current: PhysicalBatchInfo | None) -> bool:
    """Whether ``current`` belongs to the unfinished logical batch of ``trained`` (whose sums are pending): it is
    ``trained`` itself or a later physical batch of the same logical batch."""
    if trained is None or trained.is_last or current is None:
        return False
    return current is trained or (current.step == trained.step and current.index > trained.index)


def abandoned(trained: PhysicalBatchInfo | None, current: PhysicalBatchInfo | None) -> bool:
    """Whether the loop left the logical batch of ``trained`` before its last physical batch: ``current`` is
    None (the loop ended) or a batch of another logical batch."""
    return trained is not None and not trained.is_last and not continues(trained, current)
