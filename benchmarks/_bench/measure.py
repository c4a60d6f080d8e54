"""The worker: runs one job (one method, one model, one precision) in its own process and measures it.

Throughput is physical rows per second after warm-up, between two device synchronisations. Peak memory is
``torch.cuda.max_memory_allocated`` on GPU, peak RSS of the process on CPU (taken before the correctness
check and the max-batch search, which run afterwards in the same process).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import platform
import resource
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .config import Job, RunConfig
from .methods import IndexDataset, create_model, endless, image_bank, make_trainer, train_step
from .paths import portable_traceback

BANK_SIZE = 256
CHECK_TOLERANCE = 1e-6  # relative error allowed in float64; exact methods land near 1e-12


def run_job(job: Job) -> dict[str, Any]:
    """Run ``job`` and return its record; any exception becomes ``status="failed"`` with the error text."""
    config = job.config
    record: dict[str, Any] = {"model": job.model, "method": job.method, "precision": job.precision,
                              "repeat": job.repeat, "steps": job.steps, "status": "ok"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            setup_process(config, job.precision)
            record["device_name"] = device_name(config.device)
            record.update(measure_throughput(job))
            if job.check and job.method != "sgd":
                record["correctness"] = guarded(lambda: check_correctness(job))
            if config.max_batch and job.repeat == 0:
                record["max_batch"] = search_max_batch(
                    lambda b: fits(job, b), start=config.batch_size, cap=config.max_batch_cap)
        except Exception as err:  # noqa: BLE001 - a failing method is a result to report, not a harness crash
            record.update(status="failed", error=error_text(err), traceback=portable_traceback(traceback.format_exc(limit=8)))
    record["warnings"] = sorted({f"{w.category.__name__}: {w.message}" for w in caught})[:10]
    return record


def setup_process(config: RunConfig, precision: str) -> None:
    """Threads and TF32 switches for this process."""
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.keep_cpu_memory_all and config.device == "cpu":
        from opacus_fast.cpu_memory import keep_freed_memory

        keep_freed_memory()
    if config.device == "cuda":
        allow = precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (or the platform's processor string)."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or "cpu"


def autocast_for(device: str, precision: str) -> Any:
    """bf16 autocast around forward and loss, or nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(job: Job, physical: int) -> tuple:
    """A fresh model, bank and trainer for timing ``job`` at physical batch ``physical``."""
    config = job.config
    torch.manual_seed(config.seed)
    model = create_model(job.model, config.img_size, config.num_classes).to(config.device).train()
    bank = image_bank(BANK_SIZE, config.img_size, config.seed, config.device, torch.float32)
    logical = max(config.logical(), physical)
    trainer = make_trainer(
        job.method, model, IndexDataset(config.dataset_size, config.num_classes),
        logical=logical, physical=physical, noise_multiplier=config.noise_multiplier,
        max_grad_norm=config.max_grad_norm, lr=1e-3, seed=config.seed)
    return trainer, bank


def measure_throughput(job: Job) -> dict[str, Any]:
    """Warm up, then time ``job.steps`` physical steps; rows/s and peak memory."""
    config = job.config
    if config.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer, bank = build(job, config.batch_size)
    digest = hashlib.sha256()
    batches = fingerprinted(endless(trainer.loader), digest)
    autocast = autocast_for(config.device, job.precision)
    for _ in range(config.warmup):
        train_step(trainer, next(batches), bank, autocast)
    synchronize(config.device)
    start = time.perf_counter()
    for _ in range(job.steps):
        train_step(trainer, next(batches), bank, autocast)
    synchronize(config.device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "throughput": job.steps * config.batch_size / seconds,
            "peak_mem_mib": peak_memory_mib(config.device), "data_fingerprint": digest.hexdigest()[:16]}


def fingerprinted(batches: Iterator[Sequence[torch.Tensor]], digest: Any) -> Iterator[Sequence[torch.Tensor]]:
    """The batches unchanged, feeding each one's example indices into ``digest`` (to show all methods saw
    the same data)."""
    for batch in batches:
        digest.update(batch[0].numpy().tobytes())
        yield batch


def peak_memory_mib(device: str) -> float:
    """CUDA max allocated, or this process' peak resident set (ru_maxrss: KiB on Linux, bytes on macOS)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Iterator[tuple]:
    """Yield each example's full gradient (list over parameters), by a batch-of-one loop."""
    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(x.shape[0]):
        loss = nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        yield torch.autograd.grad(loss, params)


def reference_update(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> list[torch.Tensor]:
    """The exact DP-SGD gradient without noise: sum_i min(1, C/(‖g_i‖+1e-6)) g_i / n (Opacus' clip rule)."""
    total: list[torch.Tensor] | None = None
    for grads in per_example_grads(model, x, y):
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = torch.clamp(clip / (norm + 1e-6), max=1.0)
        scaled = [factor * g for g in grads]
        total = scaled if total is None else [t + s for t, s in zip(total, scaled)]
    return [t / x.shape[0] for t in total]


def example_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each example's gradient norm over all trainable parameters."""
    return torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in grads)) for grads in per_example_grads(model, x, y)])


def relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """‖got − want‖ / ‖want‖ over all parameters together."""
    diff = sum((g - w).pow(2).sum() for g, w in zip(got, want))
    return float(torch.sqrt(diff / sum(w.pow(2).sum() for w in want)))


def check_correctness(job: Job) -> dict[str, Any]:
    """The correctness check of ``job``'s method on ``job``'s model (float64, ``check_size`` examples)."""
    config = job.config
    torch.manual_seed(config.seed)
    model = create_model(job.model, config.img_size, config.num_classes).to(config.device, torch.float64).train()
    bank = image_bank(config.check_size, config.img_size, config.seed + 1, config.device, torch.float64)
    return correctness(job.method, model, bank, config.num_classes, seed=config.seed)


def correctness(method: str, model: nn.Module, images: torch.Tensor, num_classes: int, seed: int = 0
                ) -> dict[str, Any]:
    """One noiseless step (lr=1) of ``method`` on ``images`` (example i has label i % num_classes) against the
    exact clipped reference; ``model`` is consumed.

    C is the median per-example norm, so that some examples are clipped and some are not. The Poisson rate
    is 1, so the logical batch is all n examples. ``fast-bk`` is checked across two physical batches (the
    second padded: masks and accumulation); the Opacus methods on one physical batch (they have no masks).
    """
    n = images.shape[0]
    labels = torch.arange(n, device=images.device) % num_classes
    reference = copy.deepcopy(model)
    clip = float(example_norms(reference, images, labels).median())
    want = reference_update(reference, images, labels, clip)
    before = [p.detach().clone() for p in model.parameters()]
    physical = n if method.startswith("opacus") else n // 2 + 1
    trainer = make_trainer(method, model, IndexDataset(n, num_classes), logical=n, physical=physical,
                           noise_multiplier=0.0, max_grad_norm=clip, lr=1.0, seed=seed)
    for batch in trainer.loader:  # one epoch at rate 1 is exactly one logical batch holding all n examples
        train_step(trainer, batch, images, contextlib.nullcontext())
    got = [b - p.detach() for b, p in zip(before, trainer.params)]
    error = relative_error(got, want)
    return {"status": "pass" if error < CHECK_TOLERANCE else "fail", "rel_err": error, "clip": clip,
            "examples": n, "physical": physical}


def guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``, or ``{"status": "error", ...}`` if it raises."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - reported as the check's error
        return {"status": "error", "error": error_text(err)}


def fits(job: Job, physical: int) -> bool:
    """Whether two training steps at ``physical`` rows run without running out of GPU memory."""
    try:
        trainer, bank = build(job, physical)
        batches = endless(trainer.loader)
        autocast = autocast_for(job.config.device, job.precision)
        for _ in range(2):
            train_step(trainer, next(batches), bank, autocast)
        synchronize(job.config.device)
        ok = True
    except torch.cuda.OutOfMemoryError:
        ok = False
    trainer = bank = batches = None
    gc.collect()
    torch.cuda.empty_cache()
    return ok


def search_max_batch(fits_fn: Callable[[int], bool], start: int, cap: int) -> int:
    """Largest batch (within ~6%, at most ``cap``) for which ``fits_fn`` holds: doubling, then bisection.

    Returns 0 when not even one row fits.
    """
    low, high, size = 0, None, max(1, start)
    while size <= cap:
        if fits_fn(size):
            low, size = size, size * 2
        else:
            high = size
            break
    if high is None:
        return low
    while high - low > max(1, low // 16):
        mid = (low + high) // 2
        if fits_fn(mid):
            low = mid
        else:
            high = mid
    return low


def error_text(err: BaseException) -> str:
    """``Type: message``, first line only, at most 500 characters."""
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first}"[:500]
