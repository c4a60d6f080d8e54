"""The BK clipped sum equals the exact per-example reference (Opacus' microbatch oracle), in float64."""

from __future__ import annotations

import pytest
import torch
from models import RepeatedCall, TiedLM, TinyTransformer, cnn1d, cnn2d, cnn3d, linear4d, mlp
from opacus.utils.per_sample_gradients_utils import compute_microbatch_grad_sample
from oracle import RTOL, assert_exact, bk_clipped_sum, l1_loss, loop_clipped_sum, median_bound, reference_clipped_sum
from torch import nn

from opacus_fast.clipping import ClipBound
from opacus_fast.engine import BKEngine, bk
from opacus_fast.grad_sample import scale_examples, scratch_space
from opacus_fast.grad_sample.linear import (
    BLOCK_TOKENS,
    SPLIT_MIN_TOKENS,
    ghost_sq_norm,
    split_pays,
    split_point,
)


def _inputs(name: str, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    shapes = {
        "mlp": (batch, 7),
        "cnn2d": (batch, 3, 12, 12),
        "cnn1d": (batch, 2, 16),
        "cnn3d": (batch, 2, 3, 8, 8),
        "linear4d": (batch, 3, 4, 5),
        "repeated": (batch, 6),
    }
    if name in shapes:
        return torch.randn(*shapes[name], generator=g, dtype=torch.float64)
    ids = torch.randint(1, 9, (batch, 6), generator=g)
    ids[0, 4:] = 0  # padding_idx positions
    ids[1, :2] = ids[1, 2]  # a repeated token within one example
    return ids


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    factories = {
        "mlp": mlp, "cnn2d": cnn2d, "cnn1d": cnn1d, "cnn3d": cnn3d, "linear4d": linear4d,
        "transformer": TinyTransformer, "tied": TiedLM, "repeated": RepeatedCall,
    }
    return factories[name]().double()


@pytest.mark.parametrize("name", ["mlp", "cnn2d", "cnn1d", "cnn3d", "linear4d", "transformer", "tied", "repeated"])
@pytest.mark.parametrize("loss_reduction", ["sum", "mean"])
def test_small_models_exact(name: str, loss_reduction: str) -> None:
    assert_exact(_model(name), _inputs(name, 6), loss_reduction)


def test_ghost_and_instantiated_paths_agree() -> None:
    """Long sequences force ghost norms, short ones instantiation: both must be exact."""
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(3, 40), nn.Tanh(), nn.Linear(40, 2)).double()
    for tokens in (2, 30):  # first layer: 2T^2 = 8 < p*d = 120 (ghost), 1800 > 120 (instantiated)
        x = torch.randn(5, tokens, 3, dtype=torch.float64)
        assert_exact(wide, x)


@pytest.mark.parametrize(
    "tokens",
    [1, 2, 15, SPLIT_MIN_TOKENS - 1, SPLIT_MIN_TOKENS, SPLIT_MIN_TOKENS + 1,
     SPLIT_MIN_TOKENS + BLOCK_TOKENS - 1, SPLIT_MIN_TOKENS + BLOCK_TOKENS, 3 * SPLIT_MIN_TOKENS + 5],
)
def test_ghost_norm_equals_instantiated_norm(tokens: int) -> None:
    """The Gram identity, whole or split into symmetric blocks, against the norm of g_i^T a_i itself."""
    gen = torch.Generator().manual_seed(tokens)
    a = torch.randn(4, tokens, 300, generator=gen, dtype=torch.float64)
    g = torch.randn(4, tokens, 200, generator=gen, dtype=torch.float64)
    assert split_pays(a, g) == (tokens >= SPLIT_MIN_TOKENS)  # on the CPU, at these widths: both paths are tested
    expected = torch.einsum("btp,btd->bpd", g, a).pow(2).sum(dim=(1, 2))
    torch.testing.assert_close(ghost_sq_norm(a, g), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("tokens", range(SPLIT_MIN_TOKENS, SPLIT_MIN_TOKENS + 3 * BLOCK_TOKENS))
def test_split_point_leaves_an_aligned_lower_half(tokens: int) -> None:
    cut = split_point(tokens)
    lower = tokens - cut
    assert lower % BLOCK_TOKENS == 0 and 0 < lower <= cut
    assert cut - lower < 2 * BLOCK_TOKENS  # close to the middle: about a quarter of the Gram left out


def test_split_gram_path_is_exact_end_to_end() -> None:
    """A layer with T > SPLIT_MIN_TOKENS and 2T^2 < p*d (200 x 200) takes the split-Gram ghost path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(), nn.Linear(200, 2)).double()
    x = torch.randn(5, SPLIT_MIN_TOKENS + 1, 4, dtype=torch.float64)
    assert split_pays(torch.empty(5, SPLIT_MIN_TOKENS + 1, 200), torch.empty(5, SPLIT_MIN_TOKENS + 1, 200))
    assert_exact(model, x)


def test_scaled_examples_reuse_one_tensor_only_inside_a_scratch_space() -> None:
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    f = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    expected = x * f[:, None, None]
    assert scale_examples(x, f).data_ptr() != scale_examples(x, f).data_ptr()
    with scratch_space():
        first = scale_examples(x, f)
        torch.testing.assert_close(first, expected, rtol=0, atol=0)
        second = scale_examples(x, 3 * f)
        assert second.data_ptr() == first.data_ptr()
        torch.testing.assert_close(second, 3 * expected, rtol=0, atol=0)


def test_frozen_parameters_are_skipped() -> None:
    model = _model("mlp")
    model[0].weight.requires_grad_(False)
    x = _inputs("mlp", 6)
    expected = loop_clipped_sum(model, x, 0.5)
    got = bk_clipped_sum(model, x, 0.5)
    assert set(got) == set(expected) and "0.weight" not in got
    for name, ref in expected.items():
        assert (got[name] - ref).norm() <= RTOL * ref.norm(), name
    assert getattr(model[0].weight, "summed_grad", None) is None and model[0].weight.grad is None


def test_timm_vit_exact() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2, num_classes=3, reg_tokens=2, init_values=0.1
    ).double()
    assert_exact(model, torch.randn(4, 3, 16, 16, dtype=torch.float64))


def test_timm_deit_distilled_exact() -> None:
    """DeiT's distillation token is handled by its own ``_pos_embed`` unit, like the class token."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "deit_tiny_distilled_patch16_224", img_size=16, patch_size=8, depth=2, num_classes=3
    ).double()
    assert_exact(model, torch.randn(4, 3, 16, 16, dtype=torch.float64))


@pytest.mark.parametrize("source", ["timm", "torchvision"])
def test_resnet18_exact(source: str) -> None:
    from opacus.validators import ModuleValidator

    torch.manual_seed(0)
    if source == "timm":
        timm = pytest.importorskip("timm")
        model = timm.create_model("resnet18", num_classes=3)
    else:
        torchvision = pytest.importorskip("torchvision")
        model = torchvision.models.resnet18(num_classes=3)
    model = ModuleValidator.fix(model).double()
    assert_exact(model, torch.randn(3, 3, 32, 32, dtype=torch.float64), "mean")


@pytest.mark.parametrize("name", ["mlp", "cnn2d", "cnn1d", "cnn3d", "linear4d", "transformer", "tied", "repeated"])
def test_empty_batch_runs_through_every_layer_family(name: str) -> None:
    """An unpadded empty Poisson batch: forward and backward work and nothing is added (a noise-only step)."""
    model = _model(name)
    x = _inputs(name, 6)[:0]
    params = [p for p in model.parameters() if p.requires_grad]
    engine = BKEngine(model, bound=ClipBound(1.0))
    try:
        model(x).sum().backward()
    finally:
        engine.detach()
    assert all(getattr(p, "summed_grad", None) is None and p.grad is None for p in params)


def _per_layer_reference(model: nn.Module, x: torch.Tensor, bounds: dict[str, float]) -> dict[str, torch.Tensor]:
    """``{name: sum_i min(1, C_name/(||G_i(name)||+1e-6)) G_i(name)}`` from Opacus' microbatch per-sample gradients."""
    grads = compute_microbatch_grad_sample(x, model, loss_reduction="sum")
    out = {}
    for name, g in grads.items():
        norms = g.reshape(g.shape[0], -1).norm(dim=1)
        out[name] = torch.einsum("b,b...->...", (bounds[name] / (norms + 1e-6)).clamp(max=1.0), g)
    return out


@pytest.mark.parametrize("name", ["transformer", "repeated", "cnn2d"])
def test_per_layer_clipping_exact(name: str) -> None:
    """Per-layer bounds: every parameter's own factor, through rules, eager norm layers, units and repeated uses."""
    assert_per_layer_exact(_model(name), _inputs(name, 6))


def assert_per_layer_exact(model: nn.Module, x: torch.Tensor) -> None:
    """Per-layer bounds at each parameter's median per-example norm (some examples clipped, some not, per layer):
    every parameter's clipped sum against the microbatch oracle's."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    norms = {n: g.reshape(g.shape[0], -1).norm(dim=1)
             for n, g in compute_microbatch_grad_sample(x, model, loss_reduction="sum").items()}
    bounds = {n: float(v.median()) + 1e-9 for n, v in norms.items()}
    expected = _per_layer_reference(model, x, bounds)
    engine = BKEngine(model, bound=ClipBound([bounds[n] for n in params], list(params.values())), loss_reduction="sum")
    try:
        l1_loss(model(x), "sum").backward()
    finally:
        engine.detach()
    total = torch.sqrt(sum(r.pow(2).sum() for r in expected.values()))
    for n, p in params.items():  # as in assert_exact: a vanishing true gradient is compared to the total's scale
        err = (p.summed_grad - expected[n]).norm() / torch.maximum(expected[n].norm(), 1e-6 * total)
        assert err <= RTOL, f"{n}: relative error {err:.2e}"


def test_physical_batches_accumulate_exactly() -> None:
    """Two backward passes: the second adds (one foreach kernel) into sums that share one block's buffer."""
    model, x = _model("transformer"), _inputs("transformer", 6)
    bound = median_bound(reference_clipped_sum(model, x, 1.0)[1])
    first, _ = reference_clipped_sum(model, x[:3], bound)
    second, _ = reference_clipped_sum(model, x[3:], bound)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    engine = BKEngine(model, bound=ClipBound(bound), loss_reduction="sum")
    try:
        l1_loss(model(x[:3]), "sum").backward()
        l1_loss(model(x[3:]), "sum").backward()
    finally:
        engine.detach()
    for n, p in params.items():
        ref = first[n] + second[n]
        assert (p.summed_grad - ref).norm() <= RTOL * ref.norm().clamp(min=1e-12), n
        p.summed_grad = None


def test_large_per_example_gradients_are_clipped_outside_the_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-example gradients above ``BLOCK_NUMEL`` are handled alone (not copied into the block): still exact."""
    monkeypatch.setattr(bk, "BLOCK_NUMEL", 7)
    for name in ("transformer", "tied"):
        assert_exact(_model(name), _inputs(name, 6))


def test_channels_last_group_norm_exact() -> None:
    """GroupNorm's fused per-example kernel reads its input as (1, B*C, HW): a channels-last input is copied first."""
    model = _model("cnn2d").to(memory_format=torch.channels_last)
    assert_exact(model, _inputs("cnn2d", 6).contiguous(memory_format=torch.channels_last))


@pytest.fixture
def sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of calls in each stack the engine builds, in order."""
    built: list[int] = []
    of = bk._Stack.of.__func__
    monkeypatch.setattr(bk._Stack, "of", classmethod(lambda cls, recs, names: built.append(len(recs)) or
                                                     of(cls, recs, names)))
    return built


class SameShapeLayers(nn.Module):
    """Layers of equal shapes, whose calls the engine stacks into one computation (two without a bias, which stack
    apart from those with one)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(6, 6, bias=i % 3 != 2) for i in range(6)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


@pytest.mark.parametrize("tokens", [1, 3, 30])  # one token, ghost norms (2T² < 36), instantiated per-example grads
@pytest.mark.parametrize("run", [1, 2, 4])  # layers a stack may hold (bytes of their saved input and output grad)
def test_stacked_layers_exact(tokens: int, run: int, monkeypatch: pytest.MonkeyPatch, sizes: list[int]) -> None:
    """Calls stacked across layers give each layer its own exact clipped sum, under flat and per-layer clipping."""
    monkeypatch.setattr(bk, "STACK_BYTES", run * 2 * 3 * tokens * 6 * 8)
    monkeypatch.setattr(bk, "STACK_FRACTION", 0)
    monkeypatch.setitem(bk.STACK_CALL_BYTES, "cpu", 2**30)
    torch.manual_seed(0)
    model = SameShapeLayers().double()
    x = torch.randn(3, tokens, 6, dtype=torch.float64)  # batch 3 = tokens 3 in one case
    assert_exact(model, x)
    assert max(sizes) == run  # the four layers with a bias stack as far as the bytes allow
    assert_per_layer_exact(model, x)


def test_stacks_hold_at_most_a_fraction_of_the_saved_bytes(monkeypatch: pytest.MonkeyPatch, sizes: list[int]) -> None:
    """A stack is a copy made while its calls' tensors are held: it is bounded by a fraction of all saved bytes."""
    monkeypatch.setattr(bk, "STACK_BYTES", 1)
    monkeypatch.setattr(bk, "STACK_FRACTION", 1 / 3)  # six equal calls: a third of them is two
    monkeypatch.setitem(bk.STACK_CALL_BYTES, "cpu", 2**30)
    torch.manual_seed(0)
    assert_exact(SameShapeLayers().double(), torch.randn(4, 5, 6, dtype=torch.float64))
    assert max(sizes) == 2


def test_calls_too_large_to_copy_cheaply_are_not_stacked(monkeypatch: pytest.MonkeyPatch, sizes: list[int]) -> None:
    """Copying a call into a stack must cost less than the launches it saves: larger calls are computed alone."""
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    monkeypatch.setitem(bk.STACK_CALL_BYTES, "cpu", 2 * x.numel() * 8 - 1)  # saved input + output gradient
    torch.manual_seed(0)
    assert_exact(SameShapeLayers().double(), x)
    assert sizes and max(sizes) == 1


@pytest.mark.parametrize("stacked", [True, False])
def test_parameters_frozen_after_attaching_stay_out_of_the_norms(stacked: bool, monkeypatch) -> None:
    """A bias frozen after attaching, beside a trainable weight, in layers that are stacked and layers computed alone
    (convolutions, and Linear calls too large to stack): its gradient is neither clipped nor counted in the norms."""
    if not stacked:
        monkeypatch.setitem(bk.STACK_CALL_BYTES, "cpu", 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Tanh(), nn.Flatten(1), nn.Linear(56, 6), nn.Tanh(),
                          nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)).double()
    x = torch.randn(5, 2, 16, dtype=torch.float64)
    biases = [model[i].bias for i in (0, 3, 5)]
    for b in biases:
        b.requires_grad_(False)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    norms = torch.stack([  # each example's norm over the trainable parameters (batch-of-one backward passes)
        torch.sqrt(sum(g.pow(2).sum() for g in torch.autograd.grad(l1_loss(model(x[i:i + 1]), "sum"),
                                                                   list(params.values()))))
        for i in range(len(x))])
    bound = median_bound(norms)
    expected = loop_clipped_sum(model, x, bound)
    for b in biases:
        b.requires_grad_(True)
    engine = BKEngine(model, bound=ClipBound(bound), loss_reduction="sum")
    try:
        for b in biases:  # frozen after attaching: still among the layers' parameters the engine planned
            b.requires_grad_(False)
        l1_loss(model(x), "sum").backward()
    finally:
        engine.detach()
    assert set(expected) == set(params)
    for name, ref in expected.items():
        assert (params[name].summed_grad - ref).norm() <= RTOL * ref.norm(), name
    assert all(getattr(b, "summed_grad", None) is None for b in biases)


def test_stacked_layers_under_bf16_autocast_stay_close_to_the_float32_reference(sizes: list[int]) -> None:
    """Under autocast the stacked inputs are float32 and the output gradients bfloat16: norms in float32, sums close
    to the exact ones."""
    torch.manual_seed(0)
    model = SameShapeLayers()
    x = torch.randn(6, 5, 6)
    bound = median_bound(reference_clipped_sum(model, x, 1.0)[1])
    expected = loop_clipped_sum(model, x, bound)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = bk_clipped_sum(model, x, bound)
    assert max(sizes) > 1
    for name, ref in expected.items():
        assert got[name].dtype == torch.float32
        assert (got[name] - ref).norm() <= 0.05 * ref.norm(), name


class SameShapeConvs(nn.Module):
    """Convolutions of equal geometry and shapes (plain, grouped without a bias, reflect-padded), which the engine
    stacks, between ones it cannot stack with them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 8, 3, padding=1)
        self.plain = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)])
        self.grouped = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False) for _ in range(2)])
        self.reflect = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect") for _ in range(2)])
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.stem(x))
        for layer in (*self.plain, *self.grouped, *self.reflect):
            x = torch.tanh(layer(x))
        return self.head(x.mean(dim=(2, 3)))


@pytest.mark.parametrize(("side", "batch"), [(3, 4), (8, 4), (8, 8)],  # 9 positions: ghost norms; 64: instantiated;
                         ids=["ghost", "instantiated", "batch_is_channels_and_side"])  # batch = channels = side
def test_stacked_convolutions_exact(side: int, batch: int, monkeypatch: pytest.MonkeyPatch, sizes: list[int]) -> None:
    """Convolutions stacked by geometry give each layer its own exact clipped sum, flat and per layer."""
    monkeypatch.setitem(bk.STACK_CALL_BYTES, "cpu", 2**30)
    torch.manual_seed(0)
    model = SameShapeConvs().double()
    x = torch.randn(batch, 2, side, side, dtype=torch.float64)
    assert_exact(model, x)
    assert sorted(sizes)[-3:] == [2, 2, 3]  # plain, grouped and reflect-padded convolutions stack apart
    assert_per_layer_exact(model, x)


@pytest.mark.parametrize("tokens", [3, 4, 30])  # ghost norms (4: as many as the batch); instantiated
def test_stacked_transposed_linear_layers_exact(tokens: int, monkeypatch: pytest.MonkeyPatch, sizes: list[int]) -> None:
    """Hugging Face's Conv1D (GPT-2's layers, weights stored transposed) stacks like Linear: each layer gets its own
    sum in the stored layout."""
    from transformers.pytorch_utils import Conv1D

    monkeypatch.setitem(bk.STACK_CALL_BYTES, "cpu", 2**30)
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(6, 5), nn.Tanh(), Conv1D(6, 6), nn.Tanh(), Conv1D(6, 6), nn.Tanh(),
                          Conv1D(6, 6)).double()
    for layer in model[::2]:
        nn.init.normal_(layer.weight, std=0.5)
        nn.init.normal_(layer.bias, std=0.1)
    x = torch.randn(4, tokens, 5, dtype=torch.float64)
    assert_exact(model, x)
    assert max(sizes) == 3
