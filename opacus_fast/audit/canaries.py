"""Canaries for a one-run audit: their random inclusion, the rows that carry them, and how the guesser scores them.

Two kinds:

- **gradient canaries** (white-box): canary j is a row whose per-example gradient is ``CANARY_NORM · C`` times the
  unit vector of one coordinate of a parameter vector that the audit adds next to the model (a "Dirac" canary).
  Real rows never touch that vector, so nothing but the canaries and the noise moves it; the canary's gradient is
  clipped, summed, noised and sampled with the model's, by the same code, as one flat-clipped release.
- **input canaries** (black-box): ordinary (input, label) examples the caller supplies, e.g. mislabeled images,
  scored by their loss under the final model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

#: a gradient canary's gradient norm, in units of the clip bound C: far beyond it, so a correct run clips it to C
CANARY_NORM = 100.0
#: median absolute deviation of a standard normal: MAD / this estimates a standard deviation
_MAD_NORMAL = 0.6744897501960817


def draw_inclusion(count: int, seed: np.random.SeedSequence) -> np.ndarray:
    """Each of ``count`` canaries included independently with probability 1/2 (bool array)."""
    return np.random.default_rng(seed).random(count) < 0.5


class GradientCanaries(nn.Module):
    """The user's model plus one parameter per gradient canary, which real rows never touch.

    ``forward(x, canary)`` returns ``(model(x), canary_out)``; ``canary`` holds each row's canary index, −1 for a real
    row. Canary row j's ``canary_out`` is ``norm · w_j``, so its gradient is ``norm · e_j`` on ``w`` (a Dirac canary)
    and nothing elsewhere once the loss takes ``canary_out`` for canary rows and the model's loss for real rows.
    """

    def __init__(self, model: nn.Module, count: int, norm: float) -> None:
        super().__init__()
        like = next(model.parameters())
        self.model = model
        self.canaries = nn.Linear(count, 1, bias=False, device=like.device, dtype=like.dtype)
        nn.init.zeros_(self.canaries.weight)
        self.norm = norm

    def forward(self, x: Any, canary: torch.Tensor) -> tuple[Any, torch.Tensor]:
        out = self.model(x)
        weight = self.canaries.weight
        hot = F.one_hot(canary.clamp(min=0), weight.shape[1]).to(weight.dtype)
        hot = hot * (canary >= 0).to(weight.dtype).unsqueeze(1) * self.norm
        return out, self.canaries(hot).squeeze(1)

    @property
    def weights(self) -> torch.Tensor:
        """w: one coordinate per canary."""
        return self.canaries.weight[0]


class CanaryRows(Dataset):
    """The training rows of an audit: ``data``'s (x, y) examples, then the included canaries, each as (x, y, id).

    ``id`` is −1 for a real row and the canary's index for a canary row. An excluded canary has no row at all: it is
    absent from training, as the one-run theorem requires (not present with a zero gradient).
    """

    def __init__(self, data: Dataset, canaries: list[tuple[Any, Any]], ids: np.ndarray) -> None:
        if len(canaries) != len(ids):
            raise ValueError("one id per canary row")
        self.data = data
        self.canaries = canaries
        self.ids = [int(i) for i in ids]

    def __len__(self) -> int:
        return len(self.data) + len(self.canaries)

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        if index < len(self.data):
            x, y = self.data[index]
            return x, y, -1
        k = index - len(self.data)
        x, y = self.canaries[k]
        return x, y, self.ids[k]


class StepScores:
    """White-box score from every released update: per canary, the sum over steps of the log likelihood ratio
    "its clipped gradient C may be in this step's noisy sum" against "it is not".

    At each released step the coordinate of canary j in the noisy sum, in units of C, is u = N(0, σ²) plus 1 when j
    was sampled (probability q). The log ratio of that mixture to N(0, σ²) is log(1 − q + q·exp((u − ½)/σ²)), the
    Neyman–Pearson statistic for one step. σ is estimated from the step's own release (the median absolute deviation
    over all canary coordinates) rather than taken from the claimed configuration, so a run whose noise is smaller
    than claimed is scored with its real noise; q is the claimed rate. Every input is the run's output (and public
    constants), never the inclusion draw: a valid guesser for the one-run theorem.

    Args:
        count: canaries.
        sample_rate: the claimed Poisson rate q.
        unit: the factor that turns the released gradient into units of C (the noisy sum's divisor over C).
    """

    def __init__(self, count: int, sample_rate: float, unit: float) -> None:
        self.total = np.zeros(count)
        self.log_out = np.log1p(-sample_rate) if sample_rate < 1 else -np.inf
        self.log_in = np.log(sample_rate)
        self.unit = unit
        self.steps = 0

    def observe(self, released: torch.Tensor) -> None:
        """Add one released step: ``released`` holds the canary coordinates of the released (noisy) gradient."""
        u = released.detach().to("cpu", torch.float64).numpy() * self.unit
        sigma = max(np.median(np.abs(u - np.median(u))) / _MAD_NORMAL, 1e-12)
        self.total += np.logaddexp(self.log_out, self.log_in + (u - 0.5) / sigma**2)
        self.steps += 1


def loss_scores(
    model: nn.Module, canaries: list[tuple[Any, Any]], loss_fn: Callable[[Any, Any], torch.Tensor], batch_size: int
) -> np.ndarray:
    """Black-box score: minus each input canary's loss under the final model (members tend to have lower loss)."""
    device = next(model.parameters()).device
    scores = []
    with torch.no_grad():
        for start in range(0, len(canaries), batch_size):
            xs, ys = zip(*canaries[start : start + batch_size])
            x = torch.stack([torch.as_tensor(v) for v in xs]).to(device)
            losses = loss_fn(model(x), torch.stack([torch.as_tensor(y) for y in ys]).to(device))
            scores.append(-losses.detach().to("cpu", torch.float64).numpy())
    return np.concatenate(scores)
