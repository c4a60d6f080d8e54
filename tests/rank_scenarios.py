"""Run scenarios on several ranks (gloo on the CPU, spawned processes) and collect each rank's outcome per scenario.

Starting processes is the expensive part (each imports torch and opacus), so every world size is launched once per
test module: each rank runs all scenarios in order and writes "ok" or its traceback per scenario to a file, which
the tests then read. Collectives time out after 60 s.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: ``scenarios(world, ports, out_dir)``: the scenarios to run on every rank, by name (a module-level function)
Scenarios = Callable[[int, tuple[int, int], str], dict[str, Callable[[int], None]]]
Results = dict[int, dict[int, dict[str, str]]]


def _worker(rank: int, world: int, scenarios: Scenarios, ports: tuple[int, int], out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["TEST_WORLD_SIZE"] = str(world)
    out = Path(out_dir) / f"rank{rank}.json"
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[0]}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
    except Exception:
        out.write_text(json.dumps({"init": traceback.format_exc()}))
        raise
    results: dict[str, str] = {}
    for name, run in scenarios(world, ports, out_dir).items():
        start = time.monotonic()
        try:
            run(rank)
            results[name] = "ok"
        except (Exception, pytest.fail.Exception):  # noqa: BLE001 - any failure (DID NOT RAISE too) is reported
            results[name] = traceback.format_exc()
        results[name + ":seconds"] = f"{time.monotonic() - start:.1f}"
        out.write_text(json.dumps(results))
    dist.destroy_process_group()


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (all sockets are held open until every port is chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def launch(scenarios: Scenarios, worlds: tuple[int, ...], out_dir: Path, deadline_s: float) -> Results:
    """Run all scenarios on each world size at once (so one's waits overlap the other's work); kill stragglers."""
    for world in worlds:
        (out_dir / str(world)).mkdir()
    ports = iter(_free_ports(2 * len(worlds)))
    contexts = {
        world: mp.start_processes(
            _worker, args=(world, scenarios, (next(ports), next(ports)), str(out_dir / str(world))),
            nprocs=world, join=False, start_method="spawn")
        for world in worlds
    }
    processes = [p for context in contexts.values() for p in context.processes]
    deadline = time.monotonic() + deadline_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    files = {world: [out_dir / str(world) / f"rank{rank}.json" for rank in range(world)] for world in worlds}
    return {world: {rank: json.loads(f.read_text()) if f.exists() else {} for rank, f in enumerate(paths)}
            for world, paths in files.items()}


def expect_ok(ranks: tuple[int, dict[int, dict[str, str]]], scenario: str, skip_last: bool = False) -> None:
    """Assert that ``scenario`` passed on every rank (all but the last with ``skip_last``)."""
    world, results = ranks
    for rank in range(world - 1 if skip_last else world):
        outcome = results[rank].get(scenario, results[rank].get("init", "did not finish (crashed or killed)"))
        assert outcome == "ok", f"rank {rank} of {world}, scenario {scenario!r}:\n{outcome}"
