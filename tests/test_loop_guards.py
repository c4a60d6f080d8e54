"""Training loops that could release the wrong thing: each is exact, or refused before anything is released.

Covers the clip bound changed while clipped sums are pending, zero_grad at every physical batch with a step only at
the last one, a step after leaving a logical batch early, a trainable parameter the optimizer does not hold, and a
loop that fetches the next physical batch before training the current one. All in float64 without noise, against
an independent per-example reference: sum_i min(1, C / (||g_i|| + 1e-6)) g_i over the real examples.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from opacus.schedulers import StepGradClip
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from opacus_fast import PrivacyEngine
from opacus_fast.data import PhysicalBatchInfo

Grads = list[torch.Tensor]


def _data(n: int = 48) -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(n, 4, generator=g, dtype=torch.float64))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).double()


def _loss(out: torch.Tensor) -> torch.Tensor:
    """A sum over the examples, so each example's gradient is that of its own term (loss_reduction="sum")."""
    return out.pow(2).sum()


def _per_example_grads(model: nn.Module, x: torch.Tensor) -> list[Grads]:
    """One ``torch.autograd.grad`` per row of ``x`` on a plain (not private) model."""
    params = list(model.parameters())
    return [list(torch.autograd.grad(_loss(model(row[None])), params)) for row in x]


def _norm(grads: Grads) -> float:
    return float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))


def _clipped_sum(model: nn.Module, x: torch.Tensor, bound: float) -> Grads:
    """The reference: sum_i min(1, C / (||g_i|| + 1e-6)) g_i over the rows of ``x``."""
    total = [torch.zeros_like(p) for p in model.parameters()]
    for grads in _per_example_grads(model, x):
        factor = min(1.0, bound / (_norm(grads) + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads)]
    return total


def _median_bound(model: nn.Module) -> float:
    """A bound between the per-example norms of the dataset: some examples are clipped, some are not."""
    norms = sorted(_norm(grads) for grads in _per_example_grads(model, _data().tensors[0]))
    return (norms[len(norms) // 2 - 1] + norms[len(norms) // 2]) / 2


def _private(bound: float = 1.0, max_physical_batch_size: int | None = 4, lr: float = 0.0):
    """(engine, twin, model, optimizer, loader): ``twin`` is an untouched copy of the model for the reference."""
    model = _model()
    twin = copy.deepcopy(model)
    engine = PrivacyEngine(accountant="rdp")
    private = engine.make_private_fast(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), data_loader=DataLoader(_data(), 12),
        noise_multiplier=0.0, max_grad_norm=bound, loss_reduction="sum", max_physical_batch_size=max_physical_batch_size,
    )
    private[2].batch_sampler.logical.generator.manual_seed(11)
    return engine, twin, *private


def _real_rows(x: torch.Tensor, info: PhysicalBatchInfo) -> torch.Tensor:
    return x if info.mask is None else x[info.mask]


def _logical_batches(
    pmodel: nn.Module, optimizer, loader, step_every_batch: bool
) -> Iterator[tuple[torch.Tensor, Grads, list[PhysicalBatchInfo]]]:
    """Run the loop: zero_grad, forward, backward at every physical batch; step at every one or only at the last.

    Yields (real rows of the logical batch, released gradients, infos of its physical batches) after its last step.
    """
    rows, infos = [], []
    for (x,) in loader:
        info = loader.context.current
        rows.append(_real_rows(x, info))
        infos.append(info)
        optimizer.zero_grad()
        _loss(pmodel(x)).backward()
        if step_every_batch or info.is_last:
            optimizer.step()
        if info.is_last:
            yield torch.cat(rows), [p.grad.clone() for p in optimizer.params], infos
            rows, infos = [], []


def _leave_after_a_non_last_batch(pmodel: nn.Module, optimizer, loader) -> None:
    """Train physical batches, stepping each, and break after the first that does not end its logical batch."""
    for (x,) in loader:
        info = loader.context.current
        optimizer.zero_grad()
        _loss(pmodel(x)).backward()
        optimizer.step()
        if not info.is_last:
            return
    raise AssertionError("no logical batch had two physical batches")


def _pending(optimizer) -> list[torch.Tensor | None]:
    return [None if p.summed_grad is None else p.summed_grad.clone() for p in optimizer.params]


# ---- the loops that must be exact ---------------------------------------------------------------------------------
@pytest.mark.parametrize("step_every_batch", [True, False], ids=["step-every-batch", "step-only-at-is-last"])
def test_loops_release_the_exact_clipped_sum(step_every_batch: bool) -> None:
    """Stepping every physical batch (README) or only the last one: each logical batch releases the clipped sum of
    all its real examples, split over several physical batches and padded, with one accountant step each."""
    engine, twin, pmodel, optimizer, loader = _private()
    bound = _median_bound(twin)
    optimizer.max_grad_norm = bound
    split = padded = clipped = unclipped = logical = 0
    for _ in range(2):
        for rows, grads, infos in _logical_batches(pmodel, optimizer, loader, step_every_batch):
            logical += 1
            split += len(infos) > 1
            padded += any(i.mask is not None and not i.mask.all() for i in infos)
            norms = [_norm(g) for g in _per_example_grads(twin, rows)]
            clipped += sum(n > bound for n in norms)
            unclipped += sum(n < bound for n in norms)
            for got, want in zip(grads, _clipped_sum(twin, rows, bound)):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert split >= 2 and padded >= 2 and clipped >= 5 and unclipped >= 5
    assert sum(steps for _, _, steps in engine.accountant.history) == logical


# ---- the clip bound changed while clipped sums are pending --------------------------------------------------------
def test_clip_bound_change_is_refused_while_sums_are_pending() -> None:
    """Between the backward and the step that ends the logical batch, a new max_grad_norm (by hand or by a
    GradClipScheduler stepped every physical batch) is refused and changes nothing: the pending examples were
    clipped at the old bound, and noise at the new one would not cover them."""
    _, _, pmodel, optimizer, loader = _private(bound=1.0)
    scheduler = StepGradClip(optimizer, step_size=1, gamma=0.5)
    message = r"after the optimizer\.step\(\) that ends the logical batch"
    for (x,) in loader:
        info = loader.context.current
        optimizer.zero_grad()
        _loss(pmodel(x)).backward()
        optimizer.step()
        if not info.is_last:  # inside a logical batch that goes on: its sums are pending
            pending = _pending(optimizer)
            assert all(s is not None for s in pending)
            with pytest.raises(ValueError, match=message):
                optimizer.max_grad_norm = 0.5
            with pytest.raises(ValueError, match=message):
                scheduler.step()
            optimizer.max_grad_norm = 1.0  # the same value again: nothing changes, nothing to refuse
            assert optimizer.max_grad_norm == optimizer.bound.flat == 1.0
            for before, p in zip(pending, optimizer.params):
                assert torch.equal(before, p.summed_grad)
            break
    else:
        raise AssertionError("no logical batch had two physical batches")

    _, _, pmodel, optimizer, loader = _private(bound=1.0, max_physical_batch_size=None)
    (x,) = next(batches := iter(loader))
    optimizer.zero_grad()
    _loss(pmodel(x)).backward()
    with pytest.raises(ValueError, match=message):
        optimizer.max_grad_norm = 0.01
    assert optimizer.max_grad_norm == 1.0
    del batches


def test_clip_bound_change_after_leaving_a_logical_batch_discards_its_sums() -> None:
    """A scheduler stepped after a loop left a logical batch early (break): its sums will never be released, so
    they are discarded (with the warning) and the new bound applies."""
    _, _, pmodel, optimizer, loader = _private(bound=1.0)
    scheduler = StepGradClip(optimizer, step_size=1, gamma=0.5)
    _leave_after_a_non_last_batch(pmodel, optimizer, loader)
    with pytest.warns(UserWarning, match="discarding the clipped gradients"):
        scheduler.step()
    assert optimizer.max_grad_norm == optimizer.bound.flat == 0.5
    assert all(p.summed_grad is None for p in optimizer.params)


def test_data_only_pass_over_the_loader_then_training() -> None:
    """Iterating the private loader without training (statistics, accuracy under no_grad) is fine; so is training
    afterwards."""
    engine, _, pmodel, optimizer, loader = _private()
    rows = 0
    for (x,) in loader:
        with torch.no_grad():
            pmodel(x)
        rows += len(x)
    assert rows > 0
    for (x,) in loader:
        optimizer.zero_grad()
        _loss(pmodel(x)).backward()
        optimizer.step()
    assert sum(n for _, _, n in engine.accountant.history) == loader.steps_per_epoch


def test_freezing_inside_a_logical_batch_does_not_block_later_ones() -> None:
    """The frozen parameter's partial sum is dropped (never released), not left to block the next batches."""
    engine, _, pmodel, optimizer, loader = _private()
    frozen = False
    for (x,) in loader:
        info = loader.context.current
        optimizer.zero_grad()
        _loss(pmodel(x)).backward()
        optimizer.step()
        if not info.is_last and not frozen:
            pmodel._module[0].requires_grad_(False)
            frozen = True
    assert frozen and sum(n for _, _, n in engine.accountant.history) == loader.steps_per_epoch
    assert all(getattr(p, "summed_grad", None) is None for p in pmodel._module[0].parameters())
    optimizer.max_grad_norm = 0.5  # the other parameters' sums were released (kept readable until zero_grad)


def test_clip_bound_changes_after_the_step_that_ends_the_logical_batch() -> None:
    """A GradClipScheduler stepped once per logical batch, after its last optimizer.step(), is accepted: the next
    logical batch is clipped, and released, at the new bound."""
    _, twin, pmodel, optimizer, loader = _private(bound=1.0)
    scheduler = StepGradClip(optimizer, step_size=1, gamma=0.5)
    bounds = []
    for rows, grads, _ in _logical_batches(pmodel, optimizer, loader, step_every_batch=True):
        for got, want in zip(grads, _clipped_sum(twin, rows, optimizer.max_grad_norm)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        bounds.append(optimizer.max_grad_norm)
        scheduler.step()
    assert bounds[:3] == [1.0, 0.5, 0.25]


# ---- leaving a logical batch, then stepping -----------------------------------------------------------------------
def test_step_after_leaving_a_logical_batch_releases_nothing() -> None:
    """break after a physical batch that does not end its logical batch, then optimizer.step(): no noise, no
    accountant step, no update. The next loop's zero_grad discards the partial sums (with a warning) and its
    first logical batch is exact."""
    engine, twin, pmodel, optimizer, loader = _private(lr=0.5)
    _leave_after_a_non_last_batch(pmodel, optimizer, loader)
    before = [p.detach().clone() for p in optimizer.params]
    history = list(engine.accountant.history)
    optimizer.step()
    assert all(p.grad is None for p in optimizer.params)
    assert all(torch.equal(b, p) for b, p in zip(before, optimizer.params))
    assert engine.accountant.history == history
    assert all(p.summed_grad is not None for p in optimizer.params)

    optimizer.original_optimizer.param_groups[0]["lr"] = 0.0
    twin.load_state_dict(pmodel._module.state_dict())
    with pytest.warns(UserWarning, match="discarding the clipped gradients"):
        rows, grads, _ = next(_logical_batches(pmodel, optimizer, loader, step_every_batch=False))
    for got, want in zip(grads, _clipped_sum(twin, rows, 1.0)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# ---- a trainable parameter outside the optimizer ------------------------------------------------------------------
def test_trainable_parameter_outside_the_optimizer_is_refused() -> None:
    """Naming the parameters and what to do, before the model or optimizer is changed; frozen ones are fine."""
    model = _model()
    optimizer = torch.optim.SGD(model[2].parameters(), lr=0.1)
    options = {"data_loader": DataLoader(_data(), 12), "noise_multiplier": 1.0, "max_grad_norm": 1.0}
    with pytest.raises(ValueError, match=r"\['0\.weight', '0\.bias'\].*requires_grad_\(False\)"):
        PrivacyEngine().make_private_fast(module=model, optimizer=optimizer, **options)
    assert all("forward" not in m.__dict__ for m in model.modules())
    model[0].requires_grad_(False)
    PrivacyEngine().make_private_fast(module=model, optimizer=optimizer, **options)


# ---- a loop that fetches the next physical batch first ------------------------------------------------------------
def _one_ahead(loader) -> Iterator[tuple[torch.Tensor, PhysicalBatchInfo]]:
    """A prefetcher (as accelerate's DataLoaderShard): fetches the next batch before yielding the current one."""
    batches = iter(loader)
    current = (next(batches), loader.context.current)
    for batch in batches:
        yield current
        current = (batch, loader.context.current)
    yield current


def test_prefetching_loop_is_refused_before_any_step() -> None:
    """Fetching the next physical batch before the current one is trained would pair rows with the next batch's
    mask: refused at the first backward, before anything is clipped, stepped or accounted."""
    engine, _, pmodel, optimizer, loader = _private(lr=0.5)
    before = [p.detach().clone() for p in optimizer.params]
    with pytest.raises(RuntimeError, match="the physical batch before this one got no backward"):
        for (x,), _ in _one_ahead(loader):
            optimizer.zero_grad()
            _loss(pmodel(x)).backward()
            optimizer.step()
    assert engine.accountant.history == []
    assert all(p.grad is None for p in optimizer.params)
    assert all(torch.equal(b, p) for b, p in zip(before, optimizer.params))


def test_peeking_a_batch_then_training() -> None:
    """A batch taken from an iterator that stays alive (e.g. to read shapes) does not count as skipped by the
    training loop's own iteration."""
    engine, _, pmodel, optimizer, loader = _private()
    peek = iter(loader)
    next(peek)
    for (x,) in loader:
        optimizer.zero_grad()
        _loss(pmodel(x)).backward()
        optimizer.step()
    assert sum(n for _, _, n in engine.accountant.history) == loader.steps_per_epoch
    del peek
