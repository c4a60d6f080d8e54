"""The one-run lower bound on ε: from the number of correct membership guesses among randomly included canaries.

Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023, arXiv 2305.08846): m canaries
are each included in the training data independently with probability 1/2; after one training run a guesser
looks at the output only and guesses "in" or "out" for r of them (abstaining on the rest, r fixed in advance).
If training is (ε, δ)-DP, the number W of correct guesses satisfies, for every v (their Theorem for approximate DP),

    P[W ≥ v] ≤ f(v) + 2·m·δ · max_{i = 1..v} (f(v − i) − f(v)) / i,    f(v) = P[Binomial(r, e^ε / (1 + e^ε)) ≥ v],

which for δ = 0 says that W is dominated by the correct answers of ε-randomized response. So observing v correct
guesses rejects (ε, δ)-DP at confidence 1 − β whenever the right-hand side is ≤ β: the largest such ε is a lower
bound on the true ε of the run that holds with probability ≥ 1 − β over the canaries' inclusion and the training
randomness. The guesser of the paper's Algorithm ranks the canaries by a score and guesses "in" for the k₊ highest
and "out" for the k₋ lowest.

Everything here is plain arithmetic on counts; it knows nothing about training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

#: grid step of ε when δ > 0: the bound returned is a grid point, so it errs low by less than this
RESOLUTION = 1e-3
#: the first grid's step when δ > 0; the fine grid then covers the last rejected coarse cell
_COARSE = 0.05
#: rows of the (ε grid × outcomes) probability table computed at once (bounds the memory of large r)
_CHUNK = 256


def _accuracy(epsilon: np.ndarray) -> np.ndarray:
    """e^ε / (1 + e^ε): the probability that ε-randomized response tells the truth."""
    return 1.0 / (1.0 + np.exp(-epsilon))


def _check_counts(canaries: int, guesses: int, correct: int) -> None:
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(
            f"need 0 <= correct <= guesses <= canaries, got correct={correct}, guesses={guesses}, canaries={canaries}"
        )


def one_run_p_value(
    *, canaries: int, guesses: int, correct: int, epsilon: float | np.ndarray, delta: float
) -> np.ndarray:
    """Upper bound on P[≥ ``correct`` of ``guesses`` guesses are right] for an (ε, δ)-DP run with ``canaries``
    canaries: the right-hand side of the paper's theorem (capped at 1), for one ε or an array of them."""
    _check_counts(canaries, guesses, correct)
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    eps = np.atleast_1d(np.asarray(epsilon, dtype=np.float64))
    if np.any(eps < 0):
        raise ValueError("epsilon must be >= 0")
    p = _accuracy(eps)
    tail = binom.sf(correct - 1, guesses, p)  # f(v) = P[B >= v]
    if delta > 0 and correct > 0:
        tail = tail + 2 * canaries * delta * _worst_mass_per_step(p, guesses, correct)
    return np.minimum(tail, 1.0)


def _worst_mass_per_step(p: np.ndarray, guesses: int, correct: int) -> np.ndarray:
    """max over i = 1..v of P[v − i ≤ B < v] / i, with B ~ Binomial(r, p), for each p (v = ``correct``)."""
    below = np.arange(correct - 1, -1, -1)  # v−1, v−2, ..., 0: the outcomes added as i grows
    steps = np.arange(1, correct + 1)
    out = np.empty_like(p)
    for start in range(0, p.size, _CHUNK):
        rows = p[start : start + _CHUNK, None]
        mass = np.cumsum(binom.pmf(below[None, :], guesses, rows), axis=1)  # column i−1: P[v−i ≤ B ≤ v−1]
        out[start : start + _CHUNK] = np.max(mass / steps, axis=1)
    return out


def epsilon_lower_bound(
    *, canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95
) -> float:
    """The largest ε at which ``correct`` right guesses out of ``guesses`` reject (ε, δ)-DP at ``confidence``.

    0 when nothing is rejected (too few right guesses). For δ = 0 the bound is the root of a binomial tail, found by
    bisection to 1e-9. For δ > 0 the theorem's right-hand side need not be monotone in ε; since (ε, δ)-DP implies
    (ε', δ)-DP for every ε' > ε, each ε is tested with the smallest right-hand side found at or above it (on a coarse
    grid, then a grid of step :data:`RESOLUTION` inside the last rejected coarse cell), and the largest rejected grid
    point is returned: the bound errs low by less than :data:`RESOLUTION`, never high.
    """
    _check_counts(canaries, guesses, correct)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    beta = 1.0 - confidence
    pure = _pure_bound(guesses, correct, beta)
    if delta == 0 or pure == 0:
        return pure

    def rejected(grid: np.ndarray) -> np.ndarray:
        """Grid points rejected by the smallest right-hand side at or above them among the grid's points."""
        rhs = one_run_p_value(canaries=canaries, guesses=guesses, correct=correct, epsilon=grid, delta=delta)
        return np.flatnonzero(np.minimum.accumulate(rhs[::-1])[::-1] <= beta)

    coarse = np.arange(0.0, pure + _COARSE, _COARSE)  # every point above the root of the pure bound is accepted
    hits = rejected(coarse)
    if hits.size == 0:
        return 0.0
    fine = np.arange(coarse[hits[-1]], coarse[hits[-1]] + _COARSE, RESOLUTION)  # the next coarse point is accepted
    return float(fine[rejected(fine)[-1]])


def _pure_bound(guesses: int, correct: int, beta: float) -> float:
    """The δ = 0 bound: the ε where P[Binomial(r, e^ε/(1+e^ε)) ≥ v] = β (0 if already above β at ε = 0).

    The tail grows with ε and tends to 1 (v ≤ r), so the root is unique; it also bounds the δ > 0 case from above.
    """
    def tail(eps: float) -> float:
        return float(binom.sf(correct - 1, guesses, _accuracy(np.float64(eps))))

    if correct == 0 or tail(0.0) > beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while tail(hi) <= beta:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-9:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail(mid) <= beta else (lo, mid)
    return lo


def guess(scores: np.ndarray, positive: int, negative: int) -> np.ndarray:
    """The paper's guesser: +1 ("in") for the ``positive`` highest scores, −1 ("out") for the ``negative`` lowest,
    0 (abstain) for the rest. Ties are broken by position, which is independent of the inclusion draw."""
    scores = np.asarray(scores, dtype=np.float64)
    if positive < 0 or negative < 0 or positive + negative > scores.size:
        raise ValueError(f"need positive, negative >= 0 and positive + negative <= {scores.size} canaries")
    order = np.argsort(scores, kind="stable")
    guesses = np.zeros(scores.size, dtype=np.int8)
    guesses[order[scores.size - positive :]] = 1
    guesses[order[:negative]] = -1
    return guesses


@dataclass(frozen=True)
class Bound:
    """The one-run lower bound reached by one guesser, with the counts it rests on.

    Attributes:
        epsilon: the lower bound (0 when nothing is rejected).
        positive, negative: the guesser's numbers of "in" and "out" guesses (k₊, k₋).
        guesses: r = k₊ + k₋.
        correct: v, the number of right guesses.
        confidence: the confidence of this bound alone (after any correction for several guessers).
    """

    epsilon: float
    positive: int
    negative: int
    guesses: int
    correct: int
    confidence: float


def audit_bound(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
    guessers: Sequence[tuple[int, int]],
) -> Bound:
    """The best lower bound over several guessers (k₊, k₋), valid at ``confidence`` for the whole set.

    Each guesser is tested at confidence 1 − β/len(guessers) (Bonferroni), so reporting the largest of their bounds
    is still valid at 1 − β: with probability ≥ 1 − β no guesser's bound exceeds the true ε. ``guessers`` must be
    chosen before looking at the scores.
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError(f"scores and included must be 1-D of one length, got {scores.shape} and {included.shape}")
    if not guessers:
        raise ValueError("give at least one guesser (positive, negative)")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    each = 1.0 - (1.0 - confidence) / len(guessers)
    truth = np.where(included, 1, -1)
    best: Bound | None = None
    for positive, negative in guessers:
        guesses = guess(scores, positive, negative)
        r, v = int(np.count_nonzero(guesses)), int(np.count_nonzero(guesses == truth))
        eps = epsilon_lower_bound(canaries=scores.size, guesses=r, correct=v, delta=delta, confidence=each)
        if best is None or eps > best.epsilon:
            best = Bound(eps, positive, negative, r, v, each)
    return best


def default_guessers(
    canaries: int, fractions: Sequence[float] = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
) -> list[tuple[int, int]]:
    """Symmetric guessers (k₊ = k₋) that guess on the given fractions of the canaries (at least 2 guesses each)."""
    counts = sorted({max(1, round(f * canaries / 2)) for f in fractions})
    return [(k, k) for k in counts if 2 * k <= canaries]
