"""Tests of the Poisson samplers: exact distribution (statistical tests with fixed seeds), cost, resume, ranks.

Every statistical threshold is a p-value cut at 1e-4 (Bonferroni-corrected where several are taken), so a correct
sampler fails each such test with probability about 1e-4 for a random seed; the seeds are fixed, so the outcome
is deterministic. The references are closed-form probabilities from scipy, not our own code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from opacus_fast.data import DistributedPoissonBatchSampler, PoissonBatchSampler

ALPHA = 1e-4  # false-failure probability of each statistical test (for a random seed)


def _sampler(num_samples: int, sample_rate: float, steps: int, seed: int = 0) -> PoissonBatchSampler:
    return PoissonBatchSampler(num_samples, sample_rate, steps=steps, generator=torch.Generator().manual_seed(seed))


def _inclusion_matrix(batches: list[list[int]], num_samples: int) -> np.ndarray:
    """Steps × examples 0/1 matrix."""
    matrix = np.zeros((len(batches), num_samples), dtype=np.int64)
    for step, batch in enumerate(batches):
        matrix[step, batch] = 1
    return matrix


def _chi_square_pvalue(observed: np.ndarray, probs: np.ndarray) -> float:
    """Pearson goodness of fit; adjacent cells are merged until each expects at least 5 counts."""
    expected = probs * observed.sum()
    obs_cells, exp_cells, o, e = [], [], 0.0, 0.0
    for count, mean in zip(observed, expected):
        o, e = o + count, e + mean
        if e >= 5:
            obs_cells.append(o)
            exp_cells.append(e)
            o, e = 0.0, 0.0
    obs_cells[-1] += o
    exp_cells[-1] += e
    obs_arr, exp_arr = np.array(obs_cells), np.array(exp_cells)
    statistic = float(((obs_arr - exp_arr) ** 2 / exp_arr).sum())
    return float(stats.chi2.sf(statistic, len(obs_arr) - 1))


def _subset_code(batch: list[int]) -> int:
    return sum(1 << i for i in batch)


def _subset_probs(num_samples: int, q: float) -> np.ndarray:
    """Exact Poisson probability of each subset of range(num_samples), indexed by its bit code."""
    sizes = np.array([code.bit_count() for code in range(1 << num_samples)])
    return q**sizes * (1 - q) ** (num_samples - sizes)


def _binomial_two_sided_pvalues(counts: np.ndarray, trials: int, p: float) -> np.ndarray:
    return np.minimum(1.0, 2 * np.minimum(stats.binom.cdf(counts, trials, p), stats.binom.sf(counts - 1, trials, p)))


@pytest.mark.parametrize("q", [0.3, 0.7])
def test_joint_law_of_one_batch_is_poisson(q: float) -> None:
    """All 64 subsets of 6 examples appear with frequency q^|S| (1-q)^(6-|S|); q=0.7 uses the permutation branch."""
    n, steps = 6, 20_000
    codes = [_subset_code(b) for b in _sampler(n, q, steps, seed=1)]
    observed = np.bincount(codes, minlength=1 << n)
    assert _chi_square_pvalue(observed, _subset_probs(n, q)) > ALPHA


def test_consecutive_batches_are_independent() -> None:
    """The pair (S_2t, S_2t+1) over 3 examples follows the product law on all 64 cells."""
    n, q, pairs = 3, 0.4, 10_000
    codes = [_subset_code(b) for b in _sampler(n, q, 2 * pairs, seed=2)]
    joint = [8 * a + b for a, b in zip(codes[0::2], codes[1::2])]
    observed = np.bincount(joint, minlength=64)
    single = _subset_probs(n, q)
    assert _chi_square_pvalue(observed, np.outer(single, single).ravel()) > ALPHA


def test_per_example_inclusion_frequency() -> None:
    """Each example's inclusion count over T steps is Binomial(T, q); Σ standardised² ~ chi²(N) (normal approx.)."""
    n, q, steps = 500, 0.1, 2_000
    counts = _inclusion_matrix(list(_sampler(n, q, steps, seed=3)), n).sum(axis=0)
    statistic = float((((counts - steps * q) ** 2) / (steps * q * (1 - q))).sum())
    assert stats.chi2.sf(statistic, n) > ALPHA  # too uneven
    assert stats.chi2.cdf(statistic, n) > ALPHA  # too even, e.g. epochs of shuffled batches (2e-4 in all)


@pytest.mark.parametrize(("n", "q"), [(50, 0.05), (1_000, 0.1), (10**7, 1e-4)])
def test_batch_size_is_binomial(n: int, q: float) -> None:
    """Batch sizes fit scipy's Binomial(N, q) (covers torch.binomial's small-mean and large-mean algorithms)."""
    steps = 3_000
    sizes = np.array([len(b) for b in _sampler(n, q, steps, seed=4)])
    dist = stats.binom(n, q)
    lo, hi = int(dist.ppf(1e-9)), int(dist.isf(1e-9))
    support = np.arange(lo, hi + 1)
    probs = dist.pmf(support)
    probs[0], probs[-1] = dist.cdf(lo), dist.sf(hi - 1)
    observed = np.bincount(np.clip(sizes, lo, hi) - lo, minlength=len(support))
    assert _chi_square_pvalue(observed, probs) > ALPHA


def test_pairwise_inclusions_are_independent() -> None:
    """Each pair of examples is included together Binomial(T, q²) times (two-sided tests, Bonferroni over pairs)."""
    n, q, steps = 30, 0.3, 3_000
    matrix = _inclusion_matrix(list(_sampler(n, q, steps, seed=5)), n)
    together = (matrix.T @ matrix)[np.triu_indices(n, k=1)]
    pvalues = _binomial_two_sided_pvalues(together, steps, q * q)
    assert pvalues.min() * len(pvalues) > ALPHA


def test_batches_are_sorted_distinct_and_in_range() -> None:
    n = 100
    for batch in _sampler(n, 0.5, 200, seed=6):
        assert batch == sorted(set(batch))
        assert all(0 <= i < n for i in batch)


def test_cost_does_not_grow_with_dataset_size() -> None:
    """N = 10^12: anything O(N) per step (N coin flips, randperm(N)) would need terabytes and fail."""
    n = 10**12
    batches = list(_sampler(n, 1e-10, 50, seed=7))
    assert sum(len(b) for b in batches) > 0
    assert all(b == sorted(set(b)) and all(0 <= i < n for i in b) for b in batches)


def test_full_rate_takes_everything() -> None:
    assert all(b == list(range(20)) for b in _sampler(20, 1.0, 3))


def test_length_and_arguments() -> None:
    assert len(PoissonBatchSampler(10, 0.3)) == 3  # int(1 / q), as Opacus
    assert len(PoissonBatchSampler(10, 0.3, steps=7)) == 7
    assert len(list(PoissonBatchSampler(10, 0.3, steps=7))) == 7
    for n, q, steps in [(0, 0.1, None), (10, 0.0, None), (10, 1.5, None), (10, 0.1, 0), (10.0, 0.1, None)]:
        with pytest.raises(ValueError):
            PoissonBatchSampler(n, q, steps=steps)


def test_seeded_generators_reproduce_and_default_follows_manual_seed() -> None:
    assert list(_sampler(100, 0.1, 20, seed=8)) == list(_sampler(100, 0.1, 20, seed=8))
    assert list(_sampler(100, 0.1, 20, seed=8)) != list(_sampler(100, 0.1, 20, seed=9))
    torch.manual_seed(10)
    first = list(PoissonBatchSampler(100, 0.1, steps=20))
    torch.manual_seed(10)
    assert list(PoissonBatchSampler(100, 0.1, steps=20)) == first


def test_epochs_continue_the_random_stream() -> None:
    sampler = _sampler(100, 0.1, 10, seed=11)
    assert list(sampler) != list(sampler)


@pytest.mark.parametrize("saved_after", [0, 4, 10])
def test_state_dict_resumes_the_same_batches(saved_after: int) -> None:
    """Save after ``saved_after`` steps of a 10-step epoch; a fresh sampler (other seed) continues identically."""
    sampler = _sampler(200, 0.05, 10, seed=12)
    iterator = iter(sampler)
    for _ in range(saved_after):
        next(iterator)
    state = sampler.state_dict()
    rest, next_epoch = list(iterator), list(sampler)
    resumed = _sampler(200, 0.05, 10, seed=99)
    resumed.load_state_dict(state)
    if rest:  # saved mid-epoch: the first iteration finishes that epoch
        assert list(resumed) == rest
    assert list(resumed) == next_epoch


def test_state_after_an_abandoned_iteration_describes_a_new_epoch() -> None:
    sampler = _sampler(200, 0.05, 10, seed=13)
    iterator = iter(sampler)
    next(iterator)
    sampler.release()
    state = sampler.state_dict()
    assert state["step"] == 0
    expected = list(sampler)
    resumed = _sampler(200, 0.05, 10, seed=0)
    resumed.load_state_dict(state)
    assert list(resumed) == expected


def test_secure_mode() -> None:
    with pytest.raises(ValueError, match="generator"):
        PoissonBatchSampler(10, 0.1, generator=torch.Generator(), secure_mode=True)
    torch.manual_seed(0)
    a = list(PoissonBatchSampler(1_000, 0.5, steps=3, secure_mode=True))
    torch.manual_seed(0)
    b = list(PoissonBatchSampler(1_000, 0.5, steps=3, secure_mode=True))
    assert a != b  # OS entropy, not torch's seed (equal with probability ~2^-1000)
    state = PoissonBatchSampler(10, 0.1, secure_mode=True).state_dict()
    assert state["generator_state"] is None
    with pytest.raises(ValueError, match="secure_mode"):
        _sampler(10, 0.1, 10).load_state_dict(state)


def _rank_samplers(n: int, q: float, steps: int, world_size: int, seed: int) -> list[DistributedPoissonBatchSampler]:
    return [
        DistributedPoissonBatchSampler(
            n, q, rank=r, world_size=world_size, steps=steps, generator=torch.Generator().manual_seed(seed)
        )
        for r in range(world_size)
    ]


def test_distributed_union_is_the_single_global_draw() -> None:
    n, q, steps, world_size = 10, 0.15, 300, 3
    per_rank = [list(s) for s in _rank_samplers(n, q, steps, world_size, seed=14)]
    assert all(len(parts) == steps for parts in per_rank)  # every rank yields every step
    saw_empty_part = False
    for step, global_batch in enumerate(_sampler(n, q, steps, seed=14)):
        parts = [parts[step] for parts in per_rank]
        union = [i for part in parts for i in part]
        assert sorted(union) == global_batch and len(set(union)) == len(union)  # disjoint, union = global
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        saw_empty_part |= any(len(p) == 0 for p in parts)
    assert saw_empty_part


def test_distributed_largest_part_is_known_on_every_rank() -> None:
    samplers = _rank_samplers(50, 0.2, 20, 4, seed=15)
    draws = [list(s.draws()) for s in samplers]
    for step in range(20):
        largest = max(len(d[step].indices) for d in draws)
        assert all(d[step].largest_part == largest for d in draws)


def test_distributed_arguments() -> None:
    with pytest.raises(ValueError, match="same seed"):
        DistributedPoissonBatchSampler(10, 0.1, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        DistributedPoissonBatchSampler(10, 0.1, rank=2, world_size=2, generator=torch.Generator())
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedPoissonBatchSampler(10, 0.1, rank=0, world_size=2, secure_mode=True)


def test_distributed_state_dict_resumes() -> None:
    sampler = _rank_samplers(100, 0.1, 10, 2, seed=16)[1]
    iterator = iter(sampler)
    next(iterator)
    state = sampler.state_dict()
    expected = list(iterator)
    resumed = _rank_samplers(100, 0.1, 10, 2, seed=0)[1]
    resumed.load_state_dict(state)
    assert list(resumed) == expected


def test_subset_probabilities_sum_to_one() -> None:
    """Sanity check of the tests' own reference."""
    assert math.isclose(_subset_probs(5, 0.3).sum(), 1.0)
