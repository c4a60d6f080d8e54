"""Throughput against the number of processes: distributed DP-SGD (fast-bk) and non-private DDP.

    python benchmarks/scaling.py                          # CPU, gloo, 1 and 2 processes of 1 thread (~2 min)
    python benchmarks/scaling.py --procs 1 2 4 8 --device cuda --hidden 4096   # one GPU per process, NCCL

Both methods see the same kind of batches: Poisson logical batches of expected GLOBAL size --logical-batch from
opacus_fast's distributed loader (one global sample per step, split over the ranks), cut into physical batches of
--physical-batch rows per rank, the last one padded. Per logical step:
  fast-bk  make_private_fast on DPDistributedModule: BK clipping on each rank, then ONE all-reduce of the clipped
           sums (in large buckets) and one noise draw (rank 0);
  ddp      DistributedDataParallel + SGD, no privacy: loss masked to the real rows, no_sync() on every physical
           batch but the last, so DDP all-reduces once per logical step too (a fair comparison).
Throughput = real (unpadded) examples in the measured steps / their wall time (slowest rank), after --warmup steps.
Scaling efficiency = throughput(n) / (n × throughput(1)). Every n runs in its own n spawned processes, which run
the methods in alternation, --repeats times; medians are reported. Outputs: a table on stdout and
benchmarks/results/scaling.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: use its opacus_fast

from opacus_fast import PrivacyEngine
from opacus_fast.data import DPDataLoader
from opacus_fast.distributed import DPDistributedModule

RESULTS_DIR = Path(__file__).resolve().parent / "results"
METHODS = ("ddp", "fast-bk")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="numbers of processes to compare")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    parser.add_argument("--dataset-size", type=int, default=60_000)
    parser.add_argument("--features", type=int, default=784)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--logical-batch", type=int, default=512, help="expected global logical batch N·q")
    parser.add_argument("--physical-batch", type=int, default=64, help="rows per forward/backward per rank")
    parser.add_argument("--warmup", type=int, default=2, help="logical steps not timed")
    parser.add_argument("--steps", type=int, default=6, help="logical steps timed per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "scaling")
    return parser.parse_args()


def make_model(args: argparse.Namespace) -> nn.Module:
    return nn.Sequential(nn.Linear(args.features, args.hidden), nn.ReLU(), nn.Linear(args.hidden, args.hidden),
                         nn.ReLU(), nn.Linear(args.hidden, 10))


def make_data(args: argparse.Namespace) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(args.dataset_size, args.features, generator=g),
                         torch.randint(0, 10, (args.dataset_size,), generator=g))


def prepare(method: str, args: argparse.Namespace, device: torch.device) -> tuple[Any, Any, DataLoader]:
    """(step function, optimizer, loader) for one method; the step function runs one physical batch."""
    torch.manual_seed(1)
    model = make_model(args).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    data = DataLoader(make_data(args), batch_size=args.logical_batch)
    rate = args.logical_batch / args.dataset_size
    if method == "fast-bk":
        private, optimizer, loader = PrivacyEngine().make_private_fast(
            module=DPDistributedModule(model), optimizer=optimizer, data_loader=data, noise_multiplier=1.0,
            max_grad_norm=1.0, sample_rate=rate, max_physical_batch_size=args.physical_batch,
        )
        criterion = nn.CrossEntropyLoss()

        def step(x: torch.Tensor, y: torch.Tensor, last: bool) -> None:
            optimizer.zero_grad()
            criterion(private(x), y).backward()
            optimizer.step()

        return step, optimizer, loader

    ddp = DistributedDataParallel(model)
    loader = DPDataLoader.from_data_loader(data, sample_rate=rate, max_physical_batch_size=args.physical_batch,
                                           distributed=True)
    criterion = nn.CrossEntropyLoss(reduction="none")
    scale = dist.get_world_size() / loader.expected_batch_size  # DDP averages over ranks; we want sum / (N·q)

    def step(x: torch.Tensor, y: torch.Tensor, last: bool) -> None:
        info = loader.context.current
        losses = criterion(ddp(x), y)
        if info.mask is not None:
            losses = losses * info.mask.to(device)
        if last:
            (losses.sum() * scale).backward()
            optimizer.step()
            optimizer.zero_grad()
        else:
            with ddp.no_sync():
                (losses.sum() * scale).backward()

    return step, optimizer, loader


def time_steps(method: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Examples per second of ``method`` over ``args.steps`` logical steps (slowest rank's wall time)."""
    step, _, loader = prepare(method, args, device)
    done, real, start = 0, 0, None
    batches = iter(loader)
    while done < args.warmup + args.steps:
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            continue
        info = loader.context.current
        if done == args.warmup and info.index == 0:
            sync(device)
            dist.barrier()
            start = time.perf_counter()
        if done >= args.warmup:
            real += info.num_real
        step(x.to(device), y.to(device), info.is_last)
        done += info.is_last
    batches.close()
    sync(device)
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)  # NCCL: on the GPU
    counts = torch.tensor([float(real)], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    dist.all_reduce(counts)
    return {"examples": counts.item(), "seconds": elapsed.item(), "throughput": counts.item() / elapsed.item()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(minutes=5))
    runs = []
    for repeat in range(args.repeats):
        order = METHODS if repeat % 2 == 0 else METHODS[::-1]
        for method in order:
            runs.append({"method": method, "procs": world, "repeat": repeat, **time_steps(method, args, device)})
    if rank == 0:
        Path(out).write_text(json.dumps(runs))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for world in args.procs:
        out = args.out.with_name(f"{args.out.name}.{world}procs.tmp.json")
        mp.start_processes(worker, args=(world, free_port(), args, str(out)), nprocs=world, start_method="spawn")
        runs += json.loads(out.read_text())
        out.unlink()
        print(f"done: {world} process(es)", flush=True)
    return runs


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median throughput per (method, procs), its min-max, scaling efficiency and ratio to DDP."""
    rows = []
    for method in METHODS:
        for world in sorted({r["procs"] for r in runs}):
            values = [r["throughput"] for r in runs if r["method"] == method and r["procs"] == world]
            rows.append({"method": method, "procs": world, "throughput": statistics.median(values),
                         "min": min(values), "max": max(values)})
    base = {r["method"]: r["throughput"] for r in rows if r["procs"] == min(r["procs"] for r in rows)}
    ddp = {r["procs"]: r["throughput"] for r in rows if r["method"] == "ddp"}
    lowest = min(r["procs"] for r in rows)
    for row in rows:
        row["efficiency"] = row["throughput"] * lowest / (row["procs"] * base[row["method"]])
        row["vs_ddp"] = row["throughput"] / ddp[row["procs"]]
    return rows


def render(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        (
            f"Model: MLP {args.features}-{args.hidden}-{args.hidden}-10; expected global logical batch "
            f"{args.logical_batch}, physical batch {args.physical_batch} per rank; device {args.device}, "
            f"{args.threads} thread(s) per process; {args.repeats} repeats of {args.steps} logical steps; "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs."
        ),
        "",
        "| method | processes | examples/s (median) | min–max | scaling efficiency | ÷ DDP |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['procs']} | {r['throughput']:.0f} | {r['min']:.0f}–{r['max']:.0f} | "
                     f"{r['efficiency']:.2f} | {r['vs_ddp']:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        procs = [r["procs"] for r in mine]
        left.errorbar(procs, [r["throughput"] for r in mine], marker="o", label=method,
                      yerr=[[r["throughput"] - r["min"] for r in mine], [r["max"] - r["throughput"] for r in mine]])
        left.plot(procs, [mine[0]["throughput"] * p / procs[0] for p in procs], ls=":", color="grey")
        right.plot(procs, [r["efficiency"] for r in mine], marker="o", label=method)
    left.set(xlabel="processes", ylabel="examples/s", title="throughput (dotted: linear)")
    right.set(xlabel="processes", ylabel="throughput(n) / (n × throughput(1))", title="scaling efficiency",
              ylim=(0, 1.2))
    for ax in (left, right):
        ax.set_xticks(sorted({r["procs"] for r in rows}))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = run_all(args)
    rows = summarize(runs)
    text = render(rows, args)
    print(text)
    args.out.with_suffix(".md").write_text(text + "\n")
    config = {k: v for k, v in vars(args).items() if k != "out"}
    args.out.with_suffix(".json").write_text(json.dumps({"config": config, "runs": runs, "summary": rows}, indent=1))
    plot(rows, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
