"""make_private_fast end to end: the user's loop, noise, physical batches, accounting, errors and cleanup."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from models import mlp
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from oracle import l1_loss, loop_clipped_sum
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from opacus_fast import PrivacyEngine, UnsupportedModuleError


def _data(n: int = 64, dim: int = 7) -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(n, dim, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))


def _setup(batch_size: int = 16, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = mlp().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(_data(), batch_size=batch_size)
    engine = PrivacyEngine()
    options = {"noise_multiplier": 0.0, "max_grad_norm": 0.8, **kwargs}  # per-example norms ≈ 0.7–1.0
    private = engine.make_private_fast(module=model, optimizer=optimizer, data_loader=loader, **options)
    return engine, model, private


def test_loop_update_equals_reference() -> None:
    """Noiseless update after one logical step == exact clipped sum of the sampled batch / expected batch size."""
    _engine, model, (pmodel, optimizer, loader) = _setup()
    reference = mlp().double()
    reference.load_state_dict(model.state_dict())
    for x, _ in loader:
        if len(x) >= 2:
            break
    optimizer.zero_grad()
    l1_loss(pmodel(x), "mean").backward()
    optimizer.step()
    expected = loop_clipped_sum(reference, x, 0.8, "mean")
    for (name, _), p in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, expected[name] / loader.expected_batch_size, rtol=1e-6, atol=1e-12)


def test_matches_opacus_hooks_mode() -> None:
    """Second oracle: Opacus' own GradSampleModule + DPOptimizer with noise 0 on the same batch."""
    _engine, model, (pmodel, optimizer, _) = _setup(loss_reduction="sum", max_grad_norm=2.5)
    twin = mlp().double()
    twin.load_state_dict(model.state_dict())
    gsm = GradSampleModule(twin, loss_reduction="sum")
    opacus_opt = DPOptimizer(torch.optim.SGD(twin.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=2.5,
                             expected_batch_size=8, loss_reduction="sum")
    x = _data().tensors[0][:8]
    for m, opt in ((pmodel, optimizer), (gsm, opacus_opt)):
        opt.zero_grad()
        l1_loss(m(x), "sum").backward()
        opt.pre_step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-12)


def test_noise_once_per_logical_step_with_std_sigma_c() -> None:
    """Replaying the noise generator reproduces p.grad exactly: one N(0, σ²C²) draw for all parameters per step."""
    torch.manual_seed(0)
    model = nn.Linear(50, 40).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = DataLoader(_data(64, 50), batch_size=16)
    sigma, bound = 1.3, 0.7
    gen = torch.Generator().manual_seed(7)
    pmodel, dp_opt, dp_loader = PrivacyEngine().make_private_fast(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma, max_grad_norm=bound,
        noise_generator=gen, max_physical_batch_size=4,
    )
    replay = torch.Generator().manual_seed(7)
    steps = 0
    for x, _ in dp_loader:
        info = dp_loader.context.current
        dp_opt.zero_grad()
        (pmodel(x) * 0).sum().backward()  # zero gradients: p.grad is pure noise
        dp_opt.step()
        if not info.is_last:
            continue
        steps += 1
        params = list(model.parameters())
        flat = torch.normal(0, sigma * bound, (sum(p.numel() for p in params),), generator=replay, dtype=torch.float64)
        for p, noise in zip(params, flat.split([p.numel() for p in params])):
            torch.testing.assert_close(p.grad, noise.view_as(p) / dp_loader.expected_batch_size, rtol=1e-12, atol=0)
    assert steps == len(loader)  # q = 1 / len(loader): that many logical steps per epoch
    std = (model.weight.grad * dp_loader.expected_batch_size).std().item()
    assert abs(std / (sigma * bound) - 1) < 0.05  # 2000 draws: sd of the ratio ≈ 0.016, so 3 sd


def _logical_batches(loader, pmodel, optimizer, loss_reduction: str = "mean"):
    """Run the user's loop; yield (real rows of the logical batch, p.grads) after each logical step."""
    rows = []
    for x, _ in loader:
        info = loader.context.current
        rows.append(x if info.mask is None else x[info.mask])
        optimizer.zero_grad()
        l1_loss(pmodel(x), loss_reduction).backward()
        optimizer.step()
        if info.is_last:
            yield torch.cat(rows), [p.grad.clone() for p in optimizer.params]
            rows = []


@pytest.mark.parametrize("pad", [True, False])
def test_physical_batches_equal_logical_batch(pad: bool) -> None:
    """Padded or not, a logical batch split into physical batches gives the exact clipped sum of the whole batch."""
    _engine, model, (pmodel, optimizer, loader) = _setup(max_physical_batch_size=5, pad_physical_batches=pad)
    reference = mlp().double()
    reference.load_state_dict(model.state_dict())
    optimizer.original_optimizer.param_groups[0]["lr"] = 0.0
    seen = 0
    for batch, grads in _logical_batches(loader, pmodel, optimizer):
        if len(batch) < 6:
            continue
        seen += 1
        expected = loop_clipped_sum(reference, batch, 0.8, "mean")
        for name, got in zip(expected, grads):
            torch.testing.assert_close(got, expected[name] / loader.expected_batch_size, rtol=1e-6, atol=1e-12)
    assert seen >= 2


@pytest.mark.parametrize("pad", [True, False])
def test_empty_logical_batches_are_noise_only_steps(pad: bool) -> None:
    """q so small that most logical batches are empty: each is still one step, one noise draw, one accountant step."""
    torch.manual_seed(0)
    model = mlp().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = PrivacyEngine(accountant="rdp")
    gen = torch.Generator().manual_seed(1)
    pmodel, dp_opt, loader = engine.make_private_fast(
        module=model, optimizer=optimizer, data_loader=DataLoader(_data(), batch_size=8), noise_multiplier=1.0,
        max_grad_norm=1.0, sample_rate=0.005, max_physical_batch_size=4 if pad else None,
        pad_physical_batches=pad, noise_generator=gen,
    )
    empty, steps = 0, 0
    for batch, grads in _logical_batches(loader, pmodel, dp_opt):
        steps += 1
        empty += len(batch) == 0
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert empty >= 120 and steps == 200  # P(empty) per step ≈ 0.73: 145 expected, sd 6.3
    assert sum(n for _, _, n in engine.accountant.history) == steps


def test_accumulation_without_poisson_sums_physical_batches() -> None:
    """poisson_sampling=False: several backward() calls before one step() add their clipped sums."""
    torch.manual_seed(0)
    model = mlp().double()
    reference = mlp().double()
    reference.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.warns(UserWarning, match="poisson_sampling=False"):
        pmodel, dp_opt, _ = PrivacyEngine().make_private_fast(
            module=model, optimizer=optimizer, data_loader=DataLoader(_data(), batch_size=8), noise_multiplier=0.0,
            max_grad_norm=2.5, loss_reduction="sum", poisson_sampling=False,
        )
    x = _data().tensors[0][:10]
    dp_opt.zero_grad()
    for part in (x[:4], x[4:]):
        l1_loss(pmodel(part), "sum").backward()
    dp_opt.step()
    expected = loop_clipped_sum(reference, x, 2.5, "sum")
    for name, p in zip(expected, model.parameters()):
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-6, atol=1e-12)


def test_per_layer_clipping_matches_reference() -> None:
    _engine, model, (pmodel, optimizer, _) = _setup(clipping="per_layer", max_grad_norm=[0.1, 0.2, 0.3, 0.1, 0.2, 0.3],
                                                   loss_reduction="sum")
    reference = mlp().double()
    reference.load_state_dict(model.state_dict())
    x = _data().tensors[0][:8]
    optimizer.zero_grad()
    l1_loss(pmodel(x), "sum").backward()
    optimizer.pre_step()
    params = list(reference.parameters())
    per_example = [torch.autograd.grad(l1_loss(reference(x[i : i + 1]), "sum"), params) for i in range(8)]
    for j, (p, bound) in enumerate(zip(model.parameters(), [0.1, 0.2, 0.3, 0.1, 0.2, 0.3])):
        expected = sum((bound / (g[j].norm() + 1e-6)).clamp(max=1.0) * g[j] for g in per_example)
        torch.testing.assert_close(p.grad, expected, rtol=1e-6, atol=1e-12)
    assert optimizer.max_grad_norm == pytest.approx((2 * (0.01 + 0.04 + 0.09)) ** 0.5)


def test_cleanup_restores_the_model() -> None:
    torch.manual_seed(0)
    model = mlp().double()
    x = _data().tensors[0][:5]
    before = model(x)
    pmodel, _, _ = PrivacyEngine().make_private_fast(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(_data()),
        noise_multiplier=1.0, max_grad_norm=1.0,
    )
    assert pmodel._module is model
    assert pmodel.cleanup() is model
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(not p._backward_hooks for p in model.parameters())
    torch.testing.assert_close(model(x), before)
    l1_loss(model(x), "sum").backward()
    assert all(p.grad is not None for p in model.parameters())


class _BatchNormSubclass(nn.BatchNorm1d):
    """A library's BatchNorm variant (like timm's BatchNormAct2d), which ModuleValidator.fix leaves in place."""


class _ReadsChildWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.fc.weight.t()


@pytest.mark.parametrize(
    "model, match",
    [
        (lambda: nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), r"'1' \(BatchNorm1d\).*opacus_fast\.fix\(model\)"),
        (lambda: nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3).requires_grad_(False)), "BatchNorm1d"),
        (lambda: nn.Sequential(nn.Linear(3, 3), _BatchNormSubclass(3)), r"_BatchNormSubclass.*replace this subclass"),
        (lambda: nn.Sequential(nn.Embedding(5, 3, max_norm=1.0)), "max_norm"),
        (lambda: nn.Sequential(nn.InstanceNorm1d(3, affine=True, track_running_stats=True)), "track_running_stats"),
    ],
)
def test_unsupported_models_fail_clearly_and_are_left_untouched(model, match: str) -> None:
    model = model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UnsupportedModuleError, match=match):
        PrivacyEngine().make_private_fast(module=model, optimizer=optimizer, data_loader=DataLoader(_data(8, 3)),
                                          noise_multiplier=1.0, max_grad_norm=1.0)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not isinstance(optimizer, DPOptimizer)


def test_parameter_used_directly_by_a_parent_is_exact() -> None:
    """fc.weight read by the parent's forward (fc itself never called) gets its exact per-example gradient."""
    torch.manual_seed(0)
    model = _ReadsChildWeight().double()
    reference = _ReadsChildWeight().double()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(6, 3, dtype=torch.float64)
    pmodel, _, _ = PrivacyEngine().make_private_fast(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(_data(8, 3)),
        noise_multiplier=1.0, max_grad_norm=1.0, loss_reduction="sum",
    )
    l1_loss(pmodel(x), "sum").backward()
    want = loop_clipped_sum(reference, x, 1.0)
    torch.testing.assert_close(model.fc.weight.summed_grad, want["fc.weight"], rtol=1e-9, atol=1e-12)


def test_parameter_in_a_loss_term_is_refused_at_backward() -> None:
    """A penalty on a parameter computed outside the model is no example's gradient: it cannot be clipped."""
    model = _ReadsChildWeight().double()
    pmodel, _, _ = PrivacyEngine().make_private_fast(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(_data(8, 3)),
        noise_multiplier=1.0, max_grad_norm=1.0,
    )
    loss = l1_loss(pmodel(torch.randn(2, 3, dtype=torch.float64)), "sum") + model.fc.weight.pow(2).sum()
    with pytest.raises(UnsupportedModuleError, match="'fc.weight' received an ordinary gradient"):
        loss.backward()


class _SequenceFirstEncoder(nn.Module):
    """Takes (T, B, d) inputs, as Opacus' batch_first=False describes."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)).mean(0)


@pytest.mark.parametrize("tokens", [5, 6])
def test_batch_first_false_is_exact(tokens: int) -> None:
    """Sequence-first inputs (T, B, d): the examples are dim 1 everywhere, also with as many tokens as examples."""
    torch.manual_seed(0)
    model = _SequenceFirstEncoder().double()
    reference = _SequenceFirstEncoder().double()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(tokens, 6, 4, dtype=torch.float64)
    data = TensorDataset(torch.randn(8, tokens, 4, dtype=torch.float64))
    pmodel, _, _ = PrivacyEngine().make_private_fast(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(data),
        noise_multiplier=1.0, max_grad_norm=0.05, loss_reduction="sum", batch_first=False,
    )
    pmodel(x).sum().backward()
    want = _seq_first_reference(reference, x, 0.05)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.summed_grad, want[name], rtol=1e-9, atol=1e-12, msg=name)


def _seq_first_reference(model: nn.Module, x: torch.Tensor, bound: float) -> dict[str, torch.Tensor]:
    """Clipped sum of per-example gradients, each example called alone as (T, 1, d)."""
    params = dict(model.named_parameters())
    out = dict.fromkeys(params, 0)
    for i in range(x.shape[1]):
        grads = torch.autograd.grad(model(x[:, i:i + 1]).sum(), list(params.values()))
        factor = (bound / (torch.sqrt(sum(g.pow(2).sum() for g in grads)) + 1e-6)).clamp(max=1.0)
        for n, g in zip(params, grads):
            out[n] = out[n] + factor * g
    return out


def test_backward_twice_on_one_physical_batch_is_refused() -> None:
    _engine, _model, (pmodel, _optimizer, loader) = _setup()
    batches = iter(loader)  # kept alive: the loader withdraws the batch info when its iterator closes
    x, _ = next(batches)
    l1_loss(pmodel(x), "mean").backward()
    with pytest.raises(ValueError, match="backward\\(\\) ran twice on the same physical batch"):
        l1_loss(pmodel(x), "mean").backward()


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"grad_sample_mode": "hooks"}, ValueError, "'bk'"),
        ({"clipping": "lasso"}, ValueError, "'flat', 'per_layer' and 'adaptive'"),
        ({"clipping": "adaptive"}, TypeError, "needs the keyword"),
        ({"target_unclipped_quantile": 0.5}, TypeError, "target_unclipped_quantile"),
        ({"clipping": "per_layer"}, ValueError, "list of 6 bounds"),
        ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm must be > 0"),
        ({"noise_multiplier": -1.0}, ValueError, "noise_multiplier"),
    ],
)
def test_bad_options_fail_clearly(options: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        _setup(**options)


@pytest.mark.filterwarnings("ignore:GDP accounting is experimental")
def test_accountant_without_upper_bound_is_refused() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="'gdp' is refused"):
        PrivacyEngine(accountant="gdp").make_private_fast(
            module=model, optimizer=optimizer, data_loader=DataLoader(_data()), noise_multiplier=1.0,
            max_grad_norm=1.0)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert not isinstance(optimizer, DPOptimizer)


def test_optimizer_with_foreign_parameters_is_refused() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(list(model.parameters()) + [nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="Module parameters are different than optimizer Parameters"):
        PrivacyEngine().make_private_fast(module=model, optimizer=optimizer, data_loader=DataLoader(_data()),
                                          noise_multiplier=1.0, max_grad_norm=1.0)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_with_epsilon_reaches_target() -> None:
    torch.manual_seed(0)
    model = mlp().double()
    engine = PrivacyEngine(accountant="rdp")
    pmodel, dp_opt, loader = engine.make_private_fast_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), data_loader=DataLoader(_data(), 8),
        target_epsilon=2.0, target_delta=1e-5, epochs=2, max_grad_norm=1.0,
    )
    for _ in range(2):
        for x, y in loader:
            dp_opt.zero_grad()
            nn.functional.cross_entropy(pmodel(x), y).backward()
            dp_opt.step()
    eps = engine.get_epsilon(1e-5)
    assert 1.9 < eps <= 2.0


def test_parameter_unfrozen_after_attaching_is_refused() -> None:
    torch.manual_seed(0)
    model = mlp().double()
    model[0].requires_grad_(False)
    pmodel, _, _ = PrivacyEngine().make_private_fast(
        module=model, optimizer=torch.optim.SGD(model[2:].parameters(), lr=0.1), data_loader=DataLoader(_data()),
        noise_multiplier=1.0, max_grad_norm=1.0,
    )
    model[0].weight.requires_grad_(True)
    with pytest.raises(UnsupportedModuleError, match="'0.weight' became trainable after make_private_fast"):
        l1_loss(pmodel(_data().tensors[0][:3]), "sum").backward()


def test_grad_clip_scheduler_changes_clipping_and_noise_together() -> None:
    """One source of truth for C: Opacus' StepGradClip changes optimizer.max_grad_norm, and the engine clips with it."""
    from opacus.schedulers import StepGradClip

    _, model, (pmodel, optimizer, _) = _setup(loss_reduction="sum", max_grad_norm=2.5)
    reference = mlp().double()
    reference.load_state_dict(model.state_dict())
    optimizer.original_optimizer.param_groups[0]["lr"] = 0.0
    scheduler = StepGradClip(optimizer, step_size=1, gamma=0.9)
    scheduler.step()
    assert optimizer.max_grad_norm == pytest.approx(2.25)
    x = _data().tensors[0][:8]
    optimizer.zero_grad()
    l1_loss(pmodel(x), "sum").backward()
    optimizer.pre_step()
    expected = loop_clipped_sum(reference, x, 2.25, "sum")
    for name, p in zip(expected, model.parameters()):
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-6, atol=1e-12)


def test_bf16_autocast_close_to_float32_reference() -> None:
    """Mixed precision: activations and grads in bf16, norms in fp32; the clipped sum stays close to exact."""
    from models import TinyTransformer
    from oracle import bk_clipped_sum

    torch.manual_seed(0)
    model = TinyTransformer()
    ids = torch.randint(1, 9, (6, 6), generator=torch.Generator().manual_seed(1))
    expected = loop_clipped_sum(model, ids, 0.05, "sum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = bk_clipped_sum(model, ids, 0.05, "sum")
    for name, ref in expected.items():
        assert got[name].dtype == torch.float32
        assert (got[name] - ref).norm() <= 0.05 * ref.norm() + 1e-4, name


def test_opacus_batch_memory_manager_with_our_optimizer() -> None:
    """Opacus' BatchMemoryManager splits each logical batch; our optimizer steps (and adds noise) once per logical
    batch, and the update equals the exact clipped sum of the whole logical batch."""
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    _, model, (pmodel, optimizer, loader) = _setup(batch_size=16)
    reference = mlp().double()
    reference.load_state_dict(model.state_dict())
    optimizer.original_optimizer.param_groups[0]["lr"] = 0.0
    steps, rows = 0, []
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=3, optimizer=optimizer) as memory_safe:
        for x, _ in memory_safe:
            assert len(x) <= 3
            rows.append(x)
            optimizer.zero_grad()
            l1_loss(pmodel(x), "mean").backward()
            optimizer.step()
            if not optimizer._is_last_step_skipped:
                steps += 1
                batch, rows = torch.cat(rows), []
                expected = loop_clipped_sum(reference, batch, 0.8, "mean")
                for name, p in zip(expected, model.parameters()):
                    torch.testing.assert_close(p.grad, expected[name] / loader.expected_batch_size, rtol=1e-6,
                                               atol=1e-12)
    assert steps == len(loader)


def _leave_inside_a_logical_batch(loader, pmodel, optimizer) -> None:
    """Run physical batches until the first one that is not the last of its logical batch, then leave the loop."""
    for x, _ in loader:
        info = loader.context.current
        optimizer.zero_grad()
        l1_loss(pmodel(x), "mean").backward()
        optimizer.step()
        if not info.is_last:
            return
    raise AssertionError("no logical batch had two physical batches")


def test_abandoned_logical_batch_is_discarded_not_carried_over() -> None:
    """Partial sums of a logical batch the loop left early never reach the next batch (an example drawn in both
    would count twice): zero_grad at the next batch's start discards them, and the next update is exact."""
    _, model, (pmodel, optimizer, loader) = _setup(max_physical_batch_size=3)
    optimizer.original_optimizer.param_groups[0]["lr"] = 0.0
    _leave_inside_a_logical_batch(loader, pmodel, optimizer)
    reference = mlp().double()
    reference.load_state_dict(model.state_dict())
    with pytest.warns(UserWarning, match="discarding the clipped gradients"):
        batch, grads = next(_logical_batches(loader, pmodel, optimizer))
    expected = loop_clipped_sum(reference, batch, 0.8, "mean")
    for name, got in zip(expected, grads):
        torch.testing.assert_close(got, expected[name] / loader.expected_batch_size, rtol=1e-6, atol=1e-12)


def test_pending_sums_without_zero_grad_are_refused() -> None:
    _, _, (pmodel, optimizer, loader) = _setup(max_physical_batch_size=3)
    _leave_inside_a_logical_batch(loader, pmodel, optimizer)
    x, _ = next(batches := iter(loader))
    with pytest.raises(ValueError, match="clipped gradients of an unfinished one are still pending"):
        l1_loss(pmodel(x), "mean").backward()
    del batches


@pytest.mark.parametrize("keep", [True, False])
def test_keep_cpu_memory_option(monkeypatch, keep: bool) -> None:
    calls = []
    monkeypatch.setattr("opacus_fast.privacy_engine.keep_freed_memory", lambda: calls.append(1) or True)
    _setup(keep_cpu_memory=keep)
    assert calls == ([1] if keep else [])


def test_keep_freed_memory_stops_page_faults_on_reallocation() -> None:
    """In a fresh process: after the call, allocating the same 200 MiB again reuses the heap (no page faults)."""
    code = """
import resource, sys, torch
from opacus_fast.cpu_memory import keep_freed_memory
if not keep_freed_memory():
    print("unsupported"); sys.exit()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def allocate():
    blocks = [torch.ones(2**20) for _ in range(50)]  # 50 x 4 MiB, written
    del blocks
allocate()
before = faults()
allocate()
print(faults() - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    if out == "unsupported":
        pytest.skip("malloc is not glibc's here")
    assert int(out) < 2_000, f"{out} page faults for 51,200 pages already used once"



def test_gradient_accumulation_without_poisson_counts_like_opacus() -> None:
    """poisson_sampling=False, two backward passes per step: the accountant's rate and a mean's divisor count both
    batches, as Opacus' make_private does (the update and the recorded history match it)."""
    import opacus

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(40, 7, generator=g, dtype=torch.float64))
    grads, histories = {}, {}
    for name in ("fast", "opacus"):
        torch.manual_seed(0)
        model = mlp().double()
        engine = PrivacyEngine() if name == "fast" else opacus.PrivacyEngine()
        make = engine.make_private_fast if name == "fast" else engine.make_private
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # poisson_sampling=False
            pmodel, optimizer, loader = make(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                             data_loader=DataLoader(data, batch_size=10), noise_multiplier=0.0,
                                             max_grad_norm=0.5, poisson_sampling=False)
        optimizer.zero_grad()
        batches = iter(loader)
        for _ in range(2):
            (x,) = next(batches)
            l1_loss(pmodel(x), "mean").backward()
        optimizer.step()
        grads[name] = [p.grad.clone() for p in model.parameters()]
        histories[name] = engine.accountant.history
    assert histories["fast"] == histories["opacus"] == [(0.0, 2 / len(loader), 1)]
    for a, b in zip(grads["fast"], grads["opacus"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_failure_after_planning_leaves_the_model_as_it_was() -> None:
    """An error raised by the optimizer (adaptive clipping's bounds in the wrong order) comes before anything is
    attached; a retry is not blocked."""
    torch.manual_seed(0)
    model = mlp().double()
    data = TensorDataset(torch.randn(16, 7, dtype=torch.float64))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="max_clipbound must be larger"):
        PrivacyEngine().make_private_fast(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(data, 4),
            noise_multiplier=1.0, max_grad_norm=1.0, clipping="adaptive", target_unclipped_quantile=0.5,
            clipbound_learning_rate=0.2, max_clipbound=1.0, min_clipbound=2.0, unclipped_num_std=1.0,
        )
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(not p._backward_hooks for p in model.parameters() if p._backward_hooks is not None)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    pmodel, _, _ = PrivacyEngine().make_private_fast(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                                     data_loader=DataLoader(data, batch_size=4), noise_multiplier=1.0,
                                                     max_grad_norm=1.0)
    pmodel(data.tensors[0][:2]).sum().backward()


@pytest.mark.parametrize("make_copy", ["deepcopy", "AveragedModel"])
def test_copies_of_the_returned_model_are_plain_models_with_their_own_weights(make_copy: str) -> None:
    """An EMA of the model that make_private_fast returned: a plain copy of the user's model (the engine, which
    holds autograd state, is not copied), computing with its own weights; the original still clips exactly."""
    import copy

    from torch.optim.swa_utils import AveragedModel

    torch.manual_seed(0)
    model = mlp().double()
    data = TensorDataset(torch.randn(16, 7, dtype=torch.float64))
    pmodel, _, _ = PrivacyEngine().make_private_fast(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                                     data_loader=DataLoader(data, batch_size=4), noise_multiplier=1.0,
                                                     max_grad_norm=1.0, loss_reduction="sum")
    average = copy.deepcopy(pmodel) if make_copy == "deepcopy" else AveragedModel(pmodel)
    copied = average.module if isinstance(average, AveragedModel) else average
    assert type(copied) is type(model)
    other = mlp().double()
    copied.load_state_dict(other.state_dict())
    x = torch.randn(5, 7, dtype=torch.float64)
    torch.testing.assert_close(average(x), other(x), rtol=0, atol=0)
    reference = mlp().double()
    reference.load_state_dict(model.state_dict())
    l1_loss(pmodel(x), "sum").backward()
    want = loop_clipped_sum(reference, x, 1.0)
    for (name, _), p in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.summed_grad, want[name], rtol=1e-9, atol=1e-12)
