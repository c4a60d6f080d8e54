"""Loops that Opacus accepts give Opacus' numbers with make_private_fast, or Opacus' refusal; checked against Opacus.

Each test runs the same loop through Opacus' ``make_private`` (hooks mode) and ``make_private_fast``: updates with
noise 0 in float64 (examples both clipped and not), seeds by whether two runs reproduce, the accountant by its
history and ε, refusals by their exception type.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import opacus
import pytest
import torch
from opacus.data_loader import CollateFnWithEmpty
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.validators.errors import UnsupportedModuleError as OpacusUnsupportedModuleError
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.dataloader import default_collate

from opacus_fast import PrivacyEngine, UnsupportedModuleError
from opacus_fast.data.loader import PhysicalBatchCollate

CLIP = 1.0  # per-example gradient norms of the model below are about 0.3–2: some examples clipped, some not


def _data(n: int = 64, seed: int = 3) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _private(fast: bool, loader: DataLoader, *, engine=None, model=None, lr: float = 0.5, **options):
    """(engine, the user's model, (model, optimizer, loader) from make_private_fast or Opacus' make_private)."""
    model = model if model is not None else _model()
    engine = engine if engine is not None else (PrivacyEngine() if fast else opacus.PrivacyEngine())
    options = {"noise_multiplier": 0.0, "max_grad_norm": CLIP, **options}
    make = engine.make_private_fast if fast else engine.make_private
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # poisson_sampling=False, Opacus' secure RNG notice
        private = make(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), data_loader=loader,
                       **options)
    return engine, model, private


def _step(model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor, zero_grad: bool = True) -> None:
    if zero_grad:
        optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def _assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("wrap_model", [True, False])
def test_plain_loop_matches_opacus(wrap_model: bool) -> None:
    """Fixed batches (poisson_sampling=False), N = 500 and batch 64: Opacus divides by int(N / len(loader)) = 62,
    and so does make_private_fast; with ``wrap_model=False`` the user's own model trains, as in Opacus."""
    loader = DataLoader(_data(500), batch_size=64)
    runs = [_private(fast, loader, poisson_sampling=False, wrap_model=wrap_model) for fast in (True, False)]
    for _, model, (returned, optimizer, dl) in runs:
        assert optimizer.expected_batch_size == 62
        for x, y in dl:
            _step(returned if wrap_model else model, optimizer, x, y)
    (fast_engine, fast_model, _), (engine, model, _) = runs
    _assert_same_params(fast_model, model)
    assert fast_engine.accountant.history == engine.accountant.history


def test_poisson_divisor_and_epsilon_match_opacus() -> None:
    """With Poisson sampling the divisor (int(N·q) = 62), the accountant's history and ε are Opacus'."""
    loader = DataLoader(_data(500), batch_size=64)
    runs = [_private(fast, loader, noise_multiplier=1.1) for fast in (True, False)]
    for _, _, (model, optimizer, dl) in runs:
        assert optimizer.expected_batch_size == 62
        for x, y in dl:
            _step(model, optimizer, x, y)
    (fast_engine, _, _), (engine, _, _) = runs
    assert fast_engine.accountant.history == engine.accountant.history
    assert fast_engine.get_epsilon(1e-5) == pytest.approx(engine.get_epsilon(1e-5), rel=1e-12)


def test_poisson_update_matches_opacus_hooks_on_the_drawn_batches() -> None:
    """Each Poisson step's update is what Opacus' GradSampleModule + DPOptimizer give on the same batch."""
    _, model, (pmodel, optimizer, loader) = _private(True, DataLoader(_data(), batch_size=16))
    twin = _model()
    gsm = opacus.GradSampleModule(twin)
    reference = opacus.optimizers.DPOptimizer(torch.optim.SGD(twin.parameters(), lr=0.5), noise_multiplier=0.0,
                                              max_grad_norm=CLIP, expected_batch_size=optimizer.expected_batch_size)
    for x, y in loader:
        _step(pmodel, optimizer, x, y)
        _step(gsm, reference, x, y)
    _assert_same_params(model, twin)


@pytest.mark.parametrize("poisson", [False, True])
def test_batch_memory_manager_matches_opacus(poisson: bool) -> None:
    """Opacus' BatchMemoryManager with zero_grad() at every physical batch: Opacus' update (fixed batches) and
    Opacus' accountant history (Poisson: one step per logical batch, at rate q)."""
    loader = DataLoader(_data(), batch_size=16)
    runs = [_private(fast, loader, poisson_sampling=poisson) for fast in (True, False)]
    for _, _, (model, optimizer, dl) in runs:
        with BatchMemoryManager(data_loader=dl, max_physical_batch_size=5, optimizer=optimizer) as physical:
            for x, y in physical:
                _step(model, optimizer, x, y)
    (fast_engine, fast_model, _), (engine, model, _) = runs
    if not poisson:
        _assert_same_params(fast_model, model)
    assert fast_engine.accountant.history == engine.accountant.history


@pytest.mark.parametrize("poisson", [False, True])
def test_missing_zero_grad_with_batch_memory_manager_is_refused_like_opacus(poisson: bool) -> None:
    """No zero_grad() between physical batches: Opacus raises ValueError ("Gradients haven't been cleared"), and so
    does make_private_fast, instead of dividing the update by the number of physical batches."""
    loader = DataLoader(_data(), batch_size=16)
    for fast in (True, False):
        torch.manual_seed(0)  # the first logical batch (about 16 examples) needs several physical batches
        engine, _, (model, optimizer, dl) = _private(fast, loader, poisson_sampling=poisson)
        refused = pytest.raises(ValueError, match="Gradients haven't been cleared|Poisson sampling is not compatible")
        with BatchMemoryManager(data_loader=dl, max_physical_batch_size=5, optimizer=optimizer) as physical, refused:
            for x, y in physical:
                _step(model, optimizer, x, y, zero_grad=False)
        assert engine.accountant.history == []


@pytest.mark.parametrize("poisson", [False, True])
def test_missing_zero_grad_between_steps_is_refused_like_opacus(poisson: bool) -> None:
    loader = DataLoader(_data(), batch_size=16)
    for fast in (True, False):
        _, _, (model, optimizer, dl) = _private(fast, loader, poisson_sampling=poisson)
        with pytest.raises(ValueError):
            for x, y in dl:
                _step(model, optimizer, x, y, zero_grad=False)


def test_gradient_accumulation_matches_opacus() -> None:
    """Fixed batches, three backward passes before each step: Opacus averages them as one batch three times as large
    and records three times the rate; so does make_private_fast."""
    loader = DataLoader(_data(), batch_size=8)
    runs = [_private(fast, loader, poisson_sampling=False) for fast in (True, False)]
    for _, _, (model, optimizer, dl) in runs:
        for i, (x, y) in enumerate(dl):
            if i % 3 == 0:
                optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if i % 3 == 2:
                optimizer.step()
    (fast_engine, fast_model, _), (engine, model, _) = runs
    _assert_same_params(fast_model, model)
    assert fast_engine.accountant.history == engine.accountant.history


def test_summed_grad_lives_until_zero_grad_as_in_opacus() -> None:
    """After step(), p.summed_grad holds the clipped sum (Opacus' value), until zero_grad()."""
    loader = DataLoader(_data(), batch_size=16)
    runs = [_private(fast, loader, poisson_sampling=False) for fast in (True, False)]
    x, y = next(iter(loader))
    for _, _, (model, optimizer, _) in runs:
        _step(model, optimizer, x, y)
    (_, fast_model, (_, fast_optimizer, _)), (_, model, _) = runs
    for p, q in zip(fast_model.parameters(), model.parameters()):
        torch.testing.assert_close(p.summed_grad, q.summed_grad, rtol=1e-10, atol=1e-12)
    fast_optimizer.zero_grad()
    assert all(p.summed_grad is None for p in fast_model.parameters())


def test_second_backward_without_step_under_poisson_is_a_value_error_as_in_opacus() -> None:
    loader = DataLoader(_data(), batch_size=16)
    for fast in (True, False):
        _, _, (model, _, dl) = _private(fast, loader)
        with pytest.raises(ValueError):
            for x, y in dl:
                nn.functional.cross_entropy(model(x), y).backward()


def test_unsupported_module_error_is_opacus_one() -> None:
    assert issubclass(UnsupportedModuleError, OpacusUnsupportedModuleError)
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    loader = DataLoader(_data(), batch_size=16)
    for fast in (True, False):
        with pytest.raises(OpacusUnsupportedModuleError):
            _private(fast, loader, model=copy.deepcopy(model))


def _seeded_run(fast: bool, scenario: str) -> torch.Tensor:
    """Final weights of one epoch in ``scenario`` (as in Opacus' randomness tests)."""
    loader_seed = {"loader": 96, "loader_no_noise": 96, "loader_and_noise": 96}.get(scenario)
    loader_generator = torch.Generator().manual_seed(loader_seed) if loader_seed else None
    noise_generator = torch.Generator().manual_seed(17) if scenario == "loader_and_noise" else None
    loader = DataLoader(_data(), batch_size=8, shuffle=True, generator=loader_generator)
    noise = 0.0 if scenario == "loader_no_noise" else 1.0
    model = _model()
    torch.seed()  # a fresh global state, as in a new process
    _, _, (pmodel, optimizer, dl) = _private(fast, loader, model=model, noise_multiplier=noise,
                                             noise_generator=noise_generator)
    if scenario == "global":
        torch.manual_seed(1337)
    for x, y in dl:
        _step(pmodel, optimizer, x, y)
    return model[0].weight.detach().clone()


@pytest.mark.parametrize("scenario", ["none", "global", "loader", "loader_no_noise", "loader_and_noise"])
def test_seeds_reproduce_runs_as_in_opacus(scenario: str) -> None:
    """Whether two runs give the same weights: torch.manual_seed after make_private (at iteration and step time), a
    seeded DataLoader(generator=...) for sampling, noise_generator for noise, each as in Opacus."""
    outcomes = {fast: torch.equal(_seeded_run(fast, scenario), _seeded_run(fast, scenario)) for fast in (True, False)}
    assert outcomes[True] == outcomes[False]
    assert outcomes[True] == (scenario in ("global", "loader_no_noise", "loader_and_noise"))


def test_wrap_model_false_hooks_detach_and_copies_are_plain() -> None:
    """The hooks object's cleanup() leaves the user's model as it was; a deep copy (an EMA) computes plainly."""
    model = _model()
    before = {id(m): (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(vars(m))) for m in model.modules()}
    _, _, (hooks, _, _) = _private(True, DataLoader(_data(), batch_size=16), model=model, wrap_model=False)
    assert hooks._module is model
    twin = copy.deepcopy(model)
    x, y = _data().tensors
    nn.functional.cross_entropy(twin(x), y).backward()
    assert all(p.grad is not None for p in twin.parameters())
    assert all(p.grad is None and getattr(p, "summed_grad", None) is None for p in model.parameters())
    assert hooks.cleanup() is model
    after = {id(m): (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(vars(m))) for m in model.modules()}
    assert after.keys() == before.keys()
    for key, (forward, pre, attributes) in after.items():
        assert (forward, pre) == before[key][:2]
        assert attributes.keys() == before[key][2].keys()


def test_wrap_model_false_runs_every_call_inside_model_call() -> None:
    """Each call of the user's model enters the engine's model_call with its arguments and leaves it, also when the
    forward raises."""
    model = _model()
    _, _, (hooks, _, _) = _private(True, DataLoader(_data(), batch_size=16), model=model, wrap_model=False)
    events = []

    @contextlib.contextmanager
    def model_call(args: tuple, kwargs: dict):
        events.append(("enter", args[0].shape))
        try:
            yield
        except BaseException as err:
            events.append(("raised", type(err)))
            raise
        events.append(("left", None))

    hooks._engine.model_call = model_call
    x, _ = _data().tensors
    model(x[:5])
    with pytest.raises(RuntimeError):
        model(x[:5, :4])  # wrong feature count
    assert events == [("enter", (5, 6)), ("left", None), ("enter", (5, 4)), ("raised", RuntimeError)]


def test_adaptive_clipping_matches_opacus() -> None:
    """clipping="adaptive" with noise 0: the same bound after every step and the same weights as Opacus'
    AdaClipDPOptimizer, the unclipped count noised from the same generator (fixed batches: their size is the
    expected one, Opacus' divisor)."""
    loader = DataLoader(_data(), batch_size=16)
    options = {"clipping": "adaptive", "target_unclipped_quantile": 0.5, "clipbound_learning_rate": 0.4,
               "max_clipbound": 10.0, "min_clipbound": 0.05, "unclipped_num_std": 1.5, "poisson_sampling": False}
    bounds = {}
    runs = {}
    for fast in (True, False):
        runs[fast] = _private(fast, loader, noise_generator=torch.Generator().manual_seed(5), **options)
        _, _, (model, optimizer, dl) = runs[fast]
        bounds[fast] = []
        for _ in range(2):
            for x, y in dl:
                _step(model, optimizer, x, y)
                bounds[fast].append(float(optimizer.max_grad_norm))
    assert len(set(bounds[False])) > 4  # the bound moved
    assert bounds[True] == pytest.approx(bounds[False], rel=1e-6)  # Opacus keeps the bound in float32
    for p, q in zip(runs[True][1].parameters(), runs[False][1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert runs[True][0].accountant.history == runs[False][0].accountant.history


def test_adaptive_clipping_gradient_noise_std_matches_opacus() -> None:
    """Zero gradients: p.grad is the gradient noise alone, whose std σ_eff·C/B (σ_eff from Theorem 1 of Andrew et
    al.) must be Opacus'. 10,000 draws each: the ratio of the two sample stds has sd ≈ 0.01, so 5 sd."""
    data = TensorDataset(torch.randn(64, 100, dtype=torch.float64), torch.zeros(64, dtype=torch.long))
    options = {"clipping": "adaptive", "target_unclipped_quantile": 0.5, "clipbound_learning_rate": 0.2,
               "max_clipbound": 10.0, "min_clipbound": 0.05, "unclipped_num_std": 0.8, "noise_multiplier": 1.0,
               "poisson_sampling": False}
    stds = []
    for fast in (True, False):
        model = nn.Linear(100, 100, bias=False).double()
        _, _, (pmodel, optimizer, dl) = _private(fast, DataLoader(data, batch_size=16), model=model, **options)
        x, _ = next(iter(dl))
        optimizer.zero_grad()
        (pmodel(x) * 0).sum().backward()
        optimizer.step()
        stds.append(model.weight.grad.std().item())
    assert stds[0] / stds[1] == pytest.approx(1.0, abs=0.05)
    sigma_eff = (1.0 - (2 * 0.8) ** -2) ** -0.5
    assert stds[1] * 16 == pytest.approx(sigma_eff * CLIP, rel=0.05)  # σ_eff ≈ 1.28 σ here: not σ·C


def test_rand_on_empty_gives_opacus_random_row() -> None:
    """An empty batch with rand_on_empty: one row of random 0/1 values, drawn as Opacus' collate draws it."""
    data = _data()
    opacus_collate = CollateFnWithEmpty(default_collate, rand_on_empty=True)
    opacus_collate([data[0], data[1]])  # Opacus learns the batch structure from a first non-empty batch
    for pad_to in (None, 4):
        torch.manual_seed(11)
        ours = PhysicalBatchCollate(default_collate, data, pad_to=pad_to, rand_on_empty=True)([])
        torch.manual_seed(11)
        theirs = opacus_collate([])
        for a, b in zip(ours, theirs):
            assert a.dtype == b.dtype
            assert torch.equal(a[:1], b)
            assert len(a) == (pad_to or 1)


def test_rand_on_empty_trains_the_random_row() -> None:
    """An empty logical batch (most are, at q = 0.002) becomes one real row of 0/1 values, trained (clipped and
    summed) as in Opacus."""
    torch.manual_seed(0)
    _, _, (model, optimizer, dl) = _private(True, DataLoader(_data(), batch_size=16), rand_on_empty=True,
                                            sample_rate=0.002)
    for x, y in dl:
        assert dl.context.current.num_real == len(x) >= 1
        _step(model, optimizer, x, y)
        if set(x.flatten().tolist()) <= {0.0, 1.0}:
            assert all(p.summed_grad.abs().sum() > 0 for p in optimizer.params)
            break
    else:
        raise AssertionError("no empty batch was drawn")
