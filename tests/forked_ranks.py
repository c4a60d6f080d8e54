"""Run a worker in forked processes, one per rank (gloo over a file), and collect what each puts on the queue."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from typing import Any


def run_ranks(worker: Callable[..., None], tmp_path: Any, world_size: int = 2) -> dict[int, tuple]:
    """Start ``worker(rank, world_size, init_file, queue)`` per rank; each puts ``(rank, *results)`` once.

    Returns ``{rank: results}`` after checking that every process exited cleanly.
    """
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    init_file = os.path.join(tmp_path, "init")
    processes = [context.Process(target=worker, args=(r, world_size, init_file, queue)) for r in range(world_size)]
    for p in processes:
        p.start()
    results = {rank: tuple(rest) for rank, *rest in (queue.get(timeout=60) for _ in processes)}
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results
