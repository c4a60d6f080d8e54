"""``python -m opacus_fast.audit --example digits``: audit one DP-SGD run on scikit-learn's digits.

Trains a small MLP on the digits (shipped with scikit-learn, nothing is downloaded) with ``make_private_fast`` and
canaries, prints the accountant's ε beside the one-run lower bound, and saves a plot of the canaries' scores
(included vs excluded). White-box (default): gradient canaries, guesser sees every released update
(``--observe final``: the final parameters only). Black-box: mislabeled random images, scored by their loss under
the final model.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from .run import AuditResult, TrainingConfig, audit

SCORE_LABELS = {
    ("white-box", "steps"): "score: sum over released updates of the per-step log likelihood ratio",
    ("white-box", "final"): "score: minus the change of the canary's coordinate over training",
    ("black-box", "final"): "score: minus the canary's loss under the final model",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m opacus_fast.audit", description=__doc__.split("\n\n")[0])
    p.add_argument("--example", choices=["digits"], required=True, help="the training task to audit")
    p.add_argument("--mode", choices=["white-box", "black-box"], default="white-box")
    p.add_argument("--observe", choices=["steps", "final"], default=None,
                   help="white-box: what the guesser sees (default: steps); black-box: final only")
    p.add_argument("--canaries", type=int, default=None, help="default: 5000 white-box, 500 black-box")
    p.add_argument("--sigma", type=float, default=1.0, help="noise multiplier")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--sample-rate", type=float, default=0.03, help="Poisson rate q")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=2.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--accountant", choices=["prv", "rdp", "prv_accountant"], default="prv")
    p.add_argument("--seed", type=int, default=0, help="seeds the canaries' inclusion, the model and training")
    p.add_argument("--threads", type=int, default=1, help="torch threads (small models: more only add contention)")
    p.add_argument("--plot", type=Path, default=Path("audit_scores.png"), help="where to save the score plot")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    return p


def digits(seed: int) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 8×8 digits scaled to [0, 1], split 1,437 / 360 (train / test)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x = torch.tensor(x[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[order], dtype=torch.long)
    return TensorDataset(x[:1437], y[:1437]), TensorDataset(x[1437:], y[1437:])


def mislabeled_images(count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Black-box input canaries: uniform random 8×8 images with uniform random labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(count, 64, generator=g)
    y = torch.randint(0, 10, (count,), generator=g)
    return list(zip(x, y))


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def plot_scores(result: AuditResult, path: Path) -> None:
    """Histograms of the canaries' scores, included vs excluded, with the guesser's thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores, included, b = result.scores, result.included, result.bound
    bins = np.histogram_bin_edges(scores, bins=60)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(scores[~included], bins=bins, alpha=0.6, label=f"excluded ({int((~included).sum())})")
    ax.hist(scores[included], bins=bins, alpha=0.6, label=f"included ({int(included.sum())})")
    ordered = np.sort(scores)
    if b.positive:
        ax.axvline(ordered[-b.positive], color="k", ls="--", lw=1, label=f'"in" guesses above (k+ = {b.positive})')
    if b.negative:
        ax.axvline(ordered[b.negative - 1], color="k", ls=":", lw=1, label=f'"out" guesses below (k- = {b.negative})')
    ax.set_yscale("log")
    ax.set_xlabel(SCORE_LABELS[result.mode, result.observe])
    ax.set_ylabel("canaries")
    ax.set_title(f"{result.mode} audit ({result.observe}): lower bound ε ≥ {result.epsilon_lower:.2f} "
                 f"({100 * result.confidence:g} %), accountant ε = {result.epsilon_accountant:.2f}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> AuditResult:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test = digits(args.seed)
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    config = TrainingConfig(
        noise_multiplier=args.sigma, max_grad_norm=args.max_grad_norm, sample_rate=args.sample_rate,
        steps=args.steps, lr=args.lr, delta=args.delta, accountant=args.accountant,
    )
    if args.mode == "white-box":
        canaries: int | list = args.canaries or 5000
    else:
        canaries = mislabeled_images(args.canaries or 500, args.seed)
    result = audit(model, train, config, mode=args.mode, observe=args.observe, canaries=canaries,
                   confidence=args.confidence, seed=args.seed, progress=True)
    print(result.summary())
    print(f"test accuracy of the audited model: {100 * accuracy(result.model, test):.1f} %")
    plot_scores(result, args.plot)
    print(f"score plot: {args.plot}")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "mode": result.mode, "observe": result.observe, "canaries": result.canaries,
            "included": int(result.included.sum()), "epsilon_lower": result.epsilon_lower,
            "epsilon_accountant": result.epsilon_accountant, "delta": result.delta, "confidence": result.confidence,
            "guesses": result.bound.guesses, "correct": result.bound.correct, "k_pos": result.bound.positive,
            "k_neg": result.bound.negative, "config": vars(args) | {"plot": str(args.plot), "json": str(args.json)},
        }, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
