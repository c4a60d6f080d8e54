"""Distributed DP training (gloo on CPU, 2 and 3 spawned processes) against single-process references.

Starting processes is the expensive part (each imports torch and opacus), so every world size is launched once
per module: each rank runs all scenarios in order and writes "ok" or its traceback per scenario to a file, and the
tests below read those files. Collectives inside a scenario time out after 60 s; the failure scenario re-creates
the process group with a 3 s timeout. Each scenario checks on every rank that all ranks hold identical parameters.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from models import mlp
from oracle import l1_loss, loop_clipped_sum
from rank_scenarios import expect_ok, launch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from opacus_fast import PrivacyEngine
from opacus_fast.data import PhysicalBatchInfo
from opacus_fast.distributed import DistributedStepError, DPDistributedModule, coalesced, save_checkpoint

BOUND = 0.8  # per-example norms of mlp() on this data are ≈ 0.7–1.0: some examples are clipped, some not
LAUNCH_DEADLINE_S = 240
WORLDS = (2, 3)


class SimulatedFailure(Exception):
    """What the failing rank raises in the failure scenario."""


# ---- helpers run inside the ranks ----------------------------------------------------------------------------------
def _dataset(n: int = 48, dim: int = 7) -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(n, dim, generator=g, dtype=torch.float64), torch.arange(n))


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _assert_same_on_all_ranks(model: nn.Module) -> None:
    mine = _flat(model)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    assert all(torch.equal(mine, other) for other in everyone), "ranks hold different parameters"


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _private(wrapper: nn.Module, model: nn.Module, dataset: TensorDataset, **options):
    engine = PrivacyEngine()
    optimizer = torch.optim.SGD(model.parameters(), lr=options.pop("lr", 0.5), momentum=options.pop("momentum", 0))
    loader = DataLoader(dataset, batch_size=8)
    return engine, engine.make_private_fast(module=wrapper, optimizer=optimizer, data_loader=loader, **options)


def _check_step(model: nn.Module, reference: nn.Module, rows: torch.Tensor, divisor: float) -> None:
    """p.grad == exact clipped sum over the global batch ``rows`` / divisor, computed in this process alone."""
    expected = loop_clipped_sum(reference, rows, BOUND, "mean")
    for (name, _), p in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, torch.zeros_like(p) + expected[name] / divisor, rtol=1e-6, atol=1e-12)


# ---- scenarios (run on every rank) ---------------------------------------------------------------------------------
def scenario_exact(rank: int, **options) -> None:
    """:func:`exact_steps`, counting the all-reduces: one per logical step, holding every parameter."""
    sizes = []
    real_all_reduce = dist.all_reduce

    def counting(tensor: torch.Tensor, *args, **kwargs):
        sizes.append(tensor.numel())
        return real_all_reduce(tensor, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dist, "all_reduce", counting)
        steps, params = exact_steps(rank, **options)
    assert sizes == [params] * steps, f"all-reduces of {sizes} elements for {steps} steps of {params} parameters"


def exact_steps(rank: int, *, wrapper: str, sample_rate: float, physical: int | None, pad: bool, steps: int,
                want_empty: bool) -> tuple[int, int]:
    """Noiseless: each logical step's update == the single-process update on the union of the ranks' real rows.

    Returns the number of logical steps and of parameters."""
    torch.manual_seed(100 + rank)  # different initialisations and loader seeds: make_private_fast must sync them
    model = mlp().double()
    wrapped = DPDistributedModule(model) if wrapper == "dp" else DistributedDataParallel(model)
    _, (pmodel, optimizer, loader) = _private(
        wrapped, model, _dataset(), noise_multiplier=0.0, max_grad_norm=BOUND, sample_rate=sample_rate,
        max_physical_batch_size=physical, pad_physical_batches=pad,
    )
    _assert_same_on_all_ranks(model)
    reference = mlp().double()
    reference.load_state_dict(model.state_dict())
    rows, done, uneven_seen = [], 0, False
    for x, idx in loader:
        info = loader.context.current
        real = slice(None) if info.mask is None else info.mask
        rows.append((x[real], idx[real]))
        optimizer.zero_grad()
        l1_loss(pmodel(x), "mean").backward()
        optimizer.step()
        if not info.is_last:
            continue
        parts = _gather((torch.cat([r for r, _ in rows]), torch.cat([i for _, i in rows])))
        indices = torch.cat([i for _, i in parts])
        assert indices.unique().numel() == indices.numel(), "the ranks' parts overlap"
        sizes = [len(i) for _, i in parts]
        uneven_seen |= min(sizes) == 0 < max(sizes)
        _check_step(model, reference, torch.cat([r for r, _ in parts]), loader.expected_batch_size)
        _assert_same_on_all_ranks(model)
        reference.load_state_dict(model.state_dict())
        rows, done = [], done + 1
        if done == steps:
            break
    assert done == steps
    assert uneven_seen or not want_empty, "no step had an empty rank next to a non-empty one: change the seed"
    if wrapper == "ddp":
        with pytest.raises(RuntimeError, match="call the model that make_private_fast returned"):
            wrapped(x)
        pmodel.cleanup()
        assert not wrapped._forward_pre_hooks, "cleanup() left the DDP guard behind"
    return done, _flat(model).numel()


def scenario_uneven(rank: int) -> None:
    """Ranks run 1, 3 and 1 (empty) physical batches before the same step(): one exact global update."""
    torch.manual_seed(7)
    model = mlp().double()
    _, (pmodel, optimizer, loader) = _private(
        DPDistributedModule(model), model, _dataset(), noise_multiplier=0.0, max_grad_norm=BOUND, sample_rate=0.25,
        max_physical_batch_size=4,
    )
    reference = mlp().double()
    reference.load_state_dict(model.state_dict())
    x = _dataset().tensors[0][:9]  # the global batch: rank 0 has rows 0-1, rank 1 rows 2-8, rank 2 none
    padded = torch.cat([x[5:7], x[5:6].expand(2, -1)])
    plans = {
        0: [(x[0:2], None)],
        1: [(x[2:5], None), (padded, torch.tensor([True, True, False, False])), (x[7:9], None)],
        2: [(x[:0], None)],
    }[rank]
    for index, (rows, mask) in enumerate(plans):
        num_real = len(rows) if mask is None else int(mask.sum())
        loader.context.publish(PhysicalBatchInfo(mask, num_real, index, index == len(plans) - 1, 0))
        optimizer.zero_grad()
        l1_loss(pmodel(rows), "mean").backward()
        optimizer.step()
    _check_step(model, reference, x, loader.expected_batch_size)
    _assert_same_on_all_ranks(model)


def scenario_noise(rank: int) -> None:
    """Zero-gradient loss: the update is pure noise, whose variance must be σ²C²/B² (one draw, not one per rank)."""
    sigma, bound, steps = 1.3, 0.7, 5
    model = nn.Linear(50, 40).double()
    data = TensorDataset(torch.randn(64, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))
    gen = torch.Generator().manual_seed(1000 + rank)  # every rank has a generator: only rank 0's may be used
    _, (pmodel, optimizer, loader) = _private(
        DPDistributedModule(model), model, data, lr=0.0, noise_multiplier=sigma, max_grad_norm=bound,
        sample_rate=0.2, max_physical_batch_size=4, noise_generator=gen,
    )
    updates = []
    while len(updates) < steps:
        for (x,) in loader:
            optimizer.zero_grad()
            (pmodel(x) * 0).sum().backward()
            optimizer.step()
            if loader.context.current.is_last:
                updates.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
                _assert_same_on_all_ranks(model)
    variance = torch.stack(updates[:steps]).pow(2).mean().item()
    expected = (sigma * bound / loader.expected_batch_size) ** 2
    # 5 × 2040 = 10,200 independent N(0, v) draws: v̂/v has sd sqrt(2/10200) ≈ 0.014, so a ±10% band is 7 sd
    # (false failure < 1e-11); noise from every rank would give 2× or 3× (identical generators: 4× or 9×).
    assert abs(variance / expected - 1) < 0.1, f"update variance {variance:.3e}, expected σ²C²/B² = {expected:.3e}"


def _steps(pmodel, optimizer, loader, batches, count: int) -> None:
    done = 0
    while done < count:
        x, _ = next(batches)
        optimizer.zero_grad()
        l1_loss(pmodel(x), "mean").backward()
        optimizer.step()
        done += loader.context.current.is_last


def scenario_checkpoint(rank: int, out_dir: str) -> None:
    """Saved on rank 0 after 2 steps and loaded by every rank into fresh objects: the next 2 steps are identical."""
    path = Path(out_dir) / "checkpoint.pt"

    def build(seed: int):
        torch.manual_seed(seed + rank)
        model = mlp().double()
        engine, private = _private(
            DPDistributedModule(model), model, _dataset(), lr=0.1, momentum=0.9, noise_multiplier=1.0,
            max_grad_norm=BOUND, sample_rate=0.25, max_physical_batch_size=3,
            noise_generator=torch.Generator().manual_seed(seed * 10 + rank),
        )
        return engine, model, private

    engine, model, (pmodel, optimizer, loader) = build(1)
    batches = iter(loader)
    _steps(pmodel, optimizer, loader, batches, 2)
    save_checkpoint(engine, path=path, module=pmodel, optimizer=optimizer, data_loader=loader,
                    checkpoint_dict={"steps": 2})
    _steps(pmodel, optimizer, loader, batches, 2)
    batches.close()
    engine2, model2, (pmodel2, optimizer2, loader2) = build(2)
    loaded = engine2.load_checkpoint(path=path, module=pmodel2, optimizer=optimizer2, data_loader=loader2)
    assert loaded["steps"] == 2
    _steps(pmodel2, optimizer2, loader2, iter(loader2), 2)
    assert torch.equal(_flat(model2), _flat(model)), "the resumed run differs from the uninterrupted one"
    assert engine2.accountant.history == engine.accountant.history
    _assert_same_on_all_ranks(model2)


def scenario_errors(rank: int) -> None:
    """Unusable setups fail clearly before anything is changed."""
    model = mlp().double()
    before = _flat(model).clone()
    with pytest.raises(ValueError, match="poisson_sampling=True"):
        _private(DPDistributedModule(model), model, _dataset(), noise_multiplier=1.0, max_grad_norm=1.0,
                 poisson_sampling=False)
    with pytest.raises(TypeError, match="wrapped for distributed training"):
        DPDistributedModule(DPDistributedModule(model))
    assert torch.equal(_flat(model), before)


def scenario_mismatch(rank: int, setting: str) -> None:
    """Ranks that disagree on a setting all raise, naming it with every rank's value, before anything is changed."""
    world = int(os.environ["TEST_WORLD_SIZE"])
    torch.manual_seed(100 + rank)  # different initialisations: the broadcast from rank 0 would change them
    model = mlp().double()
    before = _flat(model).clone()
    if setting == "dataset size":  # a user who shards the data himself: 48, 49 (and 50) examples
        options, values = {"max_grad_norm": BOUND}, [48 + r for r in range(world)]
        dataset = _dataset(48 + rank)
    else:
        options, values = {"max_grad_norm": BOUND if rank == 0 else 5.0}, [BOUND] + [5.0] * (world - 1)
        dataset = _dataset()
    with pytest.raises(ValueError, match="DP settings differ") as error:
        _private(DPDistributedModule(model), model, dataset, noise_multiplier=1.0, **options)
    message = str(error.value)
    assert f"{setting}: " + ", ".join(f"rank {r}: {v}" for r, v in enumerate(values)) in message, message
    assert ("do not shard it yourself" if setting == "dataset size" else "same max_grad_norm") in message, message
    named = re.findall(r"^- ([^:]+):", message, flags=re.MULTILINE)  # only what differs, in a fixed order
    assert named == (["dataset size", "dataset contents", "sample_rate", "expected batch size"]
                     if setting == "dataset size" else [setting])
    assert torch.equal(_flat(model), before)


def scenario_failure(rank: int, port: int, mode: str) -> None:
    """The last rank raises in step 1 and then hangs (or exits): the others get a clear error within the timeout."""
    dist.destroy_process_group()
    world = int(os.environ["TEST_WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=3))
    model = mlp().double()
    _, (pmodel, optimizer, loader) = _private(
        DPDistributedModule(model), model, _dataset(), noise_multiplier=1.0, max_grad_norm=BOUND, sample_rate=0.25,
    )

    def train() -> None:
        for step, (x, _) in enumerate(loader):
            if rank == world - 1 and step == 1:
                raise SimulatedFailure
            optimizer.zero_grad()
            l1_loss(pmodel(x), "mean").backward()
            optimizer.step()

    if rank == world - 1:
        with pytest.raises(SimulatedFailure):
            train()
        if mode == "exit":
            os._exit(0)
        time.sleep(6)  # alive but gone from the collectives: only the timeout can free the others
        return
    with pytest.raises(DistributedStepError, match="logical step 1 failed after") as error:
        train()
    waited = float(re.search(r"failed after ([0-9.]+) s", str(error.value)).group(1))
    assert waited < 5.5, f"the error came after {waited} s: not from the 3 s timeout"


def _scenarios(world: int, ports: tuple[int, int], out_dir: str) -> dict[str, Callable[[int], None]]:
    wide = world == 3
    return {
        "exact": lambda r: scenario_exact(r, wrapper="ddp" if wide else "dp", sample_rate=0.25, physical=2 if wide else 3,
                                          pad=not wide, steps=3, want_empty=False),
        "empty": lambda r: exact_steps(r, wrapper="dp", sample_rate=3 / 48 if wide else 2 / 48,
                                          physical=None if wide else 3, pad=not wide, steps=8, want_empty=True),
        "uneven": scenario_uneven,
        "noise": scenario_noise,
        "checkpoint": lambda r: scenario_checkpoint(r, out_dir),
        "errors": scenario_errors,
        "dataset_sizes": lambda r: scenario_mismatch(r, "dataset size"),
        "clip_bounds": lambda r: scenario_mismatch(r, "max_grad_norm"),
        "failure": lambda r: scenario_failure(r, ports[1], "exit" if wide else "hang"),
    }


@pytest.fixture(scope="module")
def all_results(tmp_path_factory) -> dict[int, dict[int, dict[str, str]]]:
    return launch(_scenarios, WORLDS, tmp_path_factory.mktemp("ranks"), LAUNCH_DEADLINE_S)


@pytest.fixture(params=WORLDS, ids=lambda w: f"{w}ranks")
def ranks(request, all_results) -> tuple[int, dict[int, dict[str, str]]]:
    return request.param, all_results[request.param]


def test_noiseless_update_equals_single_process_update(ranks) -> None:
    """Physical batches (padded on 2 ranks, unpadded and DDP-wrapped on 3), float64, exact reference."""
    expect_ok(ranks, "exact")


def test_empty_local_batches(ranks) -> None:
    expect_ok(ranks, "empty")


def test_different_numbers_of_physical_batches(ranks) -> None:
    expect_ok(ranks, "uneven")


def test_noise_is_added_once_globally(ranks) -> None:
    expect_ok(ranks, "noise")


def test_checkpoint_saved_on_rank0_resumes_every_rank(ranks) -> None:
    expect_ok(ranks, "checkpoint")


def test_bad_setups_fail_clearly(ranks) -> None:
    expect_ok(ranks, "errors")


def test_ranks_with_different_dataset_sizes_all_raise(ranks) -> None:
    """Per-rank shards (48, 49, 50 examples): each rank's sampler would draw its own q from its own data."""
    expect_ok(ranks, "dataset_sizes")


def test_ranks_with_different_clip_bounds_all_raise(ranks) -> None:
    """Rank 0 clips at 0.8, the others at 5.0, while the noise is scaled to rank 0's bound."""
    expect_ok(ranks, "clip_bounds")


def test_failing_rank_gives_clear_error_in_bounded_time(ranks) -> None:
    """2 ranks: the failed rank hangs (the 3 s timeout frees the other); 3 ranks: it exits (connection reset)."""
    expect_ok(ranks, "failure", skip_last=True)


def test_buckets_group_by_dtype_and_respect_the_cap() -> None:
    """Few large flat buckets: one per dtype unless the cap splits it; results shaped like the inputs."""
    tensors = [torch.ones(3, 4), torch.ones(5, dtype=torch.float64), torch.ones(2, 2), torch.ones(300)]
    calls = []

    class Done:
        def wait(self) -> None:
            pass

    def double(flat: torch.Tensor) -> Done:
        calls.append((flat.dtype, flat.numel()))
        flat.mul_(2)
        return Done()

    out = coalesced(tensors, double, cap_mb=1000 / 2**20)  # 1000 bytes: 16 float32s fit with the next 300 not
    assert calls == [(torch.float32, 16), (torch.float32, 300), (torch.float64, 5)]
    assert all(o.shape == t.shape and torch.equal(o, 2 * t) for o, t in zip(out, tensors))
    assert all(torch.equal(t, torch.ones_like(t)) for t in tensors), "the inputs were modified"


def test_needs_initialised_process_group() -> None:
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        DPDistributedModule(nn.Linear(2, 2))
