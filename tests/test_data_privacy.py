"""The data side of privacy: what the loader and the sampler guarantee besides Poisson batch sizes.

- padding rows are appended after the user's collate_fn, so a collate that reorders examples cannot make one count
  twice (or mask a real one out);
- the uniform subset behind the Poisson sampler is exactly uniform (``torch.randint(n)`` is modulo-biased);
- ``DPDataLoader.state_dict`` refuses while another iterator (Opacus' BatchMemoryManager) drives the sampler;
- a loop left midway rewinds the sampler, so the live run draws what a run resumed from its checkpoint draws;
- ranks passing different shards of equal size get different dataset fingerprints;
- a user's sampler that the Poisson loader ignores is warned about.

Statistical thresholds are p-values below 1e-4 for a correct sampler (or |z| above 4.5, about 7e-6), at fixed
seeds, so the outcome is deterministic.
"""

from __future__ import annotations

import io
import math
import random
import warnings
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from forked_ranks import run_ranks
from scipy import stats
from torch import nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    Subset,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)
from torch.utils.data.dataloader import default_collate

from opacus_fast import PrivacyEngine
from opacus_fast.data import DPDataLoader, PhysicalBatchInfo, PoissonBatchSampler
from opacus_fast.data.loader import PhysicalBatchCollate
from opacus_fast.data.sampler import _accept_below, _uniform_subset
from opacus_fast.distributed import check_same_settings, dataset_fingerprint


class IndexDataset(Dataset):
    """Example i is (features all equal to i, i, a pseudo-random "sequence length")."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.lengths = torch.randint(1, 50, (size,), generator=torch.Generator().manual_seed(0)).tolist()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return torch.full((3,), float(i)), i, self.lengths[i]


def _loader(size: int = 60, seed: int = 0, collate_fn: Any = None, **options: Any) -> DPDataLoader:
    loader_options = options.pop("loader_options", {})
    if collate_fn is not None:
        loader_options["collate_fn"] = collate_fn
    base = DataLoader(IndexDataset(size), batch_size=6, **loader_options)
    return DPDataLoader.from_data_loader(base, generator=torch.Generator().manual_seed(seed), **options)


def _reference(loader: DPDataLoader, seed: int, epochs: int = 1) -> list[list[int]]:
    """The logical batches that an independent sampler with the same seed draws."""
    logical = loader.batch_sampler.logical
    sampler = PoissonBatchSampler(logical.num_samples, logical.sample_rate, steps=logical.steps,
                                  generator=torch.Generator().manual_seed(seed))
    return [batch for _ in range(epochs) for batch in sampler]


def _rows(loader: DPDataLoader, stop: int | None = None) -> list[tuple[list[int], PhysicalBatchInfo]]:
    """(dataset indices of the rows, published info) of each physical batch, leaving the loop before ``stop``."""
    out = []
    for position, (_, idx, _) in enumerate(loader):
        if position == stop:
            break
        out.append((idx.tolist(), loader.context.current))
    return out


def _real(rows: list[int], info: PhysicalBatchInfo) -> list[int]:
    return rows if info.mask is None else [r for r, keep in zip(rows, info.mask.tolist()) if keep]


def _logical(batches: list[tuple[list[int], PhysicalBatchInfo]]) -> list[list[int]]:
    """The real rows of consecutive physical batches glued into (sorted) logical batches."""
    out, current = [], []
    for rows, info in batches:
        current += _real(rows, info)
        if info.is_last:
            out.append(sorted(current))
            current = []
    return out


# ---- 1. padding after the user's collate_fn -------------------------------------------------------------------------
def _sort_by_length(examples: list[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A typical NLP collate: longest example first (as pack_padded_sequence wants)."""
    examples = sorted(examples, key=lambda e: -e[2])
    x, idx, lengths = zip(*examples)
    return torch.stack(x), torch.tensor(idx), torch.tensor(lengths)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_reordering_collate_cannot_make_padding_rows_real(workers: int) -> None:
    """Unmasked rows hold each example of the physical batch exactly once; padding rows copy the first row."""
    loader = _loader(seed=1, collate_fn=_sort_by_length, max_physical_batch_size=4,
                     loader_options={"num_workers": workers})
    batches = _rows(loader)
    chunks = [batch[i : i + 4] for batch in _reference(loader, seed=1) for i in range(0, max(len(batch), 1), 4)]
    assert len(batches) == len(chunks)
    padded = 0
    for (rows, info), chunk in zip(batches, chunks):
        assert len(rows) == 4 and info.num_real == len(chunk)
        assert Counter(_real(rows, info)) == Counter(chunk)
        if info.mask is not None:
            assert info.mask.tolist() == [i < len(chunk) for i in range(4)]
            assert all(r == rows[0] for r in rows[info.num_real :])
            padded += info.num_real > 1
    assert padded >= 3  # batches where the old padding (before the collate) could be reordered


def test_padding_with_the_default_collate_is_unchanged() -> None:
    """Collate-then-pad equals the old pad-then-collate (copies of the first example) for nested structures."""
    examples = [(torch.full((2, 3), float(i)), (i, f"ex{i}"), {"tokens": torch.arange(4) + i}) for i in (7, 3)]
    padded = PhysicalBatchCollate(default_collate, dataset=None, pad_to=5)(examples)
    expected = default_collate(examples + [examples[0]] * 3)
    torch.testing.assert_close(padded[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(padded[1][0], expected[1][0], rtol=0, atol=0)
    assert padded[1][1] == expected[1][1] == ("ex7", "ex3", "ex7", "ex7", "ex7")
    torch.testing.assert_close(padded[2]["tokens"], expected[2]["tokens"], rtol=0, atol=0)


def test_padding_follows_the_batch_dimension_of_each_part() -> None:
    """Sequence-first tensors pad along dim 1, per-example lists grow, per-batch constants are kept."""
    def collate(examples: list[tuple[torch.Tensor, int, int]]) -> dict[str, Any]:
        return {"x": torch.stack([x for x, _, _ in examples], dim=1), "idx": [i for _, i, _ in examples],
                "tag": "mine", "vocab": torch.arange(5)}

    loader = _loader(size=30, seed=2, collate_fn=collate, max_physical_batch_size=4)
    for batch in loader:
        info = loader.context.current
        assert batch["x"].shape == (3, 4) and len(batch["idx"]) == 4 and batch["tag"] == "mine"
        assert torch.equal(batch["vocab"], torch.arange(5))
        assert batch["x"][0].long().tolist() == batch["idx"]
        if info.num_real > 0:
            assert batch["idx"][info.num_real :] == [batch["idx"][0]] * (4 - info.num_real)


@pytest.mark.parametrize("output", ["row count", "packed tokens"])
def test_a_batch_without_a_clear_batch_dimension_is_not_padded(output: str) -> None:
    """A collate whose output cannot be padded safely raises, saying to turn padding off (and then works)."""
    def collate(examples: list[tuple[torch.Tensor, int, int]]) -> Any:
        if output == "row count":
            return torch.stack([x for x, _, _ in examples]), len(examples)
        return torch.cat([x[: 1 + i % 2] for x, i, _ in examples])  # variable-length rows, concatenated

    with pytest.raises(ValueError, match="pad_physical_batches=False"):
        list(_loader(seed=3, collate_fn=collate, max_physical_batch_size=4))
    assert list(_loader(seed=3, collate_fn=collate, max_physical_batch_size=4, pad=False))


# ---- 2. exactly uniform subsets ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3, 100, 128, 255, 256])
def test_accepted_words_map_to_every_value_equally_often(n: int) -> None:
    """Over all 2**8 words, every value of range(n) comes from exactly 2**8 // n kept words: no modulo bias."""
    values = _accept_below(torch.arange(256), n, bits=8)
    assert values.numel() == (256 // n) * n
    assert torch.equal(torch.bincount(values, minlength=n), torch.full((n,), 256 // n))


def test_inclusion_is_uniform_where_randint_is_modulo_biased() -> None:
    """N ≈ 2**32 / 16.5: torch.randint(N) draws the indices below r = 2**32 mod N (about half) 3 % too often.

    With ~2·10^5 sampled rows the old bias is about 13 standard deviations; the z-score uses the binomial variance,
    an upper bound for the (hypergeometric) counts of uniform subsets.
    """
    n = int(2**32 / 16.5)
    r = 2**32 % n
    sampler = PoissonBatchSampler(n, 10_000 / n, steps=20, generator=torch.Generator().manual_seed(0))
    batches = [torch.tensor(batch) for batch in sampler]
    total = sum(b.numel() for b in batches)
    below = sum(int((b < r).sum()) for b in batches)
    p = r / n
    z = (below - total * p) / (total * p * (1 - p)) ** 0.5
    assert total > 150_000 and abs(z) < 4.5, z


@pytest.mark.parametrize("k", [4, 5])
def test_large_subsets_are_uniform(k: int) -> None:
    """k > n / 2 (the complement branch): all C(6, k) subsets equally likely (chi-square, p > 1e-4)."""
    generator = torch.Generator().manual_seed(4)
    codes = [sum(1 << i for i in _uniform_subset(6, k, generator).tolist()) for _ in range(15_000)]
    counts = Counter(codes)
    assert all(code.bit_count() == k for code in counts) and len(counts) == math.comb(6, k)
    assert stats.chisquare(list(counts.values())).pvalue > 1e-4
    assert _uniform_subset(6, 6, generator).tolist() == list(range(6))


# ---- 3. state_dict while Opacus' BatchMemoryManager iterates ---------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_state_dict_is_refused_while_batch_memory_manager_iterates(workers: int) -> None:
    """Inside the loop the sampler may be ahead of the trained batch: refuse; after the epoch, resume exactly."""
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    loader = _loader(seed=5, loader_options={"num_workers": workers})
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=2, optimizer=_NoStepOptimizer()) as bmm:
        for position, _ in enumerate(bmm):
            if position in (0, 3):
                with pytest.raises(RuntimeError, match="BatchMemoryManager"):
                    loader.state_dict()
                with pytest.raises(RuntimeError, match="BatchMemoryManager"):
                    loader.load_state_dict({"sampler": {}})
    fresh = _loader(seed=0)
    fresh.load_state_dict(loader.state_dict())
    assert _logical(_rows(fresh)) == _reference(loader, seed=5, epochs=2)[10:]


class _NoStepOptimizer:
    """What BatchMemoryManager needs of an optimizer when nothing is trained."""

    signal_skip_step = staticmethod(lambda do_skip=True: None)


def test_save_checkpoint_inside_a_batch_memory_manager_loop_is_refused() -> None:
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    _model, (engine, pmodel, optimizer, loader) = _private(max_physical_batch_size=None)
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=3, optimizer=optimizer) as bmm:
        for x, y, _ in bmm:
            _train_step(pmodel, optimizer, x, y)
            with pytest.raises(RuntimeError, match="BatchMemoryManager"):
                engine.save_checkpoint(path=io.BytesIO(), module=pmodel, optimizer=optimizer, data_loader=loader)
            break


# ---- 4. a loop left midway, then continued in the same process ------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"num_workers": 2, "prefetch_factor": 4},
                                     {"num_workers": 2, "persistent_workers": True}], ids=["main", "workers", "persistent"])
def test_a_loop_left_midway_continues_at_the_interrupted_logical_batch(options: dict[str, Any]) -> None:
    """The next iteration (a new epoch) starts with the interrupted logical batch, drawn again: the same draws as a
    loader resumed from the state saved after the break, whatever the workers had drawn ahead."""
    loader = _loader(seed=6, max_physical_batch_size=2, loader_options=options)
    reference = _reference(loader, seed=6, epochs=3)
    ends = [i == count - 1 for batch in reference for count in [max(1, math.ceil(len(batch) / 2))] for i in range(count)]
    stop = next(p for p in range(5, len(ends)) if not ends[p - 1])
    first = _rows(loader, stop=stop)  # left inside a logical batch; prefetching workers have drawn beyond it
    assert len(first) == stop and not first[-1][1].is_last
    done = len(_logical(first))
    state = loader.state_dict()
    continued = _logical(_rows(loader))
    resumed = _loader(seed=0, max_physical_batch_size=2)
    resumed.load_state_dict(state)
    assert continued == _logical(_rows(resumed)) == reference[done:done + 10]
    assert _logical(_rows(loader)) == reference[done + 10:done + 20]  # then the next epoch


def test_leaving_every_epoch_after_a_few_logical_batches_starts_full_epochs() -> None:
    """A loop that caps logical batches per epoch (break right after a step) gets a new epoch at every iteration,
    as with any DataLoader, and the draws go on where they stopped."""
    loader = _loader(seed=7, sample_rate=0.2)  # 5 logical batches per epoch: 3 x 2 would run past one
    reference = _reference(loader, seed=7, epochs=2)
    epochs = []
    for _ in range(3):
        rows = []
        for position, (_, idx, _) in enumerate(loader):
            rows.append((idx.tolist(), loader.context.current))
            if position == 1:
                break
        epochs.append(_logical(rows))
    assert [len(e) for e in epochs] == [2, 2, 2]
    assert [batch for e in epochs for batch in e] == reference[:6]


@pytest.mark.filterwarnings("ignore:discarding the clipped gradients")
def test_live_run_and_resumed_run_release_the_same_step() -> None:
    """Break inside a logical batch, save, go on: the live run and a resumed run make the same next update."""
    model, (engine, pmodel, optimizer, loader) = _private(max_physical_batch_size=3)
    for x, y, _ in loader:
        info = loader.context.current
        if info.step == 2 and info.index == 1:
            break
        _train_step(pmodel, optimizer, x, y)
    checkpoint = io.BytesIO()
    engine.save_checkpoint(path=checkpoint, module=pmodel, optimizer=optimizer, data_loader=loader)
    checkpoint.seek(0)
    live = _one_logical_step(model, pmodel, optimizer, loader)
    model2, (engine2, pmodel2, optimizer2, loader2) = _private(max_physical_batch_size=3)
    engine2.load_checkpoint(path=checkpoint, module=pmodel2, optimizer=optimizer2, data_loader=loader2)
    resumed = _one_logical_step(model2, pmodel2, optimizer2, loader2)
    assert live[0] == resumed[0]
    torch.testing.assert_close(live[1], resumed[1], rtol=0, atol=0)


def _private(max_physical_batch_size: int | None) -> tuple[nn.Module, tuple]:
    """A seeded linear model made private over 40 examples (q = 0.2), with seeded sampler and noise."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(40, 3, generator=g, dtype=torch.float64),
                         torch.randn(40, generator=g, dtype=torch.float64), torch.arange(40))
    model = nn.Linear(3, 1).double()
    engine = PrivacyEngine(accountant="rdp")
    pmodel, optimizer, loader = engine.make_private_fast(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), data_loader=DataLoader(data, batch_size=8),
        noise_multiplier=1.0, max_grad_norm=1.0, loss_reduction="sum", noise_generator=torch.Generator().manual_seed(5),
        max_physical_batch_size=max_physical_batch_size,
    )
    loader.batch_sampler.logical.generator.manual_seed(11)
    return model, (engine, pmodel, optimizer, loader)


def _train_step(pmodel: nn.Module, optimizer: Any, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad()
    (0.5 * (pmodel(x).squeeze(1) - y) ** 2).sum().backward()
    optimizer.step()


def _one_logical_step(model: nn.Module, pmodel: nn.Module, optimizer: Any, loader: DPDataLoader):
    """Train one logical batch; return its sorted rows and the parameters after its update."""
    rows = []
    for x, y, idx in loader:
        info = loader.context.current
        _train_step(pmodel, optimizer, x, y)
        rows += _real(idx.tolist(), info)
        if info.is_last:
            break
    return sorted(rows), torch.cat([p.detach().flatten() for p in model.parameters()])


# ---- 5. dataset fingerprints across ranks --------------------------------------------------------------------------
def _tensor_dataset(size: int = 12) -> TensorDataset:
    return TensorDataset(torch.arange(size * 2.0).reshape(size, 2), torch.arange(size))


def test_fingerprint_tells_equal_size_shards_apart() -> None:
    full = _tensor_dataset()
    assert dataset_fingerprint(full) == dataset_fingerprint(_tensor_dataset())
    shards = [Subset(full, range(rank, 12, 2)) for rank in range(2)]
    assert len(shards[0]) == len(shards[1])
    fingerprints = {dataset_fingerprint(d) for d in [full, *shards, Subset(full, range(6)), Subset(full, range(6, 12))]}
    assert len(fingerprints) == 5


class Augmented(Dataset):
    """Nested examples with random augmentations from torch's, NumPy's and Python's global generators."""

    def __len__(self) -> int:
        return 100

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": torch.rand(2, 2) + i, "half": torch.ones(2, dtype=torch.bfloat16), "jitter": np.random.rand(),
                "flip": random.random() < 0.5, "meta": (i, f"ex{i}", None, np.arange(3)), "obj": object()}


def test_fingerprint_is_reproducible_under_random_augmentations_and_leaves_global_rngs_alone() -> None:
    fingerprints = set()
    for seed in (1, 2):
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
        fingerprints.add(dataset_fingerprint(Augmented()))
        assert torch.equal(states[0], torch.get_rng_state())
        assert np.array_equal(states[1], np.random.get_state()[1]) and states[2] == random.getstate()
    assert len(fingerprints) == 1


def _fingerprint_worker(rank: int, world_size: int, init_file: str, queue: Any) -> None:
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        full, shard = _tensor_dataset(), Subset(_tensor_dataset(), range(rank, 12, 2))
        check_same_settings({"dataset size": len(full), "dataset contents": dataset_fingerprint(full)})
        try:
            check_same_settings({"dataset size": len(shard), "dataset contents": dataset_fingerprint(shard)})
            queue.put((rank, None))
        except ValueError as error:
            queue.put((rank, str(error)))
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_passing_equal_size_shards_all_raise(tmp_path: Any) -> None:
    """Two gloo ranks: the same full dataset passes; their own shards of equal size raise on both ranks."""
    errors = {rank: message for rank, (message,) in run_ranks(_fingerprint_worker, tmp_path).items()}
    for message in errors.values():
        assert message and "- dataset contents: rank 0: " in message and "do not shard it yourself" in message
        assert "- dataset size" not in message


# ---- 6. a user's sampler is not kept --------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["subset", "weighted"])
def test_an_ignored_user_sampler_is_warned_about(sampler: str) -> None:
    dataset = IndexDataset(100)
    user = SubsetRandomSampler(range(10)) if sampler == "subset" else WeightedRandomSampler([1.0] * 100, 100)
    with pytest.warns(UserWarning, match=r"WHOLE dataset.*Subset\(dataset, indices\)"):
        DPDataLoader.from_data_loader(DataLoader(dataset, batch_size=5, sampler=user))


@pytest.mark.parametrize("options", [{}, {"shuffle": True}, "distributed"])
def test_whole_dataset_samplers_are_not_warned_about(options: Any) -> None:
    dataset = IndexDataset(100)
    if options == "distributed":
        options = {"sampler": DistributedSampler(dataset, num_replicas=2, rank=0)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader = DPDataLoader.from_data_loader(DataLoader(dataset, batch_size=5, **options))
        DPDataLoader.from_data_loader(loader)
