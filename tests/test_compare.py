"""Smoke tests of the benchmark harness ``benchmarks/compare.py``: its logic, not its timings.

Covered: argument parsing and validation, job planning, the exact clipped reference (against torch.func) and
the correctness check on a tiny MLP, the --check comparison, the output files, the max-batch search and the
job loop. Worker processes and timm models are not started here (too slow for CI); the jobs are faked.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import compare
from _bench.config import SUITES, VIT_TINY_32, Job, RunConfig, parse_model_spec, plan_jobs
from _bench.measure import correctness, reference_update, search_max_batch
from _bench.report import check_results, summarize, write_outputs
from _bench.runner import run_jobs


def resolve(*argv: str):
    return compare.resolve_config(compare.build_parser().parse_args(list(argv)))


# --- arguments ----------------------------------------------------------------------------------------------


def test_default_is_the_cpu_suite():
    config, baseline = resolve()
    assert baseline is None
    assert config.models == [VIT_TINY_32, "resnet18"]
    assert config.methods == ["sgd", "opacus", "opacus-ghost", "fast-bk"]
    assert (config.batch_size, config.threads, config.device, config.img_size) == (64, 2, "cpu", 32)
    assert compare.config_errors(config, cuda_available=False) == []


def test_options_override_the_suite_and_sgd_is_always_there():
    config, _ = resolve("--models", "resnet18", "--methods", "fast-bk", "--batch-size", "8", "--steps", "3",
                        "--warmup", "0", "--repeat", "1", "--img-size", "16", "--num-classes", "5")
    assert config.models == ["resnet18"]
    assert config.methods == ["sgd", "fast-bk"]
    assert (config.batch_size, config.steps_for("resnet18"), config.warmup, config.repeat) == (8, 3, 0, 1)
    assert (config.img_size, config.num_classes, config.logical()) == (16, 5, 32)


def test_bad_options_give_clear_errors():
    config, _ = resolve("--device", "cuda", "--precision", "tf32")
    errors = compare.config_errors(config, cuda_available=False)
    assert any("is_available() is False" in e and "--device cpu" in e for e in errors), errors

    config, _ = resolve("--precision", "tf32", "--max-batch", "--batch-size", "0", "--models", "not_a_model_xyz")
    text = "\n".join(compare.config_errors(config, cuda_available=False))
    for expected in ("tf32 is a CUDA mode", "--max-batch", "--batch-size must be at least 1", "not_a_model_xyz"):
        assert expected in text

    with pytest.raises(SystemExit):
        compare.build_parser().parse_args(["--methods", "adam"])


def test_model_spec_parses_extra_arguments():
    assert parse_model_spec("vit_tiny_patch16_224:patch_size=4,qkv_bias=False") == (
        "vit_tiny_patch16_224", {"patch_size": 4, "qkv_bias": False})
    assert parse_model_spec("resnet18") == ("resnet18", {})
    with pytest.raises(ValueError, match="name:key=value"):
        parse_model_spec("resnet18:oops")


def test_jobs_are_interleaved_and_checked_once():
    config = SUITES["cpu"]
    jobs = plan_jobs(config)
    assert len(jobs) == config.repeat * len(config.models) * len(config.methods)
    first = [j.method for j in jobs if j.repeat == 0 and j.model == "resnet18"]
    second = [j.method for j in jobs if j.repeat == 1 and j.model == "resnet18"]
    assert sorted(first) == sorted(second) and first != second  # rotated between repeats
    checked = [(j.model, j.method) for j in jobs if j.check]
    assert len(checked) == len(set(checked)) == len(config.models) * len(config.methods)


# --- correctness reference ------------------------------------------------------------------------------------


def tiny_mlp(img_size: int = 3, num_classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * img_size * img_size, 6), nn.Tanh(),
                         nn.Linear(6, num_classes)).double()


def torch_func_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> list[torch.Tensor]:
    """Independent oracle: per-example grads by torch.func.vmap, clipped and averaged."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in per.values()))
    factor = torch.clamp(clip / (norms + 1e-6), max=1.0)
    return [torch.einsum("i,i...->...", factor, g) / x.shape[0] for g in per.values()]


def test_reference_matches_torch_func():
    model = tiny_mlp()
    x = torch.randn(6, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(6) % 4
    for clip in (0.05, 1e6):  # everything clipped; nothing clipped
        got = reference_update(model, x, y, clip)
        want = torch_func_reference(model, x, y, clip)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["opacus", "opacus-ghost", "fast-bk"])
def test_correctness_check_passes_for_dp_methods(method):
    if method == "fast-bk":
        pytest.importorskip("opacus_fast")
    images = torch.randn(8, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    result = correctness(method, tiny_mlp(), images, num_classes=4)
    assert result["status"] == "pass", result
    assert result["rel_err"] < 1e-10


@pytest.mark.parametrize("method", ["opacus", "opacus-ghost"])
def test_opacus_steps_once_per_logical_batch_like_fast_bk(method):
    """Opacus gets BatchMemoryManager's skip signals: parameters move (noise, step) only at a logical batch's end."""
    from _bench.methods import IndexDataset, make_trainer, train_step

    bank = torch.randn(16, 3, 3, 3)
    trainer = make_trainer(method, tiny_mlp().float(), IndexDataset(64, 4), logical=16, physical=4,
                           noise_multiplier=1.0, max_grad_norm=1.0, lr=1.0, seed=0)
    context = trainer.loader.context
    moved, last = [], []
    for _, batch in zip(range(12), trainer.loader):
        is_last = context.current.is_last
        before = [p.detach().clone() for p in trainer.params]
        train_step(trainer, batch, bank, contextlib.nullcontext())
        moved.append(any(not torch.equal(b, p) for b, p in zip(before, trainer.params)))
        last.append(is_last)
    assert moved == last and sum(last) >= 1 and not all(last)


def test_written_results_hold_no_machine_paths():
    """Tracebacks and the command line in results name files by repository or package path only."""
    import traceback

    from _bench.paths import portable_command, portable_traceback

    try:
        nn.Linear(2, 3)(torch.zeros(1, 5))  # raises inside torch's installed package, called from this repository
    except RuntimeError:
        text = portable_traceback(traceback.format_exc())
    files = [line.split('"')[1] for line in text.splitlines() if line.strip().startswith("File ")]
    assert "tests/test_compare.py" in files and any(f.startswith(".../torch/nn/") for f in files)
    assert not any(f.startswith("/") for f in files)
    outside = str(Path("/") / "elsewhere" / "out" / "run")
    assert portable_command(["--out", outside, "--check", "benchmarks/baseline.json"]) == (
        "python benchmarks/compare.py --out .../run --check benchmarks/baseline.json")


def test_correctness_check_can_fail():
    """sgd does not clip: with C = the median norm its update must be flagged."""
    images = torch.randn(8, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    result = correctness("sgd", tiny_mlp(), images, num_classes=4)
    assert result["status"] == "fail" and result["rel_err"] > 1e-3


# --- summary, --check and outputs -----------------------------------------------------------------------------


def fake_records() -> list[dict]:
    """Two repeats of sgd/opacus/fast-bk on one model; opacus fails."""
    records = []
    for repeat, (sgd, fast) in enumerate([(100.0, 80.0), (120.0, 90.0)]):
        records.append({"model": "m", "method": "sgd", "precision": "fp32", "repeat": repeat, "status": "ok",
                        "throughput": sgd, "peak_mem_mib": 10.0, "device_name": "cpu"})
        records.append({"model": "m", "method": "fast-bk", "precision": "fp32", "repeat": repeat, "status": "ok",
                        "throughput": fast, "peak_mem_mib": 12.0,
                        **({"correctness": {"status": "pass", "rel_err": 1e-15}} if repeat == 0 else {})})
    records.append({"model": "m", "method": "opacus", "precision": "fp32", "repeat": 0, "status": "failed",
                    "error": "RuntimeError: inplace"})
    return records


def fake_config():
    return RunConfig(suite="test", models=["m"], methods=["sgd", "opacus", "fast-bk"], precisions=["fp32"], repeat=2)


def test_summary_takes_ratios_within_each_repeat():
    rows = {r["method"]: r for r in summarize(fake_records(), fake_config())}
    assert rows["fast-bk"]["ratio_min"] == pytest.approx(0.75)  # 90/120, not 80/120 or 90/100
    assert rows["fast-bk"]["ratio_max"] == pytest.approx(0.8)
    assert rows["fast-bk"]["ratio_median"] == pytest.approx(0.775)
    assert rows["fast-bk"]["correctness"] == "pass"
    assert rows["opacus"]["status"] == "failed" and "inplace" in rows["opacus"]["error"]
    assert rows["sgd"]["correctness"] is None


def test_ratio_to_opacus_is_taken_within_each_repeat():
    records = [r for r in fake_records() if r["method"] != "opacus"]
    for repeat, throughput in enumerate([40.0, 30.0]):
        records.append({"model": "m", "method": "opacus", "precision": "fp32", "repeat": repeat, "status": "ok",
                        "throughput": throughput, "peak_mem_mib": 50.0})
    config = RunConfig(suite="cpu", models=[VIT_TINY_32], methods=["sgd", "opacus", "fast-bk"], precisions=["fp32"],
                       repeat=2)
    for r in records:
        r["model"] = VIT_TINY_32
    rows = {r["method"]: r for r in summarize(records, config)}
    assert rows["fast-bk"]["opacus_ratio_min"] == pytest.approx(2.0)  # 80/40, then 90/30 = 3.0
    assert rows["fast-bk"]["opacus_ratio_median"] == pytest.approx(2.5)
    assert rows["fast-bk"]["opacus_target"] == 2.5 and rows["fast-bk"]["opacus_target_met"] is True
    assert rows["opacus"]["opacus_ratio_median"] is None and rows["sgd"]["opacus_ratio_median"] is None


def test_check_flags_regressions_failures_and_wrong_gradients():
    summary = summarize(fake_records(), fake_config())
    floor = {"model": "m", "precision": "fp32", "method": "fast-bk"}
    assert check_results(summary, {"floors": [{**floor, "floor": 0.8}]}, tolerance=0.05) == []
    problems = check_results(summary, {"floors": [{**floor, "floor": 0.9}]}, tolerance=0.05)
    assert len(problems) == 1 and "below the floor 0.90" in problems[0]
    problems = check_results(summary, {"floors": [{**floor, "method": "opacus", "floor": 0.1}]}, tolerance=0.05)
    assert len(problems) == 1 and "failed" in problems[0]
    summary[2]["correctness"], summary[2]["correctness_rel_err"] = "fail", 0.3
    problems = check_results(summary, {"floors": []}, tolerance=0.05)
    assert len(problems) == 1 and "correctness" in problems[0]


def test_outputs_are_written(tmp_path):
    config = fake_config()
    records = fake_records()
    paths = write_outputs(tmp_path / "run", {"device": "cpu"}, config, summarize(records, config), records)
    assert [p.suffix for p in paths] == [".json", ".csv", ".md", ".png"]
    data = json.loads(paths[0].read_text())
    assert {r["method"] for r in data["summary"]} == {"sgd", "opacus", "fast-bk"}
    assert paths[1].read_text().startswith("model,precision,method,status")
    assert "| m | fp32 | fast-bk |" in paths[2].read_text()
    assert paths[3].read_bytes()[:4] == b"\x89PNG"


def test_main_with_check_exits_nonzero_on_regression(tmp_path, monkeypatch, capsys):
    suite = {**fake_config().to_dict(), "models": ["resnet18"]}
    records = [{**r, "model": "resnet18"} for r in fake_records()]
    monkeypatch.setattr(compare, "run_jobs", lambda jobs, timeout, progress: records)
    baseline = tmp_path / "baseline.json"
    floor = {"model": "resnet18", "precision": "fp32", "method": "fast-bk"}
    baseline.write_text(json.dumps({"tolerance": 0.05, "suite": suite, "floors": [{**floor, "floor": 0.95}]}))
    args = ["--check", str(baseline), "--out", str(tmp_path / "out"), "--no-progress"]
    assert compare.main(args) == 1
    assert "CHECK FAILED" in capsys.readouterr().out
    assert compare.main(args + ["--tolerance", "0.25"]) == 0
    assert (tmp_path / "out.png").exists()


# --- max-batch search and job loop ---------------------------------------------------------------------------


def test_max_batch_search_finds_the_limit():
    tried = []

    def fits(size):
        tried.append(size)
        return size <= 300

    found = search_max_batch(fits, start=64, cap=4096)
    assert 300 * 15 / 16 <= found <= 300 and len(tried) < 12
    assert search_max_batch(lambda b: True, start=64, cap=1000) == 512
    assert search_max_batch(lambda b: False, start=64, cap=1000) == 0
    assert search_max_batch(lambda b: b <= 5, start=64, cap=1000) == 5


def test_failed_methods_are_not_run_again():
    config = fake_config()
    ran = []

    def run(job: Job, timeout: float) -> dict:
        ran.append((job.method, job.repeat))
        ok = job.method != "opacus"
        return {"model": job.model, "method": job.method, "precision": job.precision, "repeat": job.repeat,
                "status": "ok" if ok else "failed", "throughput": 1.0, "peak_mem_mib": 1.0,
                **({} if ok else {"error": "E: boom"})}

    records = run_jobs(plan_jobs(config), timeout=1, run=run, progress=False)
    assert ("opacus", 1) not in ran and ("fast-bk", 1) in ran
    assert [r["repeat"] for r in records if r["method"] == "opacus"] == [0, 1]
