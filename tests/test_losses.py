"""opacus_fast.losses: per-sequence token-mean losses against a hand-written loop and against Hugging Face's own loss
on single sequences; edge cases (empty batch, all-padding rows, batch size = sequence length); the warning for a
model-computed batch token mean; and exact clipping of a Llama-style model trained with the loss."""

from __future__ import annotations

import warnings

import pytest
import torch
from oracle import RTOL, median_bound
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from opacus_fast import losses
from opacus_fast.clipping import ClipBound
from opacus_fast.engine import BKEngine
from opacus_fast.losses import causal_lm_loss, seq2seq_lm_loss, warn_if_batch_token_mean

IGNORE = -100


def loop_losses(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> list[torch.Tensor]:
    """Reference: for each example, the mean of -log p(target) over its positions with a target, token by token."""
    out = []
    for x, y in zip(logits, labels):
        if shift:
            x, y = x[:-1], y[1:]
        terms = [-torch.log_softmax(x[t], dim=-1)[y[t]] for t in range(len(y)) if y[t] != IGNORE]
        out.append(sum(terms) / len(terms) if terms else torch.zeros((), dtype=logits.dtype))
    return out


def batch(rows: int, tokens: int, vocab: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 logits and labels with padding of different lengths: row 1 all padding, row 2 a single target."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, tokens, vocab, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (rows, tokens), generator=g)
    for i in range(rows):
        labels[i, tokens - i % tokens:] = IGNORE  # row i ends with i % tokens padding positions
    if rows > 1:
        labels[1] = IGNORE
    if rows > 2:
        labels[2, :-2] = IGNORE
    return logits, labels


@pytest.mark.parametrize("shape", [(4, 6), (5, 5), (1, 3), (6, 2)])  # (5, 5): batch size = sequence length
@pytest.mark.parametrize(("loss", "shift"), [(causal_lm_loss, True), (seq2seq_lm_loss, False)])
def test_per_example_losses_equal_a_loop_over_examples(shape: tuple[int, int], loss, shift: bool) -> None:
    logits, labels = batch(*shape)
    expected = torch.stack(loop_losses(logits, labels, shift))
    torch.testing.assert_close(loss(logits, labels, reduction="none"), expected, rtol=RTOL, atol=0)
    torch.testing.assert_close(loss(logits, labels, reduction="sum"), expected.sum(), rtol=RTOL, atol=0)
    torch.testing.assert_close(loss(logits, labels), expected.sum() / shape[0], rtol=RTOL, atol=0)


@pytest.mark.parametrize(("loss", "shift"), [(causal_lm_loss, True), (seq2seq_lm_loss, False)])
def test_example_without_targets_contributes_zero(loss, shift: bool) -> None:
    """An all-padding row has loss 0 and its logits get no gradient; the others' losses do not depend on it."""
    logits, labels = batch(4, 6)
    per_example = loss(logits, labels, reduction="none")
    assert per_example[1] == 0
    per_example.sum().backward()
    assert torch.count_nonzero(logits.grad[1]) == 0 and torch.count_nonzero(logits.grad[0]) > 0
    others = [0, 2, 3]
    torch.testing.assert_close(loss(logits[others], labels[others], reduction="none"), per_example[others])


def test_single_token_sequence_has_no_causal_target() -> None:
    logits, labels = batch(3, 1)
    assert torch.equal(causal_lm_loss(logits, labels, reduction="none"), torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("loss", [causal_lm_loss, seq2seq_lm_loss])
def test_empty_batch_gives_zero_and_backpropagates(loss) -> None:
    logits, labels = batch(3, 5)
    logits, labels = logits[:0], labels[:0]
    assert loss(logits, labels, reduction="none").shape == (0,)
    for reduction in ("mean", "sum"):
        value = loss(logits, labels, reduction=reduction)
        assert value.shape == () and value == 0
        value.backward()


def test_bad_input_fails_clearly() -> None:
    logits, labels = batch(2, 4)
    with pytest.raises(ValueError, match=r"labels \(batch, tokens\), got \(2, 4, 7\) and \(2, 3\)"):
        seq2seq_lm_loss(logits, labels[:, 1:])
    with pytest.raises(ValueError, match="reduction must be one of"):
        causal_lm_loss(logits, labels, reduction="batchmean")


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    return LlamaForCausalLM(config).double()


def tiny_t5() -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(config).double()


def test_shifts_agree_with_hugging_face_on_one_sequence() -> None:
    """For one sequence Hugging Face's own loss (a token mean) is the per-example loss: both shift conventions
    (causal: shift by one; seq2seq: labels aligned with the decoder's logits) must give the same value."""
    ids = torch.randint(1, 32, (1, 7), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, 5:] = IGNORE
    llama = tiny_llama()
    out = llama(input_ids=ids, labels=labels)
    torch.testing.assert_close(causal_lm_loss(out.logits, labels), out.loss.to(torch.float64), rtol=1e-6, atol=0)
    t5 = tiny_t5()
    out = t5(input_ids=ids, labels=labels)
    torch.testing.assert_close(seq2seq_lm_loss(out.logits, labels), out.loss.to(torch.float64), rtol=1e-6, atol=0)


def test_hugging_face_batch_loss_weights_examples_by_their_tokens() -> None:
    """Why the helper exists: on a batch, Hugging Face's loss is sum_i n_i L_i / sum_i n_i, not a per-example mean."""
    ids = torch.randint(1, 32, (2, 7), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[1, 3:] = IGNORE  # 6 targets in row 0, 2 in row 1
    out = tiny_llama()(input_ids=ids, labels=labels)
    per_example = causal_lm_loss(out.logits, labels, reduction="none")
    token_weighted = (6 * per_example[0] + 2 * per_example[1]) / 8
    torch.testing.assert_close(out.loss.to(torch.float64), token_weighted, rtol=1e-6, atol=0)
    assert abs(out.loss - per_example.mean()) > 1e-3


@pytest.mark.parametrize("lora", [False, True])
def test_llama_trained_with_the_loss_is_clipped_exactly(lora: bool) -> None:
    """BK clipped sum of a Llama-style model (all weights, or peft LoRA adapters) with causal_lm_loss equals
    clipping one autograd gradient per example (float64; one example all padding, some clipped, some not)."""
    model = tiny_llama()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
        for name, p in model.named_parameters():  # LoRA's B starts at zero: give the adapters a gradient of A too
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(1, 32, (4, 6), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, 4:] = IGNORE
    labels[2] = IGNORE
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    per_example = [
        torch.autograd.grad(causal_lm_loss(model(input_ids=ids[i : i + 1]).logits, labels[i : i + 1], "sum"),
                            list(params.values()), allow_unused=True, materialize_grads=True)
        for i in range(4)
    ]
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in grads)) for grads in per_example])
    assert norms[2] == 0
    bound = median_bound(norms[[0, 1, 3]])
    factors = (bound / (norms + 1e-6)).clamp(max=1.0)
    engine = BKEngine(model, bound=ClipBound(bound), loss_reduction="sum")
    try:
        causal_lm_loss(model(input_ids=ids).logits, labels, "sum").backward()
        for k, (name, p) in enumerate(params.items()):
            expected = sum(factors[i] * per_example[i][k] for i in range(4))
            assert (p.summed_grad - expected).norm() <= RTOL * max(expected.norm(), 1e-12), name
    finally:
        engine.detach()


def test_warns_once_for_a_model_computed_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(losses, "_warned", False)
    model = tiny_llama()
    ids = torch.randint(1, 32, (2, 5), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_batch_token_mean(model(input_ids=ids))  # no labels: no loss computed by the model
        assert not warn_if_batch_token_mean({"loss": torch.zeros(())})  # not a ModelOutput
        assert not warn_if_batch_token_mean(torch.zeros(2, 5, 32))
    with_loss = model(input_ids=ids, labels=ids)
    with pytest.warns(UserWarning, match=r"averages it over all target tokens.*losses\.causal_lm_loss\(logits"):
        assert warn_if_batch_token_mean(with_loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_batch_token_mean(with_loss)  # recognised again, but warned only once


def test_engine_warns_when_the_models_own_loss_is_backpropagated(monkeypatch: pytest.MonkeyPatch) -> None:
    """The warning comes at the backward that uses outputs.loss, not for calls that only compute it."""
    monkeypatch.setattr(losses, "_warned", False)
    model = tiny_llama()
    ids = torch.randint(1, 32, (3, 5), generator=torch.Generator().manual_seed(4))
    engine = BKEngine(model, bound=ClipBound(1.0), loss_reduction="sum")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = model(input_ids=ids, labels=ids)
            causal_lm_loss(out.logits, ids, "sum").backward()  # the model's loss is computed but not used
        with pytest.warns(UserWarning, match="averages it over all target tokens"):
            model(input_ids=ids, labels=ids).loss.backward()
    finally:
        engine.detach()
