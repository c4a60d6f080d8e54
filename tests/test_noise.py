"""The optimizer's noise: one flat draw for all parameters, exactly N(0, std²) per coordinate, independent."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

import opacus_fast.optimizer
from opacus_fast.optimizer import add_gaussian_noise, filled_buffers

SHAPES = [(300, 70), (70,), (3, 5, 7, 11), (1,), (4096,)]


def _draw(std: float, secure_mode: bool, seed: int = 3) -> list[torch.Tensor]:
    """Noise alone (added to zeros) for parameters of several shapes, two dtypes (two groups, two draws)."""
    tensors = [torch.zeros(s, dtype=torch.float64 if i % 2 else torch.float32) for i, s in enumerate(SHAPES)]
    add_gaussian_noise(tensors, std, torch.Generator().manual_seed(seed), secure_mode)
    return tensors


@pytest.mark.parametrize("chunk", [2**21, 1000], ids=["one_stream", "parallel_chunks"])
@pytest.mark.parametrize("bucket", [2**24, 5000], ids=["one_bucket", "several_buckets"])
@pytest.mark.parametrize("secure_mode", [False, True])
def test_flat_noise_is_normal_with_the_given_std(secure_mode: bool, bucket: int, chunk: int, monkeypatch) -> None:
    """Also with buckets smaller than some parameters (those are drawn alone) and than their sum, and drawn in
    parallel chunks from generators of their own."""
    monkeypatch.setattr(opacus_fast.optimizer, "NOISE_BUCKET_NUMEL", bucket)
    monkeypatch.setattr(opacus_fast.optimizer, "NOISE_CHUNK_NUMEL", chunk)
    std = 2.5
    tensors = _draw(std, secure_mode)
    values = torch.cat([t.reshape(-1).double() for t in tensors])
    n = values.numel()
    # under N(0, std²): mean ~ N(0, std²/n), sample variance / std² ~ 1 ± sqrt(2/n); 5 standard errors each
    assert abs(values.mean().item()) < 5 * std / math.sqrt(n)
    assert abs(values.var().item() / std**2 - 1) < 5 * math.sqrt(2 / n)
    # the whole distribution, not only two moments (fixed seed: deterministic; a false alarm has p = 1e-4)
    assert stats.kstest(values.numpy() / std, "norm").pvalue > 1e-4
    for t in tensors:  # every parameter gets noise of its own dtype, none is left out or scaled differently
        assert t.dtype in (torch.float32, torch.float64)
        if t.numel() >= 1000:
            assert abs(t.double().std().item() / std - 1) < 5 / math.sqrt(2 * t.numel())


def test_flat_noise_is_independent_across_parameters_and_steps() -> None:
    gen = torch.Generator().manual_seed(11)
    a, b = torch.zeros(20_000), torch.zeros(20_000)
    add_gaussian_noise([a, b], 1.0, gen, False)
    again = torch.zeros(20_000)
    add_gaussian_noise([again], 1.0, gen, False)
    bound = 5 / math.sqrt(20_000)  # correlation of independent samples ~ N(0, 1/n)
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < bound
    assert abs(torch.corrcoef(torch.stack([a, again]))[0, 1].item()) < bound


def test_noise_is_added_in_place_once() -> None:
    sums = [torch.arange(12.0).reshape(3, 4), torch.ones(5, dtype=torch.float64)]
    expected = [s.clone() for s in sums]
    add_gaussian_noise(sums, 0.7, torch.Generator().manual_seed(2), False)
    noise = [s - e for s, e in zip(sums, expected)]
    replay = torch.Generator().manual_seed(2)  # one draw per dtype group, in the tensors' order
    torch.testing.assert_close(noise[0].reshape(-1), torch.normal(0, 0.7, (12,), generator=replay), rtol=0, atol=1e-6)
    torch.testing.assert_close(noise[1], torch.normal(0, 0.7, (5,), generator=replay, dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_zero_std_adds_nothing_and_draws_nothing() -> None:
    gen = torch.Generator().manual_seed(4)
    state = gen.get_state()
    sums = [torch.arange(6.0)]
    add_gaussian_noise(sums, 0.0, gen, False)
    assert torch.equal(sums[0], torch.arange(6.0)) and torch.equal(gen.get_state(), state)


def test_filled_buffers_reuse_what_fits_and_copy_the_sums() -> None:
    """A zeroed gradient of the right shape and dtype is reused; the others are new; the values are the sums (zeros
    where there is none), whatever the buffers held before."""
    like = [torch.ones(3, 2), torch.ones(4), torch.ones(5, dtype=torch.float64)]
    current = [torch.full((3, 2), 7.0), torch.full((2, 2), 7.0), None]
    sums = [torch.arange(6.0).view(3, 2), torch.arange(4.0), None]
    out = filled_buffers(current, sums, like)
    assert out[0] is current[0] and out[1] is not current[1] and out[2] is not None
    torch.testing.assert_close(out[0], sums[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1], sums[1], rtol=0, atol=0)
    torch.testing.assert_close(out[2], torch.zeros(5, dtype=torch.float64), rtol=0, atol=0)
    assert out[1].shape == like[1].shape and out[1] is not sums[1]


@pytest.mark.parametrize("bucket", [2**24, 50], ids=["one_bucket", "several_buckets"])
def test_cleared_and_zeroed_gradients_get_the_same_noisy_step(bucket: int, monkeypatch) -> None:
    """After zero_grad(set_to_none=True) the noise draw itself becomes p.grad; after zero_grad(set_to_none=False) the
    zeroed gradients are reused: the same seed must give bit-identical gradients, sum + noise once, either way."""
    monkeypatch.setattr(opacus_fast.optimizer, "NOISE_BUCKET_NUMEL", bucket)
    from opacus_fast import PrivacyEngine

    grads = {}
    for set_to_none in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3, bias=False))
        model[0].bias.requires_grad_(False)  # a frozen one among them
        data = torch.utils.data.TensorDataset(torch.randn(64, 6), torch.randint(0, 3, (64,)))
        engine = PrivacyEngine()
        model, optimizer, loader = engine.make_private_fast(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=torch.utils.data.DataLoader(data, batch_size=16), noise_multiplier=1.3, max_grad_norm=0.5,
            noise_generator=torch.Generator().manual_seed(5))
        steps = []
        for i, (x, y) in enumerate(loader):
            optimizer.zero_grad(set_to_none=set_to_none)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            steps.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
            if i == 2:
                break
        grads[set_to_none] = steps
    for cleared, zeroed in zip(grads[True], grads[False]):
        for a, b in zip(cleared, zeroed):
            assert torch.equal(a, b)


def test_parallel_chunks_are_independent_and_reproducible_on_any_thread_count(monkeypatch) -> None:
    """Chunks drawn in parallel come from generators seeded by the caller's: the same seed gives the same noise with
    one thread or several, the chunks are uncorrelated, and the caller's generator moves on (the next draw differs)."""
    monkeypatch.setattr(opacus_fast.optimizer, "NOISE_CHUNK_NUMEL", 20_000)
    threads = torch.get_num_threads()
    draws = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            gen = torch.Generator().manual_seed(7)
            first, second = torch.zeros(100_000), torch.zeros(100_000)
            add_gaussian_noise([first], 1.0, gen, False)
            add_gaussian_noise([second], 1.0, gen, False)
            draws.append((first, second))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    first, second = draws[0]
    chunks = first.view(5, 20_000)
    bound = 5 / math.sqrt(20_000)
    corr = torch.corrcoef(torch.cat([chunks, second.view(5, 20_000)]))
    assert (corr - torch.eye(10)).abs().max().item() < bound


def test_parallel_chunks_are_drawn_in_a_forked_child(monkeypatch) -> None:
    """A process forked after drawing in parallel (a rank, a worker) has none of its parent's threads: it must still
    draw, with the same noise for the same seed."""
    import multiprocessing

    monkeypatch.setattr(opacus_fast.optimizer, "NOISE_CHUNK_NUMEL", 1000)
    parent = torch.zeros(5000)
    add_gaussian_noise([parent], 1.0, torch.Generator().manual_seed(3), False)  # the parent's pool now exists
    context = multiprocessing.get_context("fork")
    queue = context.Queue()

    def child() -> None:
        t = torch.zeros(5000)
        add_gaussian_noise([t], 1.0, torch.Generator().manual_seed(3), False)
        queue.put(t.numpy())

    process = context.Process(target=child)
    process.start()
    drawn = queue.get(timeout=60)
    process.join(timeout=60)
    assert process.exitcode == 0 and torch.equal(torch.from_numpy(drawn), parent)
