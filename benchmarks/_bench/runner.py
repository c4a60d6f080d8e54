"""Runs every job in its own spawned process (clean memory figures, no state shared between methods)."""

from __future__ import annotations

import multiprocessing as mp
import sys
from collections.abc import Callable
from typing import Any

from .config import Job


def _child(job: Job, conn: Any) -> None:
    """Entry point of a worker process: run the job and send its record back."""
    from .measure import run_job

    conn.send(run_job(job))
    conn.close()


def run_isolated(job: Job, timeout: float) -> dict[str, Any]:
    """Run ``job`` in a fresh spawned process; a crash or a timeout becomes a failed record."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(job, child), daemon=True)
    process.start()
    child.close()
    answered = parent.poll(timeout)
    record = _receive(parent) if answered else None
    process.join(timeout=30)
    if process.is_alive():
        process.terminate()
        process.join()
    if record is None:
        why = f"worker exited with code {process.exitcode}" if answered else f"timed out after {timeout:.0f} s"
        record = {"model": job.model, "method": job.method, "precision": job.precision, "repeat": job.repeat,
                  "steps": job.steps, "status": "failed", "error": f"WorkerDied: {why}"}
    return record


def _receive(conn: Any) -> Any:
    """The worker's record, or None when it died before sending one."""
    try:
        return conn.recv()
    except EOFError:
        return None


def run_jobs(jobs: list[Job], timeout: float, run: Callable[[Job, float], dict[str, Any]] = run_isolated,
             progress: bool = True) -> list[dict[str, Any]]:
    """Run the jobs in order with a progress bar; a (model, precision, method) that failed is not run again."""
    from tqdm import tqdm

    records: list[dict[str, Any]] = []
    failed: dict[tuple, dict[str, Any]] = {}
    bar = tqdm(jobs, desc="benchmark", unit="job", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for job in bar:
        bar.set_postfix_str(f"{job.model.split(':')[0]} {job.precision} {job.method} #{job.repeat}")
        if job.key() in failed:
            records.append({**failed[job.key()], "repeat": job.repeat, "skipped": True})
            continue
        record = run(job, timeout)
        records.append(record)
        if record["status"] != "ok":
            failed[job.key()] = record
    bar.close()
    return records
