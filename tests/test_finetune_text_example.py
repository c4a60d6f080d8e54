"""examples/finetune_text.py end to end at tiny size: Python's help texts with a config-built Llama, local weights
with LoRA on the user's JSONL, CSV records, and bad input. Nothing is downloaded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from example_scripts import load_example, refuse_network
from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

TINY = ["--seq-len", "32", "--batch-size", "16", "--max-physical-batch-size", "8", "--no-progress", "--threads", "1",
        "--model-kwargs", '{"hidden_size": 32, "intermediate_size": 64}']
finetune = load_example("finetune_text.py")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    refuse_network(monkeypatch)


def _check_run(summary: dict, out: Path, epochs: float) -> None:
    """Finite losses, one recorded loss per step, as many steps as the expected passes need, the summary on disk."""
    privacy, n = summary["privacy"], summary["data"]["train_records"]
    assert summary["steps"] == max(1, round(epochs * n / 16)) == len(summary["train_loss"])
    assert privacy["sample_rate"] == 16 / n
    assert math.isfinite(privacy["epsilon"]) and privacy["epsilon"] > 0
    assert all(math.isfinite(v) for v in (*summary["loss"].values(), *summary["train_loss"]))
    assert json.loads((out / "summary.json").read_text())["privacy"]["epsilon"] == privacy["epsilon"]


def test_help_texts_with_a_llama_built_from_a_config(tmp_path: Path) -> None:
    """Default data and model, σ calibrated to ε = 8: ε spent ≤ 8, and the loss starts near uniform over bytes."""
    summary = finetune.main([*TINY, "--epochs", "0.03", "--out", str(tmp_path)])
    _check_run(summary, tmp_path, 0.03)
    assert summary["data"]["source"] == "pydoc_data.topics" and summary["data"]["train_records"] > 1000
    assert summary["tokenizer"] == "bytes" and summary["model"]["trainable"] == summary["model"]["parameters"]
    assert 7.9 <= summary["privacy"]["epsilon"] <= 8.0
    assert abs(summary["loss"]["test_before"] - math.log(259)) < 0.5  # an untrained model: ~uniform over 259 ids


def test_gpt2_built_from_a_config_called_the_usual_way(tmp_path: Path) -> None:
    """GPT-2 builds its (1, T) position ids itself; the example calls it with input_ids and attention_mask only."""
    tiny = [*TINY[:-2], "--model-kwargs", '{"n_embd": 32}']
    summary = finetune.main([*tiny, "--model", "gpt2", "--epochs", "0.02", "--out", str(tmp_path)])
    _check_run(summary, tmp_path, 0.02)
    assert summary["model"]["trainable"] == summary["model"]["parameters"]


def save_word_tokenizer(texts: list[str], folder: Path) -> int:
    """A word-level Hugging Face tokenizer of ``texts``' words, saved into ``folder``; returns its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")
    wrapped.save_pretrained(folder)
    return len(wrapped)


def test_local_weights_and_tokenizer_with_lora_on_jsonl_records(tmp_path: Path) -> None:
    """--model-path loads saved weights and the tokenizer saved with them, --lora trains adapters only, --data reads
    JSONL; with σ given, ε equals an independent accountant's for (σ, q, steps)."""
    from transformers import AutoModelForCausalLM

    texts = [f"record {i}: " + "some private words " * (i % 5) for i in range(80)]
    vocab = save_word_tokenizer(texts, tmp_path / "model")
    torch.manual_seed(0)
    config = finetune.tiny_llama_config(vocab, 32, {"hidden_size": 32, "intermediate_size": 64})
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)))
    out = tmp_path / "out"
    summary = finetune.main([*TINY[:-2], "--model-path", str(tmp_path / "model"), "--lora", "--data",
                             str(tmp_path / "data.jsonl"), "--noise-multiplier", "1.0", "--epochs", "0.5",
                             "--out", str(out)])
    _check_run(summary, out, 0.5)
    assert summary["data"]["train_records"] == 72 and summary["tokenizer"] == str(tmp_path / "model")
    assert summary["loss"]["test_before"] < 0.8 * math.log(259)  # ~uniform over the word ids, not over bytes
    assert 0 < summary["model"]["trainable"] < summary["model"]["parameters"] / 3  # the adapters only
    privacy = summary["privacy"]
    accountant = PRVAccountant(
        prvs=[PoissonSubsampledGaussianMechanism(noise_multiplier=1.0, sampling_probability=privacy["sample_rate"])],
        max_self_compositions=[summary["steps"]], eps_error=0.01, delta_error=1e-8,
    )
    low, _, high = accountant.compute_epsilon(delta=1e-5, num_self_compositions=[summary["steps"]])
    assert low - 0.02 <= privacy["epsilon"] <= high + 0.02


def test_csv_records_and_encoding(tmp_path: Path) -> None:
    """A CSV column, empty texts skipped; ids padded on the right, labels -100 exactly at the padding."""
    (tmp_path / "data.csv").write_text('text,label\n"héllo, world",1\n"",0\nsecond,0\n', encoding="utf-8")
    texts = finetune.read_texts(tmp_path / "data.csv", "text")
    assert texts == ["héllo, world", "second"]
    ids, mask, labels = finetune.encode(texts, finetune.ByteTokenizer(), 10).tensors
    assert ids[1].tolist() == [257, *b"second", 258, 256, 256]
    assert ids[0].tolist() == [257, *"héllo, w".encode()][:10]  # cut to 10 ids, no end token left
    assert mask[1].tolist() == [1] * 8 + [0] * 2
    assert torch.equal(labels, ids.masked_fill(mask == 0, -100))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "{dir}/missing.jsonl"], "no such file"),
        (["--data", "{dir}/data.txt"], "expected a .jsonl or .csv file"),
        (["--data", "{dir}/data.jsonl", "--text-key", "body"], "has no 'body' field"),
        (["--data", "{dir}/data.jsonl", "--batch-size", "50"], "exceeds the 9 training records"),
        (["--model-path", "{dir}/no_model"], "no_model"),
        (["--epochs", "0"], "must be > 0"),
    ],
)
def test_bad_input_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
                                 message: str) -> None:
    (tmp_path / "data.txt").write_text("plain text")
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"text": f"t{i}"}) for i in range(10)))
    with pytest.raises(SystemExit) as exit_info:
        finetune.main([*TINY[:-2], "--out", str(tmp_path / "out"), *[a.format(dir=tmp_path) for a in extra]])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
