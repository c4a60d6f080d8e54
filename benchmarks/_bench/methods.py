"""Models, synthetic data and the four methods, each set up through the public API a user would call.

Data: every example is ``(index, label)``; the training loop gathers the image from a bank of random
CIFAR/ImageNet-shaped images that already sits on the device, so the host does no image work and the
timings measure the model. Every method draws its physical batches from ``opacus_fast.data.DPDataLoader``
(Poisson logical batches, split into physical batches of exactly ``physical`` rows, the last one padded):
- ``sgd``: plain ``torch.optim.SGD`` on the same (ModuleValidator-fixed) model and the same batches;
- ``opacus`` / ``opacus-ghost``: ``opacus.PrivacyEngine.make_private`` (hooks / ghost with its criterion),
  given that loader with ``poisson_sampling=False`` (it already samples); Opacus has no padding masks,
  so for these two the padded rows count as examples: identical work, not a private run. As with Opacus'
  ``BatchMemoryManager``, the optimizer is told to skip every physical step but a logical batch's last, so
  Opacus also adds noise once per logical batch;
- ``fast-bk``: ``opacus_fast.PrivacyEngine().make_private_fast`` with the plain loader, Poisson sampling,
  ``max_physical_batch_size=physical`` and padding: its own DPDataLoader, masks included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


class IndexDataset(Dataset):
    """``size`` examples; example i is ``(i, i % num_classes)``; images come from the device bank."""

    def __init__(self, size: int, num_classes: int) -> None:
        self.size = size
        self.num_classes = num_classes

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple:
        return index, index % self.num_classes


@dataclass
class Trainer:
    """What the user's loop holds after setting a method up."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: Callable[..., torch.Tensor]
    loader: Any
    params: list[torch.Tensor]
    #: called just before ``optimizer.step()`` (Opacus: signal a skipped step inside a logical batch)
    before_step: Callable[[], None] | None = None


def create_model(spec: str, img_size: int, num_classes: int) -> nn.Module:
    """A timm model from ``name[:key=value,...]``, passed through ``ModuleValidator.fix`` (BatchNorm→GroupNorm).

    ``img_size`` is given to models that take it (ViTs) and left out for those that do not (ResNets).
    """
    import timm
    from opacus.validators import ModuleValidator

    from .config import parse_model_spec

    name, kwargs = parse_model_spec(spec)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size, **kwargs)
    except TypeError as err:
        if "img_size" not in str(err):
            raise
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    return ModuleValidator.fix(model)


def image_bank(count: int, img_size: int, seed: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """``count`` random standard-normal images of shape (3, img_size, img_size) on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, img_size, img_size, generator=gen).to(device=device, dtype=dtype)


def poisson_loader(dataset: Dataset, *, logical: int, physical: int, seed: int) -> DataLoader:
    """opacus_fast's Poisson loader: expected logical batch ``logical``, physical batches of ``physical`` rows.

    Its generator is seeded from torch's global RNG, reseeded with ``seed`` just before, exactly as
    ``make_private_fast`` builds its own: so every method draws the same batches.
    """
    from opacus_fast.data import DPDataLoader

    torch.manual_seed(seed)
    return DPDataLoader.from_data_loader(
        DataLoader(dataset, batch_size=logical),
        sample_rate=min(1.0, logical / len(dataset)),
        max_physical_batch_size=physical,
        pad=True,
    )


def make_trainer(
    method: str,
    model: nn.Module,
    dataset: Dataset,
    *,
    logical: int,
    physical: int,
    noise_multiplier: float,
    max_grad_norm: float,
    lr: float,
    seed: int,
) -> Trainer:
    """Set ``method`` up on ``model`` exactly as a user would; ``params`` are the user's parameter tensors."""
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=lr)
    criterion: Callable[..., torch.Tensor] = nn.CrossEntropyLoss()
    if method == "sgd":
        loader = poisson_loader(dataset, logical=logical, physical=physical, seed=seed)
        return Trainer(model, optimizer, criterion, loader, params)
    if method in ("opacus", "opacus-ghost"):
        from opacus import PrivacyEngine

        loader = poisson_loader(dataset, logical=logical, physical=physical, seed=seed)
        context = loader.context
        out = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            criterion=criterion,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=False,
            grad_sample_mode="ghost" if method == "opacus-ghost" else "hooks",
        )
        if method == "opacus-ghost":
            model, optimizer, criterion, loader = out
        else:
            model, optimizer, loader = out
        return Trainer(model, optimizer, criterion, loader, params, partial(_skip_inside_logical, optimizer, context))
    if method == "fast-bk":
        from opacus_fast import PrivacyEngine as FastPrivacyEngine

        torch.manual_seed(seed)  # its DPDataLoader seeds its sampler from the global RNG: same batches as sgd
        model, optimizer, loader = FastPrivacyEngine().make_private_fast(
            module=model,
            optimizer=optimizer,
            data_loader=DataLoader(dataset, batch_size=logical),
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
            max_physical_batch_size=physical,
            pad_physical_batches=True,
            sample_rate=min(1.0, logical / len(dataset)),
        )
        return Trainer(model, optimizer, criterion, loader, params)
    raise ValueError(f"unknown method {method!r}")


def _skip_inside_logical(optimizer: Any, context: Any) -> None:
    """What Opacus' ``BatchMemoryManager`` does: only a logical batch's last physical step adds noise and steps."""
    info = context.current
    optimizer.signal_skip_step(do_skip=info is not None and not info.is_last)


def endless(loader: Any) -> Iterator[Sequence[torch.Tensor]]:
    """The loader's batches, starting a new epoch whenever one ends."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the data loader yielded no batch in a whole epoch")


def train_step(trainer: Trainer, batch: Sequence[torch.Tensor], bank: torch.Tensor, autocast: Any) -> None:
    """One iteration of the user's loop on one physical batch."""
    index, target = batch[0], batch[1]
    device = bank.device
    x = bank[index.to(device, non_blocking=True) % bank.shape[0]]
    y = target.to(device, non_blocking=True)
    trainer.optimizer.zero_grad(set_to_none=True)
    with autocast:
        loss = trainer.criterion(trainer.model(x), y)
    loss.backward()
    if trainer.before_step is not None:
        trainer.before_step()
    trainer.optimizer.step()
