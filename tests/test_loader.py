"""Tests of DPDataLoader: physical batches, masks published in step with the yielded rows, empty batches, resume,
Opacus' BatchMemoryManager, and torch.distributed (two gloo processes).

Every example carries its own dataset index, so each test can check the published info against the rows it got.
The reference logical batches come from a PoissonBatchSampler with the same seed (tested in test_sampler.py).
"""

from __future__ import annotations

import math
import pickle
from typing import Any

import pytest
import torch
from forked_ranks import run_ranks
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from opacus_fast.data import BatchContext, DPDataLoader, PhysicalBatchInfo, PoissonBatchSampler


class IndexDataset(Dataset):
    """Example i is (float features all equal to i, i)."""

    def __init__(self, size: int, features: int = 3) -> None:
        self.size, self.features = size, features

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((self.features,), float(i)), i


class NestedDataset(IndexDataset):
    """Example i is (image tensor, (label, name), {"tokens": long tensor}): a structure to reproduce when empty."""

    def __getitem__(self, i: int) -> Any:
        return torch.full((2, 3), float(i)), (i, f"ex{i}"), {"tokens": torch.arange(4) + i}


class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(3))


def _loader(size: int = 60, batch_size: int = 6, seed: int = 0, dataset: Dataset | None = None,
            **kwargs: Any) -> DPDataLoader:
    base = DataLoader(dataset if dataset is not None else IndexDataset(size), batch_size=batch_size,
                      **kwargs.pop("loader_options", {}))
    return DPDataLoader.from_data_loader(base, generator=torch.Generator().manual_seed(seed), **kwargs)


def _reference(loader: DPDataLoader, seed: int) -> list[list[int]]:
    """The logical batches an independent sampler with the same seed draws for one epoch."""
    sampler = loader.batch_sampler.logical
    return list(PoissonBatchSampler(sampler.num_samples, sampler.sample_rate, steps=sampler.steps,
                                    generator=torch.Generator().manual_seed(seed)))


def _collect(loader: DPDataLoader) -> list[tuple[list[int], PhysicalBatchInfo]]:
    """(row indices, published info) of each yielded physical batch."""
    out = []
    for _, idx in loader:
        out.append((idx.tolist(), loader.context.current))
    return out


def _check_rows_match_info(rows: list[int], info: PhysicalBatchInfo, size: int | None) -> None:
    if size is not None:
        assert len(rows) == size
        expected_mask = torch.arange(size) < info.num_real
        if info.num_real == size:
            assert info.mask is None
        else:
            assert torch.equal(info.mask, expected_mask)
        assert len(set(rows[: info.num_real])) == info.num_real
        assert all(r == rows[0] for r in rows[info.num_real :])  # padding copies the first row
    else:
        assert info.mask is None and len(rows) == info.num_real


def _logical_batches(batches: list[tuple[list[int], PhysicalBatchInfo]]) -> list[list[int]]:
    """Glue the real rows of consecutive physical batches back into logical batches, checking index/step."""
    logical: list[list[int]] = []
    current: list[int] = []
    position = 0
    for rows, info in batches:
        assert (info.step, info.index) == (len(logical), position)
        current.extend(rows[: info.num_real])
        position += 1
        if info.is_last:
            logical.append(current)
            current, position = [], 0
    assert position == 0
    return logical


def _check_epoch(loader: DPDataLoader, batches: list[tuple[list[int], PhysicalBatchInfo]], seed: int) -> None:
    size = loader.max_physical_batch_size if loader.pad else None
    for rows, info in batches:
        _check_rows_match_info(rows, info, size)
    reference = _reference(loader, seed)
    assert _logical_batches(batches) == reference
    if loader.max_physical_batch_size is not None:
        counts = [max(1, math.ceil(len(b) / loader.max_physical_batch_size)) for b in reference]
        assert [info.index for _, info in batches] == [i for c in counts for i in range(c)]


def _comparable(batches: list[tuple[list[int], PhysicalBatchInfo]]) -> list[tuple]:
    """Rows and info of each physical batch, without the step number (counted from each iteration's start)."""
    return [(rows, info.index, info.is_last, info.num_real, None if info.mask is None else info.mask.tolist())
            for rows, info in batches]


def test_padded_physical_batches_have_one_shape_and_the_right_masks() -> None:
    loader = _loader(size=60, batch_size=6, max_physical_batch_size=4, seed=1)  # q = 0.1: 6 expected, often > 4
    assert loader.pad and loader.sample_rate == pytest.approx(0.1) and loader.expected_batch_size == pytest.approx(6)
    batches = _collect(loader)
    _check_epoch(loader, batches, seed=1)
    assert any(info.index > 0 for _, info in batches) and any(info.mask is not None for _, info in batches)
    assert loader.context.current is None


def test_lengths() -> None:
    loader = _loader(size=60, batch_size=6, max_physical_batch_size=4)  # 10 steps, 6 expected rows → 2 batches
    assert (loader.steps_per_epoch, len(loader)) == (10, 20)
    assert (_loader(size=60, batch_size=6).steps_per_epoch, len(_loader(size=60, batch_size=6))) == (10, 10)


def test_without_padding_the_last_physical_batch_is_short() -> None:
    loader = _loader(max_physical_batch_size=4, pad=False, seed=2)
    batches = _collect(loader)
    _check_epoch(loader, batches, seed=2)
    assert all(len(rows) <= 4 for rows, _ in batches)


def test_without_max_size_one_batch_per_logical_batch() -> None:
    loader = _loader(seed=3)
    assert not loader.pad and len(loader) == 10
    batches = _collect(loader)
    assert all(info.is_last and info.index == 0 and info.mask is None for _, info in batches)
    _check_epoch(loader, batches, seed=3)


def test_workers_keep_masks_aligned_with_rows() -> None:
    """Two workers prefetching 4 batches ahead: each published info still describes the batch being yielded."""
    loader = _loader(size=80, batch_size=8, max_physical_batch_size=3, seed=4,
                     loader_options={"num_workers": 2, "prefetch_factor": 2})
    _check_epoch(loader, _collect(loader), seed=4)


def test_persistent_workers_survive_an_early_break() -> None:
    """After a break the loader starts a clean new epoch, in step with its masks; its state resumes the old one."""
    def make(seed: int) -> DPDataLoader:
        return _loader(size=80, batch_size=8, max_physical_batch_size=3, seed=seed,
                       loader_options={"num_workers": 2, "persistent_workers": True})

    loader, twin = make(5), make(5)
    uninterrupted = _collect(twin)
    for position, _ in enumerate(loader):
        if position == 2:
            break
    assert loader.context.current is None
    fresh = make(0)
    fresh.load_state_dict(loader.state_dict())
    restart = 3 if uninterrupted[2][1].is_last else 2 - uninterrupted[2][1].index
    assert _comparable(_collect(fresh)) == _comparable(uninterrupted[restart:])
    new_epoch = _collect(loader)
    for rows, info in new_epoch:
        _check_rows_match_info(rows, info, 3)
    assert len(_logical_batches(new_epoch)) == 10  # a full new epoch, not the rest of the abandoned one


def test_user_collate_fn_is_kept() -> None:
    def collate(examples: list[tuple[torch.Tensor, int]]) -> dict[str, Any]:
        return {"x": torch.stack([x for x, _ in examples]), "idx": torch.tensor([i for _, i in examples]),
                "tag": "mine"}

    loader = _loader(size=30, batch_size=3, seed=6, loader_options={"collate_fn": collate})
    for batch in loader:
        assert batch["tag"] == "mine"
        assert torch.equal(batch["x"][:, 0].long(), batch["idx"])
        assert batch["x"].shape[1:] == (3,)


def _signature(batch: Any) -> Any:
    """Structure, dtypes and trailing shapes of a collated batch (independent of how the loader builds it)."""
    if isinstance(batch, torch.Tensor):
        return ("tensor", batch.dtype, tuple(batch.shape[1:]))
    if isinstance(batch, dict):
        return {k: _signature(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        if all(isinstance(v, str) for v in batch):
            return (type(batch), "strings")
        return (type(batch), [_signature(v) for v in batch])
    return type(batch)


def test_empty_logical_batch_without_padding_is_a_zero_row_batch_of_the_same_structure() -> None:
    loader = _loader(size=20, batch_size=1, seed=7, dataset=NestedDataset(20), sample_rate=0.03)
    empty, full = [], []
    for batch in loader:
        info = loader.context.current
        assert info.is_last and info.index == 0 and info.mask is None
        (empty if info.num_real == 0 else full).append(batch)
    assert empty and full
    image, (labels, names), mapping = empty[0]
    assert image.shape == (0, 2, 3) and labels.shape == (0,) and len(names) == 0 and mapping["tokens"].shape == (0, 4)
    assert _signature(empty[0]) == _signature(full[0])


def test_empty_logical_batch_with_padding_is_fully_masked() -> None:
    loader = _loader(size=20, batch_size=1, seed=8, sample_rate=0.03, max_physical_batch_size=5)
    batches = _collect(loader)
    empty = [(rows, info) for rows, info in batches if info.num_real == 0]
    assert empty
    for rows, info in empty:
        assert len(rows) == 5 and info.is_last and not info.mask.any()
    _check_epoch(loader, batches, seed=8)


def test_spawned_workers_build_empty_batches_from_their_own_dataset_copy() -> None:
    """With spawn, the collate wrapper is pickled without the dataset and uses the worker's copy."""
    loader = _loader(size=20, batch_size=1, seed=7, sample_rate=0.03,
                     loader_options={"num_workers": 1, "multiprocessing_context": "spawn"})
    assert pickle.loads(pickle.dumps(loader.collate_fn)).dataset is None
    shapes = [tuple(x.shape) for x, _ in loader]
    assert (0, 3) in shapes and (1, 3) in shapes


def test_iterable_dataset_is_refused() -> None:
    with pytest.raises(TypeError, match="IterableDataset"):
        DPDataLoader.from_data_loader(DataLoader(Stream(), batch_size=2))
    with pytest.raises(TypeError, match="IterableDataset"):
        DPDataLoader(Stream(), sample_rate=0.1)


def test_bad_arguments_are_refused() -> None:
    base = DataLoader(IndexDataset(10), batch_size=2)
    with pytest.raises(ValueError, match="max_physical_batch_size"):
        DPDataLoader.from_data_loader(base, pad=True)
    with pytest.raises(ValueError, match="positive"):
        DPDataLoader.from_data_loader(base, max_physical_batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        DPDataLoader.from_data_loader(DataLoader(IndexDataset(10), batch_size=None))
    with pytest.raises(TypeError, match="shuffle"):
        DPDataLoader(IndexDataset(10), sample_rate=0.1, shuffle=True)


def test_loader_settings_are_kept() -> None:
    def init(_: int) -> None:
        pass

    base = DataLoader(IndexDataset(40), batch_size=4, num_workers=2, worker_init_fn=init, timeout=30,
                      prefetch_factor=3, persistent_workers=True)
    context = BatchContext()
    loader = DPDataLoader.from_data_loader(base, context=context)
    assert loader.sample_rate == pytest.approx(1 / len(base)) and loader.context is context
    assert (loader.num_workers, loader.worker_init_fn, loader.timeout, loader.prefetch_factor,
            loader.persistent_workers) == (2, init, 30, 3, True)
    assert loader.collate_fn.collate_fn is base.collate_fn


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("where", ["after a logical batch", "inside a logical batch"])
def test_state_dict_resume_gives_the_same_next_batches(workers: int, where: str) -> None:
    """Save the state mid-epoch; a fresh loader (other seed) that loads it yields what the original yielded next.

    Saved inside a logical batch, that logical batch is drawn again from its first physical batch.
    """
    def make(seed: int) -> DPDataLoader:
        options = {"num_workers": workers} if workers else {}
        return _loader(size=60, batch_size=6, max_physical_batch_size=2, seed=seed, loader_options=options)

    original = make(9)
    first_epoch, second_epoch = _collect(original), _collect(original)
    wanted_last = where == "after a logical batch"
    stop = next(p for p in range(3, len(first_epoch)) if first_epoch[p - 1][1].is_last == wanted_last)
    restart = stop if wanted_last else stop - 1 - first_epoch[stop - 1][1].index

    replay = make(9)
    iterator = iter(replay)
    for _ in range(stop):
        next(iterator)
    state = replay.state_dict()
    del iterator  # leaving the loop early keeps the random state; the next iteration is a new epoch
    after_exit = replay.state_dict()["sampler"]
    assert after_exit["step"] == 0
    assert torch.equal(after_exit["generator_state"], state["sampler"]["generator_state"])
    fresh = make(0)
    fresh.load_state_dict(state)
    resumed = _collect(fresh) + _collect(fresh)
    assert _comparable(resumed) == _comparable(first_epoch[restart:] + second_epoch)


def _per_example_clipped_sum(w: torch.Tensor, b: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor,
                             clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_i clip(∇ 0.5 (w·x_i + b - y_i)²) for a 1-output linear model, in closed form."""
    residual = xs @ w + b - ys
    grads_w, grads_b = residual[:, None] * xs, residual
    norms = torch.sqrt((grads_w**2).sum(1) + grads_b**2)
    factor = torch.clamp(clip / (norms + 1e-6), max=1.0)
    return (factor[:, None] * grads_w).sum(0), (factor * grads_b).sum()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_batch_memory_manager_works_with_a_loader_without_max_size() -> None:
    """Opacus DPOptimizer (noise 0) + BatchMemoryManager(2) give the closed-form clipped-SGD reference."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    n, lr, clip, seed = 40, 0.1, 0.5, 10
    torch.manual_seed(0)
    xs, ys = torch.randn(n, 3, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    dataset = torch.utils.data.TensorDataset(xs, ys, torch.arange(n))
    loader = DPDataLoader.from_data_loader(DataLoader(dataset, batch_size=2), sample_rate=0.05,
                                           generator=torch.Generator().manual_seed(seed))
    model = nn.Linear(3, 1).double()
    w, b = model.weight.detach().clone()[0], model.bias.detach().clone()[0]
    module = GradSampleModule(model, loss_reduction="sum")
    optimizer = DPOptimizer(torch.optim.SGD(module.parameters(), lr=lr), noise_multiplier=0.0,
                            max_grad_norm=clip, expected_batch_size=2, loss_reduction="sum")
    steps = []
    optimizer.attach_step_hook(lambda _: steps.append(1))
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=2, optimizer=optimizer) as physical:
        for x, y, _ in physical:
            assert len(x) <= 2
            optimizer.zero_grad()
            loss = 0.5 * ((module(x).squeeze(1) - y) ** 2).sum()
            loss.backward()
            optimizer.step()
    reference = _reference(loader, seed)
    assert any(len(batch) == 0 for batch in reference) and any(len(batch) > 2 for batch in reference)
    for batch in reference:
        gw, gb = _per_example_clipped_sum(w, b, xs[batch], ys[batch], clip)
        w, b = w - lr * gw, b - lr * gb
    assert len(steps) == len(reference)
    torch.testing.assert_close(model.weight.detach()[0], w)
    torch.testing.assert_close(model.bias.detach()[0], b)


def test_batch_memory_manager_is_refused_when_the_loader_already_splits() -> None:
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    loader = _loader(max_physical_batch_size=4)
    with (BatchMemoryManager(data_loader=loader, max_physical_batch_size=2, optimizer=None) as physical,
          pytest.raises(RuntimeError, match="BatchMemoryManager")):
        next(iter(physical))


def _distributed_worker(rank: int, world_size: int, init_file: str, queue: Any) -> None:
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(rank)  # only the broadcast of rank 0's seed can make the ranks agree
    try:
        base = DataLoader(IndexDataset(30), batch_size=3)
        # q = 0.05: 20 steps, each with P ≈ 0.55 that one rank's part is empty (none in 20: about 1e-7)
        shared = DPDataLoader.from_data_loader(base, sample_rate=0.05, max_physical_batch_size=2, distributed=True)
        info = shared.context  # sent as plain tuples: tensors would need this process alive when unpickled
        plain = [(idx.tolist(), (info.current.num_real, info.current.index, info.current.is_last, info.current.step))
                 for _, idx in shared]
        secure = DPDataLoader.from_data_loader(base, sample_rate=0.1, secure_mode=True, distributed=True)
        secure_batches = [idx.tolist() for _, idx in secure]
        mismatch = None
        try:
            DPDataLoader.from_data_loader(base, generator=torch.Generator().manual_seed(rank), distributed=True)
        except ValueError as error:
            mismatch = str(error)
        queue.put((rank, plain, secure_batches, mismatch))
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_ranks_split_one_global_sample(tmp_path: Any) -> None:
    """Two gloo ranks: disjoint parts, union = the global sample of rank 0's shared seed, same physical batch count."""
    results = run_ranks(_distributed_worker, tmp_path)
    (plain0, secure0, mismatch0), (plain1, secure1, mismatch1) = results[0], results[1]
    plain0, plain1 = ([(rows, PhysicalBatchInfo(None, *fields)) for rows, fields in plain] for plain in (plain0, plain1))
    assert mismatch0 and "same seed" in mismatch0 and mismatch1
    assert [info.index for _, info in plain0] == [info.index for _, info in plain1]  # same count per step
    logical0, logical1 = _logical_batches(plain0), _logical_batches(plain1)
    assert len(logical0) == len(logical1) == 20
    assert any(not part for part in logical0 + logical1)
    for part0, part1 in zip(logical0, logical1):
        assert not set(part0) & set(part1) and 0 <= len(part0) - len(part1) <= 1
        assert not part0 or not part1 or max(part0) < min(part1)
    for part0, part1 in zip(secure0, secure1):  # independent draws per rank would break these almost surely
        assert 0 <= len(part0) - len(part1) <= 1 and (not part0 or not part1 or max(part0) < min(part1))
