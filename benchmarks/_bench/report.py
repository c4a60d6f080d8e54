"""From job records to the summary, the printed table, the four output files and the baseline check."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import METHODS, OPACUS_TARGETS, TARGETS, RunConfig

NOTES = [
    (
        "Throughput = physical rows per second after warm-up, between device synchronisations. Every method is fed "
        "the same kind of stream: Poisson logical batches (expected size --logical-batch) from "
        "opacus_fast.data.DPDataLoader, cut into physical batches of exactly --batch-size rows, the last one "
        "padded; padded rows are computed by every method, so they count."
    ),
    (
        "sgd, opacus and opacus-ghost iterate a DPDataLoader seeded like the one make_private_fast returns to "
        "fast-bk, so all see the same batches (jobs' data_fingerprint in the JSON). Opacus gets it with "
        "poisson_sampling=False and has no padding masks: for it this times identical work, not a private run. "
        "As with Opacus' BatchMemoryManager, it steps and adds noise once per logical batch, like fast-bk."
    ),
    (
        "Each job (method x model x precision x repeat) runs in its own spawned process; methods are rotated "
        "between repeats and the ratio to sgd is taken within a repeat, then the median and min-max are reported."
    ),
    (
        "Correctness: one noiseless step (lr=1, float64, C = median per-example norm) against an exact "
        "batch-of-one reference, sum_i min(1, C/(|g_i|+1e-6)) g_i / n; pass if the relative error < 1e-6."
    ),
    (
        "CPU memory: make_private_fast makes glibc's malloc keep freed memory for reuse (opacus_fast.cpu_memory), "
        "so fast-bk's worker runs with that setting and the others with glibc's defaults; with "
        "--keep-cpu-memory-all every worker gets it (the like-for-like comparison)."
    ),
    (
        "On a shared machine other processes slow all methods alike only on average: see the load averages."
    ),
]

CSV_FIELDS = ["model", "precision", "method", "status", "runs", "throughput_median", "throughput_min",
              "throughput_max", "ratio_median", "ratio_min", "ratio_max", "peak_mem_mib", "max_batch",
              "opacus_ratio_median", "opacus_ratio_min", "opacus_ratio_max", "correctness", "correctness_rel_err",
              "target", "target_met", "opacus_target", "opacus_target_met", "error"]


def summarize(records: Sequence[dict[str, Any]], config: RunConfig) -> list[dict[str, Any]]:
    """One row per (model, precision, method): medians and ranges over repeats, ratios to sgd per repeat."""
    rows = []
    for model in config.models:
        for precision in config.precisions:
            mine = [r for r in records if r["model"] == model and r["precision"] == precision
                    and not r.get("skipped")]
            sgd = _throughput_by_repeat(mine, "sgd")
            opacus = _throughput_by_repeat(mine, "opacus")
            for method in config.methods:
                runs = [r for r in mine if r["method"] == method]
                checks = [r["correctness"] for r in records
                          if r["model"] == model and r["method"] == method and "correctness" in r]
                rows.append(summary_row(model, precision, method, runs, sgd, opacus, config,
                                        checks[0] if checks else None))
    return rows


def _throughput_by_repeat(records: Sequence[dict[str, Any]], method: str) -> dict[int, float]:
    return {r["repeat"]: r["throughput"] for r in records if r["method"] == method and r["status"] == "ok"}


def _ratios(ok: Sequence[dict[str, Any]], reference: dict[int, float]) -> list[float]:
    """Throughput over the reference method's throughput in the same repeat."""
    return [r["throughput"] / reference[r["repeat"]] for r in ok if r["repeat"] in reference]


def summary_row(model: str, precision: str, method: str, runs: list[dict[str, Any]], sgd: dict[int, float],
                opacus: dict[int, float], config: RunConfig, correctness: dict[str, Any] | None) -> dict[str, Any]:
    """The summary of one (model, precision, method) from its runs, sgd's and opacus' throughput per repeat and
    the (model, method)'s correctness check (float64, so the same for every precision)."""
    ok = [r for r in runs if r["status"] == "ok"]
    throughputs = [r["throughput"] for r in ok]
    key = (config.device, model, config.img_size, config.batch_size, method)
    target, opacus_target = TARGETS.get(key), OPACUS_TARGETS.get(key)
    ratio = _stats(_ratios(ok, sgd))
    vs_opacus = _stats(_ratios(ok, opacus) if method not in ("sgd", "opacus") else [])
    return {
        "model": model, "precision": precision, "method": method,
        "status": "ok" if ok else "failed", "runs": len(ok),
        "error": next((r["error"] for r in runs if r.get("error")), None),
        "throughput_median": _stats(throughputs)[0], "throughput_min": _stats(throughputs)[1],
        "throughput_max": _stats(throughputs)[2],
        "ratio_median": ratio[0], "ratio_min": ratio[1], "ratio_max": ratio[2],
        "opacus_ratio_median": vs_opacus[0], "opacus_ratio_min": vs_opacus[1], "opacus_ratio_max": vs_opacus[2],
        "peak_mem_mib": _stats([r["peak_mem_mib"] for r in ok])[0],
        "max_batch": next((r["max_batch"] for r in runs if "max_batch" in r), None),
        "correctness": None if method == "sgd" else (correctness or {}).get("status", "not run"),
        "correctness_rel_err": (correctness or {}).get("rel_err"),
        "correctness_error": (correctness or {}).get("error"),
        "target": target,
        "target_met": None if target is None or ratio[0] is None else ratio[0] >= target,
        "opacus_target": opacus_target,
        "opacus_target_met": None if opacus_target is None or vs_opacus[0] is None else vs_opacus[0] >= opacus_target,
        "device_name": next((r["device_name"] for r in runs if r.get("device_name")), None),
    }


def _stats(values: Sequence[float]) -> tuple:
    """(median, min, max), or Nones for no values."""
    if not values:
        return (None, None, None)
    return (statistics.median(values), min(values), max(values))


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_cells(row: dict[str, Any], config: RunConfig) -> list[str]:
    """The printed cells of one summary row."""
    spread = None
    if row["throughput_median"]:
        spread = 100 * (row["throughput_max"] - row["throughput_min"]) / row["throughput_median"]
    ratio_range = "-" if row["ratio_min"] is None else f"{row['ratio_min']:.2f}-{row['ratio_max']:.2f}"
    cells = [row["model"], row["precision"], row["method"], _num(row["throughput_median"], 1),
             "-" if spread is None else f"{spread:.0f}%", _num(row["ratio_median"], 2), ratio_range,
             _num(row["peak_mem_mib"], 0)]
    if "opacus" in config.methods:
        cells.append(_num(row["opacus_ratio_median"], 2))
    if config.max_batch:
        cells.append(max_batch_cell(row["max_batch"], config.max_batch_cap))
    cells += [correctness_cell(row), target_cell(row), status_cell(row)]
    return cells


def table_header(config: RunConfig) -> list[str]:
    head = ["model", "prec", "method", "ex/s", "spread", "x sgd", "x sgd range",
            "peak MiB (GPU alloc)" if config.device == "cuda" else "peak RSS MiB"]
    if "opacus" in config.methods:
        head.append("x opacus")
    if config.max_batch:
        head.append("max batch")
    return head + ["correct", "target", "status"]


def max_batch_cell(value: int | None, cap: int) -> str:
    """The largest batch that fit; ``>=cap`` when the search stopped at its cap."""
    if value is None:
        return "-"
    return f">={cap} (cap)" if value >= cap else str(value)


def correctness_cell(row: dict[str, Any]) -> str:
    status = row["correctness"]
    if status is None:
        return "n/a"
    if row["correctness_rel_err"] is not None:
        return f"{status} ({row['correctness_rel_err']:.0e})"
    return status


def target_cell(row: dict[str, Any]) -> str:
    """The project's targets for this row: ratio to sgd, and to opacus where one is set."""
    verdicts = {True: "met", False: "NOT met", None: "NOT met (no ratio)"}
    parts = []
    if row["target"] is not None:
        parts.append(f">={row['target']:.2f} {verdicts[row['target_met']]}")
    if row.get("opacus_target") is not None:
        parts.append(f">={row['opacus_target']:.1f}x opacus {verdicts[row['opacus_target_met']]}")
    return "; ".join(parts)


def status_cell(row: dict[str, Any], width: int = 48) -> str:
    if row["status"] == "ok":
        return "ok" if row["runs"] == 0 or not row["error"] else "ok (some runs failed)"
    text = f"FAILED: {row['error']}"
    return text if len(text) <= width else text[: width - 3] + "..."


def render_text(summary: Sequence[dict[str, Any]], config: RunConfig) -> str:
    """A plain aligned table for the terminal."""
    lines = [table_header(config)] + [table_cells(row, config) for row in summary]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def render_markdown(summary: Sequence[dict[str, Any]], config: RunConfig, meta: dict[str, Any]) -> str:
    """The markdown report: environment, method notes, table and full error texts."""
    lines = [f"# opacus_fast benchmark: suite `{config.suite}`", ""]
    lines += [f"- {key}: {value}" for key, value in meta.items()]
    lines += ["", "## Table", "", "| " + " | ".join(table_header(config)) + " |",
              "|" + "---|" * len(table_header(config))]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in table_cells(row, config)) + " |" for row in summary]
    lines += ["", "## How it was measured", ""] + [f"- {note}" for note in NOTES]
    errors = failure_lines(summary)
    if errors:
        lines += ["", "## Failures", ""] + [f"- {line}" for line in errors]
    return "\n".join(lines) + "\n"


def failure_lines(summary: Sequence[dict[str, Any]]) -> list[str]:
    """The full error of every failed method and every erroring correctness check."""
    lines = []
    for row in summary:
        where = f"{row['model']} {row['precision']} {row['method']}"
        if row["error"]:
            lines.append(f"{where}: {row['error']}")
        if row.get("correctness_error"):
            lines.append(f"{where} correctness check: {row['correctness_error']}")
    return lines


def write_outputs(prefix: Path, meta: dict[str, Any], config: RunConfig, summary: list[dict[str, Any]],
                  records: list[dict[str, Any]]) -> list[Path]:
    """``prefix``.json, .csv, .md and .png; returns their paths."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = [prefix.with_name(prefix.name + ext) for ext in (".json", ".csv", ".md", ".png")]
    payload = {"meta": meta, "config": config.to_dict(), "notes": NOTES, "summary": summary, "jobs": records}
    paths[0].write_text(json.dumps(payload, indent=1, default=str) + "\n")
    with paths[1].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(summary)
    paths[2].write_text(render_markdown(summary, config, meta))
    plot_ratios(summary, config, meta, paths[3])
    return paths


def plot_ratios(summary: Sequence[dict[str, Any]], config: RunConfig, meta: dict[str, Any], path: Path) -> None:
    """Bar chart of the median throughput ratio to sgd (min-max whiskers), per model and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    groups = [(m, p) for m in config.models for p in config.precisions]
    methods = [m for m in config.methods if m != "sgd"] or ["sgd"]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(groups)), 4.2))
    rows = {(r["model"], r["precision"], r["method"]): r for r in summary}
    top = 1.1
    for j, method in enumerate(methods):
        for i, group in enumerate(groups):
            row = rows[group + (method,)]
            x = i - 0.4 + width * (j + 0.5)
            if row["ratio_median"] is None:
                ax.text(x, 0.02, "failed", rotation=90, ha="center", va="bottom", fontsize=8, color="crimson")
            else:
                low, high = row["ratio_median"] - row["ratio_min"], row["ratio_max"] - row["ratio_median"]
                ax.bar(x, row["ratio_median"], width, yerr=[[low], [high]], capsize=3, color=_color(method))
                top = max(top, row["ratio_max"] * 1.1)
            if row["target"] is not None:
                ax.hlines(row["target"], x - width / 2, x + width / 2, colors="black", linestyles="--")
    ax.axhline(1.0, color="grey", linewidth=1)
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.set_ylim(0, top)
    labels = [m.split(":")[0] + ("" if len(config.precisions) == 1 else f"\n{p}") for m, p in groups]
    ax.set_xticks(range(len(groups)), labels, fontsize=8)
    ax.set_ylabel("throughput / sgd (median, min-max)")
    ax.set_title(f"{meta.get('device', config.device)}, physical batch {config.batch_size}, "
                 f"{config.img_size}px (grey: sgd, dashed: target)", fontsize=9)
    ax.legend(handles=[Patch(color=_color(m), label=m) for m in methods], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _color(method: str) -> str:
    """One colour per method, the same in every chart."""
    return f"C{METHODS.index(method)}" if method in METHODS else "grey"


def check_results(summary: Sequence[dict[str, Any]], baseline: dict[str, Any], tolerance: float) -> list[str]:
    """Problems against ``baseline``: a median ratio below its floor minus ``tolerance``, a method with a floor
    that failed, or any correctness check that did not pass."""
    rows = {(r["model"], r["precision"], r["method"]): r for r in summary}
    problems = []
    for floor in baseline.get("floors", []):
        key = (floor["model"], floor.get("precision", "fp32"), floor["method"])
        row = rows.get(key)
        where = " ".join(key)
        if row is None:
            problems.append(f"{where}: not in this run (the baseline's suite and floors disagree)")
        elif row["status"] != "ok":
            problems.append(f"{where}: failed: {row['error']}")
        elif row["ratio_median"] is None:
            problems.append(f"{where}: no ratio to sgd (did sgd fail? {rows.get(key[:2] + ('sgd',), {}).get('error')})")
        elif row["ratio_median"] < floor["floor"] - tolerance:
            problems.append(f"{where}: throughput ratio to sgd {row['ratio_median']:.2f} is below the floor "
                            f"{floor['floor']:.2f} minus tolerance {tolerance:.2f}")
    for row in summary:
        if row["correctness"] in ("fail", "error"):
            detail = row["correctness_error"] or f"relative error {row['correctness_rel_err']:.2e}"
            problems.append(f"{row['model']} {row['precision']} {row['method']}: correctness check "
                            f"{row['correctness']}: {detail}")
    return problems


def make_baseline(summary: Sequence[dict[str, Any]], config: RunConfig, meta: dict[str, Any],
                  tolerance: float) -> dict[str, Any]:
    """A baseline whose floors are this run's smallest ratio to sgd (rounded down to 0.01) per method."""
    floors = [{"model": r["model"], "precision": r["precision"], "method": r["method"],
               "floor": math.floor(r["ratio_min"] * 100) / 100}
              for r in summary if r["method"] != "sgd" and r["ratio_min"] is not None]
    return {"description": "Floors of the throughput ratio to sgd for `compare.py --check`; made with "
                           "--save-baseline. A run fails if a median ratio < floor - tolerance.",
            "tolerance": tolerance, "suite": config.to_dict(), "recorded_on": meta, "floors": floors}
