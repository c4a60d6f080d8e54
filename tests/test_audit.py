"""Tests of the one-run privacy audit: the lower-bound arithmetic, the canary plumbing, and audits of real runs.

The bound is checked against an independent computation (exact binomial sums in 40-digit arithmetic with mpmath,
and the closed form of a perfect guesser at δ = 0) and against simulated mechanisms whose ε is known (randomized
response; a guesser that knows nothing). The audits train a small model for real, with fixed seeds. A correct run
must give a lower bound below its accountant's ε; deliberately broken runs (σ/4, no clipping, canaries in every
batch) must give a lower bound above the ε the accountant claims for the intended configuration: each such bound
rejects the claim at 95 % confidence. The broken runs are built here, from the public API, never by an option of
the library.
"""

from __future__ import annotations

import json
import math

import mpmath
import numpy as np
import pytest
import torch
from scipy.stats import binom
from torch import nn
from torch.utils.data import TensorDataset

from opacus_fast.audit import (
    TrainingConfig,
    accountant_epsilon,
    audit,
    audit_bound,
    default_guessers,
    epsilon_lower_bound,
    guess,
    one_run_p_value,
)
from opacus_fast.audit.bound import RESOLUTION
from opacus_fast.audit.canaries import CANARY_NORM, CanaryRows
from opacus_fast.data.sampler import Draw

DELTA = 1e-5
mpmath.mp.dps = 40


# ---- an independent reference for the bound -------------------------------------------------------------------
def reference_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The theorem's right-hand side from exact binomial sums (40 digits), written out term by term."""
    p = mpmath.e**eps / (1 + mpmath.e**eps)
    pmf = [(1 - p) ** r]  # P[B = k] by the recurrence P[B = k + 1] = P[B = k] · (r − k)/(k + 1) · p/(1 − p)
    for k in range(r):
        pmf.append(pmf[-1] * (r - k) / (k + 1) * p / (1 - p))
    tail = mpmath.fsum(pmf[v:])
    worst, mass = mpmath.mpf(0), mpmath.mpf(0)
    for i in range(1, v + 1):  # mass = P[v - i <= B <= v - 1]
        mass += pmf[v - i]
        worst = max(worst, mass / i)
    return float(min(tail + 2 * m * delta * worst, 1))


def reference_bound(m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """The largest ε with reference p-value ≤ β, by bisection (the p-value is increasing in these cases)."""
    beta = 1 - confidence
    if reference_p_value(m, r, v, 0.0, delta) > beta:
        return 0.0
    lo, hi = 0.0, 16.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if reference_p_value(m, r, v, mid, delta) <= beta else (lo, mid)
    return lo


CASES = [  # (canaries m, guesses r, correct v, δ)
    (1000, 1000, 1000, 1e-5),
    (500, 100, 100, 1e-5),
    (1000, 100, 90, 1e-5),
    (2000, 300, 240, 1e-6),
    (200, 50, 40, 1e-3),
    (1000, 1000, 620, 1e-5),
]


@pytest.mark.parametrize("eps", [0.0, 0.5, 2.0, 4.0])
@pytest.mark.parametrize("m,r,v,delta", CASES)
def test_p_value_matches_exact_binomial_sums(m, r, v, delta, eps):
    ours = float(one_run_p_value(canaries=m, guesses=r, correct=v, epsilon=eps, delta=delta)[0])
    assert ours == pytest.approx(reference_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("m,r,v,delta", CASES)
def test_lower_bound_is_the_exact_threshold_rounded_down(m, r, v, delta):
    ours = epsilon_lower_bound(canaries=m, guesses=r, correct=v, delta=delta)
    ref = reference_bound(m, r, v, delta, 0.95)
    assert ref - RESOLUTION - 1e-9 <= ours <= ref + 1e-9  # never above the exact threshold, at most one step below
    if ours > 0:
        assert reference_p_value(m, r, v, ours, delta) <= 0.05  # the reported ε is itself rejected


@pytest.mark.parametrize("r", [10, 100, 1000, 5000])
def test_perfect_guesser_without_delta_has_the_closed_form(r):
    """All r guesses right, δ = 0: P[Binomial(r, p) = r] = p^r = β, so ε = log(p / (1 − p)) with p = β^(1/r)."""
    p = 0.05 ** (1 / r)
    ours = epsilon_lower_bound(canaries=r, guesses=r, correct=r, delta=0.0)
    assert ours == pytest.approx(math.log(p / (1 - p)), abs=1e-7)


def test_perfect_guesser_maximum_grows_with_canaries_and_delta_lowers_it():
    """The most a one-run audit can show with m canaries (all guessed right), the ceiling the paper plots: about
    log(m / log(1/β)) at δ = 0 (since 1 − β^(1/m) ≈ log(1/β)/m); δ > 0 can only lower it."""
    sizes = (100, 1000, 10000)
    best = [epsilon_lower_bound(canaries=m, guesses=m, correct=m, delta=DELTA) for m in sizes]
    pure = [epsilon_lower_bound(canaries=m, guesses=m, correct=m, delta=0.0) for m in sizes]
    assert best == sorted(best) and all(b < p for b, p in zip(best, pure))
    for m, p in zip(sizes, pure):
        assert abs(p - math.log(m / math.log(20))) < 0.02


def test_randomized_response_bound_is_valid_and_tight():
    """ε-randomized response on m canaries, guessed from its outputs: the 95 % bound may exceed the true ε in at
    most 5 % of runs (here 400 runs: under that, more than 35 exceedances has probability < 1e-3), and with 2,000
    canaries its median lies within 0.15 of the true ε."""
    eps0, m, runs = 1.0, 2000, 400
    truth = 1 / (1 + math.exp(-eps0))
    rng = np.random.default_rng(1)
    bounds = np.array([
        epsilon_lower_bound(canaries=m, guesses=m, correct=int(rng.binomial(m, truth)), delta=0.0)
        for _ in range(runs)
    ])
    assert binom.sf(35, runs, 0.05) < 1e-3
    assert np.sum(bounds > eps0) <= 35
    assert eps0 - 0.15 <= np.median(bounds) <= eps0


def test_guesser_that_knows_nothing_gives_zero():
    """Scores independent of the inclusion draw: the Bonferroni-corrected bound over the default guessers is 0 in
    at least 90 % of 200 runs (≤ 5 % expected above 0) and never large."""
    rng = np.random.default_rng(2)
    m, guessers = 1000, default_guessers(1000)
    bounds = np.array([
        audit_bound(rng.normal(size=m), rng.random(m) < 0.5, delta=DELTA, guessers=guessers).epsilon
        for _ in range(200)
    ])
    assert np.sum(bounds > 0) <= 20
    assert bounds.max() < 0.5


def test_guess_takes_highest_in_and_lowest_out():
    scores = np.array([0.3, -2.0, 5.0, 1.0, -1.0, 0.0])
    assert guess(scores, 2, 1).tolist() == [0, -1, 1, 1, 0, 0]
    assert guess(scores, 0, 0).tolist() == [0] * 6
    with pytest.raises(ValueError):
        guess(scores, 4, 3)


def test_audit_bound_is_the_best_bonferroni_corrected_guesser():
    rng = np.random.default_rng(3)
    included = rng.random(1000) < 0.5
    scores = rng.normal(size=1000) + 2.0 * included
    guessers = [(10, 10), (50, 50), (200, 0)]
    best = audit_bound(scores, included, delta=DELTA, confidence=0.95, guessers=guessers)
    each = []
    for k_pos, k_neg in guessers:
        g = guess(scores, k_pos, k_neg)
        right = int(np.sum(g == np.where(included, 1, -1)))
        each.append(epsilon_lower_bound(canaries=1000, guesses=k_pos + k_neg, correct=right, delta=DELTA,
                                        confidence=1 - 0.05 / 3))
    assert best.epsilon == max(each) > 0
    assert best.confidence == pytest.approx(1 - 0.05 / 3)


def test_bound_inputs_are_checked():
    with pytest.raises(ValueError):
        epsilon_lower_bound(canaries=10, guesses=11, correct=5, delta=DELTA)
    with pytest.raises(ValueError):
        epsilon_lower_bound(canaries=10, guesses=10, correct=5, delta=DELTA, confidence=1.0)
    with pytest.raises(ValueError):
        audit_bound(np.zeros(4), np.zeros(3, dtype=bool), delta=DELTA, guessers=[(1, 1)])
    with pytest.raises(ValueError):
        audit_bound(np.array([0.0, np.nan]), np.zeros(2, dtype=bool), delta=DELTA, guessers=[(1, 1)])


# ---- audited training runs ----------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one torch thread is much faster than contended ones (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_task(seed: int = 0) -> tuple[nn.Module, TensorDataset]:
    """256 examples of a 2-class problem in 8 dimensions, and a 2-layer MLP."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=g)
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)), TensorDataset(x, (x[:, 0] > 0).long())


def test_gradient_canaries_are_clipped_to_c_on_their_own_coordinate():
    """No noise, every row in every step: each included canary's coordinate moves by exactly lr·C/N per step (its
    gradient, CANARY_NORM·C long, clipped to C, averaged over the N rows), an excluded one's not at all; real rows
    never touch the canary coordinates. The caller's model is left as it was."""
    model, data = small_task()
    before = [p.detach().clone() for p in model.parameters()]
    config = TrainingConfig(noise_multiplier=0.0, max_grad_norm=0.5, sample_rate=1.0, steps=3, lr=0.1)
    result = audit(model, data, config, canaries=40, observe="final", seed=4)
    rows = len(data) + int(result.included.sum())
    expected = np.where(result.included, config.steps * config.lr * config.max_grad_norm / rows, 0.0)
    np.testing.assert_allclose(result.scores, expected, rtol=1e-5, atol=1e-9)
    assert CANARY_NORM * config.max_grad_norm > 10 * config.max_grad_norm  # the canary really is clipped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before, result.model.parameters()))


def test_inclusion_is_reproducible_and_fair():
    model, data = small_task()
    config = TrainingConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, steps=1, lr=0.1)
    first = audit(model, data, config, canaries=2000, seed=5).included
    assert np.array_equal(first, audit(model, data, config, canaries=2000, seed=5).included)
    assert not np.array_equal(first, audit(model, data, config, canaries=2000, seed=6).included)
    assert abs(first.sum() - 1000) < 4 * math.sqrt(2000 * 0.25)  # Binomial(2000, 1/2): 4 standard deviations


def test_mode_and_canaries_are_checked():
    model, data = small_task()
    config = TrainingConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, steps=1, lr=0.1)
    with pytest.raises(TypeError):
        audit(model, data, config, canaries=[data[0], data[1]])
    with pytest.raises(TypeError):
        audit(model, data, config, mode="black-box", canaries=10)
    with pytest.raises(ValueError):
        audit(model, data, config, mode="black-box", observe="steps", canaries=[data[0], data[1]])
    with pytest.raises(ValueError):
        audit(model, data, config, mode="grey-box")
    with pytest.raises(ValueError):
        audit(model, data, config, canaries=10, guessers=[(6, 5)])
    with pytest.raises(ValueError):
        audit(model, data, config, canaries=10, confidence=95)
    with pytest.raises(ValueError):
        TrainingConfig(noise_multiplier=1.0, max_grad_norm=0.0, sample_rate=0.1, steps=1, lr=0.1)


#: a correct run with room to leak: σ = 1, q = 0.03, 400 steps (accountant ε ≈ 3.9 at δ = 1e-5)
LEAKY = TrainingConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.03, steps=400, lr=0.5)


@pytest.mark.parametrize("observe", ["steps", "final"])
def test_correct_run_stays_below_the_accountant(observe):
    """The lower bound of a correct run is below the accountant's ε (a bound above it would happen with probability
    ≤ 5 % if the implementation is correct), and above 0: the audit does detect the leak that σ = 1 allows."""
    model, data = small_task()
    result = audit(model, data, LEAKY, canaries=1000, observe=observe, seed=0)
    claimed = accountant_epsilon(noise_multiplier=1.0, sample_rate=0.03, steps=400, delta=DELTA)
    assert result.epsilon_accountant == pytest.approx(claimed, rel=1e-6)  # the engine's accountant, same run
    assert 0.3 < result.epsilon_lower < result.epsilon_accountant


def test_black_box_run_stays_below_the_accountant():
    model, data = small_task()
    g = torch.Generator().manual_seed(7)
    canaries = list(zip(3 * torch.randn(200, 8, generator=g), torch.randint(0, 2, (200,), generator=g)))
    result = audit(model, data, LEAKY, mode="black-box", canaries=canaries, seed=0)
    assert result.observe == "final" and result.scores.shape == (200,)
    assert result.epsilon_lower < result.epsilon_accountant


# the intended configuration of the broken runs: σ = 1.5, q = 0.03, 100 steps (accountant ε ≈ 0.97 at δ = 1e-5)
INTENDED = TrainingConfig(noise_multiplier=1.5, max_grad_norm=1.0, sample_rate=0.03, steps=100, lr=0.5)
BROKEN_CANARIES = 2000


def noise_divided_by_four(engine, **keywords):
    """Bug: the noise std is σ/4 · C while the accountant is told σ."""
    return engine.make_private_fast(**{**keywords, "noise_multiplier": keywords["noise_multiplier"] / 4})


def no_clipping(engine, **keywords):
    """Bug: per-example gradients are not clipped; the noise std stays σ·C (clipping at 10⁶·C never binds)."""
    big = 1e6 * keywords["max_grad_norm"]
    sigma = keywords["noise_multiplier"] * keywords["max_grad_norm"] / big
    return engine.make_private_fast(**{**keywords, "max_grad_norm": big, "noise_multiplier": sigma})


def canaries_in_every_batch(engine, **keywords):
    """Bug: a sampler that adds every included canary to every logical batch (rate 1 instead of q)."""
    model, optimizer, loader = engine.make_private_fast(**keywords)
    rows = loader.dataset
    assert isinstance(rows, CanaryRows)
    canary_rows = list(range(len(rows.data), len(rows)))
    sampler = loader.batch_sampler.logical
    poisson = sampler._draw

    def draw() -> Draw:
        indices = sorted(set(poisson().indices) | set(canary_rows))
        return Draw(indices, len(indices))

    sampler._draw = draw
    return model, optimizer, loader


@pytest.fixture(scope="module")
def intended_epsilon() -> float:
    return accountant_epsilon(noise_multiplier=INTENDED.noise_multiplier, sample_rate=INTENDED.sample_rate,
                              steps=INTENDED.steps, delta=DELTA)


def test_intended_configuration_passes_its_own_audit(intended_epsilon):
    """The control for the broken runs: the same configuration, implemented correctly, stays below its ε."""
    model, data = small_task()
    result = audit(model, data, INTENDED, canaries=BROKEN_CANARIES, seed=0)
    assert result.epsilon_accountant == pytest.approx(intended_epsilon, rel=1e-6)
    assert result.epsilon_lower < intended_epsilon


@pytest.mark.parametrize("broken", [noise_divided_by_four, no_clipping, canaries_in_every_batch],
                         ids=["sigma-over-4", "no-clipping", "canaries-always-sampled"])
def test_broken_run_is_caught(broken, intended_epsilon):
    """The lower bound exceeds the ε claimed for the intended configuration: at 95 % confidence, the broken run is
    not (ε_claimed, δ)-DP."""
    model, data = small_task()
    result = audit(model, data, INTENDED, canaries=BROKEN_CANARIES, seed=0, make_private=broken)
    assert result.epsilon_lower > intended_epsilon + 0.5


@pytest.mark.parametrize("mode", ["white-box", "black-box"])
def test_digits_command_prints_both_numbers_and_saves_the_plot(mode, tmp_path, capsys):
    from opacus_fast.audit.__main__ import main

    plot, summary = tmp_path / "scores.png", tmp_path / "audit.json"
    result = main(["--example", "digits", "--mode", mode, "--steps", "20", "--canaries", "200",
                   "--plot", str(plot), "--json", str(summary)])
    out = capsys.readouterr().out
    assert "accountant (prv) epsilon" in out and "one-run lower bound epsilon" in out
    assert plot.stat().st_size > 0
    assert json.loads(summary.read_text())["epsilon_accountant"] == pytest.approx(result.epsilon_accountant)
    assert result.canaries == 200 and result.epsilon_lower <= result.epsilon_accountant
