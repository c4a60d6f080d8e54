"""A model compiled with torch.compile before make_private_fast trains exactly (float64, batch-of-one reference)."""

from __future__ import annotations

import copy

import pytest
import torch
from models import LayerScale
from oracle import loop_clipped_sum, median_bound
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from opacus_fast import PrivacyEngine


class Block(nn.Module):
    """A residual MLP block with a layer scale (a parameter used directly) and a position table."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(5, 6) * 0.1)
        self.norm, self.fc1, self.fc2, self.ls = nn.LayerNorm(6), nn.Linear(6, 12), nn.Linear(12, 6), LayerScale(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.pos
        h = h + self.ls(self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(h)))))
        return self.head(h.mean(1))


@pytest.mark.filterwarnings("ignore")
def test_compiled_model_trains_exactly() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Block().double()
    reference = copy.deepcopy(model)
    x = torch.randn(6, 5, 6, dtype=torch.float64)
    loss = lambda out: out.pow(2).sum()
    params = list(reference.parameters())
    norms = torch.stack([
        torch.sqrt(sum(g.pow(2).sum() for g in torch.autograd.grad(loss(reference(x[i:i + 1])), params)))
        for i in range(len(x))
    ])
    bound = median_bound(norms)
    want = loop_clipped_sum(reference, x, bound, loss=loss)
    compiled = torch.compile(model)
    optimizer = torch.optim.SGD(compiled.parameters(), lr=1.0)
    private, _, _ = PrivacyEngine().make_private_fast(
        module=compiled, optimizer=optimizer, data_loader=DataLoader(TensorDataset(x), 6), noise_multiplier=0.0,
        max_grad_norm=bound, poisson_sampling=False, loss_reduction="sum",
    )
    for _ in range(2):  # the second call runs the compiled code
        for p in model.parameters():
            p.summed_grad = None
        loss(private(x)).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.summed_grad, want[name], rtol=1e-9, atol=1e-12, msg=name)
