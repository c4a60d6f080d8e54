"""torch and Opacus attention, transformer layers, user modules, EmbeddingBag and other layer types through
make_private_fast: the noiseless update is exact, or the model is refused naming what cannot be clipped."""

from __future__ import annotations

import pytest
import torch
from model_zoo import Examples, assert_private_step_exact, private_step_refusal
from opacus.layers import DPGRU, DPLSTM, DPMultiheadAttention
from torch import nn

DIM, FEATURES = 8, 4
#: (batch, sequence length, padded positions of example 0)
SHAPES = {"batch_eq_seq_padded": (6, 6, 2), "batch_1": (1, 6, 0), "batch_lt_seq": (3, 5, 1)}


def sequences(batch: int, length: int, padded: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (B, T, 4) and a key padding mask (True = padded) where example 0 ends in ``padded`` positions."""
    gen = torch.Generator().manual_seed(seed)
    pad = torch.zeros(batch, length, dtype=torch.bool)
    pad[0, length - padded :] = True
    return torch.randn(batch, length, FEATURES, generator=gen, dtype=torch.float64), pad


def causal_mask(length: int) -> torch.Tensor:
    return torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)


class SelfAttentionModel(nn.Module):
    """Linear → self-attention → Linear, batch-first inputs; sequence-first inside when ``batch_first=False``."""

    def __init__(self, attention: type[nn.Module], batch_first: bool, mask: str) -> None:
        super().__init__()
        self.batch_first, self.mask = batch_first, mask
        self.embed = nn.Linear(FEATURES, DIM)
        self.attn = attention(DIM, 2, batch_first=batch_first)
        self.head = nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h if self.batch_first else h.transpose(0, 1)
        if self.mask == "key_padding":
            out, _ = self.attn(h, h, h, key_padding_mask=pad, need_weights=False)
        else:
            out, _ = self.attn(h, h, h, attn_mask=causal_mask(x.shape[1]), need_weights=False)
        return self.head(out if self.batch_first else out.transpose(0, 1))


class EncoderModel(nn.Module):
    """nn.TransformerEncoder (batch first, two layers) with a padding mask or a causal mask."""

    def __init__(self, mask: str) -> None:
        super().__init__()
        self.mask = mask
        self.embed = nn.Linear(FEATURES, DIM)
        layer = nn.TransformerEncoderLayer(DIM, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2)
        self.head = nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        if self.mask == "key_padding":
            h = self.encoder(self.embed(x), src_key_padding_mask=pad)
        else:
            h = self.encoder(self.embed(x), mask=causal_mask(x.shape[1]), is_causal=True)
        return self.head(h)


class DecoderModel(nn.Module):
    """nn.TransformerDecoder: causal self-attention over the target, cross-attention to a padded memory."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.embed_memory = nn.Linear(FEATURES, DIM), nn.Linear(FEATURES, DIM)
        layer = nn.TransformerDecoderLayer(DIM, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers=1)
        self.head = nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.decoder(self.embed(x), self.embed_memory(memory), tgt_mask=causal_mask(x.shape[1]),
                         tgt_is_causal=True, memory_key_padding_mask=pad)
        return self.head(h)


def _seeded(make):
    torch.manual_seed(0)
    return make()


#: Opacus' DPMultiheadAttention checks a batch-first attn_mask against (B, B) instead of (T, T), so it runs
#: only when B == T; that combination is left out (the layer's own limitation, not the engine's)
ATTENTIONS = [
    (attention, batch_first, mask)
    for attention in (nn.MultiheadAttention, DPMultiheadAttention)
    for batch_first in (True, False)
    for mask in ("key_padding", "causal")
    if not (attention is DPMultiheadAttention and batch_first and mask == "causal")
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("attention, batch_first, mask", ATTENTIONS)
def test_self_attention_exact(attention: type[nn.Module], batch_first: bool, mask: str, shape: str) -> None:
    model = _seeded(lambda: SelfAttentionModel(attention, batch_first, mask))
    assert_private_step_exact(model, sequences(*SHAPES[shape]))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask", ["key_padding", "causal"])
def test_transformer_encoder_exact(mask: str, shape: str) -> None:
    assert_private_step_exact(_seeded(lambda: EncoderModel(mask)), sequences(*SHAPES[shape]))


@pytest.mark.parametrize("shape", SHAPES)
def test_transformer_decoder_exact(shape: str) -> None:
    """Target and memory lengths differ (T and T + 1); the memory of example 0 is padded."""
    batch, length, padded = SHAPES[shape]
    x, _ = sequences(batch, length, 0, seed=1)
    memory, pad = sequences(batch, length + 1, padded)
    assert_private_step_exact(_seeded(DecoderModel), (x, memory, pad))


# ---- user modules with their own parameters -----------------------------------------------------------------------
class ScaledLinear(nn.Module):
    """A user module: a Linear and a parameter of its own, used in the same forward."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.scale = nn.Parameter(torch.rand(d_out) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale


class BatchMixing(nn.Module):
    """A parameter read by the parent's forward in a batch-level reduction: every output row depends on every
    example, so per-example gradients do not exist."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(FEATURES, DIM)
        self.batch_gate = nn.Parameter(torch.rand(DIM))
        self.head = nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return self.head(h + (h * self.batch_gate).mean(0, keepdim=True))


def features(batch: int = 6, seed: int = 0) -> tuple[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, FEATURES, generator=gen, dtype=torch.float64),)


@pytest.mark.parametrize("tokens", [False, True])
def test_parameter_next_to_a_linear_exact(tokens: bool) -> None:
    model = _seeded(lambda: nn.Sequential(ScaledLinear(FEATURES, DIM), nn.Tanh(), nn.Linear(DIM, 3)))
    assert_private_step_exact(model, sequences(6, 6, 0)[:1] if tokens else features())


def test_opacus_model_with_custom_linear_exact() -> None:
    """Opacus' own test model: a functional linear with bare parameters, a Linear followed by a matmul with an
    extra parameter in the same module, and a matmul with the root's parameter."""
    opacus_tests = pytest.importorskip("opacus.tests.privacy_engine_test")
    assert_private_step_exact(_seeded(opacus_tests.ModelWithCustomLinear), features())


def test_parameter_mixing_examples_is_refused_naming_the_operation() -> None:
    """A batch mean combined back with the examples makes each example's result depend on the others."""
    error = private_step_refusal(_seeded(BatchMixing), features())
    assert "combines the examples with values computed across the batch" in str(error), f"{error}"
    assert "'mean' reduces over the batch dimension" in str(error), f"{error}"


# ---- EmbeddingBag -------------------------------------------------------------------------------------------------
class Bag(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(50, DIM, mode=mode)
        self.head = nn.Linear(DIM, 3)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        bags = self.bag(ids) if offsets is None else self.bag(ids, offsets)
        return self.head(torch.tanh(bags))


def flat_bags(items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The usual collate_fn for EmbeddingBag: all ids in one 1-D tensor, and where each example's bag starts."""
    lengths = torch.tensor([0] + [len(t) for t in items[:-1]])
    return torch.cat(items), lengths.cumsum(0)


def bags() -> list[torch.Tensor]:
    """Bags of different lengths; a token repeated within a bag and tokens shared between bags."""
    gen = torch.Generator().manual_seed(0)
    items = [torch.randint(0, 20, (n,), generator=gen) for n in (3, 1, 4, 2, 5, 3)]
    items[2][1] = items[2][0]
    items[3][0] = items[0][0]
    return items


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_with_offsets_exact(mode: str) -> None:
    """Flat ids and offsets: the examples are the bags, which the Poisson loader's row count tells."""
    assert_private_step_exact(_seeded(lambda: Bag(mode)), Examples(bags(), flat_bags), poisson=True)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_2d_exact(mode: str) -> None:
    ids = torch.randint(0, 20, (6, 4), generator=torch.Generator().manual_seed(0))
    ids[1, 1] = ids[1, 0]
    assert_private_step_exact(_seeded(lambda: Bag(mode)), (ids,))


# ---- other layer types --------------------------------------------------------------------------------------------
class BilinearModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Linear(FEATURES, 5), nn.Linear(FEATURES, 6)
        self.bilinear = nn.Bilinear(5, 6, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.bilinear(torch.tanh(self.left(x)), torch.tanh(self.right(y)))


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn, self.head = cell(FEATURES, 6, batch_first=True), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


def _conv_transpose() -> nn.Module:
    return nn.Sequential(
        nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1), nn.Tanh(),
        nn.ConvTranspose2d(4, 2, 3, dilation=2, groups=2),
    )


def _prelu() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, DIM), nn.PReLU(DIM), nn.Linear(DIM, DIM), nn.PReLU(), nn.Linear(DIM, 3))


def _inputs(name: str):
    gen = torch.Generator().manual_seed(0)
    if name == "conv_transpose2d":
        return (torch.randn(6, 3, 5, 5, generator=gen, dtype=torch.float64),)
    if name == "bilinear":
        return features(seed=1) + features(seed=2)
    if name in ("dplstm", "dpgru"):
        return sequences(6, 6, 0)[:1]
    return features()


LAYERS = {
    "conv_transpose2d": _conv_transpose,
    "prelu": _prelu,
    "bilinear": BilinearModel,
    "dplstm": lambda: Recurrent(DPLSTM),
    "dpgru": lambda: Recurrent(DPGRU),
}


@pytest.mark.parametrize("name", LAYERS)
def test_layer_exact(name: str) -> None:
    assert_private_step_exact(_seeded(LAYERS[name]), _inputs(name))
