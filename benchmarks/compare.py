"""Compare the throughput, memory and correctness of DP-SGD methods against non-private SGD.

    python benchmarks/compare.py                     # default CPU suite (about 10 minutes on 2 cores)
    python benchmarks/compare.py --suite gpu         # ViT-B/16 and ResNet-50 at 224 px, bf16 and TF32
    python benchmarks/compare.py --check benchmarks/baseline.json   # quick regression check for CI

Every method runs through the public API a user would call, each (method, model, precision, repeat) in its
own spawned process; the ratio to sgd is taken within one run. See ``--help`` for what each option does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # run from a checkout: use its opacus_fast

from _bench.config import METHODS, PRECISIONS, SUITES, RunConfig, parse_model_spec, plan_jobs, with_overrides
from _bench.paths import portable_command
from _bench.report import (
    check_results,
    failure_lines,
    make_baseline,
    render_text,
    summarize,
    write_outputs,
)
from _bench.runner import run_jobs

RESULTS_DIR = Path(__file__).resolve().parent / "results"

DESCRIPTION = """\
Throughput (examples/s), peak memory and a correctness check of DP-SGD methods, each relative to
non-private SGD on the same model and the same data:
  sgd           torch.optim.SGD, no privacy (the reference; model passed through ModuleValidator.fix
                so that every method trains the identical architecture)
  opacus        opacus.PrivacyEngine().make_private(..., grad_sample_mode="hooks")
  opacus-ghost  opacus.PrivacyEngine().make_private(..., grad_sample_mode="ghost"), with its criterion
  fast-bk       opacus_fast.PrivacyEngine().make_private_fast(...)

Fairness: every method sees Poisson logical batches (expected size --logical-batch) from
opacus_fast.data.DPDataLoader, cut into physical batches of exactly --batch-size rows (the last padded),
so every step has the same shape. sgd and the Opacus methods iterate the same seeded loader (Opacus with
poisson_sampling=False: it cannot mask padding, so for it this times identical work, not a private run;
like Opacus' BatchMemoryManager, it steps and adds noise only at each logical batch's last physical batch);
fast-bk uses the loader make_private_fast returns. Images are synthetic (CIFAR-shaped by default) and sit
on the device, so data loading costs nothing. Throughput counts every physical row, padded or not, after
--warmup steps, between device synchronisations. Each job runs in its own process; methods are rotated
between repeats; the ratio to sgd is computed per repeat; median and min-max are reported.

Columns: ex/s (median over repeats) and its spread (max-min)/median; x sgd, the ratio to sgd (median,
min-max); peak memory (CUDA max allocated on GPU, peak RSS of the worker process on CPU); x opacus (when
opacus runs), the throughput over Opacus hooks mode's in the same repeat (median); with --max-batch
the largest physical batch that fits; correct: one noiseless step (lr=1, float64, a few examples, C = their
median gradient norm) against the exact batch-of-one reference sum_i min(1, C/(|g_i|+1e-6)) g_i / n, pass
if the relative error < 1e-6; target: the project's CPU targets for fast-bk, met or not. A method that fails
(e.g. Opacus on ResNets) is listed with its error.

Outputs: a table on stdout and <out>.json, <out>.csv, <out>.md and <out>.png (ratio to sgd per model and
method). The exit status is 1 when --check finds a regression."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--suite", choices=sorted(SUITES), default="cpu",
        help="preset to start from (default: cpu). cpu: vit_tiny (32 px, patch 4) and resnet18, all methods, "
             "batch 64, 2 threads, fp32. gpu: vit_base_patch16_224 and resnet50 at 224 px, bf16 and tf32, "
             "on cuda. quick: what --check runs. Every option below overrides the preset.")
    add("--models", nargs="+", metavar="MODEL",
        help="timm model names; extra create_model arguments as name:key=value[,key=value], e.g. "
             "vit_tiny_patch16_224:patch_size=4. Every model is passed through ModuleValidator.fix.")
    add("--img-size", type=int, help="image side in pixels (given to models that take img_size)")
    add("--num-classes", type=int, help="number of classes of the synthetic labels and the model head")
    add("--methods", nargs="+", choices=METHODS, metavar="METHOD",
        help=f"methods to compare, from {', '.join(METHODS)}; sgd is always added (ratios are to it)")
    add("--batch-size", type=int, help="physical batch size: rows per forward/backward (default 64)")
    add("--logical-batch", type=int,
        help="expected Poisson logical batch size (default 4 x --batch-size); sample rate = this / 50,000")
    add("--steps", type=int, help="timed physical steps per job (default: per model, from the suite)")
    add("--warmup", type=int, help="untimed steps before timing (default 2 on cpu, 3 on gpu)")
    add("--device", choices=["cpu", "cuda"], help="where to run (default: the suite's)")
    add("--precision", nargs="+", choices=PRECISIONS, metavar="PREC",
        help="fp32 (TF32 off), tf32 (TF32 matmuls/convs, cuda only) or bf16 (autocast); several allowed")
    add("--repeat", type=int, help="repeats of every job, methods interleaved (default 3 on cpu)")
    add("--threads", type=int, help="torch.set_num_threads in every worker (cpu suite: 2; 0 = torch default)")
    add("--keep-cpu-memory-all", action="store_true",
        help="cpu: make glibc malloc keep freed memory in every method's worker (make_private_fast does so for "
             "fast-bk by default; see opacus_fast.cpu_memory), to compare all methods under one allocator setting")
    add("--max-batch", action="store_true",
        help="cuda only: also search the largest physical batch that fits (doubling, then bisection to ~6%%)")
    add("--max-batch-cap", type=int, help="largest physical batch tried by --max-batch (default 4096)")
    add("--out", type=Path,
        help="output path prefix (default benchmarks/results/<suite>-<device>-<UTC time>); the run writes "
             "<out>.json, <out>.csv, <out>.md and <out>.png")
    add("--check", type=Path, metavar="BASELINE",
        help="run the baseline file's suite and exit 1 if a ratio to sgd falls below its floor minus the "
             "tolerance, a method with a floor fails, or a correctness check fails")
    add("--tolerance", type=float, help="absolute slack under each floor for --check (default: the baseline's)")
    add("--save-baseline", type=Path, metavar="PATH",
        help="write a baseline for --check from this run (floors = smallest ratio to sgd seen per method)")
    add("--job-timeout", type=float, help="seconds before a job counts as failed (default 900)")
    add("--seed", type=int, help="seed of model weights, images and sampler (default 0)")
    add("--no-progress", action="store_true", help="no progress bar")
    return parser


def resolve_config(args: argparse.Namespace) -> tuple[RunConfig, dict[str, Any] | None]:
    """The preset (or the --check baseline's suite) with every given option applied; and the baseline."""
    baseline = None
    if args.check is not None:
        baseline = json.loads(args.check.read_text())
        base = RunConfig(**baseline["suite"])
    else:
        base = SUITES[args.suite]
    config = with_overrides(
        base, models=args.models, img_size=args.img_size, num_classes=args.num_classes,
        batch_size=args.batch_size, logical_batch=args.logical_batch, warmup=args.warmup, device=args.device,
        precisions=args.precision, repeat=args.repeat, max_batch_cap=args.max_batch_cap,
        job_timeout=args.job_timeout, seed=args.seed)
    if args.methods:
        config = with_overrides(config, methods=["sgd"] + [m for m in args.methods if m != "sgd"])
    if args.steps is not None:
        config = with_overrides(config, steps={}, default_steps=args.steps)
    if args.threads is not None:
        config = with_overrides(config, threads=args.threads or 0)
    if args.max_batch:
        config = with_overrides(config, max_batch=True)
    if args.keep_cpu_memory_all:
        config = with_overrides(config, keep_cpu_memory_all=True)
    if config.device == "cuda" and args.threads is None and config.suite != "gpu":
        config = with_overrides(config, threads=0)
    return config, baseline


def config_errors(config: RunConfig, cuda_available: bool) -> list[str]:
    """Everything wrong with ``config``, each with what to do instead."""
    errors = []
    for name, value in [("--batch-size", config.batch_size), ("--repeat", config.repeat),
                        ("--img-size", config.img_size), ("--num-classes", config.num_classes),
                        ("--logical-batch", config.logical())] + [("--steps", config.steps_for(m)) for m in config.models]:
        if value < 1:
            errors.append(f"{name} must be at least 1 (got {value})")
    if config.warmup < 0:
        errors.append(f"--warmup must be 0 or more (got {config.warmup})")
    if config.device == "cuda" and not cuda_available:
        errors.append("--device cuda was asked for, but torch.cuda.is_available() is False on this machine: "
                      "run on a machine with an NVIDIA GPU and a CUDA build of torch, or use --device cpu")
    if config.device == "cpu" and "tf32" in config.precisions:
        errors.append("--precision tf32 is a CUDA mode: use fp32 or bf16 on cpu")
    if config.device == "cpu" and config.max_batch:
        errors.append("--max-batch searches GPU memory: use it with --device cuda")
    errors += model_errors(config.models)
    return errors


def model_errors(models: Sequence[str]) -> list[str]:
    """Model specs that do not parse or that timm does not know."""
    import timm

    errors = []
    for spec in models:
        try:
            name, _ = parse_model_spec(spec)
        except ValueError as err:
            errors.append(str(err))
            continue
        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
            errors.append(f"unknown timm model {name!r}; similar names: {', '.join(close) or 'none'} "
                          f"(see timm.list_models())")
    return errors


def environment(config: RunConfig, argv: Sequence[str], started: datetime) -> dict[str, Any]:
    """What the results depend on besides the config: versions, machine, load, command."""
    import opacus
    import timm
    import torch

    return {
        "started_utc": f"{started:%Y-%m-%d %H:%M:%S}",
        "command": portable_command(list(argv)),
        "device": config.device, "cpu_count": os.cpu_count(), "threads_per_worker": config.threads or "default",
        "keep_cpu_memory": "all methods" if config.keep_cpu_memory_all else "fast-bk (make_private_fast default)",
        "python": platform.python_version(), "torch": torch.__version__, "opacus": opacus.__version__,
        "timm": timm.__version__, "opacus_fast": _opacus_fast_version(),
        "load_average_start": _load(),
    }


def _opacus_fast_version() -> str:
    try:
        import opacus_fast
    except Exception as err:  # noqa: BLE001 - the report must still say why fast-bk could not run
        return f"not importable ({type(err).__name__}: {err})"
    return getattr(opacus_fast, "__version__", "unknown version")


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def default_prefix(config: RunConfig, device_name: str, started: datetime) -> Path:
    """benchmarks/results/<suite>-<device name>-<UTC start time>."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")[:40] or config.device
    return RESULTS_DIR / f"{config.suite}-{slug}-{started:%Y%m%d-%H%M%S}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config, baseline = resolve_config(args)
    except (OSError, ValueError, KeyError, TypeError) as err:
        parser.error(f"cannot use --check {args.check}: {type(err).__name__}: {err} (make one with --save-baseline)")
    import torch

    errors = config_errors(config, torch.cuda.is_available())
    if errors:
        parser.error("\n  ".join(errors))
    started_at = datetime.now(timezone.utc)
    meta = environment(config, argv, started_at)
    started = time.perf_counter()
    records = run_jobs(plan_jobs(config), config.job_timeout, progress=not args.no_progress)
    summary = summarize(records, config)
    device_name = next((r["device_name"] for r in records if r.get("device_name")), config.device)
    meta.update(device=device_name, load_average_end=_load(), minutes=round((time.perf_counter() - started) / 60, 1))
    prefix = args.out or default_prefix(config, device_name, started_at)
    paths = write_outputs(prefix, meta, config, summary, records)
    print(f"\n{config.suite} suite on {device_name} ({config.device}), physical batch {config.batch_size}, "
          f"{config.img_size}px, {meta['minutes']} min, load average {meta['load_average_start']} -> "
          f"{meta['load_average_end']}\n")
    print(render_text(summary, config))
    for line in failure_lines(summary):
        print(f"  ! {line}")
    print("\nwrote " + ", ".join(str(p) for p in paths))
    tolerance = args.tolerance if args.tolerance is not None else (baseline or {}).get("tolerance", 0.1)
    if args.save_baseline:
        args.save_baseline.write_text(json.dumps(make_baseline(summary, config, meta, tolerance), indent=1) + "\n")
        print(f"wrote baseline {args.save_baseline}")
    if baseline is None:
        return 0
    problems = check_results(summary, baseline, tolerance)
    if problems:
        print(f"\nCHECK FAILED against {args.check}:")
        print("\n".join(f"  - {p}" for p in problems))
        return 1
    print(f"\ncheck passed against {args.check} (tolerance {tolerance:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
