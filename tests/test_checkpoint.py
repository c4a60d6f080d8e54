"""A run stopped and resumed from a checkpoint gives the same batches, updates and ε as an uninterrupted run."""

from __future__ import annotations

import pytest
import torch
from models import mlp
from oracle import l1_loss
from torch.utils.data import DataLoader, TensorDataset

from opacus_fast import PrivacyEngine


def _fresh(user_generator: bool = True):
    """Fresh, identically seeded model, engine, optimizer and loader (default noise generator if not user's)."""
    torch.manual_seed(0)
    model = mlp().double()
    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(80, 7, generator=g, dtype=torch.float64))
    engine = PrivacyEngine(accountant="rdp")
    pmodel, opt, loader = engine.make_private_fast(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
        data_loader=DataLoader(data, batch_size=20), noise_multiplier=1.0, max_grad_norm=1.0,
        noise_generator=torch.Generator().manual_seed(5) if user_generator else None, max_physical_batch_size=8,
    )
    return engine, model, pmodel, opt, loader


def _train(pmodel, opt, loader, steps: int, interrupt_after_physical: bool = False) -> int:
    done = 0
    for (x,) in loader:
        info = loader.context.current
        opt.zero_grad()
        l1_loss(pmodel(x), "mean").backward()
        opt.step()
        if done == steps and interrupt_after_physical:
            return done
        if info.is_last:
            done += 1
            if done == steps and not interrupt_after_physical:
                return done
    return done


def _saved_run(tmp_path, steps: int, wrapped: bool = True, left_out: tuple[str, ...] = ()):
    """Train a fresh run ``steps`` logical steps and save it (the wrapped or the user's model, without the parts
    ``left_out``); returns the checkpoint's path and the user's model."""
    engine, model, pmodel, opt, loader = _fresh()
    _train(pmodel, opt, loader, steps)
    path = tmp_path / "ckpt.pt"
    parts = {name: None if name in left_out else part for name, part in (("optimizer", opt), ("data_loader", loader))}
    engine.save_checkpoint(path=path, module=pmodel if wrapped else model, **parts)
    return path, model


@pytest.mark.parametrize("user_generator", [True, False])
@pytest.mark.parametrize("interrupt_inside_logical_batch", [False, True])
def test_resume_matches_uninterrupted_run(tmp_path, interrupt_inside_logical_batch: bool, user_generator: bool) -> None:
    """4 logical steps straight == 2 steps (+ part of the 3rd), checkpoint, fresh objects, resume, 2 more steps."""
    engine, model, pmodel, opt, loader = _fresh(user_generator)
    assert _train(pmodel, opt, loader, 4) == 4
    expected_params = [p.detach().clone() for p in model.parameters()]
    expected_eps = engine.get_epsilon(1e-5)

    engine, model, pmodel, opt, loader = _fresh(user_generator)
    _train(pmodel, opt, loader, 2, interrupt_after_physical=interrupt_inside_logical_batch)
    path = tmp_path / "ckpt.pt"
    engine.save_checkpoint(path=path, module=pmodel, optimizer=opt, data_loader=loader)

    engine2, model2, pmodel2, opt2, loader2 = _fresh(user_generator)
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)  # the checkpoint must overwrite this
    opt2.generator.manual_seed(999)  # and the noise generator's state (the user's or the default one)
    engine2.load_checkpoint(path=path, module=pmodel2, optimizer=opt2, data_loader=loader2)
    assert _train(pmodel2, opt2, loader2, 2) == 2
    for p, q in zip(model2.parameters(), expected_params):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert engine2.get_epsilon(1e-5) == pytest.approx(expected_eps, rel=1e-12)


@pytest.mark.parametrize("left_out", ["optimizer", "data_loader"])
def test_partial_restore_into_a_training_engine_is_refused(tmp_path, left_out: str) -> None:
    """A fresh sampler would redraw batches already used; a fresh noise generator would replay used noise."""
    path, _ = _saved_run(tmp_path, 2)

    engine2, model2, pmodel2, opt2, loader2 = _fresh()
    before = [p.detach().clone() for p in model2.parameters()]
    given = {"optimizer": opt2, "data_loader": loader2}
    given[left_out] = None
    with pytest.raises(ValueError, match=f"holds the state of {left_out} .* voids the privacy guarantee"):
        engine2.load_checkpoint(path=path, module=pmodel2, **given)
    assert all(torch.equal(p, b) for p, b in zip(model2.parameters(), before))
    assert len(engine2.accountant) == 0


def test_model_only_load_by_an_engine_that_does_not_train(tmp_path) -> None:
    path, model = _saved_run(tmp_path, 1, wrapped=False)
    torch.manual_seed(1)
    fresh = mlp().double()
    PrivacyEngine(accountant="rdp").load_checkpoint(path=path, module=fresh)
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), model.parameters()))


def test_checkpoint_between_last_batch_and_its_step_is_refused(tmp_path) -> None:
    """The sampler state is already past the logical batch, the noise generator not: refuse until the step."""
    engine, _model, pmodel, opt, loader = _fresh()
    path = tmp_path / "ckpt.pt"
    for (x,) in loader:
        info = loader.context.current
        opt.zero_grad()
        l1_loss(pmodel(x), "mean").backward()
        if info.is_last:
            with pytest.raises(RuntimeError, match="between fetching the last physical batch"):
                engine.save_checkpoint(path=path, module=pmodel, optimizer=opt, data_loader=loader)
        opt.step()
        engine.save_checkpoint(path=path, module=pmodel, optimizer=opt, data_loader=loader)
        if info.is_last:
            break


@pytest.mark.parametrize("saved_without", [("optimizer",), ("data_loader",), ("optimizer", "data_loader")])
def test_resuming_from_a_checkpoint_without_randomness_state_is_refused(tmp_path, saved_without: tuple) -> None:
    """A checkpoint saved without the optimizer (noise generator) or the data loader (sampler) cannot resume
    training: the fresh, identically seeded run would replay noise or batches already used. Saving one warns."""
    with pytest.warns(UserWarning, match="training cannot resume from it"):
        path, _ = _saved_run(tmp_path, 2, left_out=saved_without)

    engine2, model2, pmodel2, opt2, loader2 = _fresh()
    before = [p.detach().clone() for p in model2.parameters()]
    with pytest.raises(ValueError, match="holds no .*state, so training cannot resume from it"):
        engine2.load_checkpoint(path=path, module=pmodel2, optimizer=opt2, data_loader=loader2)
    assert all(torch.equal(p, b) for p, b in zip(model2.parameters(), before))
    assert len(engine2.accountant) == 0


def test_make_private_fast_after_loading_a_checkpoint_is_refused(tmp_path) -> None:
    """Loaded before make_private_fast, a checkpoint's sampler and noise states cannot be restored, and the new
    ones (seeded as in the original run) would replay its batches and noise: make_private_fast refuses."""
    path, _ = _saved_run(tmp_path, 2, wrapped=False)
    torch.manual_seed(0)
    model = mlp().double()
    engine2 = PrivacyEngine(accountant="rdp")
    engine2.load_checkpoint(path=path, module=model)
    data = TensorDataset(torch.randn(80, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="loaded a checkpoint before make_private_fast"):
        engine2.make_private_fast(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                                  data_loader=DataLoader(data, batch_size=20), noise_multiplier=1.0,
                                  max_grad_norm=1.0)
    assert all("forward" not in m.__dict__ for m in model.modules())
