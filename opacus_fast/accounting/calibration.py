"""Noise calibration: the smallest noise multiplier σ whose reported ε stays within a target, for any accountant.

The search is conservative: it only ever returns a σ at which the chosen accountant itself reported ε ≤ target, and
stops once that ε is within ``epsilon_tolerance`` of the target. Accountants such as PRV get slow and memory-hungry
when ε is large (tiny σ), so the search never probes far below the answer: it starts from the σ that the cheap RDP
accountant calibrates to (RDP bounds ε from above, so the answer is near it and usually just below), brackets the
answer with small multiplicative steps, then narrows the bracket by false position on log σ (Illinois variant).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Integral, Real

from opacus.accountants import create_accountant

MIN_SIGMA = 1e-2  # below this the search stops: σ this small protects nothing in practice
MAX_SIGMA = 1e6  # above this the target is declared unreachable
RDP_STEP = 2.0  # first bracketing ratio for the cheap RDP guess
STEP = 1.1  # first bracketing ratio around the guess for the chosen accountant
MAX_ITERATIONS = 100

#: accountants whose ε is an estimate that can lie below the true ε: refused wherever a guarantee is promised
NOT_UPPER_BOUNDS = {
    "gdp": "Opacus' Gaussian-DP accountant is a central-limit approximation that can under-report ε (at q = 0.1, "
    "σ = 0.89, 10 steps and δ = 1e-5 it reports 2.0 where the true ε is above 3.6)",
}

EpsilonFn = Callable[[float], float]
Bracket = tuple[float | None, float, float, float]  # (σ_lo or None, ε(σ_lo), σ_hi, ε(σ_hi))


def get_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int | None = None,
    epochs: float | None = None,
    accountant: str = "prv",
    epsilon_tolerance: float = 0.01,
    **kwargs,
) -> float:
    """Smallest σ (up to ``epsilon_tolerance`` in ε) such that ``accountant`` reports ε ≤ ``target_epsilon``.

    Args:
        target_epsilon, target_delta: the (ε, δ) budget for the whole training.
        sample_rate: Poisson sampling probability q of each step.
        steps, epochs: give exactly one; ``epochs`` means ``epochs / sample_rate`` steps, rounded up.
        accountant: any name registered in Opacus that bounds ε from above (``"prv"``, ``"rdp"``,
            ``"prv_accountant"``, ...; not ``"gdp"``, see :func:`check_upper_bound`).
        epsilon_tolerance: the returned σ has target − tolerance ≤ ε(σ) ≤ target (unless σ hit ``MIN_SIGMA``).
        **kwargs: passed to the accountant's ``get_epsilon`` (e.g. ``eps_error`` for the PRV accountants).
    """
    check_upper_bound(accountant)
    steps = _check_inputs(target_epsilon, target_delta, sample_rate, steps, epochs, epsilon_tolerance)
    rdp = _epsilon_fn("rdp", target_delta, sample_rate, steps, {})
    guess = _calibrate(rdp, target_epsilon, epsilon_tolerance, 1.0, RDP_STEP)
    chosen = _epsilon_fn(accountant, target_delta, sample_rate, steps, kwargs)
    return _calibrate(chosen, target_epsilon, epsilon_tolerance, guess, STEP)


def check_upper_bound(accountant: str) -> None:
    """Refuse an accountant whose reported ε is not an upper bound (a σ calibrated with it, or an ε reported by it,
    would not be a guarantee)."""
    if accountant in NOT_UPPER_BOUNDS:
        raise ValueError(
            f"accountant {accountant!r} is refused: {NOT_UPPER_BOUNDS[accountant]}. Use 'prv' (the default), 'rdp' "
            "or 'prv_accountant', which bound ε from above"
        )


def _check_inputs(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int | None,
    epochs: float | None,
    epsilon_tolerance: float,
) -> int:
    """Validate the calibration inputs and return the number of steps."""
    if not (isinstance(target_epsilon, Real) and 0 < target_epsilon < math.inf):
        raise ValueError(f"target_epsilon must be a positive finite number, got {target_epsilon!r}.")
    if not (isinstance(target_delta, Real) and 0 < target_delta < 1):
        raise ValueError(f"target_delta must be in (0, 1) (typically < 1/dataset size), got {target_delta!r}.")
    if not (isinstance(sample_rate, Real) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1] (expected batch size / dataset size), got {sample_rate!r}.")
    if not (isinstance(epsilon_tolerance, Real) and epsilon_tolerance > 0):
        raise ValueError(f"epsilon_tolerance must be > 0, got {epsilon_tolerance!r}.")
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps= and epochs= (the length of the training).")
    if epochs is not None:
        if not (isinstance(epochs, Real) and 0 < epochs < math.inf):
            raise ValueError(f"epochs must be a positive number, got {epochs!r}.")
        return epochs_to_steps(epochs, sample_rate)
    if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    return int(steps)


def epochs_to_steps(epochs: float, sample_rate: float) -> int:
    """``epochs / sample_rate`` rounded up (never under-count steps), ignoring float noise such as 9.999999999999998."""
    exact = epochs / sample_rate
    nearest = round(exact)
    return max(1, nearest if abs(exact - nearest) <= 1e-9 * exact else math.ceil(exact))


def _epsilon_fn(name: str, delta: float, sample_rate: float, steps: int, kwargs: dict) -> EpsilonFn:
    """ε of ``steps`` steps at (σ, ``sample_rate``) as reported by the accountant registered as ``name``."""
    try:
        accountant = create_accountant(mechanism=name)
    except ValueError as err:
        raise ValueError(
            f"unknown accountant {name!r}: use 'prv', 'rdp', 'prv_accountant' or a name registered with "
            "opacus.accountants.register_accountant."
        ) from err

    def epsilon(sigma: float) -> float:
        accountant.history = [(sigma, sample_rate, steps)]
        return float(accountant.get_epsilon(delta=delta, **kwargs))

    return epsilon


def _calibrate(epsilon: EpsilonFn, target: float, tolerance: float, start: float, ratio: float) -> float:
    """Bracket the target around ``start`` and narrow it; the σ returned has ε(σ) ≤ target."""
    lo, eps_lo, hi, eps_hi = _bracket(epsilon, target, start, ratio)
    if lo is None:
        return hi
    return _false_position(epsilon, target, tolerance, (lo, eps_lo, hi, eps_hi))


def _bracket(epsilon: EpsilonFn, target: float, sigma: float, ratio: float) -> Bracket:
    """Walk from ``sigma`` by ratios ``ratio``, ``ratio²``, ``ratio⁴``, ... until ε crosses the target.

    Returns σ_lo with ε > target and σ_hi with ε ≤ target; σ_lo is None if even ``MIN_SIGMA`` meets the target.
    """
    eps = epsilon(sigma)
    if eps > target:
        while eps > target:
            if sigma >= MAX_SIGMA:
                raise ValueError(
                    f"even noise_multiplier={MAX_SIGMA:g} gives epsilon={eps:.4g} > target {target:g}: raise "
                    "target_epsilon or target_delta, or lower sample_rate or the number of steps."
                )
            lo, eps_lo = sigma, eps
            sigma = min(sigma * ratio, MAX_SIGMA)
            ratio *= ratio
            eps = epsilon(sigma)
        return lo, eps_lo, sigma, eps
    while eps <= target:
        if sigma <= MIN_SIGMA:
            return None, math.inf, sigma, eps
        hi, eps_hi = sigma, eps
        sigma = max(sigma / ratio, MIN_SIGMA)
        ratio *= ratio
        eps = epsilon(sigma)
    return sigma, eps, hi, eps_hi


def _false_position(epsilon: EpsilonFn, target: float, tolerance: float, bracket: Bracket) -> float:
    """Illinois false position on (log σ, ε − target) until target − tolerance < ε(σ_hi) ≤ target."""
    lo, eps_lo, hi, eps_hi = bracket
    g_lo, g_hi = eps_lo - target, eps_hi - target  # g_lo > 0 >= g_hi; Illinois halves a stale end's weight
    last_moved = 0
    for _ in range(MAX_ITERATIONS):
        if target - eps_hi <= tolerance or hi - lo <= 1e-12 * hi:
            break
        x_lo, x_hi = math.log(lo), math.log(hi)
        x = (x_lo + x_hi) / 2 if math.isinf(g_lo) else (x_lo * g_hi - x_hi * g_lo) / (g_hi - g_lo)
        sigma = min(max(math.exp(x), lo), hi)
        if sigma in (lo, hi):  # interpolation stalled at an end: bisect instead
            sigma = math.sqrt(lo * hi)
        eps = epsilon(sigma)
        if eps > target:
            lo, g_lo = sigma, eps - target
            g_hi = g_hi / 2 if last_moved < 0 else g_hi
            last_moved = -1
        else:
            hi, eps_hi, g_hi = sigma, eps, eps - target
            g_lo = g_lo / 2 if last_moved > 0 else g_lo
            last_moved = 1
    return hi


__all__ = ["epochs_to_steps", "get_noise_multiplier"]
