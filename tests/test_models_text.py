"""Hugging Face text models (tiny random configs) through make_private_fast: the noiseless update is exact.

Each is called the usual way, ``model(input_ids=..., attention_mask=...)`` without position ids, on three batch
shapes where size coincidences hide bugs: batch == sequence length with one padded example, a batch of one, and
a batch shorter than the sequence.
"""

from __future__ import annotations

import pytest
import torch
from model_zoo import assert_private_step_exact, lm_loss, private_step_refusal, token_batch

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN = 64, 16
#: (batch, sequence length, padded positions of example 0)
SHAPES = {"batch_eq_seq_padded": (6, 6, 2), "batch_1": (1, 6, 0), "batch_lt_seq": (3, 5, 1)}


def gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=HIDDEN, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied embeddings
    return model


def llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, attention_dropout=0.0,
    )
    return transformers.LlamaForCausalLM(config)


def bert() -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )
    return transformers.BertForSequenceClassification(config)


def distilbert() -> torch.nn.Module:
    config = transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=HIDDEN, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=16,
        dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=3,
    )
    return transformers.DistilBertForSequenceClassification(config)


def roberta() -> torch.nn.Module:
    config = transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
        pad_token_id=1,
    )
    return transformers.RobertaForSequenceClassification(config)


def bart() -> torch.nn.Module:
    config = transformers.BartConfig(
        vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=16,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, classifier_dropout=0.0,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
    )
    return transformers.BartForConditionalGeneration(config)


def t5() -> torch.nn.Module:
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(config)


def lora(base: torch.nn.Module, targets: list[str], fan_in_fan_out: bool = False) -> torch.nn.Module:
    """peft LoRA with random A and B (B = 0 would make A's gradient vanish), base frozen."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                             init_lora_weights=False, fan_in_fan_out=fan_in_fan_out)
    return peft.get_peft_model(base, config)


CAUSAL = {"gpt2": gpt2, "llama_gqa": llama}
CLASSIFIERS = {"bert": bert, "distilbert": distilbert, "roberta": roberta}


def _model(factory) -> torch.nn.Module:
    torch.manual_seed(0)
    return factory()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", CAUSAL)
def test_causal_lm_exact(name: str, shape: str) -> None:
    batch, length, padded = SHAPES[shape]
    assert_private_step_exact(_model(CAUSAL[name]), token_batch(batch, length, VOCAB, padded), lm_loss)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_sequence_classifier_exact(name: str, shape: str) -> None:
    batch, length, padded = SHAPES[shape]
    pad_id = 1 if name == "roberta" else 0
    assert_private_step_exact(_model(CLASSIFIERS[name]), token_batch(batch, length, VOCAB, padded, pad_id))


@pytest.mark.parametrize("shape", SHAPES)
def test_bart_exact(shape: str) -> None:
    """Decoder inputs are the encoder inputs shifted right inside the model."""
    batch, length, padded = SHAPES[shape]
    assert_private_step_exact(_model(bart), token_batch(batch, length, VOCAB, padded, pad_id=1))


@pytest.mark.parametrize("shape", [*SHAPES, "batch_eq_encoder_eq_decoder"])
def test_t5_exact(shape: str) -> None:
    """T5's relative-position bias is computed from a (T, T) table without the batch: with batch == encoder
    length == decoder length its rows look like examples."""
    batch, length, padded = SHAPES.get(shape, (6, 6, 0))
    inputs = token_batch(batch, length, VOCAB, padded)
    inputs["decoder_input_ids"] = token_batch(batch, length, VOCAB, seed=1)["input_ids"]
    assert_private_step_exact(_model(t5), inputs)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_lora_exact(name: str, shape: str) -> None:
    """Only the adapters train; GPT-2's fused attention is a transformers Conv1D (fan_in_fan_out)."""
    batch, length, padded = SHAPES[shape]
    model = _model(CAUSAL[name])
    model = lora(model, ["c_attn"], fan_in_fan_out=True) if name == "gpt2" else lora(model, ["q_proj", "v_proj"])
    assert_private_step_exact(model, token_batch(batch, length, VOCAB, padded), lm_loss)


def _checkpointed_lora_llama(reentrant: bool | None) -> torch.nn.Module:
    """LoRA on Llama; with Hugging Face gradient checkpointing unless ``reentrant`` is None (the same weights)."""
    base = _model(llama)
    if reentrant is not None:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        base.enable_input_require_grads()
    return lora(base, ["q_proj", "v_proj"])


@pytest.mark.parametrize("poisson", [False, True])
def test_reentrant_gradient_checkpointing_is_refused(poisson: bool) -> None:
    """Reentrant checkpointing runs a backward inside the backward: each example's gradient would be clipped in
    parts. The error must say so and point to use_reentrant=False (the reference is an uncheckpointed twin)."""
    error = private_step_refusal(_checkpointed_lora_llama(True), token_batch(4, 6, VOCAB, 2), lm_loss, poisson,
                                 reference=_checkpointed_lora_llama(None))
    assert "checkpoint" in str(error) and "use_reentrant=False" in str(error), str(error)


@pytest.mark.parametrize("poisson", [False, True])
def test_non_reentrant_gradient_checkpointing_is_exact(poisson: bool) -> None:
    assert_private_step_exact(_checkpointed_lora_llama(False), token_batch(4, 6, VOCAB, 2), lm_loss, poisson)
