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

FSDP2 mode (--fsdp): peak memory per rank and throughput of a model sharded with ``fully_shard``:

    python benchmarks/scaling.py --fsdp                   # CPU, gloo, 1, 2 and 3 processes of 1 thread (~4 min)

The model is a residual MLP (--features → --hidden, --blocks pre-norm blocks LayerNorm → Linear(hidden, hidden) →
GELU, final LayerNorm, 10 classes; 2048 wide and 8 blocks by default: 34 M parameters, 130 MiB in float32), so
that parameters dominate memory. Every (method, number of processes, repeat) runs in its own freshly spawned
processes, so that no method's peak contaminates another's; the methods alternate in order from one repeat to the
next. Methods:
  fast-bk            each block sharded with fully_shard, then the root; make_private_fast (BK clipping on each
                     rank, one reduce-scatter of the clipped sums per FSDP unit and backward, noise on each shard);
                     the usual loop, optimizer.zero_grad() (whose set_to_none=False, as in Opacus, keeps the
                     zeroed p.grad buffers) before every physical batch;
  fsdp2              the same sharded model, no privacy: loss masked to the real rows and scaled as in the DDP mode,
                     FSDP2's own reduce-scatter of the gradients after every physical batch (its default);
  fast-bk unsharded  the reference: the same model, not sharded, with make_private_fast in one process.
Peak memory per rank is measured over the training steps (building the full model on every rank before sharding
it, as here, is excluded: large FSDP models are built on the meta device), relative to just before the model is
built (after the dataset, the same on every rank), in two ways:
  heap  the bytes in use in the C heap (glibc's mallinfo2: all arenas and threads, so every CPU tensor's storage
        and gloo's buffers, but not the free memory the allocator keeps), sampled after every ATen operator of the
        --warmup steps by a TorchDispatchMode (2 by default: the first step, before any gradient exists, peaks
        lower than the later ones); on CUDA, torch.cuda.max_memory_allocated. (torch's profiler with
        profile_memory=True misses the frees made on gloo's threads, e.g. of the copy its reduce-scatter makes.)
  RSS   the peak resident set size over the timed steps (VmHWM, reset through /proc/self/clear_refs when they
        start; where that is not possible, ru_maxrss over the whole run) minus the RSS before the build: what the
        OS sees, including the heap that glibc keeps after frees (often far above the heap in use).
The table shows the largest over the ranks (medians over repeats), and throughput as in the DDP mode (the timed
steps run without the dispatch mode). Outputs: a table on stdout and
benchmarks/results/scaling_fsdp_<device>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: use its opacus_fast

from opacus_fast import PrivacyEngine
from opacus_fast.data import DPDataLoader
from opacus_fast.distributed import DPDistributedModule

RESULTS_DIR = Path(__file__).resolve().parent / "results"
METHODS = ("ddp", "fast-bk")


#: defaults of the DDP mode and of --fsdp, for the options whose default depends on the mode
DEFAULTS = {
    False: {"procs": [1, 2], "features": 784, "hidden": 512, "dataset_size": 60_000, "logical_batch": 512,
            "physical_batch": 64, "warmup": 2, "steps": 6, "repeats": 3},
    True: {"procs": [1, 2, 3], "features": 256, "hidden": 2048, "dataset_size": 10_000, "logical_batch": 128,
           "physical_batch": 32, "warmup": 2, "steps": 2, "repeats": 2},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ddp, fsdp = DEFAULTS[False], DEFAULTS[True]

    def option(name: str, help_text: str = "", **kwargs: Any) -> None:
        key = name.lstrip("-").replace("-", "_")
        shown = f"default {ddp[key]} (DDP), {fsdp[key]} (--fsdp)"
        parser.add_argument(name, default=None, help=f"{help_text}; {shown}" if help_text else shown, **kwargs)

    parser.add_argument("--fsdp", action="store_true", help="FSDP2 mode: peak memory per rank and throughput")
    option("--procs", "numbers of processes to compare", type=int, nargs="+")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    option("--dataset-size", type=int)
    option("--features", type=int)
    option("--hidden", type=int)
    parser.add_argument("--blocks", type=int, default=8, help="residual blocks of the --fsdp model")
    option("--logical-batch", "expected global logical batch N·q", type=int)
    option("--physical-batch", "rows per forward/backward per rank", type=int)
    option("--warmup", "logical steps not timed", type=int)
    option("--steps", "logical steps timed per repeat", type=int)
    option("--repeats", type=int)
    parser.add_argument("--out", type=Path, help="output path without suffix; default benchmarks/results/scaling "
                        "(DDP), benchmarks/results/scaling_fsdp_<device> (--fsdp)")
    args = parser.parse_args()
    for key, value in DEFAULTS[args.fsdp].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = RESULTS_DIR / (f"scaling_fsdp_{args.device}" if args.fsdp else "scaling")
    return args


def make_model(args: argparse.Namespace) -> nn.Module:
    return nn.Sequential(nn.Linear(args.features, args.hidden), nn.ReLU(), nn.Linear(args.hidden, args.hidden),
                         nn.ReLU(), nn.Linear(args.hidden, 10))


def make_data(args: argparse.Namespace) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(args.dataset_size, args.features, generator=g),
                         torch.randint(0, 10, (args.dataset_size,), generator=g))


def prepare(method: str, args: argparse.Namespace, device: torch.device) -> tuple[Any, DataLoader]:
    """(step function, loader) for one method; the step function runs one physical batch."""
    torch.manual_seed(1)
    model = make_model(args).to(device)
    data = DataLoader(make_data(args), batch_size=args.logical_batch)
    rate = args.logical_batch / args.dataset_size
    if method == "fast-bk":
        return private_step(DPDistributedModule(model), data, rate, args)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
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

    return step, loader


def time_steps(method: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Examples per second of ``method`` over ``args.steps`` logical steps (slowest rank's wall time)."""
    step, loader = prepare(method, args, device)
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
    device = start_process(rank, world, port, args)
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


# ---- FSDP2 mode (--fsdp) -------------------------------------------------------------------------------------------
FSDP_METHODS = ("fast-bk", "fsdp2")
UNSHARDED = "fast-bk unsharded"
ALL_FSDP_METHODS = (*FSDP_METHODS, UNSHARDED)
MIB = 2**20


class Block(nn.Module):
    """Pre-norm residual block h + GELU(Linear(LayerNorm(h))): one FSDP unit."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + nn.functional.gelu(self.fc(self.norm(h)))


class DeepMLP(nn.Module):
    """Stem, residual blocks, final LayerNorm and a 10-class head: parameters dominate its memory."""

    def __init__(self, features: int, width: int, blocks: int) -> None:
        super().__init__()
        self.stem = nn.Linear(features, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(blocks))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def make_deep_model(args: argparse.Namespace) -> DeepMLP:
    """The --fsdp model of --features, --hidden and --blocks."""
    return DeepMLP(args.features, args.hidden, args.blocks)


def count_parameters(args: argparse.Namespace) -> int:
    """Parameters of the --fsdp model (built on the meta device: nothing allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in make_deep_model(args).parameters())


def shard(model: DeepMLP) -> nn.Module:
    """One FSDP2 unit per block, then the root (stem, final norm and head)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    return fully_shard(model)


#: one physical batch: (x, y, whether it is the last of its logical batch) -> None
Step = Callable[[torch.Tensor, torch.Tensor, bool], None]


def private_step(model: nn.Module, data: DataLoader, rate: float, args: argparse.Namespace) -> tuple[Step, Any]:
    """make_private_fast on ``model`` (sharded or not) and the usual loop's step on one physical batch."""
    private, optimizer, loader = PrivacyEngine().make_private_fast(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), data_loader=data, noise_multiplier=1.0,
        max_grad_norm=1.0, sample_rate=rate, max_physical_batch_size=args.physical_batch,
    )
    criterion = nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor, last: bool) -> None:
        optimizer.zero_grad()
        criterion(private(x), y).backward()
        optimizer.step()

    return step, loader


def plain_fsdp_step(model: nn.Module, data: DataLoader, rate: float, args: argparse.Namespace,
                    device: torch.device) -> tuple[Step, Any]:
    """Non-private FSDP2 on the same Poisson batches: the loss masked to the real rows, summed and divided by the
    global N·q (times the ranks, since FSDP2 averages the reduce-scattered gradients); FSDP2 reduce-scatters after
    every backward and accumulates into the sharded gradients; one optimizer step per logical batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = DPDataLoader.from_data_loader(data, sample_rate=rate, max_physical_batch_size=args.physical_batch,
                                           distributed=True)
    criterion = nn.CrossEntropyLoss(reduction="none")
    scale = dist.get_world_size() / loader.expected_batch_size

    def step(x: torch.Tensor, y: torch.Tensor, last: bool) -> None:
        losses = criterion(model(x), y)
        mask = loader.context.current.mask
        if mask is not None:
            losses = losses * mask.to(device)
        (losses.sum() * scale).backward()
        if last:
            optimizer.step()
            optimizer.zero_grad()

    return step, loader


def prepare_fsdp(method: str, args: argparse.Namespace, device: torch.device,
                 data: TensorDataset) -> tuple[Step, Any]:
    """Build ``method``'s model (the same initial weights for all) and return its step and loader."""
    torch.manual_seed(1)
    model = make_deep_model(args).to(device)
    if method != UNSHARDED:
        model = shard(model)
    source = DataLoader(data, batch_size=args.logical_batch)
    rate = args.logical_batch / args.dataset_size
    if method == "fsdp2":
        return plain_fsdp_step(model, source, rate, args, device)
    return private_step(model, source, rate, args)


def physical_batches(loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor, Any]]:
    """The loader's physical batches with their batch info, epoch after epoch."""
    while True:
        for x, y in loader:
            yield x, y, loader.context.current


def run_steps(step: Step, batches: Iterator, count: int, device: torch.device) -> int:
    """Run ``count`` logical steps; returns the number of real (unpadded) examples this rank processed."""
    real = done = 0
    while done < count:
        x, y, info = next(batches)
        real += info.num_real
        step(x.to(device), y.to(device), info.is_last)
        done += info.is_last
    return real


def proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes; None where there is no such file."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_rss_peak() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return proc_status_bytes("VmHWM") is not None
    except OSError:
        return False


def max_rss_bytes() -> int:
    """ru_maxrss: the peak RSS of the whole process so far (in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2() -> Any:
    """glibc's mallinfo2 (2.33 and later), or None (another C library)."""
    try:
        function = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    return function


MALLINFO2 = _mallinfo2()


def heap_in_use() -> int:
    """Bytes that malloc has handed out and not taken back, in all arenas and threads (glibc's mallinfo2: arena
    chunks in use + mmapped blocks): every CPU tensor's storage, gloo's buffers, not the allocator's free memory."""
    info = MALLINFO2()
    return info.uordblks + info.hblkhd


class HeapPeak(TorchDispatchMode):
    """Samples :func:`heap_in_use` after every ATen operator called on this thread, forward and backward (when an
    operator returns, its outputs and inputs are alive: the peaks between operators)."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = heap_in_use()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, heap_in_use())
        return out


class MemoryMeter:
    """Peak memory of one process over the training steps run in :meth:`training`, relative to just before the model
    is built (see the module docstring): the heap in use (CPU, glibc) or CUDA's allocated bytes, and the RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rss_before = proc_status_bytes("VmRSS") or max_rss_bytes()
        self.rss_reset = False
        self.peak: int | None = None
        if device.type == "cuda":
            self._before = torch.cuda.memory_allocated(device)
        else:
            self._before = heap_in_use() if MALLINFO2 is not None else None

    @contextmanager
    def training(self) -> Iterator[None]:
        """Measure the peak of the steps run inside; then reset the RSS peak for the steps that follow."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._before
        elif self._before is not None:
            with HeapPeak() as heap:
                yield
            self.peak = heap.peak - self._before
        else:
            yield
        gc.collect()
        self.rss_reset = reset_rss_peak()

    def rss_peak(self) -> int:
        """Peak RSS since :meth:`training` (or of the whole run, where it could not be reset) minus the RSS before."""
        peak = proc_status_bytes("VmHWM") if self.rss_reset else max_rss_bytes()
        return peak - self.rss_before


def start_process(rank: int, world: int, port: int, args: argparse.Namespace) -> torch.device:
    """Threads, device and process group of one spawned rank."""
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(minutes=5))
    return device


def measure_fsdp(method: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """This rank's peak memory (tensors and RSS) and its real examples and wall time over the timed steps."""
    data = make_data(args)  # the same on every rank: before the baseline
    gc.collect()
    meter = MemoryMeter(device)
    step, loader = prepare_fsdp(method, args, device, data)
    batches = physical_batches(loader)
    with meter.training():
        run_steps(step, batches, args.warmup, device)
    sync(device)
    dist.barrier()
    start = time.perf_counter()
    real = run_steps(step, batches, args.steps, device)
    sync(device)
    seconds = time.perf_counter() - start
    batches.close()
    return {"rank": dist.get_rank(), "examples": real, "seconds": seconds, "peak_memory": meter.peak,
            "peak_rss": meter.rss_peak(), "rss_reset": meter.rss_reset}


def largest(values: list[Any]) -> Any:
    """The largest value, or None if any is None (a measure this platform lacks)."""
    return None if any(v is None for v in values) else max(values)


def median(values: list[Any]) -> Any:
    """The median, or None if any value is None."""
    return None if any(v is None for v in values) else statistics.median(values)


def fsdp_worker(rank: int, world: int, port: int, method: str, args: argparse.Namespace, out: str) -> None:
    """One rank of one run; rank 0 writes the run (slowest rank's time, largest peaks, every rank's values)."""
    device = start_process(rank, world, port, args)
    mine = measure_fsdp(method, args, device)
    ranks: list[Any] = [None] * world
    dist.all_gather_object(ranks, mine)
    if rank == 0:
        examples = sum(r["examples"] for r in ranks)
        seconds = max(r["seconds"] for r in ranks)
        Path(out).write_text(json.dumps({
            "method": method, "procs": world, "examples": examples, "seconds": seconds,
            "throughput": examples / seconds, "peak_memory": largest([r["peak_memory"] for r in ranks]),
            "peak_rss": max(r["peak_rss"] for r in ranks), "rss_reset": all(r["rss_reset"] for r in ranks),
            "ranks": ranks,
        }))
    dist.destroy_process_group()
    # exit at once: the run is written, and gloo's worker threads can still hold FSDP's asynchronous work, whose
    # release during interpreter finalization sometimes aborts the process (a known torch/gloo teardown race)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_fsdp(method: str, world: int, repeat: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run of ``method`` in ``world`` freshly spawned processes."""
    out = args.out.with_name(f"{args.out.name}.{world}procs.tmp.json")
    mp.start_processes(fsdp_worker, args=(world, free_port(), method, args, str(out)), nprocs=world,
                       start_method="spawn")
    run = {**json.loads(out.read_text()), "repeat": repeat}
    out.unlink()
    return run


def run_all_fsdp(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The unsharded reference, then for each number of processes the two methods in alternating order."""
    if args.warmup < 1:
        raise SystemExit("--fsdp measures the memory peak over the warmup steps: --warmup must be at least 1")
    runs = [spawn_fsdp(UNSHARDED, 1, repeat, args) for repeat in range(args.repeats)]
    print(f"done: {UNSHARDED}", flush=True)
    for world in args.procs:
        for repeat in range(args.repeats):
            for method in FSDP_METHODS if repeat % 2 == 0 else FSDP_METHODS[::-1]:
                runs.append(spawn_fsdp(method, world, repeat, args))
        print(f"done: {world} process(es)", flush=True)
    return runs


def summarize_fsdp(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians over repeats per (method, procs): peak memory per rank and throughput, with their ratios to the
    unsharded reference (memory) and to plain FSDP2 with as many processes (throughput)."""
    rows = []
    for method in ALL_FSDP_METHODS:
        for world in sorted({r["procs"] for r in runs if r["method"] == method}):
            mine = [r for r in runs if r["method"] == method and r["procs"] == world]
            values = [r["throughput"] for r in mine]
            rows.append({"method": method, "procs": world, "throughput": statistics.median(values),
                         "min": min(values), "max": max(values),
                         "peak_memory": median([r["peak_memory"] for r in mine]),
                         "peak_rss": statistics.median(r["peak_rss"] for r in mine),
                         "rss_reset": all(r["rss_reset"] for r in mine)})
    reference = next(r["peak_memory"] for r in rows if r["method"] == UNSHARDED)
    plain = {r["procs"]: r["throughput"] for r in rows if r["method"] == "fsdp2"}
    for row in rows:
        row["vs_unsharded"] = None if reference is None else row["peak_memory"] / reference
        row["vs_fsdp2"] = row["throughput"] / plain[row["procs"]] if row["procs"] in plain else None
    return rows


def describe_memory(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """What the two memory columns measure on this run."""
    if args.device == "cuda":
        main = "torch.cuda.max_memory_allocated over the warmup steps (the GPU's tensors)"
    elif rows[0]["peak_memory"] is None:
        main = "not available (needs glibc's mallinfo2)"
    else:
        main = ("bytes in use in the C heap (glibc mallinfo2: all threads and arenas, so every CPU tensor and gloo's "
                "buffers, not the allocator's free or cached memory) sampled after every ATen operator of the "
                "warmup steps")
    rss = "VmHWM over the timed steps" if all(r["rss_reset"] for r in rows) else "ru_maxrss over the whole run"
    return (f"Peak memory per rank (largest over the ranks; medians over repeats), training steps only (building "
            f"the full model before sharding it is excluded), relative to just before the model is built: heap = "
            f"{main}; RSS = peak resident set size ({rss}) minus the RSS before the build, which also counts the "
            f"memory the allocator keeps. ÷ unsharded: heap peak ÷ that of {UNSHARDED}.")


def mib(value: Any, digits: int = 0) -> str:
    """Bytes as MiB for the table ("n/a" for a measure this platform lacks)."""
    return "n/a" if value is None else f"{value / MIB:.{digits}f}"


def render_fsdp(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The markdown table, after a description of the setup and of the memory measures."""
    params = count_parameters(args)
    lines = [
        (
            f"Model: residual MLP {args.features}-{args.hidden}×{args.blocks} blocks-10, {params / 1e6:.1f} M "
            f"parameters ({params * 4 / MIB:.0f} MiB in float32), one FSDP2 unit per block plus the root; expected "
            f"global logical batch {args.logical_batch}, physical batch {args.physical_batch} per rank; device "
            f"{args.device}, {args.threads} thread(s) per process; {args.warmup} warmup and {args.steps} timed "
            f"logical steps per run, {args.repeats} runs per (method, processes), each in fresh processes; "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs."
        ),
        "",
        describe_memory(rows, args),
        "",
        (
            "| method | processes | peak heap per rank (MiB) | ÷ unsharded | peak RSS increase per rank (MiB) | "
            "examples/s (median) | min–max | ÷ FSDP2 |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        versus = "" if r["vs_unsharded"] is None else f"{r['vs_unsharded']:.2f}"
        ratio = "" if r["vs_fsdp2"] is None else f"{r['vs_fsdp2']:.2f}"
        lines.append(f"| {r['method']} | {r['procs']} | {mib(r['peak_memory'])} | {versus} | {mib(r['peak_rss'])} | "
                     f"{r['throughput']:.1f} | {r['min']:.1f}–{r['max']:.1f} | {ratio} |")
    return "\n".join(lines)


def plot_fsdp(rows: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    """Peak memory per rank (left) and throughput (right) against the number of processes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    procs = sorted({r["procs"] for r in rows if r["method"] != UNSHARDED})
    reference = next(r for r in rows if r["method"] == UNSHARDED)
    for method, color in zip(FSDP_METHODS, ("C0", "C1")):
        mine = [r for r in rows if r["method"] == method]
        x = [r["procs"] for r in mine]
        if reference["peak_memory"] is not None:
            left.plot(x, [r["peak_memory"] / MIB for r in mine], marker="o", color=color, label=f"{method}: heap")
        left.plot(x, [r["peak_rss"] / MIB for r in mine], marker="x", ls="--", color=color, label=f"{method}: RSS")
        right.errorbar(x, [r["throughput"] for r in mine], marker="o", color=color, label=method,
                       yerr=[[r["throughput"] - r["min"] for r in mine], [r["max"] - r["throughput"] for r in mine]])
    if reference["peak_memory"] is not None:
        left.axhline(reference["peak_memory"] / MIB, color="C2", label=f"{UNSHARDED}: heap")
    left.axhline(reference["peak_rss"] / MIB, color="C2", ls="--", label=f"{UNSHARDED}: RSS")
    weights = count_parameters(args) * 4 / MIB
    left.plot(procs, [weights / p for p in procs], color="grey", ls=":", label="parameters ÷ processes")
    right.axhline(reference["throughput"], color="C2", ls="--", label=f"{UNSHARDED} (1 process)")
    left.set(xlabel="processes", ylabel="MiB", title="peak memory per rank (training steps)", ylim=(0, None))
    right.set(xlabel="processes", ylabel="examples/s", title="throughput (slowest rank)", ylim=(0, None))
    for ax in (left, right):
        ax.set_xticks(procs)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main_fsdp(args: argparse.Namespace) -> None:
    """Run the --fsdp mode and write its table, JSON (config, every run, summary) and plot."""
    runs = run_all_fsdp(args)
    rows = summarize_fsdp(runs)
    text = render_fsdp(rows, args)
    print(text)
    args.out.with_suffix(".md").write_text(text + "\n")
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config["parameters"] = count_parameters(args)
    args.out.with_suffix(".json").write_text(json.dumps({"config": config, "runs": runs, "summary": rows}, indent=1))
    plot_fsdp(rows, args, args.out.with_suffix(".png"))


def main() -> None:
    args = parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.fsdp:
        main_fsdp(args)
        return
    runs = run_all(args)
    rows = summarize(runs)
    text = render(rows, args)
    print(text)
    args.out.with_suffix(".md").write_text(text + "\n")
    config = {k: v for k, v in vars(args).items() if k not in ("out", "fsdp", "blocks")}
    args.out.with_suffix(".json").write_text(json.dumps({"config": config, "runs": runs, "summary": rows}, indent=1))
    plot(rows, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
