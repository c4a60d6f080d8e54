"""One audited training run: canaries in, DP-SGD with ``make_private_fast``, scores out, the two ε side by side."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from opacus.accountants import create_accountant
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..accounting.calibration import MIN_SIGMA
from ..privacy_engine import PrivacyEngine
from .bound import Bound, audit_bound, default_guessers
from .canaries import CANARY_NORM, CanaryRows, GradientCanaries, StepScores, draw_inclusion, loss_scores

#: ``make_private(engine, **keywords) -> (model, optimizer, data_loader)``, keywords as ``make_private_fast``'s
MakePrivate = Callable[..., tuple[nn.Module, Any, DataLoader]]
LossFn = Callable[[Any, Any], torch.Tensor]

MODES = ("white-box", "black-box")
OBSERVE = ("steps", "final")


def _cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target, reduction="none")


def _make_private_fast(engine: PrivacyEngine, **keywords: Any) -> tuple[nn.Module, Any, DataLoader]:
    return engine.make_private_fast(**keywords)


@dataclass(frozen=True)
class TrainingConfig:
    """The DP-SGD configuration of the audited run (plain SGD with optional momentum).

    Attributes:
        noise_multiplier: σ.
        max_grad_norm: the flat clip bound C.
        sample_rate: the Poisson rate q.
        steps: logical steps (noisy updates).
        lr, momentum: of the SGD optimizer.
        delta: δ of the accountant's ε and of the lower bound.
        accountant: the PrivacyEngine's accountant ("prv", "rdp", "prv_accountant").
        loss_reduction: "mean" or "sum", as in ``make_private_fast``.
        max_physical_batch_size: split logical batches into physical ones (None: one per step).
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    lr: float
    momentum: float = 0.0
    delta: float = 1e-5
    accountant: str = "prv"
    loss_reduction: str = "mean"
    max_physical_batch_size: int | None = None

    def __post_init__(self) -> None:
        if not self.noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {self.loss_reduction!r}")


@dataclass(frozen=True)
class AuditResult:
    """The two sides of one audited run.

    Attributes:
        epsilon_lower: the one-run lower bound on ε at ``confidence`` (0: nothing shown).
        epsilon_accountant: the ε that the run's accountant reports for it (its real σ, q and steps) at ``delta``
            (∞ when σ is below ``opacus_fast.accounting.calibration.MIN_SIGMA``).
        bound: the guesser that reached ``epsilon_lower`` and its counts.
        scores: one score per canary (higher: guessed "in").
        included: the inclusion draw (True: the canary was in the training data).
        model: the trained copy of the model (the caller's model is left untouched).
    """

    mode: str
    observe: str
    epsilon_lower: float
    epsilon_accountant: float
    delta: float
    confidence: float
    bound: Bound
    scores: np.ndarray = field(repr=False)
    included: np.ndarray = field(repr=False)
    config: TrainingConfig
    seed: int
    model: nn.Module = field(repr=False)

    @property
    def canaries(self) -> int:
        return int(self.included.size)

    def summary(self) -> str:
        """A few lines that put the lower bound beside the accountant's ε."""
        c, b = self.config, self.bound
        seen = {"steps": "every released update", "final": "the final model"}[self.observe]
        kind = "gradient" if self.mode == "white-box" else "input"
        head = f"{self.mode} audit from {seen}: {self.canaries} {kind} canaries, {int(self.included.sum())} included"
        run = f"DP-SGD: sigma = {c.noise_multiplier:g}, C = {c.max_grad_norm:g}, q = {c.sample_rate:g}, {c.steps} steps"
        guesses = f"{b.correct} of {b.guesses} guesses right: k+ = {b.positive}, k- = {b.negative}"
        lines = [
            f"{head} (seed {self.seed})",
            f"{run}, delta = {self.delta:g}",
            f"accountant ({c.accountant}) epsilon      = {self.epsilon_accountant:.3f}  (upper bound)",
            f"one-run lower bound epsilon  = {self.epsilon_lower:.3f}  at {100 * self.confidence:g} % confidence ({guesses})",
        ]
        return "\n".join(lines)


def audit(
    model: nn.Module,
    data: Dataset,
    config: TrainingConfig,
    *,
    mode: str = "white-box",
    observe: str | None = None,
    canaries: int | Sequence[tuple[Any, Any]] = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    loss_fn: LossFn = _cross_entropy,
    guessers: Sequence[tuple[int, int]] | None = None,
    make_private: MakePrivate = _make_private_fast,
    progress: bool = False,
) -> AuditResult:
    """Train ``model`` once on ``data`` plus randomly included canaries with DP-SGD, and bound ε from below.

    Each canary is included with probability 1/2, independently (from ``seed``, which also seeds training). The
    guesser ranks the canaries by a score computed from the run's output only, guesses "in" for the k₊ highest and
    "out" for the k₋ lowest (the best of ``guessers``, Bonferroni-corrected; default
    :func:`~opacus_fast.audit.bound.default_guessers`), and the number of right guesses gives the one-run lower
    bound (Steinke, Nasr, Jagielski 2023) next to the accountant's ε for the same run.

    Args:
        model: the model to train (a deep copy is trained; the argument is left as it was).
        data: a map-style dataset of (input, target) examples.
        config: the DP-SGD configuration.
        mode: "white-box": gradient canaries (``canaries`` is their number); "black-box": input canaries
            (``canaries`` is the list of (input, target) examples), scored by minus their loss under the final model.
        observe: what the white-box guesser sees: "steps" (every released noisy update; default) or "final" (the
            final parameters only, scored by each canary's coordinate change). Black-box: "final" only.
        confidence: of the lower bound (e.g. 0.95).
        loss_fn: ``loss_fn(output, target)`` -> per-example losses (default: cross-entropy).
        make_private: ``make_private(engine, module=, optimizer=, data_loader=, noise_multiplier=,
            max_grad_norm=, sample_rate=, max_physical_batch_size=, loss_reduction=)``; default
            ``engine.make_private_fast``. Another DP implementation behind the same keywords is audited the same way.
        progress: show a progress bar over the training steps.
    """
    observe = _check_mode(mode, observe, canaries)
    count = int(canaries) if isinstance(canaries, Integral) else len(canaries)
    guessers = list(guessers) if guessers is not None else default_guessers(count)
    _check_guessers(guessers, count, confidence)
    inclusion_seed, training_seed = np.random.SeedSequence(seed).spawn(2)
    included = draw_inclusion(count, inclusion_seed)

    model = copy.deepcopy(model)
    if mode == "white-box":
        template_x, template_y = data[0]
        canary_rows = [(torch.zeros_like(torch.as_tensor(template_x)), template_y)] * int(included.sum())
        module: nn.Module = GradientCanaries(model, count, CANARY_NORM * config.max_grad_norm)
    else:
        canary_rows = [canaries[j] for j in np.flatnonzero(included)]
        module = model
    rows = CanaryRows(data, canary_rows, np.flatnonzero(included))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(training_seed.generate_state(1)[0]))
        engine = PrivacyEngine(accountant=config.accountant)
        trained, step_scores = _train(module, rows, config, engine, make_private, observe, len(data), count, loss_fn,
                                      progress)
    if observe == "steps":
        scores = step_scores.total
    elif mode == "white-box":
        scores = -module.weights.detach().to("cpu", torch.float64).numpy()  # the canary coordinates started at 0
    else:
        scores = loss_scores(trained, list(canaries), loss_fn, batch_size=256)
    bound = audit_bound(scores, included, delta=config.delta, confidence=confidence, guessers=guessers)
    if hasattr(trained, "cleanup"):
        trained.cleanup()
    return AuditResult(
        mode=mode, observe=observe, epsilon_lower=bound.epsilon, epsilon_accountant=_run_epsilon(engine, config.delta),
        delta=config.delta, confidence=confidence, bound=bound, scores=scores, included=included, config=config,
        seed=seed, model=model,
    )


def _check_mode(mode: str, observe: str | None, canaries: int | Sequence) -> str:
    """Validate the mode and its canaries; return what the guesser observes."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "white-box":
        if not isinstance(canaries, Integral):
            raise TypeError("white-box audits use gradient canaries: pass their number as canaries=")
        observe = "steps" if observe is None else observe
    else:
        if isinstance(canaries, Integral):
            raise TypeError("black-box audits use input canaries: pass them as a list of (input, target) examples")
        if observe not in (None, "final"):
            raise ValueError("a black-box guesser sees the final model only: observe must be 'final'")
        observe = "final"
    if observe not in OBSERVE:
        raise ValueError(f"observe must be one of {OBSERVE}, got {observe!r}")
    count = int(canaries) if isinstance(canaries, Integral) else len(canaries)
    if count < 2:
        raise ValueError(f"an audit needs at least 2 canaries, got {count}")
    return observe


def _check_guessers(guessers: list[tuple[int, int]], count: int, confidence: float) -> None:
    """Refuse, before any training, guessers that cannot be applied to ``count`` canaries, or a bad confidence."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not guessers:
        raise ValueError("give at least one guesser (positive, negative)")
    for positive, negative in guessers:
        if positive < 0 or negative < 0 or positive + negative > count:
            raise ValueError(f"guesser ({positive}, {negative}): need k+, k- >= 0 and k+ + k- <= {count} canaries")


def _train(
    module: nn.Module,
    rows: CanaryRows,
    config: TrainingConfig,
    engine: PrivacyEngine,
    make_private: MakePrivate,
    observe: str,
    real_rows: int,
    count: int,
    loss_fn: LossFn,
    progress: bool,
) -> tuple[nn.Module, StepScores | None]:
    """Train ``config.steps`` logical steps; with ``observe="steps"``, score every released update on the way."""
    optimizer = torch.optim.SGD(module.parameters(), lr=config.lr, momentum=config.momentum)
    loader = DataLoader(rows, batch_size=max(1, round(config.sample_rate * len(rows))))
    private, optimizer, loader = make_private(
        engine, module=module, optimizer=optimizer, data_loader=loader, noise_multiplier=config.noise_multiplier,
        max_grad_norm=config.max_grad_norm, sample_rate=config.sample_rate,
        max_physical_batch_size=config.max_physical_batch_size, loss_reduction=config.loss_reduction,
    )
    white_box = isinstance(module, GradientCanaries)
    step_scores = None
    if observe == "steps":
        # the noisy sum's divisor under "mean": N·q, with N the expected size (real rows + half the canaries), a
        # public constant: the real N depends on the inclusion draw, which the guesser must not see
        divisor = config.sample_rate * (real_rows + count / 2) if config.loss_reduction == "mean" else 1.0
        step_scores = StepScores(count, config.sample_rate, divisor / config.max_grad_norm)
    device = next(module.parameters()).device
    bar = tqdm(total=config.steps, desc="audited training", unit="step", disable=not progress)
    released = 0
    release_hook = optimizer.step_hook

    def on_release(opt: Any) -> None:
        nonlocal released
        if release_hook is not None:
            release_hook(opt)  # the accountant
        if step_scores is not None:
            step_scores.observe(module.canaries.weight.grad[0])
        released += 1
        bar.update()

    optimizer.step_hook = on_release
    try:
        while released < config.steps:
            before = released
            for x, y, canary in loader:
                x, y, canary = x.to(device), y.to(device), canary.to(device)
                optimizer.zero_grad()
                if white_box:
                    out, canary_out = private(x, canary)
                    per_row = torch.where(canary >= 0, canary_out, loss_fn(out, y))
                else:
                    per_row = loss_fn(private(x), y)
                loss = per_row.sum() / max(1, per_row.numel()) if config.loss_reduction == "mean" else per_row.sum()
                loss.backward()
                optimizer.step()
                if released >= config.steps:
                    break
            if released == before:
                raise RuntimeError("a pass over the data loader released no step: it yields no batches")
    finally:
        bar.close()
    return private, step_scores


def _run_epsilon(engine: PrivacyEngine, delta: float) -> float:
    """The engine's ε for the run it accounted (its real σ, q and steps); ∞ when some step's σ is below
    ``MIN_SIGMA`` (no protection to speak of, and the PRV accountants cannot even represent it)."""
    if any(sigma < MIN_SIGMA for sigma, _, _ in engine.accountant.history):
        return math.inf
    return float(engine.get_epsilon(delta))


def accountant_epsilon(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv"
) -> float:
    """The ε an accountant claims for a run of ``steps`` steps at (σ, q): what a configuration promises."""
    if noise_multiplier < MIN_SIGMA:
        return math.inf
    acc = create_accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta))
