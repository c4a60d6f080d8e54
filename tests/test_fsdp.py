"""Book-Keeping under FSDP2 (``fully_shard``, gloo on CPU, 2 and 3 spawned processes) against single-process
references: exact noiseless updates in float64, noise once per coordinate, sharded checkpoints, refusals."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rank_scenarios import expect_ok, launch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.data import DataLoader, TensorDataset

from opacus_fast import PrivacyEngine
from opacus_fast.fsdp import load_checkpoint, save_checkpoint

VOCAB, LENGTH, DIM = 11, 5, 6
BOUND = 23.0  # the checkpoint scenario's clip bound: per-example norms of TinyLM on this data are ≈ 15–34
WORLDS = (2, 3)


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.fc(self.norm(h)))


class TinyLM(nn.Module):
    """A token embedding tied to the output head, a position table and a one-element gate used directly (fewer rows
    than ranks: some shards are empty), LayerNorms, two blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(0.3 * torch.randn(LENGTH, DIM))
        self.gate = nn.Parameter(torch.ones(1) * 0.9)
        self.blocks = nn.Sequential(Block(DIM), Block(DIM))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.blocks((self.embed(ids) + self.pos) * self.gate)
        return self.head(self.norm(h))


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean over examples of each example's summed token loss (targets derived from the inputs)."""
    targets = (3 * ids + 1) % VOCAB
    per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return per_token.view(ids.shape).sum(1).mean()


def _dataset(n: int = 40) -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    return TensorDataset(torch.randint(0, VOCAB, (n, LENGTH), generator=g))


def _shard(model: nn.Module, blocks: list[nn.Module], reshard: bool, mixed: bool = False) -> nn.Module:
    """``fully_shard`` each block, then the root."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed else None
    options = {"reshard_after_forward": reshard, **({"mp_policy": policy} if policy else {})}
    for block in blocks:
        fully_shard(block, **options)
    return fully_shard(model, **options)


def _tiny_lm() -> tuple[nn.Module, Callable, Callable]:
    """TinyLM, its blocks, and the loss of a batch of token ids."""
    model = TinyLM().double()
    return model, lambda m: list(m.blocks), lambda m, ids: lm_loss(m(ids), ids)


def _gpt2() -> tuple[nn.Module, Callable, Callable]:
    """A tiny Hugging Face GPT-2 (tied embeddings, position ids (1, T) built inside, Conv1D layers), called the usual
    way, its blocks, and the loss of a batch of token ids."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=8, n_embd=DIM, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).double()
    return model, lambda m: list(m.transformer.h), lambda m, ids: lm_loss(m(input_ids=ids).logits, ids)


MODELS = {"tiny": _tiny_lm, "gpt2": _gpt2}


def _private(model: nn.Module, engine: PrivacyEngine | None = None, **options):
    engine = engine or PrivacyEngine()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=options.pop("lr", 0.5),
                                momentum=options.pop("momentum", 0))
    loader = DataLoader(_dataset(), batch_size=8)
    return engine, engine.make_private_fast(module=model, optimizer=optimizer, data_loader=loader, **options)


def _reference_sum(model: nn.Module, loss: Callable, rows: torch.Tensor,
                   bound: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """sum_i min(1, C/(||G_i||+1e-6)) G_i over ``rows``, one example at a time, in this process alone, and the
    per-example norms."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    for i in range(rows.shape[0]):
        grads = torch.autograd.grad(loss(model, rows[i:i + 1]), list(params.values()))
        norms.append(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
        factor = (bound / (norms[-1] + 1e-6)).clamp(max=1.0)
        for n, g in zip(params, grads):
            total[n] += factor * g
    return total, torch.stack(norms) if norms else torch.zeros(0)


def _gather_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """The global batch (the ranks' real rows, in rank order) and each rank's number of rows."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, torch.cat(rows))
    return torch.cat(parts), [len(part) for part in parts]


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.full_tensor().detach().clone() for n, t in model.state_dict().items()}


def _run(model: nn.Module, optimizer, loader, steps: int, on_step: Callable | None = None,
         loss: Callable = lambda m, ids: lm_loss(m(ids), ids)) -> None:
    """``steps`` logical steps of the usual loop; ``on_step(global real rows, rows per rank)`` after each."""
    rows, done = [], 0
    for (ids,) in loader:
        info = loader.context.current
        rows.append(ids if info.mask is None else ids[info.mask])
        optimizer.zero_grad()
        loss(model, ids).backward()
        optimizer.step()
        if not info.is_last:
            continue
        if on_step is not None:
            on_step(*_gather_rows(rows))
        rows, done = [], done + 1
        if done == steps:
            return
    raise AssertionError("the loader ended early")


# ---- scenarios (run on every rank) ---------------------------------------------------------------------------------
def scenario_exact(rank: int, *, reshard: bool, physical: int | None, mixed: bool = False, rate: float = 0.2,
                   steps: int = 3, want_empty: bool = False, model: str = "tiny", frozen: tuple[str, ...] = ()) -> None:
    """Noiseless: each update == the single-process clipped sum over the union of the ranks' rows / N·q, with the
    clip bound at the median per-example norm of the data (some examples clipped, some not); ``frozen``: parameters
    that do not train (and get no gradient)."""
    torch.manual_seed(0)
    reference, blocks, loss = MODELS[model]()
    for name in frozen:
        reference.get_parameter(name).requires_grad_(False)
    bound = _reference_sum(reference, loss, _dataset().tensors[0][:9], 1.0)[1].median().item()
    sharded = copy.deepcopy(reference)
    _shard(sharded, blocks(sharded), reshard, mixed)
    _, (pmodel, optimizer, loader) = _private(sharded, noise_multiplier=0.0, max_grad_norm=bound, sample_rate=rate,
                                              max_physical_batch_size=physical)
    clipped, unclipped, empty_seen = 0, 0, False

    def check(rows: torch.Tensor, sizes: list[int]) -> None:
        nonlocal clipped, unclipped, empty_seen
        empty_seen |= min(sizes) == 0 < max(sizes)
        expected, norms = _reference_sum(reference, loss, rows, bound)
        errors, squares = [], []
        for name, p in sharded.named_parameters():
            if not p.requires_grad:
                assert p.grad is None, f"frozen {name} got a gradient"
                continue
            want = expected[name] / loader.expected_batch_size
            got = p.grad.full_tensor()
            errors.append((got - want).norm() ** 2)
            squares.append(want.norm() ** 2)
            if not mixed:
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
        if mixed:  # bf16 forward and backward: close, not exact
            assert (sum(errors) / sum(squares)).sqrt() < 0.05, (sum(errors) / sum(squares)).sqrt()
        clipped, unclipped = clipped + int((norms > bound).sum()), unclipped + int((norms <= bound).sum())
        reference.load_state_dict(_full(sharded))

    _run(pmodel, optimizer, loader, steps, check, loss)
    assert clipped and unclipped, f"{clipped} clipped and {unclipped} unclipped examples"
    assert empty_seen or not want_empty, "no step had an empty rank next to a non-empty one: change the seed"


def scenario_noise(rank: int) -> None:
    """σ = 1: the gathered noise has std σ·C / N·q over all coordinates, none noised twice or never, and the shards'
    streams are independent (different per rank, reproducible from the seed)."""
    torch.manual_seed(1)
    width = 48
    reference = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width)).double()

    def noise_of_one_step(seed: int) -> torch.Tensor:
        model = copy.deepcopy(reference)
        fully_shard(model[0])
        fully_shard(model)
        engine = PrivacyEngine()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        data = TensorDataset(torch.randn(32, width, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
        pmodel, optimizer, loader = engine.make_private_fast(
            module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=8), noise_multiplier=1.0,
            max_grad_norm=1.0, sample_rate=0.25)
        torch.manual_seed(seed)
        (x,) = next(iter(loader))
        optimizer.zero_grad()
        pmodel(x).pow(2).sum(1).mean().backward()
        signal = torch.cat([s.full_tensor().reshape(-1) for s in (p.summed_grad for p in model.parameters())])
        optimizer.step()
        grads = torch.cat([p.grad.full_tensor().reshape(-1) for p in model.parameters()])
        return grads * loader.expected_batch_size - signal

    noise = noise_of_one_step(seed=11)
    n = noise.numel()
    assert (noise != 0).all(), "coordinates without noise"
    # the sample std of n normals is within 5/sqrt(2n) (5 standard errors) of σ·C = 1 with near certainty; one
    # coordinate in ten noised twice would raise it by 5 %
    assert abs(noise.std().item() - 1.0) < 5 / math.sqrt(2 * n), noise.std()
    assert abs(noise.mean().item()) < 5 / math.sqrt(n)
    again = noise_of_one_step(seed=11)
    torch.testing.assert_close(again, noise, rtol=0, atol=1e-12, msg="the same seed gave other noise")
    other = noise_of_one_step(seed=12)
    assert (other - noise).abs().min() > 0, "another seed gave some of the same noise"
    # independence between shards: rank r's part of the first weight's noise against rank 0's
    rows = width // dist.get_world_size()
    first = noise[: width * width].view(width, width)
    for r in range(1, dist.get_world_size()):
        a, b = first[:rows].reshape(-1), first[r * rows:(r + 1) * rows].reshape(-1)
        correlation = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert abs(correlation) < 5 / math.sqrt(a.numel()), f"rank {r}'s noise correlates with rank 0's"


def scenario_checkpoint(rank: int, out_dir: str) -> None:
    """Save after 2 noisy steps, run 2 more; a fresh model, optimizer and loader loaded from the sharded checkpoint
    run the same 2 steps: same batches, noise, parameters and ε."""
    path = f"{out_dir}/sharded-checkpoint"

    def fresh():
        torch.manual_seed(3)
        model = TinyLM().double()
        _shard(model, list(model.blocks), reshard=True)
        engine, parts = _private(model, noise_multiplier=1.0, max_grad_norm=BOUND, sample_rate=0.2,
                                 max_physical_batch_size=4, momentum=0.9)
        return engine, model, parts

    engine, model, (pmodel, optimizer, loader) = fresh()
    _run(pmodel, optimizer, loader, 2)
    save_checkpoint(engine, path=path, module=pmodel, optimizer=optimizer, data_loader=loader)
    batches = []
    _run(pmodel, optimizer, loader, 2, lambda rows, _: batches.append(rows))
    expected, epsilon = _full(model), engine.get_epsilon(1e-5)

    engine2, model2, (pmodel2, optimizer2, loader2) = fresh()
    _run(pmodel2, optimizer2, loader2, 1)  # drift away first: the load must restore everything
    load_checkpoint(engine2, path=path, module=pmodel2, optimizer=optimizer2, data_loader=loader2)
    resumed = []
    _run(pmodel2, optimizer2, loader2, 2, lambda rows, _: resumed.append(rows))
    assert all(torch.equal(a, b) for a, b in zip(batches, resumed)), "other batches after resuming"
    got = _full(model2)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
    assert engine2.get_epsilon(1e-5) == epsilon


def scenario_errors(rank: int) -> None:
    """Refusals, each leaving the model as it was."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    torch.manual_seed(0)
    model = TinyLM().double()
    _shard(model, list(model.blocks), reshard=True)
    with pytest.raises(ValueError, match="poisson_sampling=True"):
        _private(model, noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
    engine, (pmodel, optimizer, loader) = _private(model, noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="opacus_fast.fsdp.save_checkpoint"):
        engine.save_checkpoint(path="unused.pt", module=pmodel, optimizer=optimizer, data_loader=loader)
    pmodel.cleanup()

    class FSDP1(FullyShardedDataParallel):
        """FSDP1 cannot be built without an accelerator: a module that is one by its type only."""

        __getattr__ = nn.Module.__getattr__

        def __init__(self) -> None:
            nn.Module.__init__(self)

    with pytest.raises(ValueError, match=r"FSDP1.*fully_shard"):
        _private(nn.Sequential(nn.Linear(3, 3), FSDP1()), noise_multiplier=1.0, max_grad_norm=1.0)

    from torch.distributed.tensor import Shard

    other = fully_shard(nn.Sequential(nn.Linear(6, 6)), shard_placement_fn=lambda p: Shard(p.dim() - 1))
    with pytest.raises(ValueError, match=r"'0\.weight'.*dim 0"):
        _private(other, noise_multiplier=1.0, max_grad_norm=1.0)

    mismatch = TinyLM().double()
    _shard(mismatch, list(mismatch.blocks), reshard=True)
    with pytest.raises(ValueError, match="physical batches"):
        _private(mismatch, noise_multiplier=1.0, max_grad_norm=1.0, max_physical_batch_size=3 + rank)


def _scenarios(world: int, ports: tuple[int, int], out_dir: str) -> dict[str, Callable[[int], None]]:
    wide = world == 3
    return {
        "exact": lambda r: scenario_exact(r, reshard=not wide, physical=3),
        "exact_whole": lambda r: scenario_exact(r, reshard=wide, physical=None),
        "empty": lambda r: scenario_exact(r, reshard=True, physical=None, rate=2 / 40, steps=8, want_empty=True),
        "frozen": lambda r: scenario_exact(r, reshard=True, physical=3, steps=2,
                                           frozen=("embed.weight", "blocks.0.fc.weight", "norm.bias")),
        "mixed": lambda r: scenario_exact(r, reshard=True, physical=4, mixed=True),
        "batch_eq_length": lambda r: scenario_exact(r, reshard=wide, physical=LENGTH, steps=2),
        "gpt2": lambda r: scenario_exact(r, reshard=not wide, physical=LENGTH, steps=2, model="gpt2"),
        "noise": scenario_noise,
        "checkpoint": lambda r: scenario_checkpoint(r, out_dir),
        "errors": scenario_errors,
    }


# ---- the tests (main process) -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def all_results(tmp_path_factory):
    return launch(_scenarios, WORLDS, tmp_path_factory.mktemp("fsdp"), deadline_s=300)


@pytest.fixture(params=WORLDS, ids=lambda w: f"{w}ranks")
def ranks(request, all_results):
    return request.param, all_results[request.param]


def test_noiseless_update_equals_single_process_update(ranks) -> None:
    """float64, padded physical batches of 3, a tied parameter, LayerNorms, parameters used directly."""
    expect_ok(ranks, "exact")


def test_noiseless_update_with_whole_local_batches(ranks) -> None:
    expect_ok(ranks, "exact_whole")


def test_empty_local_batches_still_take_part(ranks) -> None:
    """Unpadded: a rank with no examples runs a forward and backward on zero rows and joins the reduce-scatter."""
    expect_ok(ranks, "empty")


def test_physical_batch_equal_to_sequence_length(ranks) -> None:
    """Padded physical batches of LENGTH rows: the (LENGTH, DIM) position table has as many rows as the batch."""
    expect_ok(ranks, "batch_eq_length")


def test_hugging_face_gpt2_exact(ranks) -> None:
    """GPT-2 called as model(input_ids=...): tied embeddings, (1, T) position ids, Conv1D; one unit per block;
    padded physical batches as long as the sequences."""
    expect_ok(ranks, "gpt2")


def test_frozen_parameters_inside_units(ranks) -> None:
    """As with LoRA: a frozen tied embedding, a frozen weight next to a trainable bias, a frozen LayerNorm bias."""
    expect_ok(ranks, "frozen")


def test_mixed_precision_bf16_params_fp32_reduce(ranks) -> None:
    expect_ok(ranks, "mixed")


def test_noise_once_per_coordinate_from_independent_streams(ranks) -> None:
    expect_ok(ranks, "noise")


def test_sharded_checkpoint_resumes_exactly(ranks) -> None:
    expect_ok(ranks, "checkpoint")


def test_unsupported_setups_are_refused(ranks) -> None:
    expect_ok(ranks, "errors")
