"""Train an image classifier with DP-SGD at a target (ε, δ) using ``make_private_fast_with_epsilon``.

Defaults: scikit-learn's handwritten digits (shipped with the package, no download), a small CNN of our own, ε = 8,
δ = 1e-5, the PRV accountant, on CPU in a few minutes. ``--data cifar10 --data-dir DIR`` uses torchvision's CIFAR-10
from a folder you already have (``--download`` fetches it); ``--model`` also takes any timm model name;
``--compare-sgd`` also trains the same model without privacy, with the same batch size and number of steps.

    python examples/train.py
    python examples/train.py --compare-sgd --out examples/results
    python examples/train.py --data cifar10 --data-dir ~/data --model resnet18 --epochs 10

Writes ``curves.png`` (training curves) and ``summary.json`` into ``--out``. Importable: ``main(argv) -> summary``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm import tqdm

ACCOUNTANTS = ("prv", "rdp", "prv_accountant")
OWN_MODELS = ("cnn", "mlp")


@dataclass
class Data:
    """Train and test sets, with the input shape and number of classes the model must fit."""

    train: Dataset
    test: Dataset
    in_chans: int
    image_size: int
    num_classes: int


@dataclass
class History:
    """Per-pass training curves (one pass = one iteration of the training loader)."""

    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    epsilon: list[float] = field(default_factory=list)  # private runs only


def build_parser() -> argparse.ArgumentParser:
    """The command line: every hyper-parameter that matters for DP is a flag."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data", choices=("digits", "cifar10"), default="digits", help="data set")
    p.add_argument("--data-dir", type=Path, default=None, help="folder holding cifar-10-batches-py (cifar10 only)")
    p.add_argument("--download", action="store_true", help="allow torchvision to download CIFAR-10 into --data-dir")
    p.add_argument("--model", default="cnn", help="'cnn' or 'mlp' (ours), or any timm model name")
    p.add_argument("--model-kwargs", type=json.loads, default={},
                   help='JSON keywords for timm.create_model, e.g. \'{"img_size": 32, "patch_size": 4}\' for a ViT')
    p.add_argument("--epsilon", type=float, default=8.0, help="target ε")
    p.add_argument("--delta", type=float, default=1e-5, help="target δ")
    p.add_argument("--accountant", choices=ACCOUNTANTS, default="prv", help="privacy accountant")
    p.add_argument("--epochs", type=float, default=20.0, help="expected passes over the training set")
    p.add_argument("--batch-size", type=int, default=256, help="expected logical batch size (Poisson rate × N)")
    p.add_argument("--max-physical-batch-size", type=int, default=128,
                   help="rows per physical batch (padded and masked); 0 = whole logical batches")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="per-example clipping bound C")
    p.add_argument("--lr", type=float, default=2.0, help="learning rate")
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, sampling and noise")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (helps with CIFAR-10)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch; None: 1 for digits (its small models only lose time to thread "
                   "contention), torch's default otherwise")
    p.add_argument("--compare-sgd", action="store_true", help="also train without privacy (same batch size, steps)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


# ---- data ---------------------------------------------------------------------------------------------------------
def load_digits_data(test_fraction: float = 0.2) -> Data:
    """scikit-learn's 8×8 digits (1,797 images), a fixed stratified split, standardised with train statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=0)
    mean, std = x_tr.mean(), x_tr.std()

    def tensors(x_part: Any, y_part: Any) -> TensorDataset:
        images = torch.tensor((x_part - mean) / std, dtype=torch.float32).reshape(-1, 1, 8, 8)
        return TensorDataset(images, torch.tensor(y_part, dtype=torch.long))

    return Data(tensors(x_tr, y_tr), tensors(x_te, y_te), in_chans=1, image_size=8, num_classes=10)


def load_cifar10_data(data_dir: Path | None, download: bool) -> Data:
    """torchvision's CIFAR-10 from ``data_dir``; downloads only when ``download`` is set."""
    if data_dir is None:
        raise FileNotFoundError(
            "--data cifar10 needs --data-dir DIR, the folder that holds (or, with --download, will hold) "
            "cifar-10-batches-py; nothing is downloaded unless you pass --download"
        )
    if not download and not (data_dir / "cifar-10-batches-py").is_dir():
        raise FileNotFoundError(
            f"no CIFAR-10 in {data_dir} (expected {data_dir / 'cifar-10-batches-py'}): point --data-dir at the "
            "folder that contains it, or add --download to fetch it there (about 170 MB)"
        )
    from torchvision import datasets, transforms

    to_tensor = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))]
    )
    try:
        train = datasets.CIFAR10(str(data_dir), train=True, transform=to_tensor, download=download)
        test = datasets.CIFAR10(str(data_dir), train=False, transform=to_tensor, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(f"CIFAR-10 in {data_dir} is incomplete or corrupted ({err}); add --download") from err
    return Data(train, test, in_chans=3, image_size=32, num_classes=10)


# ---- models -------------------------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """Three 3×3 convolutions (the last two with stride 2) with GroupNorm and tanh, average pooling, a linear head.

    GroupNorm instead of BatchNorm (which mixes examples and cannot be made private); tanh because bounded
    activations keep per-example gradients small and are known to suit DP-SGD (Papernot et al. 2021).
    """

    def __init__(self, in_chans: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1), nn.GroupNorm(4, width), nn.Tanh(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(4, 2 * width), nn.Tanh(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(4, 2 * width), nn.Tanh(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_model(name: str, data: Data, timm_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Our small CNN or MLP, or a freshly initialised timm model made DP-compatible by ``opacus_fast.fix``.

    No pretrained weights: they would need a download.
    """
    if name == "cnn":
        return SmallCNN(data.in_chans, data.num_classes)
    if name == "mlp":
        features = data.in_chans * data.image_size**2
        return nn.Sequential(nn.Flatten(), nn.Linear(features, 128), nn.Tanh(), nn.Linear(128, data.num_classes))
    import timm

    import opacus_fast

    model = timm.create_model(
        name, pretrained=False, num_classes=data.num_classes, in_chans=data.in_chans, **(timm_kwargs or {})
    )
    return opacus_fast.fix(model)  # BatchNorm (timm's norm-act layers too) → GroupNorm, and the like


# ---- training -----------------------------------------------------------------------------------------------------
def batch_info(loader: DataLoader) -> tuple[torch.Tensor | None, bool]:
    """For the batch the loader just yielded: the mask of its real rows (None = all real), and whether it ends a step.

    A DP loader publishes this for each physical batch; a plain loader yields whole batches, each one a step.
    """
    info = getattr(getattr(loader, "context", None), "current", None)
    return (None, True) if info is None else (info.mask, info.is_last)


def train_batch(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None
) -> tuple[float, int, int]:
    """One forward/backward/step; returns the loss sum, correct count and count over the real rows."""
    optimizer.zero_grad()
    logits = model(x)
    losses = F.cross_entropy(logits, y, reduction="none")
    (losses.sum() / max(len(y), 1)).backward()  # the mean over the physical batch (0 for an empty one)
    optimizer.step()
    real = torch.ones_like(y, dtype=torch.bool) if mask is None else mask.to(y.device)
    with torch.no_grad():
        return losses[real].sum().item(), (logits.argmax(1) == y)[real].sum().item(), int(real.sum())


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, device: torch.device, batch_size: int = 512) -> float:
    """Accuracy of ``model`` on ``data``."""
    model.eval()
    correct = sum((model(x.to(device)).argmax(1) == y.to(device)).sum().item() for x, y in DataLoader(data, batch_size))
    model.train()
    return correct / len(data)


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    steps: int,
    test: Dataset,
    device: torch.device,
    epsilon_fn: Any = None,
    progress: bool = True,
    label: str = "",
) -> History:
    """The user's ordinary loop for ``steps`` optimizer steps (logical batches), one history point per loader pass.

    The same code trains privately and non-privately: a DP loader's physical batches may be padded, so losses and
    accuracies count the real rows only (the published mask), and a step ends with the last physical batch.
    """
    history, done, eps = History(), 0, "-"
    with tqdm(total=steps, desc=label, disable=not progress, unit="step", dynamic_ncols=True) as bar:
        while done < steps:
            loss, correct, seen = 0.0, 0, 0
            for x, y in loader:
                mask, ends_step = batch_info(loader)
                batch_loss, batch_correct, batch_seen = train_batch(model, optimizer, x.to(device), y.to(device), mask)
                loss, correct, seen = loss + batch_loss, correct + batch_correct, seen + batch_seen
                if ends_step:
                    done += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss / max(seen, 1):.3f}", acc=f"{correct / max(seen, 1):.3f}", eps=eps)
                    if done == steps:
                        break
            history.step.append(done)
            history.train_loss.append(loss / max(seen, 1))
            history.train_acc.append(correct / max(seen, 1))
            history.test_acc.append(evaluate(model, test, device))
            if epsilon_fn is not None:
                history.epsilon.append(epsilon_fn())
                eps = f"{history.epsilon[-1]:.2f}"
            else:
                eps = "inf"
            bar.set_postfix(loss=f"{history.train_loss[-1]:.3f}", acc=f"{history.train_acc[-1]:.3f}",
                            test_acc=f"{history.test_acc[-1]:.3f}", eps=eps)
    return history


def train_private(args: argparse.Namespace, data: Data, device: torch.device) -> dict[str, Any]:
    """DP-SGD with σ calibrated by ``make_private_fast_with_epsilon`` so that ε after all steps ≤ the target.

    ``steps`` = epochs / q, rounded, is what σ is calibrated for and exactly what the loop runs.
    """
    from opacus_fast import PrivacyEngine

    torch.manual_seed(args.seed)
    model = make_model(args.model, data, args.model_kwargs).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    sample_rate = args.batch_size / len(data.train)
    steps = max(1, round(args.epochs / sample_rate))
    engine = PrivacyEngine(accountant=args.accountant)
    start = time.perf_counter()
    model, optimizer, loader = engine.make_private_fast_with_epsilon(
        module=model, optimizer=optimizer,
        data_loader=DataLoader(data.train, batch_size=args.batch_size, num_workers=args.workers),
        target_epsilon=args.epsilon, target_delta=args.delta, max_grad_norm=args.max_grad_norm, steps=steps,
        sample_rate=sample_rate, max_physical_batch_size=args.max_physical_batch_size or None,
        noise_generator=torch.Generator(device).manual_seed(args.seed),
    )
    calibrate_s = time.perf_counter() - start
    history = fit(model, optimizer, loader, steps, data.test, device, lambda: engine.get_epsilon(args.delta),
                  progress=not args.no_progress, label="DP-SGD")
    return {
        "test_accuracy": history.test_acc[-1],
        "epsilon": history.epsilon[-1],
        "delta": args.delta,
        "target_epsilon": args.epsilon,
        "accountant": args.accountant,
        "noise_multiplier": optimizer.noise_multiplier,
        "sample_rate": sample_rate,
        "steps": steps,
        "wall_s": time.perf_counter() - start,
        "calibrate_s": calibrate_s,
        "history": history.__dict__,
    }


def train_sgd(args: argparse.Namespace, data: Data, device: torch.device, steps: int) -> dict[str, Any]:
    """The same model, optimizer and loop without privacy: shuffled batches of ``--batch-size``, ``steps`` steps."""
    torch.manual_seed(args.seed)
    model = make_model(args.model, data, args.model_kwargs).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    loader = DataLoader(data.train, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
    start = time.perf_counter()
    history = fit(model, optimizer, loader, steps, data.test, device, progress=not args.no_progress, label="SGD")
    return {"test_accuracy": history.test_acc[-1], "steps": steps, "wall_s": time.perf_counter() - start,
            "history": history.__dict__}


# ---- outputs ------------------------------------------------------------------------------------------------------
def plot_curves(runs: dict[str, dict[str, Any]], path: Path) -> None:
    """Test accuracy, training loss and ε spent against steps, for each run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, run in runs.items():
        h = run["history"]
        axes[0].plot(h["step"], h["test_acc"], marker=".", label=name)
        axes[1].plot(h["step"], h["train_loss"], marker=".", label=name)
        if run["history"]["epsilon"]:
            axes[2].plot(h["step"], h["epsilon"], marker=".", label=f"{name} ({run['accountant']})")
            axes[2].axhline(run["target_epsilon"], color="grey", linestyle="--", linewidth=1, label="target ε")
    for ax, title in zip(axes, ("test accuracy", "training loss (real rows)", "ε spent")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_data(args: argparse.Namespace) -> Data:
    """The data set named by ``--data``."""
    if args.data == "digits":
        return load_digits_data()
    return load_cifar10_data(args.data_dir, args.download)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse inconsistent flags before any work (parser.error exits with the usage and the message)."""
    if args.data_dir is not None and args.data != "cifar10":
        parser.error("--data-dir is only used with --data cifar10")
    if min(args.epochs, args.batch_size, args.max_grad_norm) <= 0:
        parser.error("--epochs, --batch-size and --max-grad-norm must be > 0")
    if min(args.max_physical_batch_size, args.workers) < 0:
        parser.error("--max-physical-batch-size and --workers must be >= 0")
    if args.model not in OWN_MODELS:
        import timm

        if not timm.is_model(args.model):
            parser.error(f"unknown --model {args.model!r}: use {' or '.join(OWN_MODELS)}, or a timm.list_models() name")


def write_outputs(summary: dict[str, Any], out: Path) -> None:
    """``summary.json`` and ``curves.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_curves(summary["runs"], out / "curves.png")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, train privately (and non-privately with ``--compare-sgd``), write outputs, return the summary."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        data = load_data(args)
    except FileNotFoundError as err:
        parser.error(str(err))
    if args.batch_size > len(data.train):
        parser.error(f"--batch-size {args.batch_size} exceeds the {len(data.train)} training examples")
    threads_before = torch.get_num_threads()
    threads = args.threads if args.threads is not None else (1 if args.data == "digits" else threads_before)
    torch.set_num_threads(threads)
    try:
        device = torch.device(args.device)
        runs = {"DP-SGD": train_private(args, data, device)}
        if args.compare_sgd:
            runs["SGD"] = train_sgd(args, data, device, runs["DP-SGD"]["steps"])
    finally:
        torch.set_num_threads(threads_before)  # main() may be called in-process (tests)

    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    summary = {"config": {**config, "threads": threads}, "train_size": len(data.train), "test_size": len(data.test),
               "torch": torch.__version__, "runs": runs}
    write_outputs(summary, args.out)
    private = runs["DP-SGD"]
    print(f"DP-SGD: test accuracy {private['test_accuracy']:.4f}, ε = {private['epsilon']:.4f} "
          f"(target {args.epsilon}, δ = {args.delta}, accountant {args.accountant!r}), σ = "
          f"{private['noise_multiplier']:.3f}, {private['steps']} steps, {private['wall_s']:.1f} s")
    if "SGD" in runs:
        print(f"SGD (non-private, same batch size and steps): test accuracy {runs['SGD']['test_accuracy']:.4f}, "
              f"{runs['SGD']['wall_s']:.1f} s")
    print(f"wrote {args.out / 'summary.json'} and {args.out / 'curves.png'}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
