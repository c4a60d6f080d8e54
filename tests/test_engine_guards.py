"""The engine clips exactly or refuses, and adds nothing it was not asked for.

Layers that see tokens folded into dim 0 or run sequence first are exact; each refused case would otherwise give a
wrong clipped sum without an error: a model called on part of its batch, reentrant checkpointing, input-gradient
passes, instance-level ``forward`` overrides, parameters frozen after attaching.
"""

from __future__ import annotations

import pytest
import torch
from models import mlp
from oracle import l1_loss, loop_clipped_sum, median_bound
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from opacus_fast import PrivacyEngine, UnsupportedModuleError
from opacus_fast.clipping import ClipBound
from opacus_fast.data import DPDataLoader
from opacus_fast.engine import BKEngine


class TokenFolding(nn.Module):
    """Folds tokens into dim 0 before its layers: (B, T, d) → (B·T, d). Not batch first."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return self.fc(x.reshape(b * t, d)).reshape(b, t, 2).sum(1)


class SequenceFirst(nn.Module):
    """Reads batch-first data but runs its layer sequence-first: (B, T, d) → (T, B, d)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.transpose(0, 1)).sum(0)


class Checkpointed(nn.Module):
    """An MLP whose hidden block runs under activation checkpointing."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def block(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc2(torch.tanh(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(self.block, self.fc1(x), use_reentrant=self.reentrant)
        return self.fc3(h)


def _tokens(n: int = 12, t: int = 3) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, t, 4, generator=g, dtype=torch.float64))


def _private(model: nn.Module, data: TensorDataset, **options):
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    return PrivacyEngine().make_private_fast(module=model, optimizer=optimizer, data_loader=DataLoader(data, 4),
                                             noise_multiplier=0.0, max_grad_norm=1.0, **options)


@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("make", [TokenFolding, SequenceFirst])
def test_layers_that_fold_tokens_or_run_sequence_first_are_exact(make: type[nn.Module], pad: bool) -> None:
    """Token rows are never clipped as examples: the tracker follows each example's rows through the reshape or
    transpose, also when the batch happens to have as many rows as tokens (3 here, in some batches)."""
    torch.manual_seed(0)
    model = make().double()
    reference = make().double()
    reference.load_state_dict(model.state_dict())
    loader = DPDataLoader.from_data_loader(DataLoader(_tokens(n=40, t=3), 4), sample_rate=0.1,
                                           max_physical_batch_size=3, pad=pad,
                                           generator=torch.Generator().manual_seed(3))
    engine = BKEngine(model, bound=ClipBound(0.5), loss_reduction="sum", context=loader.context)
    checked = 0
    for (x,) in loader:
        info = loader.context.current
        model(x).sum().backward()
        real = x if info.mask is None else x[info.mask]
        if len(real) > 1:
            want = loop_clipped_sum(reference, real, 0.5, loss=lambda out: out.sum())
            for (name, _), p in zip(reference.named_parameters(), model.parameters()):
                torch.testing.assert_close(p.summed_grad, want[name], rtol=1e-9, atol=1e-12)
            checked += 1
        for p in model.parameters():
            p.summed_grad = None
        loader.context.released = loader.context.trained
    engine.detach()
    assert checked > 3


def test_evaluation_forward_between_forward_and_backward_is_fine() -> None:
    """Metrics on another batch under no_grad between the training forward and its backward change nothing."""
    torch.manual_seed(0)
    model = mlp().double()
    reference = mlp().double()
    reference.load_state_dict(model.state_dict())
    pmodel, _, _ = _private(model, TensorDataset(torch.randn(8, 7, dtype=torch.float64)), loss_reduction="sum")
    x = torch.randn(5, 7, dtype=torch.float64)
    loss = l1_loss(pmodel(x), "sum")
    with torch.no_grad():
        pmodel(torch.randn(3, 7, dtype=torch.float64))
    loss.backward()
    want = loop_clipped_sum(reference, x, 1.0)
    for (name, _), p in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.summed_grad, want[name], rtol=1e-9, atol=1e-12)


def test_model_called_on_part_of_its_batch_is_refused() -> None:
    """The loader's row count exposes a call on some of the physical batch's rows."""
    torch.manual_seed(0)
    model = SequenceFirst().double()
    loader = DPDataLoader.from_data_loader(DataLoader(_tokens(n=40, t=3), 4), sample_rate=0.2)
    engine = BKEngine(model, bound=ClipBound(1.0), loss_reduction="sum", context=loader.context)
    with pytest.raises(RuntimeError, match="the physical batch has .* rows but the model call's batch inputs have"):
        for (x,) in loader:
            if len(x) > 2:
                model(x[:2]).sum().backward()
    engine.detach()


def test_reentrant_checkpointing_is_refused_and_the_engine_recovers() -> None:
    """A backward inside the backward would clip each example's gradient in two separate parts."""
    torch.manual_seed(0)
    model = Checkpointed(reentrant=True).double()
    engine = BKEngine(model, bound=ClipBound(1.0), loss_reduction="sum")
    x = torch.randn(6, 5, dtype=torch.float64)
    with pytest.raises(UnsupportedModuleError, match="use_reentrant=False"):
        l1_loss(model(x), "sum").backward()
    model.reentrant = False  # the failed backward left nothing behind: the next one is exact
    for p in model.parameters():
        p.summed_grad = None
    l1_loss(model(x), "sum").backward()
    engine.detach()
    got = {n: p.summed_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.summed_grad = None
    want = loop_clipped_sum(model, x, 1.0)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12)


def test_non_reentrant_checkpointing_is_exact() -> None:
    torch.manual_seed(0)
    model = Checkpointed(reentrant=False).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in torch.autograd.grad(
        l1_loss(model(x[i:i + 1]), "sum"), list(model.parameters())))) for i in range(7)])
    bound = median_bound(norms)
    want = loop_clipped_sum(model, x, bound)
    engine = BKEngine(model, bound=ClipBound(bound), loss_reduction="sum")
    l1_loss(model(x), "sum").backward()
    engine.detach()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.summed_grad, want[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("poisson", [True, False])
def test_input_gradient_passes_add_nothing(poisson: bool) -> None:
    """An adversarial-example loop: autograd.grad(loss, x) computes no clipped sums; the training backward on the
    perturbed batch is exact."""
    torch.manual_seed(0)
    model = mlp().double()
    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(32, 7, generator=g, dtype=torch.float64))
    pmodel, optimizer, loader = _private(model, data, poisson_sampling=poisson, loss_reduction="sum")
    checked = 0
    for (x,) in loader:
        reference = mlp().double()
        reference.load_state_dict(model.state_dict())
        optimizer.zero_grad()
        x = x.clone().requires_grad_(True)
        (grad_x,) = torch.autograd.grad(l1_loss(pmodel(x), "sum"), x)
        assert all(getattr(p, "summed_grad", None) is None for p in model.parameters())
        x_adv = (x + 0.1 * grad_x.sign()).detach()
        l1_loss(pmodel(x_adv), "sum").backward()
        if len(x) >= 2:
            want = loop_clipped_sum(reference, x_adv, 1.0)
            for (name, _), p in zip(reference.named_parameters(), model.parameters()):
                torch.testing.assert_close(p.summed_grad, want[name], rtol=1e-9, atol=1e-12)
            checked += 1
        optimizer.step()
    assert checked >= 2


@pytest.mark.parametrize("poisson", [True, False])
def test_step_after_parameter_free_backward_is_refused_and_loses_nothing(poisson: bool) -> None:
    """``loss.backward(inputs=...)`` computes no parameter gradients through the captures; stepping on it would add
    noise to nothing and train nothing, silently. The step is refused and a corrected loop then trains exactly."""
    torch.manual_seed(0)
    model = mlp().double()
    data = TensorDataset(torch.randn(32, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    options = {"max_physical_batch_size": 4} if poisson else {"poisson_sampling": False}
    pmodel, optimizer, loader = _private(model, data, loss_reduction="sum", **options)
    before = [p.detach().clone() for p in model.parameters()]
    (x,) = next(iter(loader))
    optimizer.zero_grad()
    l1_loss(pmodel(x), "sum").backward(inputs=list(model.parameters()))
    with pytest.raises(ValueError, match="found no clipped gradients"):
        optimizer.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    reference = mlp().double()
    reference.load_state_dict(model.state_dict())
    (x,) = next(iter(loader))  # a new pass over the data: the refused batch is not trained later
    assert len(x) >= 2
    optimizer.zero_grad()
    l1_loss(pmodel(x), "sum").backward()
    want = loop_clipped_sum(reference, x, 1.0)
    for (name, _), p in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.summed_grad, want[name], rtol=1e-9, atol=1e-12)


def test_metrics_forward_after_backward_is_fine_and_a_step_without_backward_is_refused() -> None:
    """A metrics forward with gradients enabled after the backward is an ordinary loop; a second step() for one
    batch, or a step() before any backward, would release noise alone (Opacus refuses both too)."""
    torch.manual_seed(0)
    model = mlp().double()
    data = TensorDataset(torch.randn(16, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    pmodel, optimizer, _ = _private(model, data, poisson_sampling=False, loss_reduction="sum")
    with pytest.raises(ValueError, match="no backward pass ran since the last step"):
        optimizer.step()
    x = torch.randn(4, 7, dtype=torch.float64)
    optimizer.zero_grad()
    l1_loss(pmodel(x), "sum").backward()
    pmodel(torch.randn(3, 7, dtype=torch.float64)).sum()
    optimizer.step()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="no backward pass ran since the last step"):
        optimizer.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("case", ["create_graph", "gradient_penalty"])
def test_higher_order_gradients_are_refused(case: str) -> None:
    """A gradient of a gradient would reach the parameters unclipped (or not at all): refused, naming a layer."""
    torch.manual_seed(0)
    model = mlp().double()
    pmodel, _, _ = _private(model, TensorDataset(torch.randn(8, 7, dtype=torch.float64)))
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    with pytest.raises(UnsupportedModuleError, match=r"\(Linear\): backward or torch.autograd.grad with create_graph"):
        out = pmodel(x)
        if case == "create_graph":
            l1_loss(out, "sum").backward(create_graph=True)
        else:
            (grad_x,) = torch.autograd.grad(out.sum(), x, create_graph=True)
            (l1_loss(out, "sum") + grad_x.pow(2).sum()).backward()
    assert all(getattr(p, "summed_grad", None) is None and p.grad is None for p in model.parameters())


def test_instance_level_forward_override_is_refused() -> None:
    """accelerate's hooks and monkeypatches set ``forward`` on the instance; the capture would bypass them."""
    model = mlp().double()
    original = model[0].forward
    model[0].forward = lambda x: original(x) * 2
    with pytest.raises(UnsupportedModuleError, match="'0' \\(Linear\\): it has its own 'forward' set on the instance"):
        _private(model, TensorDataset(torch.randn(8, 7, dtype=torch.float64)))
    assert model[0].__dict__["forward"] is not original  # the user's override is still there, nothing attached
    assert all("forward" not in m.__dict__ for m in (model, model[2]))


def test_parameter_frozen_after_attaching_is_neither_clipped_nor_updated() -> None:
    torch.manual_seed(0)
    model = mlp().double()
    reference = mlp().double()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(6, 7, dtype=torch.float64)
    engine = BKEngine(model, bound=ClipBound(0.5), loss_reduction="sum")
    model[0].weight.requires_grad_(False)
    reference[0].weight.requires_grad_(False)
    l1_loss(model(x), "sum").backward()
    engine.detach()
    want = loop_clipped_sum(reference, x, 0.5)
    assert getattr(model[0].weight, "summed_grad", None) is None
    for name, p in model.named_parameters():
        if name != "0.weight":
            torch.testing.assert_close(p.summed_grad, want[name], rtol=1e-9, atol=1e-12)


def test_backward_through_a_frozen_private_model_adds_and_marks_nothing() -> None:
    """A GAN generator step through the frozen private discriminator, after the discriminator's own step on the
    same physical batch: nothing to clip, no error, and the discriminator's training goes on."""
    torch.manual_seed(0)
    model = mlp().double()
    generator = nn.Linear(7, 7).double()
    data = TensorDataset(torch.randn(32, 7, dtype=torch.float64))
    pmodel, optimizer, loader = _private(model, data, loss_reduction="sum")
    steps = 0
    for (x,) in loader:
        optimizer.zero_grad()
        l1_loss(pmodel(x), "sum").backward()
        optimizer.step()
        model.requires_grad_(False)
        l1_loss(pmodel(generator(torch.randn(len(x), 7, dtype=torch.float64))), "sum").backward()
        model.requires_grad_(True)
        assert generator.weight.grad is not None
        assert all(getattr(p, "summed_grad", None) is None for p in model.parameters())
        steps += 1
    assert steps == loader.steps_per_epoch
