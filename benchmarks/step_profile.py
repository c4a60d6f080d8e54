"""What one physical training step costs, per method, counted exactly: FLOPs, kernel-launching ops, host syncs,
peak memory, and host time on a launch-bound copy of the model.

    python benchmarks/step_profile.py                                   # ViT-B/16 and ResNet-50 at 224 px, batch 64
    python benchmarks/step_profile.py --batch-size 4 --models vit_base_patch16_224 resnet50
    python benchmarks/step_profile.py --device cuda                     # the same on a GPU

On a GPU a step of a large model at a small batch is bound by how fast the host issues kernels, not by the math:
every extra kernel launch, host-device synchronisation and microsecond of Python per layer shows up in the
throughput. The CPU counts these exactly. See ``--help`` for what each column means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # run from a checkout: use its opacus_fast

from _bench.measure import device_name
from _bench.methods import IndexDataset, create_model, endless, image_bank, make_trainer, train_step
from _bench.paths import portable_path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
METHODS = ("sgd", "opacus", "fast-bk")
#: SGD made to pay what any eager BK engine must and no more (``--floors``, host time only); see :func:`add_floor`
FLOORS = ("sgd+mode", "sgd+callbacks", "sgd+mode+callbacks")
LAUNCH_BOUND_VIT = "vit_base_patch16_224:embed_dim=16,num_heads=4"

aten = torch.ops.aten

#: ops that allocate or describe memory without running a kernel (views are found by their schema: ``op.is_view``)
NO_KERNEL = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided, aten.set_,
             aten.resize_, aten.lift_fresh, aten._unsafe_view, aten._local_scalar_dense}
#: ops whose result the host must wait for (the value, or a data-dependent output size)
SYNCING = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten._unique, aten._unique2,
           aten.unique_dim, aten.unique_consecutive, aten.unique_dim_consecutive, aten.equal, aten.bincount,
           aten.masked_scatter_, aten.masked_scatter}
#: indexing ops that sync when given a boolean mask (the kernel computes its nonzero positions)
MASK_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}

DESCRIPTION = """\
One physical training step (zero_grad, forward, loss, backward, optimizer.step) of each method on a timm
model, counted exactly, and each count's ratio to non-private SGD's:
  sgd       torch.optim.SGD, no privacy (model passed through ModuleValidator.fix, like every method)
  opacus    opacus.PrivacyEngine().make_private(..., grad_sample_mode="hooks")
  fast-bk   opacus_fast.PrivacyEngine().make_private_fast(...)
The counted step is a logical batch's only physical batch (so it adds noise once, and accumulates nothing),
after --warmup steps. Data come from the same Poisson loaders as benchmarks/compare.py.

Columns:
  GFLOP       FLOPs of the step by torch.utils.flop_counter's formulas (matmuls, convs, attention)
  ops         aten operators that launch a kernel, counted by a TorchDispatchMode: every operator the step
              dispatches except views (view, t, permute, slice, expand, ...: op.is_view), allocations and
              metadata changes (empty*, set_, resize_) and reading a value back (counted under syncs)
  syncs       operators after which the host waits for the device: reading a value (.item(), bool(tensor):
              aten._local_scalar_dense), data-dependent output sizes (nonzero, unique, masked_select, boolean
              indexing, repeat_interleave without output_size, ...), copies to the host, blocking copies to the
              device
  peak MiB    the most memory held at once by tensors created during the step (on CUDA also
              torch.cuda.max_memory_allocated over the step, absolute)
  host ms     wall time per step on a launch-bound copy of the model (--launch-bound: all widths shrunk, small
              images and batch, so that the math is negligible and the time is what the host spends issuing
              work); methods interleaved over --rounds rounds: the median per method, and the median over rounds
              of the ratio to sgd's time in the same round

Outputs: a table on stdout and <out>.json and <out>.md (default benchmarks/results/step-<device>-<UTC time>)."""


class StepCounter(TorchDispatchMode):
    """Counts, for every aten operator dispatched inside it: FLOPs, kernel launches, syncs and live memory."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.ops: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self.live = 0
        self.peak = 0
        self._seen: weakref.WeakSet = weakref.WeakSet()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in flop_registry:
            self.flops += flop_registry[packet](*args, **kwargs, out_val=out)
        if _syncs(func, packet, args, kwargs, out):
            self.syncs[packet.__name__] += 1
        if not func.is_view and packet not in NO_KERNEL and _has_tensor((args, kwargs, out)):
            self.ops[packet.__name__] += 1
        self._track(out)
        return out

    def _track(self, out: Any) -> None:
        """Add every new storage among the outputs to the live bytes, until it is freed."""
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            if storage in self._seen:
                continue
            self._seen.add(storage)
            size = storage.nbytes()
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size


def _has_tensor(tree: Any) -> bool:
    """Whether an op touches tensor data (not e.g. ``aten.promote_types`` or the profiler's record functions)."""
    return any(isinstance(t, torch.Tensor) for t in tree_leaves(tree))


def _syncs(func: Any, packet: Any, args: tuple, kwargs: dict, out: Any) -> bool:
    """Whether the host must wait for the device to finish ``func`` (on any device; the CPU runs it in order)."""
    if packet in SYNCING:
        return True
    if packet is aten.repeat_interleave and isinstance(args[0], torch.Tensor) and kwargs.get("output_size") is None:
        return len(args) == 1 or isinstance(args[1], torch.Tensor)
    if packet in MASK_INDEXING:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())
    if packet in (aten._to_copy, aten.copy_) and isinstance(out, torch.Tensor):
        src = args[1] if packet is aten.copy_ else args[0]
        if isinstance(src, torch.Tensor) and src.device != out.device:
            return out.device.type == "cpu" or not kwargs.get("non_blocking", len(args) > 2 and args[2])
    return False


class PassThrough(TorchFunctionMode):
    """Sees every torch call and runs it unchanged: the least that following the batch through a Python mode costs."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return func(*args, **(kwargs or {}))


def add_floor(kind: str, model: torch.nn.Module) -> None:
    """Make an SGD model pay a floor of the host work of BK in eager mode, doing none of its math.

    ``mode``: every torch call of a model call passes through a ``TorchFunctionMode`` (opacus_fast's batch tracker
    is one). ``callbacks``: one Python call in forward per layer that opacus_fast captures (it keeps the input), one
    in backward (it receives the output gradient): no engine can take (x, g) with less.
    """
    from opacus_fast.grad_sample import find_rule

    if "mode" in kind:
        mode = PassThrough()

        def enter(module: torch.nn.Module, args: tuple) -> None:
            mode.__enter__()

        def leave(module: torch.nn.Module, args: tuple, out: Any) -> None:
            mode.__exit__(None, None, None)

        model.register_forward_pre_hook(enter)
        model.register_forward_hook(leave, always_call=True)
    if "callbacks" in kind:
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []

        def keep(module: torch.nn.Module, args: tuple, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(lambda g, x=args[0]: kept.append((x, g)))

        def clear(module: torch.nn.Module, args: tuple) -> None:
            kept.clear()

        model.register_forward_pre_hook(clear)
        for module in model.modules():
            if find_rule(module) is not None and any(p.requires_grad for p in module.parameters(recurse=False)):
                module.register_forward_hook(keep)


def build(method: str, spec: str, *, img_size: int, batch: int, device: str, seed: int) -> tuple:
    """A trainer for ``method`` on ``spec``; logical batches of expected size batch/2, so nearly every logical
    batch is one physical batch (noise at every step, as in the counted step)."""
    torch.manual_seed(seed)
    model = create_model(spec, img_size, 10).to(device).train()
    bank = image_bank(16, img_size, seed, device, torch.float32)
    trainer = make_trainer("sgd" if method in FLOORS else method, model, IndexDataset(50_000, 10),
                           logical=max(1, batch // 2), physical=batch, noise_multiplier=1.0, max_grad_norm=1.0,
                           lr=1e-3, seed=seed)
    if method in FLOORS:
        add_floor(method, trainer.model)
    return trainer, bank


def whole_logical_batches(trainer: Any, bank: torch.Tensor) -> Iterator[Sequence[torch.Tensor]]:
    """The loader's physical batches that are a whole logical batch (its first and last); the others are trained
    on as they come (the fast-bk loader refuses skipped batches)."""
    context = trainer.loader.context
    for batch in endless(trainer.loader):
        info = context.current
        if info is None or (info.index == 0 and info.is_last):
            yield batch
        else:
            train_step(trainer, batch, bank, contextlib.nullcontext())


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def count_step(method: str, spec: str, args: argparse.Namespace) -> dict[str, Any]:
    """Counts of one physical step of ``method`` on ``spec`` after ``args.warmup`` steps."""
    trainer, bank = build(method, spec, img_size=args.img_size, batch=args.batch_size, device=args.device,
                          seed=args.seed)
    batches = whole_logical_batches(trainer, bank)
    plain = contextlib.nullcontext()
    for _ in range(args.warmup):
        train_step(trainer, next(batches), bank, plain)
    batch = next(batches)
    synchronize(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    counter = StepCounter()
    with counter:
        train_step(trainer, batch, bank, plain)
    synchronize(args.device)
    row = {"gflop": counter.flops / 1e9, "ops": sum(counter.ops.values()), "syncs": sum(counter.syncs.values()),
           "sync_ops": dict(counter.syncs), "peak_mib": counter.peak / 2**20,
           "top_ops": dict(counter.ops.most_common(args.top))}
    if args.device == "cuda":
        row["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        row["cuda_step_mib"] = (torch.cuda.max_memory_allocated() - start) / 2**20
    return row


def host_times(spec: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Median wall time per step of each method on ``spec`` (launch-bound), interleaved over rounds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(args.host_threads)
    try:
        return _host_times(spec, args)
    finally:
        torch.set_num_threads(threads)


def _host_times(spec: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    trainers = {}
    for method in [*args.methods, *(FLOORS if args.floors else ())]:
        try:
            trainer, bank = build(method, spec, img_size=args.launch_img_size, batch=args.launch_batch,
                                  device=args.device, seed=args.seed)
            batches = whole_logical_batches(trainer, bank)
            for _ in range(args.warmup + 1):
                train_step(trainer, next(batches), bank, contextlib.nullcontext())
            trainers[method] = (trainer, bank, batches)
        except Exception as err:  # noqa: BLE001 - a method that fails is reported, not fatal
            trainers[method] = err
    times: dict[str, list[float]] = {m: [] for m in trainers}
    for _ in range(args.rounds):
        for method, item in trainers.items():
            if isinstance(item, Exception):
                continue
            trainer, bank, batches = item
            synchronize(args.device)
            seconds = 0.0
            for _ in range(args.steps):
                batch = next(batches)
                start = time.perf_counter()
                train_step(trainer, batch, bank, contextlib.nullcontext())
                seconds += time.perf_counter() - start
            start = time.perf_counter()
            synchronize(args.device)
            seconds += time.perf_counter() - start
            times[method].append(seconds / args.steps * 1e3)
    out = {}
    for method, item in trainers.items():
        if isinstance(item, Exception):
            out[method] = {"status": "failed", "error": f"{type(item).__name__}: {item}"[:300]}
        else:
            out[method] = {"status": "ok", "host_ms": statistics.median(times[method]), "host_ms_all": times[method]}
    if out.get("sgd", {}).get("status") == "ok":  # per round (the methods ran one after the other), then the median
        for row in out.values():
            if row["status"] == "ok":
                row["ratio"] = statistics.median(t / s for t, s in zip(row["host_ms_all"], out["sgd"]["host_ms_all"]))
    return out


def profile(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"counts": {}, "host": {}}
    for spec in args.models:
        rows = {}
        for method in args.methods:
            try:
                rows[method] = {"status": "ok", **count_step(method, spec, args)}
            except Exception as err:  # noqa: BLE001 - e.g. Opacus on a model it cannot handle
                rows[method] = {"status": "failed", "error": f"{type(err).__name__}: {err}"[:300]}
            print(f"  {spec} {method}: {_brief(rows[method])}", flush=True)
        sgd = rows.get("sgd", {})
        for row in rows.values():
            if row["status"] == "ok" and sgd.get("status") == "ok":
                row["ratio"] = {k: row[k] / sgd[k] if sgd[k] else None for k in ("gflop", "ops", "peak_mib")}
        results["counts"][spec] = rows
    for spec in args.launch_bound:
        results["host"][spec] = host_times(spec, args)
        print(f"  host time {spec}: " + ", ".join(
            f"{m} {r['host_ms']:.2f} ms" if r["status"] == "ok" else f"{m} failed"
            for m, r in results["host"][spec].items()), flush=True)
    return results


def _brief(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return row["error"]
    return f"{row['gflop']:.1f} GFLOP, {row['ops']} ops, {row['syncs']} syncs, {row['peak_mib']:.0f} MiB"


def render_markdown(results: dict[str, Any], meta: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"# Step profile on {meta['device']}", "",
             f"`{meta['command']}`", "",
             (f"torch {meta['torch']}, opacus {meta['opacus']}, timm {meta['timm']}, {meta['started_utc']} UTC, "
             f"physical batch {args.batch_size}, {args.img_size} px, fp32, {meta['threads']} threads."), "",
             "| model | method | GFLOP | x sgd | ops | x sgd | syncs | peak MiB | x sgd | most frequent ops |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for spec, rows in results["counts"].items():
        for method, row in rows.items():
            if row["status"] != "ok":
                lines.append(f"| {spec} | {method} | failed: {row['error'][:120]} |||||||||")
                continue
            ratio = row.get("ratio", {})
            top = ", ".join(f"{k} {v}" for k, v in list(row["top_ops"].items())[:6])
            syncs = row["syncs"] if not row["sync_ops"] else f"{row['syncs']} ({_ops(row['sync_ops'])})"
            lines.append(f"| {spec} | {method} | {row['gflop']:.1f} | {_x(ratio.get('gflop'))} | {row['ops']} | "
                         f"{_x(ratio.get('ops'))} | {syncs} | {row['peak_mib']:.0f} | {_x(ratio.get('peak_mib'))} | "
                         f"{top} |")
    if results["host"]:
        lines += ["", (f"Host time per step on launch-bound copies ({args.launch_img_size} px, physical batch "
                  f"{args.launch_batch}, {args.host_threads} thread(s); median of {args.rounds} rounds of "
                  f"{args.steps} steps, methods interleaved; x sgd: median of the per-round ratios):"),
                  "", "| model | method | host ms/step | x sgd | rounds (ms) |", "|---|---|---:|---:|---|"]
        for spec, rows in results["host"].items():
            for method, row in rows.items():
                if row["status"] != "ok":
                    lines.append(f"| {spec} | {method} | failed: {row['error'][:120]} |||")
                    continue
                rounds = " ".join(f"{t:.2f}" for t in row["host_ms_all"])
                lines.append(f"| {spec} | {method} | {row['host_ms']:.2f} | {_x(row.get('ratio'))} | {rounds} |")
    return "\n".join(lines) + "\n"


def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _ops(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--models", nargs="*", default=["vit_base_patch16_224", "resnet50"], metavar="MODEL",
        help="timm models to count, as name[:key=value,...] (default: vit_base_patch16_224 resnet50)")
    add("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="METHOD",
        help=f"from {', '.join(METHODS)} (default: all); ratios are to sgd")
    add("--img-size", type=int, default=224, help="image side of the counted models (default 224)")
    add("--batch-size", type=int, default=64, help="physical batch of the counted step (default 64)")
    add("--warmup", type=int, default=1, help="steps before the counted one (default 1)")
    add("--device", choices=["cpu", "cuda"], default="cpu")
    add("--threads", type=int, default=0, help="torch.set_num_threads for the counted steps (default: torch's)")
    add("--host-threads", type=int, default=1,
        help="torch.set_num_threads while timing the launch-bound copies (default 1: no thread start-up in the time)")
    add("--launch-policy-as", "--gram-split-as", dest="launch_policy_as", choices=["cpu", "cuda"],
        help="make opacus_fast weigh kernel launches against FLOPs and copies as it does on this device type "
             "(where it splits Gram matrices, which layer calls it stacks; default: the device's own), e.g. to "
             "count on the CPU the kernels that a GPU step launches")
    add("--launch-bound", nargs="*", default=[LAUNCH_BOUND_VIT], metavar="MODEL",
        help=f"models whose host time per step is measured (default: {LAUNCH_BOUND_VIT}); none to skip")
    add("--launch-img-size", type=int, default=32,
        help="image side of the launch-bound copies (default 32: 5 tokens for patch 16)")
    add("--launch-batch", type=int, default=4, help="physical batch of the launch-bound copies (default 4)")
    add("--floors", action="store_true",
        help=f"also time {', '.join(FLOORS)} on the launch-bound copies: SGD paying a floor of BK's host work in "
             "eager mode (a pass-through TorchFunctionMode around the model call; one Python callback per captured "
             "layer in forward and one in backward), doing none of its math")
    add("--rounds", type=int, default=15, help="interleaved timing rounds per method (default 15)")
    add("--steps", type=int, default=10, help="steps timed per round (default 10)")
    add("--top", type=int, default=15, help="most frequent ops kept per method (default 15)")
    add("--seed", type=int, default=0)
    add("--out", type=Path, help="output path prefix (default benchmarks/results/step-<device>-<UTC time>)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import opacus
    import timm

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    if "sgd" not in args.methods:
        args.methods = ["sgd", *args.methods]
    started = datetime.now(timezone.utc)
    name = device_name(args.device)
    meta = {"started_utc": f"{started:%Y-%m-%d %H:%M:%S}", "device": name,
            "command": " ".join(["python", "benchmarks/step_profile.py", *(portable_path(a, keep=1) for a in argv)]),
            "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
            "opacus": opacus.__version__, "timm": timm.__version__}
    if args.launch_policy_as:
        from opacus_fast.engine import bk
        from opacus_fast.grad_sample import linear

        linear.LAUNCH_FLOPS[args.device] = linear.LAUNCH_FLOPS[args.launch_policy_as]
        bk.STACK_CALL_BYTES[args.device] = bk.STACK_CALL_BYTES[args.launch_policy_as]
    results = profile(args)
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    slug = "-".join(filter(None, slug.split("-")))[:40]
    prefix = args.out or RESULTS_DIR / f"step-{slug}-{started:%Y%m%d-%H%M%S}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    prefix.with_suffix(".json").write_text(json.dumps({"meta": meta, "config": config, **results}, indent=1) + "\n")
    markdown = render_markdown(results, meta, args)
    prefix.with_suffix(".md").write_text(markdown)
    print("\n" + markdown)
    print(f"wrote {prefix.with_suffix('.json')}, {prefix.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
