"""The step profile's counters (``benchmarks/step_profile.py``), and a BK step that makes the host wait for nothing."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from models import TinyTransformer, cnn2d
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from step_profile import StepCounter

from opacus_fast import PrivacyEngine


def test_counter_counts_kernels_flops_syncs_and_memory() -> None:
    x, y = torch.randn(8, 16), torch.randn(16, 4)
    with StepCounter() as counter:
        z = x @ y  # mm: 2 * 8 * 16 * 4 FLOPs
        z.t().reshape(-1)[:5].view(5, 1)  # views and a copy of the transposed reshape
        z.add_(1)
        torch.empty(3)
        del z
        assert counter.live == 0
        float(x.sum())  # sum, then the host reads the value
        x.nonzero()
        torch.unique(torch.tensor([1, 1, 2]))
        x[x > 0]  # boolean indexing: an output size the host must know
    assert counter.flops == 2 * 8 * 16 * 4
    assert counter.ops == {"mm": 1, "clone": 1, "add_": 1, "sum": 1, "nonzero": 1, "_unique2": 1,
                           "gt": 1, "index": 1}
    assert counter.syncs == {"_local_scalar_dense": 1, "nonzero": 1, "_unique2": 1, "index": 1}
    assert counter.peak >= 8 * 4 * 4 * 2  # z and its copy were alive together


def _bk_step(model: nn.Module, x: torch.Tensor, loss_of) -> StepCounter:
    """One Poisson physical batch through make_private_fast (masks, noise), the second one counted."""
    data = TensorDataset(x, torch.zeros(len(x)))
    pmodel, optimizer, loader = PrivacyEngine().make_private_fast(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(data, batch_size=4),
        noise_multiplier=1.0, max_grad_norm=1.0, max_physical_batch_size=4,
    )
    counter = StepCounter()
    for i, (xb, _) in zip(range(2), loader):
        optimizer.zero_grad()
        with counter if i == 1 else contextlib.nullcontext():
            loss_of(pmodel(xb)).backward()
            optimizer.step()
    return counter


def test_a_bk_step_never_waits_for_the_device() -> None:
    """Every layer family (embedding, norms, attention, convs, units), masks, noise: no host sync."""
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (16, 6))
    images = torch.randn(16, 3, 12, 12)
    for model, x in ((TinyTransformer(), ids), (cnn2d(), images)):
        counter = _bk_step(model, x, lambda out: out.pow(2).mean())
        assert sum(counter.ops.values()) > 0 and counter.syncs == {}, dict(counter.syncs)
