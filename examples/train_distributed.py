"""Distributed DP-SGD with opacus_fast: an MLP on scikit-learn's digits, one process per CPU core or GPU.

Launch with torchrun (gloo on CPU; NCCL, one GPU per process, when CUDA is available):

    # one machine, 2 processes
    torchrun --standalone --nproc_per_node=2 examples/train_distributed.py --epochs 10
    # two machines with 4 GPUs each: run on both, with --node_rank=0 on HOST and --node_rank=1 on the other
    torchrun --nnodes=2 --nproc_per_node=4 --node_rank=0 --master_addr=HOST --master_port=29500 \\
        examples/train_distributed.py --epochs 10

Every rank runs the same unchanged training loop. Each step's logical batch is one Poisson sample of the whole
dataset (expected size --batch-size), split over the ranks; the clipped gradient sums are all-reduced once per step
and the noise is added once, by rank 0. With --checkpoint, rank 0 saves after every epoch and the same command,
restarted, resumes from there on every rank. If a rank fails, the others stop with an error after --timeout seconds at most.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from opacus_fast import PrivacyEngine
from opacus_fast.distributed import DPDistributedModule, save_checkpoint


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128, help="expected GLOBAL logical batch size N·q")
    parser.add_argument("--physical-batch-size", type=int, default=32, help="rows per forward/backward per rank")
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--target-epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a collective gives up")
    parser.add_argument("--checkpoint", type=Path, help="save after every epoch; resume from it if it exists")
    parser.add_argument("--ddp", action="store_true", help="wrap the model in DistributedDataParallel instead")
    return parser.parse_args()


def digits(device: torch.device) -> tuple[TensorDataset, TensorDataset]:
    """Standardised 8×8 digit images (1,797), split 1,500 / 297 with a fixed permutation."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(y)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:1500], order[1500:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test].to(device), y[test].to(device))


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    args = parse_args()
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)  # rank 0's initial weights and Poisson seed are broadcast to every rank anyway

    train, test = digits(device)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)
    wrapped = DistributedDataParallel(model) if args.ddp else DPDistributedModule(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loader = DataLoader(train, batch_size=args.batch_size)
    engine = PrivacyEngine(accountant="prv")
    model, optimizer, loader = engine.make_private_fast_with_epsilon(
        module=wrapped, optimizer=optimizer, data_loader=loader, target_epsilon=args.target_epsilon,
        target_delta=args.delta, max_grad_norm=args.max_grad_norm, epochs=args.epochs,
        sample_rate=args.batch_size / len(train), max_physical_batch_size=args.physical_batch_size,
    )
    start = 0
    if args.checkpoint is not None and args.checkpoint.exists():
        checkpoint = engine.load_checkpoint(path=args.checkpoint, module=model, optimizer=optimizer,
                                            data_loader=loader, torch_load_kwargs={"map_location": "cpu"})
        if checkpoint["noise_multiplier"] != optimizer.noise_multiplier:
            raise SystemExit("the checkpoint was trained with another σ: resume with the same arguments")
        start = checkpoint["epoch"] + 1
    if rank == 0:
        print(f"{world} ranks on {device.type}; σ = {optimizer.noise_multiplier:.3f}, q = {loader.sample_rate:.4f}, "
              f"{len(loader)} steps per epoch; starting at epoch {start}")

    criterion = nn.CrossEntropyLoss()
    for epoch in range(start, args.epochs):
        for x, y in loader:  # every rank gets every step, possibly with only padding rows
            optimizer.zero_grad()
            loss = criterion(model(x.to(device)), y.to(device))
            loss.backward()
            optimizer.step()
        if args.checkpoint is not None:
            save_checkpoint(engine, path=args.checkpoint, module=model, optimizer=optimizer, data_loader=loader,
                            checkpoint_dict={"epoch": epoch, "noise_multiplier": optimizer.noise_multiplier})
        if rank == 0:
            print(f"epoch {epoch}: test accuracy {accuracy(model, test):.3f}, "
                  f"ε = {engine.get_epsilon(args.delta):.2f} (δ = {args.delta:g})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
