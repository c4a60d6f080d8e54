"""Fine-tune a causal language model on text with DP-SGD using ``make_private_fast``.

Defaults: a tiny Llama-style model built from a config (no download), trained on the paragraphs of Python's own help
texts (``pydoc_data.topics``, which ships with CPython), tokenised byte by byte, at ε = 8, δ = 1e-5 (PRV accountant),
with Poisson sampling and padded physical batches. ``--data`` reads your own records (JSONL with a "text" field, or
CSV with a text column); ``--model-path`` loads local weights (``from_pretrained(local_files_only=True)``) and, if
that folder holds one, its tokenizer; ``--lora`` trains LoRA adapters (peft) instead of all weights.

    python examples/finetune_text.py
    python examples/finetune_text.py --lora --epochs 2
    python examples/finetune_text.py --data notes.jsonl --model-path ~/models/my-llama --lora

The privacy unit is one record (a help-text paragraph, a JSONL line, a CSV row), truncated to ``--seq-len`` tokens.
The loss is the per-sequence token mean of :mod:`opacus_fast.losses` (Hugging Face's own ``outputs.loss`` is a mean
over the batch's tokens, which is not a per-example loss). Writes ``summary.json`` into ``--out``.
Importable: ``main(argv) -> summary``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from opacus_fast.losses import IGNORE_INDEX, causal_lm_loss, reduce

ACCOUNTANTS = ("prv", "rdp", "prv_accountant")
MIN_CHARS = 40  # shorter help-text paragraphs are headings and fragments


class ByteTokenizer:
    """UTF-8 bytes as token ids 0–255, plus padding, begin- and end-of-text ids: needs no vocabulary file."""

    pad_token_id, bos_token_id, eos_token_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str, max_length: int) -> list[int]:
        """``[BOS] + bytes + [EOS]``, cut to ``max_length`` ids."""
        return [self.bos_token_id, *text.encode("utf-8"), self.eos_token_id][:max_length]


class HubTokenizer:
    """A Hugging Face tokenizer read from a local folder, with the same ``encode`` as :class:`ByteTokenizer`."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.vocab_size = len(self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id or 0

    def encode(self, text: str, max_length: int) -> list[int]:
        return self.tokenizer(text, truncation=True, max_length=max_length)["input_ids"]


@dataclass
class Corpus:
    """Tokenised train and held-out records: tensors (input_ids, attention_mask, labels) of shape (N, seq_len)."""

    train: TensorDataset
    test: TensorDataset
    source: str


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data", type=Path, default=None,
                   help="JSONL (one object per line) or CSV file of records; default: Python's help texts")
    p.add_argument("--text-key", default="text", help="the JSONL field or CSV column holding each record's text")
    p.add_argument("--test-fraction", type=float, default=0.1, help="records held out for the evaluation loss")
    p.add_argument("--model", choices=tuple(CONFIGS), default="llama", help="architecture built from a config")
    p.add_argument("--model-kwargs", type=json.loads, default={},
                   help='JSON fields of the model config, e.g. \'{"hidden_size": 128, "num_hidden_layers": 4}\'')
    p.add_argument("--model-path", type=Path, default=None,
                   help="folder with local weights (from_pretrained, local_files_only=True) instead of --model")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="folder with a local Hugging Face tokenizer; default: --model-path's if it has one, "
                   "else bytes")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters on all linear layers (peft)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scaling numerator alpha")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per record (longer records are cut)")
    p.add_argument("--epsilon", type=float, default=8.0, help="target ε (σ is calibrated for the whole run)")
    p.add_argument("--noise-multiplier", type=float, default=None, help="σ instead of calibrating it to --epsilon")
    p.add_argument("--delta", type=float, default=1e-5, help="target δ")
    p.add_argument("--accountant", choices=ACCOUNTANTS, default="prv", help="privacy accountant")
    p.add_argument("--epochs", type=float, default=3.0, help="expected passes over the training records")
    p.add_argument("--batch-size", type=int, default=64, help="expected logical batch size (Poisson rate × N)")
    p.add_argument("--max-physical-batch-size", type=int, default=16, help="rows per physical batch (padded)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="per-example clipping bound C")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, sampling and noise")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch; None: 1 for a model built from a config (small models only lose "
                   "time to thread contention), torch's default with --model-path")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "finetune_text",
                   help="output folder")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


# ---- data ---------------------------------------------------------------------------------------------------------
def help_texts() -> list[str]:
    """The paragraphs of Python's interactive help texts (``pydoc_data.topics``, part of CPython)."""
    from pydoc_data.topics import topics

    paragraphs = (p.strip() for name in sorted(topics) for p in topics[name].split("\n\n"))
    return [p for p in paragraphs if len(p) >= MIN_CHARS]


def read_texts(path: Path, key: str) -> list[str]:
    """The non-empty ``key`` texts of a JSONL or CSV file, one record each."""
    if not path.is_file():
        raise ValueError(f"--data {path}: no such file")
    with path.open(encoding="utf-8", newline="") as f:
        if path.suffix in (".jsonl", ".json"):
            rows = [json.loads(line) for line in f if line.strip()]
        elif path.suffix == ".csv":
            rows = list(csv.DictReader(f))
        else:
            raise ValueError(f"--data {path}: expected a .jsonl or .csv file")
    missing = [i for i, row in enumerate(rows) if not isinstance(row, dict) or key not in row]
    if missing:
        raise ValueError(f"--data {path}: record {missing[0]} has no {key!r} field (set --text-key)")
    return [str(row[key]) for row in rows if str(row[key]).strip()]


def encode(texts: Sequence[str], tokenizer: Any, seq_len: int) -> TensorDataset:
    """(input_ids, attention_mask, labels), each (N, seq_len): ids padded on the right, labels = ids with
    ``IGNORE_INDEX`` at padding (the loss shifts them by one)."""
    ids = torch.full((len(texts), seq_len), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(texts), seq_len), dtype=torch.long)
    for i, text in enumerate(texts):
        tokens = tokenizer.encode(text, seq_len)
        ids[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(tokens)] = 1
    return TensorDataset(ids, mask, ids.masked_fill(mask == 0, IGNORE_INDEX))


def load_corpus(args: argparse.Namespace, tokenizer: Any) -> Corpus:
    """The records, tokenised, split into train and held-out parts by a fixed permutation."""
    texts = help_texts() if args.data is None else read_texts(args.data, args.text_key)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    held_out = round(len(texts) * args.test_fraction)
    test, train = [texts[i] for i in order[:held_out]], [texts[i] for i in order[held_out:]]
    source = "pydoc_data.topics" if args.data is None else str(args.data)
    return Corpus(encode(train, tokenizer, args.seq_len), encode(test, tokenizer, args.seq_len), source)


# ---- model --------------------------------------------------------------------------------------------------------
def load_tokenizer(args: argparse.Namespace) -> tuple[Any, str]:
    """``--tokenizer``, else ``--model-path``'s tokenizer if it has one, else bytes; and a name for the summary."""
    path = args.tokenizer
    if path is None and args.model_path is not None and has_tokenizer(args.model_path):
        path = args.model_path
    return (ByteTokenizer(), "bytes") if path is None else (HubTokenizer(path), str(path))


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def tiny_llama_config(vocab_size: int, seq_len: int, overrides: dict[str, Any]) -> Any:
    """A small Llama-style decoder (rotary positions, RMSNorm, SwiGLU, grouped-query attention)."""
    from transformers import LlamaConfig

    fields = {"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": seq_len,
              "tie_word_embeddings": False, **overrides}
    return LlamaConfig(**fields)


def tiny_gpt2_config(vocab_size: int, seq_len: int, overrides: dict[str, Any]) -> Any:
    """A small GPT-2 (learned position embeddings, tied input and output embeddings), no dropout."""
    from transformers import GPT2Config

    fields = {"vocab_size": vocab_size, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": seq_len,
              "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **overrides}
    return GPT2Config(**fields)


#: the architectures ``--model`` builds from a config
CONFIGS = {"llama": tiny_llama_config, "gpt2": tiny_gpt2_config}


def build_model(args: argparse.Namespace, vocab_size: int) -> nn.Module:
    """The causal LM from ``--model-path`` or from a config, with LoRA adapters if ``--lora``; in training mode."""
    from transformers import AutoModelForCausalLM

    if args.model_path is not None:
        model = AutoModelForCausalLM.from_pretrained(str(args.model_path), local_files_only=True)
        if model.config.vocab_size < vocab_size:
            raise ValueError(f"the tokenizer has {vocab_size} ids but the model only {model.config.vocab_size}")
    else:
        model = AutoModelForCausalLM.from_config(CONFIGS[args.model](vocab_size, args.seq_len, args.model_kwargs))
    if args.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules="all-linear")
        model = get_peft_model(model, lora)
    return model.train()


# ---- training -----------------------------------------------------------------------------------------------------
def sequence_losses(model: nn.Module, batch: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Each row's mean loss over its target tokens (the model is called without labels=, see opacus_fast.losses)."""
    ids, mask, labels = (t.to(device) for t in batch)
    return causal_lm_loss(model(input_ids=ids, attention_mask=mask).logits, labels, reduction="none")


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset, device: torch.device, batch_size: int = 64) -> float:
    """Mean over records of each record's token-mean loss."""
    model.eval()
    total = sum(sequence_losses(model, batch, device).sum().item() for batch in DataLoader(data, batch_size))
    model.train()
    return total / max(len(data), 1)


def train(
    model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, steps: int, device: torch.device,
    progress: bool,
) -> list[float]:
    """The ordinary loop over physical batches: ``steps`` logical steps; returns each step's mean loss over its
    real rows (the loader's mask leaves out padding rows)."""
    history: list[float] = []
    loss_sum, rows = 0.0, 0
    with tqdm(total=steps, desc="DP fine-tuning", disable=not progress, unit="step", dynamic_ncols=True) as bar:
        while len(history) < steps:
            for batch in loader:
                info = loader.context.current
                optimizer.zero_grad()
                losses = sequence_losses(model, batch, device)
                reduce(losses, "mean").backward()  # as make_private_fast's loss_reduction="mean"
                optimizer.step()
                real = losses.detach()[info.mask.to(device)] if info.mask is not None else losses.detach()
                loss_sum, rows = loss_sum + real.sum().item(), rows + len(real)
                if info.is_last:
                    history.append(loss_sum / max(rows, 1))
                    loss_sum, rows = 0.0, 0
                    bar.update(1)
                    bar.set_postfix(loss=f"{history[-1]:.3f}")
                    if len(history) == steps:
                        break
    return history


def make_private(args: argparse.Namespace, model: nn.Module, corpus: Corpus) -> tuple[Any, Any, Any, Any, int]:
    """``make_private_fast`` (σ given) or its ``_with_epsilon`` variant (σ calibrated for ``steps``)."""
    from opacus_fast import PrivacyEngine

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    sample_rate = args.batch_size / len(corpus.train)
    steps = max(1, round(args.epochs / sample_rate))
    engine = PrivacyEngine(accountant=args.accountant)
    options = {
        "module": model, "optimizer": optimizer, "data_loader": DataLoader(corpus.train, batch_size=args.batch_size),
        "max_grad_norm": args.max_grad_norm, "sample_rate": sample_rate, "poisson_sampling": True,
        "max_physical_batch_size": args.max_physical_batch_size,
        "noise_generator": torch.Generator(args.device).manual_seed(args.seed),
    }
    if args.noise_multiplier is None:
        private = engine.make_private_fast_with_epsilon(
            **options, target_epsilon=args.epsilon, target_delta=args.delta, steps=steps
        )
    else:
        private = engine.make_private_fast(**options, noise_multiplier=args.noise_multiplier)
    return engine, *private, steps


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse inconsistent flags before any work."""
    if min(args.epochs, args.batch_size, args.max_grad_norm, args.lr, args.seq_len - 1) <= 0:
        parser.error("--epochs, --batch-size, --max-grad-norm and --lr must be > 0, --seq-len > 1")
    if args.max_physical_batch_size < 1 or not 0 <= args.test_fraction < 1:
        parser.error("--max-physical-batch-size must be >= 1 and --test-fraction in [0, 1)")
    if args.model_path is not None and args.model_kwargs:
        parser.error("--model-kwargs configures a model built from a config, not one loaded by --model-path")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, fine-tune privately, write ``summary.json``, return the summary."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        tokenizer, tokenizer_name = load_tokenizer(args)
        corpus = load_corpus(args, tokenizer)
        torch.manual_seed(args.seed)
        model = build_model(args, tokenizer.vocab_size)
    except (OSError, ValueError) as err:  # missing or bad data, model or tokenizer files: reported like bad flags
        parser.error(str(err))
    if args.batch_size > len(corpus.train):
        parser.error(f"--batch-size {args.batch_size} exceeds the {len(corpus.train)} training records")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads or (threads_before if args.model_path else 1))
    try:
        device = torch.device(args.device)
        model = model.to(device)
        counts = {"parameters": sum(p.numel() for p in model.parameters()),
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        test_before = evaluate(model, corpus.test, device)
        start = time.perf_counter()
        engine, private_model, optimizer, loader, steps = make_private(args, model, corpus)
        history = train(private_model, optimizer, loader, steps, device, progress=not args.no_progress)
        wall_s = time.perf_counter() - start
        test_after = evaluate(private_model, corpus.test, device)
        epsilon = engine.get_epsilon(args.delta)
    finally:
        torch.set_num_threads(threads_before)  # main() may be called in-process (tests)

    summary = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": {"source": str(args.model_path) if args.model_path else args.model, "lora": args.lora, **counts},
        "tokenizer": tokenizer_name,
        "data": {"source": corpus.source, "train_records": len(corpus.train), "test_records": len(corpus.test),
                 "seq_len": args.seq_len},
        "privacy": {"epsilon": epsilon, "delta": args.delta, "accountant": args.accountant,
                    "noise_multiplier": optimizer.noise_multiplier, "sample_rate": args.batch_size / len(corpus.train),
                    "max_grad_norm": args.max_grad_norm},
        "steps": steps,
        "loss": {"test_before": test_before, "test_after": test_after, "train_last_step": history[-1]},
        "train_loss": history,
        "wall_s": wall_s,
        "torch": torch.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"DP fine-tuning: held-out loss {test_before:.3f} → {test_after:.3f} (nats per token, per-record mean), "
          f"ε = {epsilon:.3f} (δ = {args.delta}, {args.accountant}), σ = {optimizer.noise_multiplier:.3f}, "
          f"{steps} steps, {wall_s:.1f} s; wrote {args.out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
