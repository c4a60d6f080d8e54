"""Poisson subsampling for DP-SGD at a cost of O(expected batch size) per step, not O(dataset size).

The privacy accountants (RDP, PRV, PLD) prove their (ε, δ) guarantee for *Poisson* subsampling only: at every
step each of the N examples is included independently with probability q. Opacus draws N coin flips per step;
here a step costs O(k) for a batch of k examples, which matters when N is large and q small.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import Sampler

_WORD_BITS = 62  # width of the random words that _uniform_below reduces to an index


class Draw(NamedTuple):
    """One logical step as seen by one rank.

    Attributes:
        indices: the dataset indices of this rank's part of the step's Poisson sample (sorted).
        largest_part: the size of the largest part over all ranks (``len(indices)`` without distribution), so
            that every rank can cut its part into the same number of physical batches.
    """

    indices: list[int]
    largest_part: int


def draw_poisson_subset(num_samples: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Sorted int64 indices of one Poisson sample of ``range(num_samples)`` with inclusion probability q.

    Draws k ~ Binomial(N, q), then a uniform k-subset without replacement: O(k) time and memory.
    """
    return _uniform_subset(num_samples, _binomial(num_samples, sample_rate, generator), generator)


def _binomial(count: int, prob: float, generator: torch.Generator) -> int:
    """One draw of Binomial(count, prob) in O(1) (float64 keeps counts exact up to 2**53)."""
    count_t = torch.tensor(float(count), dtype=torch.float64)
    prob_t = torch.tensor(prob, dtype=torch.float64)
    return int(torch.binomial(count_t, prob_t, generator=generator).item())


def _uniform_subset(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random k-subset of ``range(n)``, sorted, in O(k log k) expected time.

    When k > n / 2 it is the complement of a uniform (n - k)-subset, which is uniform too, in O(n) = O(k); unlike
    ``torch.randperm``, whose exactness depends on how it reduces random words to ranges, every draw then goes
    through the exact :func:`_uniform_below`.
    """
    if 2 * k > n:
        keep = torch.ones(n, dtype=torch.bool)
        keep[_small_uniform_subset(n, n - k, generator)] = False
        return keep.nonzero().flatten()
    return _small_uniform_subset(n, k, generator)


def _small_uniform_subset(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random k-subset of ``range(n)``, sorted, for k <= n / 2.

    Draws i.i.d. uniform indices, each round at most as many as distinct values are still missing, until k distinct
    values have been seen (a round adds at most as many new values as it draws, so it never overshoots). That set
    is the first k distinct values of an i.i.d. sequence; the sequence's law is unchanged by any relabelling of
    ``range(n)``, so every k-subset is equally likely. With k <= n / 2 at least half of each round is new in
    expectation, so the rounds shrink geometrically.
    """
    draws = _uniform_below(n, k, generator)
    distinct = torch.unique(draws)
    while distinct.numel() < k:
        draws = torch.cat([draws, _uniform_below(n, k - distinct.numel(), generator)])
        distinct = torch.unique(draws)
    return distinct


def _uniform_below(n: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """At most ``count`` i.i.d. draws from ``range(n)``, each exactly uniform (fewer when words are rejected).

    ``torch.randint(n)`` reduces a 32-bit word modulo n when n < 2**28, which favours the values below 2**32 mod n
    (by up to 6 % near n = 2**28). ``torch.randint(2**62)`` reduces a uniform 64-bit word modulo a power of two,
    so its words are exactly uniform; :func:`_accept_below` maps them to ``range(n)`` without bias and rejects a
    word with probability below n / 2**62.
    """
    return _accept_below(torch.randint(2**_WORD_BITS, (count,), generator=generator), n, _WORD_BITS)


def _accept_below(words: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """``words mod n``, keeping only the words below the largest multiple of n that is at most 2**bits.

    Each value of ``range(n)`` is the remainder of exactly 2**bits // n of the kept words, so uniform words in
    ``range(2**bits)`` give exactly uniform values.
    """
    limit = (2**bits // n) * n
    if words.numel() > 0 and int(words.max()) >= limit:  # rare for n << 2**bits: skip the costly selection
        words = words[words < limit]
    return words % n


def _os_seed() -> int:
    """A 64-bit seed from the operating system's entropy source."""
    return int.from_bytes(os.urandom(8), "little")


def draw_seed(source: torch.Generator | None = None) -> int:
    """A seed drawn from ``source``, or from torch's global RNG (so that ``torch.manual_seed`` governs it)."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=source).item())


def _rank_part(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Start and stop of ``rank``'s contiguous part when ``size`` items are split into near-equal parts."""
    base, extra = divmod(size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _check_arguments(num_samples: int, sample_rate: float, steps: int | None) -> int:
    """Validate the common arguments and return the number of steps per epoch."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
        raise ValueError(f"num_samples must be a positive int (the dataset size), got {num_samples!r}")
    if not 0.0 < float(sample_rate) <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if steps is None:
        return int(1 / sample_rate)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive int (logical batches per epoch), got {steps!r}")
    return steps


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields logical batches (lists of dataset indices) drawn by Poisson subsampling.

    At every step each of the ``num_samples`` examples is included independently with probability
    ``sample_rate`` = q, so a batch may be empty and its size is Binomial(N, q).

    Why the cheap draw is exact: under independent inclusion, P(S) = q^|S| (1 - q)^(N - |S|) depends on the set S
    only through its size. Hence |S| ~ Binomial(N, q), and conditioned on |S| = k every k-subset is equally likely.
    Drawing k ~ Binomial(N, q) and then a uniform k-subset without replacement therefore gives exactly the same
    distribution (Lemma 1 of arXiv 2406.17298v3), in O(k) instead of N coin flips.

    Args:
        num_samples: dataset size N.
        sample_rate: inclusion probability q in (0, 1].
        steps: logical batches per epoch (``len(sampler)``); default ``int(1 / sample_rate)``, as in Opacus.
        generator: source of randomness, used as it is.
        seed_source: without ``generator``, the draws come from a dedicated generator seeded, when the first
            iteration starts, from ``seed_source`` (e.g. the user's DataLoader generator) or, if None, from torch's
            global RNG: as in Opacus, the seed at the time of iteration governs the batches. Later iterations
            continue that stream (and checkpoints restore it), so a resumed run never redraws batches already used.
        secure_mode: draw every step from a generator freshly seeded with 64 bits of OS entropy (``os.urandom``):
            no seed exists that could replay the batches. (The per-step generator is torch's Mersenne Twister,
            not a cryptographic one.) Refuses a user ``generator``.

    Iterating starts a new epoch of ``steps`` batches, except right after :meth:`load_state_dict`, which resumes
    where the saved run stood.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        *,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        seed_source: torch.Generator | None = None,
        secure_mode: bool = False,
    ) -> None:
        self.steps = _check_arguments(num_samples, sample_rate, steps)
        if secure_mode and generator is not None:
            raise ValueError("secure_mode=True draws from OS entropy and cannot use a generator: pass generator=None")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"the generator must be a CPU torch.Generator, got one on {generator.device}")
        self.num_samples = num_samples
        self.sample_rate = float(sample_rate)
        self.secure_mode = secure_mode
        self.generator: torch.Generator | None = None
        if not secure_mode:
            self.generator = generator if generator is not None else torch.Generator()
        self.seed_source = seed_source
        #: whether ``generator`` holds its seed (a given one does; a dedicated one gets it at the first iteration)
        self.seeded = generator is not None
        self._start_step = 0  # where the next iteration begins (non-zero only after load_state_dict)
        self._next_step = 0  # the step the active iteration draws next
        self._active: object | None = None  # token of the active iteration, if any

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for draw in self.draws():
            yield draw.indices

    def draws(self) -> Iterator[Draw]:
        """Like ``iter(sampler)``, but yields :class:`Draw` records (indices and the largest part over ranks)."""
        token = object()
        self._active = token
        self.ensure_seeded()
        self._next_step, self._start_step = self._start_step, 0
        try:
            while self._next_step < self.steps:
                draw = self._draw()
                self._next_step += 1
                yield draw
        finally:
            if self._active is token:
                self._active = None

    def ensure_seeded(self) -> None:
        """Seed the dedicated generator from ``seed_source`` (or torch's global RNG) if it has no seed yet."""
        if not self.seeded and self.generator is not None:
            self.generator.manual_seed(draw_seed(self.seed_source))
            self.seeded = True

    @property
    def iterating(self) -> bool:
        """Whether an iteration is under way (started, and neither finished nor released)."""
        return self._active is not None

    def release(self) -> None:
        """Forget an abandoned iteration (e.g. left by ``break``); the next one starts a new epoch.

        A suspended iteration that nobody will resume (a persistent DataLoader iterator keeps one alive) would
        otherwise make :meth:`state_dict` describe its position instead of the next epoch's start.
        """
        self._active = None

    def _draw(self) -> Draw:
        indices = draw_poisson_subset(self.num_samples, self.sample_rate, self._step_generator()).tolist()
        return Draw(indices, len(indices))

    def _step_generator(self) -> torch.Generator:
        if self.secure_mode:
            return torch.Generator().manual_seed(_os_seed())
        return self.generator

    def state_dict(self) -> dict[str, Any]:
        """Where the next draw stands: the generator state (and whether it is seeded yet) and the step within the
        epoch (0 = a new epoch)."""
        step = self._next_step % self.steps if self._active is not None else self._start_step
        state = None if self.generator is None else self.generator.get_state()
        return {"step": step, "generator_state": state, "seeded": self.seeded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next iteration draws the same batches as the saved run would have."""
        step, generator_state = state["step"], state["generator_state"]
        if not 0 <= step < self.steps:
            raise ValueError(f"saved step {step} is outside this sampler's epoch of {self.steps} steps")
        if (generator_state is None) != self.secure_mode:
            raise ValueError("the state was saved with a different secure_mode; build the sampler the same way")
        if generator_state is not None:
            self.generator.set_state(generator_state.cpu())
            self.seeded = state.get("seeded", True)
        self._start_step = step


class DistributedPoissonBatchSampler(PoissonBatchSampler):
    """Poisson sampling across ``world_size`` ranks: one global sample per step, split into disjoint parts.

    Every rank draws the same global Poisson sample of the whole dataset and keeps its contiguous share of the
    sorted indices (shares differ in size by at most one), so the union over ranks is exactly one Poisson sample.
    Every rank yields every step, also when its share is empty.

    The ranks agree only if their randomness agrees: ``generator`` must be seeded with the SAME seed on every
    rank (a ``DPDataLoader`` built with ``distributed=True`` takes care of it). With ``secure_mode=True``, rank 0
    draws a fresh OS-entropy seed every step and broadcasts it over a dedicated gloo process group (created here,
    so every rank must build its sampler, in the same order relative to other process groups).

    Args:
        rank, world_size: this rank and the number of ranks.
        Other arguments: as :class:`PoissonBatchSampler` (``num_samples`` is the size of the whole dataset).
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        *,
        rank: int,
        world_size: int,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if generator is None and not secure_mode:
            raise ValueError(
                "pass a torch.Generator seeded with the same seed on every rank: ranks with different seeds would "
                "draw different samples, and the union of their parts would not be a Poisson sample"
            )
        super().__init__(num_samples, sample_rate, steps=steps, generator=generator, secure_mode=secure_mode)
        self.rank = rank
        self.world_size = world_size
        self._seed_group = _seed_group(rank, world_size) if secure_mode else None

    def _draw(self) -> Draw:
        subset = draw_poisson_subset(self.num_samples, self.sample_rate, self._step_generator())
        start, stop = _rank_part(subset.numel(), self.rank, self.world_size)
        return Draw(subset[start:stop].tolist(), -(-subset.numel() // self.world_size))

    def _step_generator(self) -> torch.Generator:
        if self.secure_mode:
            seed = [_os_seed() if self.rank == 0 else None]
            torch.distributed.broadcast_object_list(seed, src=0, group=self._seed_group)
            return torch.Generator().manual_seed(seed[0])
        return self.generator


def _seed_group(rank: int, world_size: int) -> Any:
    """A gloo process group for the per-step secure seed, so it never interleaves with the training's collectives."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("secure_mode with several ranks needs torch.distributed initialised (init_process_group)")
    if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise ValueError(
            f"rank={rank}, world_size={world_size} disagree with torch.distributed "
            f"({dist.get_rank()}, {dist.get_world_size()})"
        )
    return dist.new_group(backend="gloo")
