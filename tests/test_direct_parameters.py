"""Parameters the model uses directly (not through a layer with a rule), and attaching: each case is exact or
refused clearly.

The batch tracker gives each direct use of a parameter its per-example gradient wherever it meets the batch: a tied
weight read through a reference or a keyword, tables and masks passed any way, outputs of any structure, layers run
sequence first. Copies of an attached model and forward passes without gradients compute with the plain layers.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from models import LayerScale
from oracle import bk_clipped_sum, l1_loss, loop_clipped_sum, median_bound
from torch import nn
from torch.nn.utils import parametrizations, spectral_norm, weight_norm
from torch.optim.swa_utils import AveragedModel

from opacus_fast import UnsupportedModuleError
from opacus_fast.clipping import ClipBound
from opacus_fast.data.context import BatchContext
from opacus_fast.engine import BKEngine

B, T, D = 6, 5, 4


def _norms(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-example gradient norms over the trainable parameters, one example at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.stack([
        torch.sqrt(sum(g.pow(2).sum() for g in torch.autograd.grad(l1_loss(model(x[i:i + 1]), "sum"), params)))
        for i in range(len(x))
    ])


def assert_exact(model: nn.Module, x: torch.Tensor, rtol: float = 1e-9) -> None:
    """BK's clipped sum equals the float64 batch-of-one reference, with some examples clipped and some not."""
    norms = _norms(model, x)
    bound = median_bound(norms)
    assert (norms > bound).any() and (norms < bound).any()
    want = loop_clipped_sum(model, x, bound)
    got = bk_clipped_sum(model, x, bound)
    for name, ref in want.items():
        torch.testing.assert_close(got[name], ref, rtol=rtol, atol=1e-12, msg=name)


def _untouched(model: nn.Module, state: dict[str, torch.Tensor], pre_hooks: dict[str, int]) -> bool:
    """The model is as before a refused attach: same state, no instance methods, no parameter hooks."""
    return (
        all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
        and all("forward" not in vars(m) for m in model.modules())
        and all(not p._backward_hooks for p in model.parameters())
        and {n: len(m._forward_pre_hooks) for n, m in model.named_modules()} == pre_hooks
    )


# ---- 1. gradient paths that do not enter a unit as positional inputs ------------------------------------------
class DecoderByReference(nn.Module):
    """A unit reading the embedding's weight through an unregistered reference (a tied decoder)."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(embedding.num_embeddings))
        self._embedding = [embedding]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self._embedding[0].weight, self.bias)


class DecoderByKeyword(nn.Module):
    """A unit given the tied weight inside a container keyword argument."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, h: torch.Tensor, tied: dict | None = None) -> torch.Tensor:
        return F.linear(h, tied["weight"], self.bias)


class TiedDecoderLM(nn.Module):
    def __init__(self, by_keyword: bool, vocab: int = 9) -> None:
        super().__init__()
        self.by_keyword = by_keyword
        self.emb = nn.Embedding(vocab, D)
        self.ln = nn.LayerNorm(D)
        self.dec = DecoderByKeyword(vocab) if by_keyword else DecoderByReference(self.emb)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.emb(ids)).tanh()
        return self.dec(h, tied={"weight": self.emb.weight}) if self.by_keyword else self.dec(h)


class Rotate(nn.Module):
    """A unit with per-example (cos, sin) tables computed by a trainable layer."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(D) + 0.5)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        cos, sin = (cos, sin) if rope is None else rope
        return self.scale * (x * cos + x.flip(-1) * sin)


class RotaryNet(nn.Module):
    def __init__(self, positional: bool) -> None:
        super().__init__()
        self.positional = positional
        self.inp, self.freq, self.rot, self.head = nn.Linear(3, D), nn.Linear(3, D), Rotate(), nn.Linear(D, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.freq(x)
        h = self.inp(x)
        h = self.rot(h, f.cos(), f.sin()) if self.positional else self.rot(h, rope=(f.cos(), f.sin()))
        return self.head(h.tanh()).mean(1)


@pytest.mark.parametrize("by_keyword", [False, True])
def test_tied_weight_read_by_reference_or_keyword_is_exact(by_keyword: bool) -> None:
    """emb.weight used by the embedding and, through F.linear, by the decoder: one summed per-example gradient."""
    torch.manual_seed(0)
    assert_exact(TiedDecoderLM(by_keyword=by_keyword).double(), torch.randint(0, 9, (B, T)))


@pytest.mark.parametrize("positional", [True, False])
def test_tables_computed_by_a_layer_are_exact_however_passed(positional: bool) -> None:
    torch.manual_seed(0)
    assert_exact(RotaryNet(positional=positional).double(), torch.randn(B, T, 3, dtype=torch.float64))


# ---- 2. keyword tensors, outputs that are not one batch-first tensor -----------------------------------------
class AttentionPool(nn.Module):
    """A unit pooling tokens with a mask, given by keyword or held as an attribute set by its parent."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(D))
        self.held: torch.Tensor | None = None

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = self.held if mask is None else mask
        return ((h @ self.query).masked_fill(~mask, -1e9).softmax(-1).unsqueeze(-1) * h).sum(1)


class PooledClassifier(nn.Module):
    def __init__(self, by_keyword: bool) -> None:
        super().__init__()
        self.by_keyword = by_keyword
        self.emb, self.pool, self.head = nn.Embedding(20, D, padding_idx=0), AttentionPool(), nn.Linear(D, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.by_keyword:
            return self.head(self.pool(self.emb(ids), mask=ids != 0))
        self.pool.held = ids != 0
        return self.head(self.pool(self.emb(ids)))


def _padded_ids() -> torch.Tensor:
    ids = torch.randint(1, 20, (B, T), generator=torch.Generator().manual_seed(1))
    ids[::2, 3:] = 0
    return ids


@pytest.mark.parametrize("by_keyword", [True, False])
def test_parameter_with_a_mask_given_or_held_is_exact(by_keyword: bool) -> None:
    """The query meets each example's tokens; the mask is the example's own, given by keyword or set as an
    attribute by the parent."""
    torch.manual_seed(0)
    assert_exact(PooledClassifier(by_keyword).double(), _padded_ids())


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(D) + 0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * self.scale, x


class TwoOutputNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.two, self.head = nn.Linear(3, D), TwoOutputs(), nn.Linear(D, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.two(self.inp(x).tanh())
        return self.head(a + b.sin())


def test_module_returning_a_tuple_is_exact() -> None:
    torch.manual_seed(0)
    assert_exact(TwoOutputNet().double(), torch.randn(B, 3, dtype=torch.float64))


# ---- 3. positional inputs that are not batch first --------------------------------------------------------------
class AddTable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.rand(D) + 0.5)

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * table


class TableNet(nn.Module):
    """Gives a unit a (T, d) position table: its buffer positionally, a fresh copy positionally, or its buffer by
    keyword (the one right way: every example gets the whole table)."""

    def __init__(self, tokens: int, how: str) -> None:
        super().__init__()
        self.how = how
        self.inp, self.pos, self.head = nn.Linear(3, D), AddTable(), nn.Linear(D, 2)
        angles = torch.arange(tokens)[:, None] * torch.exp(torch.arange(D) * (-math.log(1e4) / D))
        self.register_buffer("table", torch.sin(angles))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        if self.how == "keyword":
            h = self.pos(h, table=self.table)
        else:
            h = self.pos(h, self.table if self.how == "buffer" else self.table.clone())
        return self.head(h.tanh()).mean(1)


@pytest.mark.parametrize("how", ["buffer", "copy", "keyword"])
@pytest.mark.parametrize("tokens", [B, T])
def test_position_table_is_exact_however_passed(tokens: int, how: str) -> None:
    """A (T, d) table times a parameter, added to (B, T, d): with as many table rows as examples, rows of the table
    are still positions, never examples."""
    torch.manual_seed(0)
    assert_exact(TableNet(tokens, how).double(), torch.randn(B, tokens, 3, dtype=torch.float64))


class SequenceFirstScale(nn.Module):
    """Runs a layer scale on (T, B, d) tensors: dim 0 is not the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.ls, self.head = nn.Linear(4, D), LayerScale(D), nn.Linear(D, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ls(self.inp(x).transpose(0, 1)).transpose(0, 1)).sum(1)


@pytest.mark.parametrize("tokens", [B, T])
def test_layer_scale_run_sequence_first_is_exact(tokens: int) -> None:
    torch.manual_seed(0)
    assert_exact(SequenceFirstScale().double(), torch.randn(B, tokens, 4, dtype=torch.float64))


# ---- 4. copies of an attached model (EMA, AveragedModel) ------------------------------------------------------
def _small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), LayerScale(8), nn.Linear(8, 3))


@pytest.mark.parametrize("make_copy", [copy.deepcopy, AveragedModel])
def test_copies_of_an_attached_model_compute_with_their_own_weights(make_copy) -> None:
    """An EMA copy must run its own layers: running the original ones would evaluate the live weights."""
    torch.manual_seed(0)
    model = _small_model().double()
    engine = BKEngine(model, bound=ClipBound(1.0), loss_reduction="sum")
    average = make_copy(model)
    other = _small_model().double()  # different weights
    copied = average.module if isinstance(average, AveragedModel) else average
    copied.load_state_dict(other.state_dict())
    x = torch.randn(B, 4, dtype=torch.float64)
    torch.testing.assert_close(average(x), other(x), rtol=0, atol=0)
    l1_loss(average(x), "sum").backward()  # the copy trains as a plain model: ordinary gradients
    assert all(p.grad is not None for p in copied.parameters())
    reference = copy.deepcopy(copied)  # still attached to the original only
    reference.load_state_dict(model.state_dict())
    norms = _norms(reference, x)
    bound = median_bound(norms)
    engine.bound = ClipBound(bound)
    l1_loss(model(x), "sum").backward()
    engine.detach()
    want = loop_clipped_sum(reference, x, bound)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.summed_grad, want[name], rtol=1e-9, atol=1e-12)


# ---- 5. evaluation without gradients -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_forward_without_gradients_runs_the_plain_model(mode) -> None:
    """Without gradients nothing is captured or tracked, and no forward is counted for the optimizer's checks."""
    torch.manual_seed(0)
    model = _small_model().double()
    plain = copy.deepcopy(model)
    context = BatchContext()
    engine = BKEngine(model, bound=ClipBound(1.0), context=context)
    x = torch.randn(B, 4, dtype=torch.float64)
    with mode():
        out = model(x)
    torch.testing.assert_close(out, plain(x).detach(), rtol=0, atol=0)
    assert not context.forward_since_release
    model(x)
    assert context.forward_since_release
    engine.detach()


def test_timm_vit_with_layer_scale_runs_under_inference_mode() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, depth=1,
                              init_values=0.1)
    plain = copy.deepcopy(model).eval()
    engine = BKEngine(model.eval(), bound=ClipBound(1.0))
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out = model(x)
    torch.testing.assert_close(out, plain(x).detach())
    engine.detach()


# ---- 6. refused at attaching, naming the module, the model left as it was ---------------------------------------
class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn, self.head = cell(4, 6, batch_first=True), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: nn.Sequential(weight_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 3)),
         (r"'0' \(Linear\): it has trainable parameters its rule does not know \(weight_g, weight_v\).*"
         r"remove_weight_norm")),
        (lambda: nn.Sequential(spectral_norm(nn.Conv1d(4, 5, 1)), nn.Flatten(), nn.Linear(5, 3)),
         r"'0' \(Conv1d\): it has trainable parameters its rule does not know \(weight_orig\)"),
        (lambda: nn.Sequential(parametrizations.weight_norm(nn.Linear(4, 5)), nn.Linear(5, 3)),
         r"'0' \(ParametrizedLinear\): it is parametrized.*remove_parametrizations"),
        (lambda: Recurrent(nn.LSTM), r"'rnn' \(LSTM\): it runs a fused recurrent kernel.*DPLSTM.*ModuleValidator\.fix"),
        (lambda: Recurrent(nn.GRU), r"'rnn' \(GRU\): .*DPGRU"),
        (lambda: Recurrent(nn.RNN), r"'rnn' \(RNN\): .*replace nn\.RNN by DPRNN by hand"),
    ],
)
def test_unsupported_layers_are_refused_at_attaching(make, match: str) -> None:
    """Once a KeyError, a TypeError naming an internal module, or a vmap error at the first forward."""
    model = make().double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pre_hooks = {n: len(m._forward_pre_hooks) for n, m in model.named_modules()}
    with pytest.raises(UnsupportedModuleError, match=match):
        BKEngine(model, bound=ClipBound(1.0))
    assert _untouched(model, state, pre_hooks)
    assert len(state) == len(model.state_dict())


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_recurrent_layers_fixed_by_opacus_are_exact(cell: type[nn.Module]) -> None:
    """ModuleValidator.fix turns them into Opacus' DPLSTM/DPGRU, whose weights alias their cells' Linear layers."""
    from opacus.validators import ModuleValidator

    torch.manual_seed(0)
    model = ModuleValidator.fix(Recurrent(cell)).double()
    assert type(model.rnn).__name__ == f"DP{cell.__name__}"
    assert_exact(model, torch.randn(B, T, 4, dtype=torch.float64))


# ---- 7. a model in bfloat16 without autocast ----------------------------------------------------------------
def test_bfloat16_model_runs_and_keeps_its_dtype() -> None:
    """Norm layers once returned float32 to the next bfloat16 layer (a dtype error); the sums are close to the
    float64 reference of the same weights."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 6, 8), nn.LayerNorm(8),
        nn.GELU(), nn.Linear(8, 8), nn.RMSNorm(8), nn.Linear(8, 3),
    ).bfloat16()
    x = torch.randn(8, 2, 6).bfloat16()
    reference = copy.deepcopy(model).double()
    norms = _norms(reference, x.double())
    bound = median_bound(norms)
    want = loop_clipped_sum(reference, x.double(), bound)
    engine = BKEngine(model, bound=ClipBound(bound), loss_reduction="sum")
    out = model(x)
    assert out.dtype == torch.bfloat16
    l1_loss(out, "sum").backward()
    engine.detach()
    for name, p in model.named_parameters():
        assert p.summed_grad.dtype == torch.bfloat16
        assert (p.summed_grad.double() - want[name]).norm() <= 0.05 * want[name].norm() + 1e-3, name
