"""Per-step cost of drawing one Poisson batch: opacus_fast's O(k) sampler vs Opacus' O(N) coin flips.

Usage: python benchmarks/sampler_cost.py [--steps 200] [--threads 1]

Both samplers draw exactly Poisson batches; Opacus' ``UniformWithReplacementSampler`` flips N coins per step,
ours draws k ~ Binomial(N, q) and then a uniform k-subset. Times are the median over ``steps`` steps of the
wall-clock time of one ``next()``, including the conversion to a Python list that a DataLoader needs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator

import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from opacus_fast.data import PoissonBatchSampler

CASES = [(10**7, 1e-4), (10**5, 1e-4), (10**5, 1e-2)]


def median_step_seconds(batches: Iterator[list[int]], steps: int) -> float:
    """Median wall-clock time of one ``next(batches)``."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        next(batches)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="steps timed per sampler and case")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.steps} steps")
    print(f"{'N':>12} {'q':>8} {'E[k]':>8} {'opacus (ms)':>12} {'ours (ms)':>10} {'speed-up':>9}")
    for num_samples, rate in CASES:
        generator = torch.Generator().manual_seed(0)
        opacus = UniformWithReplacementSampler(
            num_samples=num_samples, sample_rate=rate, generator=generator, steps=args.steps + 1
        )
        ours = PoissonBatchSampler(num_samples, rate, steps=args.steps + 1, generator=generator)
        t_opacus = median_step_seconds(iter(opacus), args.steps)
        t_ours = median_step_seconds(iter(ours), args.steps)
        print(
            f"{num_samples:>12.0e} {rate:>8.0e} {num_samples * rate:>8.0f} {t_opacus * 1e3:>12.3f} "
            f"{t_ours * 1e3:>10.3f} {t_opacus / t_ours:>8.0f}x"
        )


if __name__ == "__main__":
    main()
