"""What a benchmark run is made of: the built-in suites, the resolved run settings and one worker job."""

from __future__ import annotations

import ast
from dataclasses import asdict, dataclass, field, replace
from typing import Any

METHODS: tuple[str, ...] = ("sgd", "opacus", "opacus-ghost", "fast-bk")
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")
VIT_TINY_32 = "vit_tiny_patch16_224:patch_size=4"

# The project's throughput targets (ratio to sgd) for the default CPU suite; reported as met / not met,
# never asserted. Keyed by (device type, model spec, image size, physical batch, method).
TARGETS: dict[tuple[str, str, int, int, str], float] = {
    ("cpu", VIT_TINY_32, 32, 64, "fast-bk"): 0.75,
    ("cpu", "resnet18", 32, 64, "fast-bk"): 0.6,
}
# The same, as a throughput ratio to Opacus hooks mode (method "opacus") within each repeat.
OPACUS_TARGETS: dict[tuple[str, str, int, int, str], float] = {
    ("cpu", VIT_TINY_32, 32, 64, "fast-bk"): 2.5,
}


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one benchmark run (a suite with command-line overrides applied)."""

    suite: str
    models: list[str]
    methods: list[str]
    precisions: list[str]
    device: str = "cpu"
    img_size: int = 32
    num_classes: int = 10
    batch_size: int = 64
    logical_batch: int | None = None
    steps: dict[str, int] = field(default_factory=dict)
    default_steps: int = 10
    warmup: int = 2
    repeat: int = 3
    threads: int | None = 2
    #: apply opacus_fast.cpu_memory.keep_freed_memory() in every worker, not only fast-bk's (which gets it from
    #: make_private_fast): the like-for-like comparison
    keep_cpu_memory_all: bool = False
    max_batch: bool = False
    max_batch_cap: int = 4096
    check_size: int = 8
    dataset_size: int = 50_000
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    seed: int = 0
    job_timeout: float = 900.0

    def steps_for(self, model: str) -> int:
        """Timed steps for ``model``: a per-model suite value, else the run-wide one."""
        return self.steps.get(model, self.default_steps)

    def logical(self) -> int:
        """Expected logical (Poisson) batch size: four physical batches unless set."""
        return self.logical_batch or 4 * self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SUITES: dict[str, RunConfig] = {
    # The default: 2 CPU threads, CIFAR-shaped data, physical batch 64. Two warm-up steps, to time the
    # steady state: on vit_tiny the second step was still -2 to +5 % off the later ones for fast-bk (four
    # processes), 0-1 % for sgd and Opacus. 8 ViT steps narrow the spread (sgd ~1 s per step, Opacus ~3 s,
    # ~10 s per worker start).
    "cpu": RunConfig(
        suite="cpu",
        models=[VIT_TINY_32, "resnet18"],
        methods=list(METHODS),
        precisions=["fp32"],
        steps={VIT_TINY_32: 8, "resnet18": 40},
        warmup=2,
        repeat=3,
    ),
    # What --check runs (see baseline.json): the two models, sgd and fast-bk only, a smaller batch;
    # about 3 minutes on an idle 2-core machine.
    "quick": RunConfig(
        suite="quick",
        models=[VIT_TINY_32, "resnet18"],
        methods=["sgd", "fast-bk"],
        precisions=["fp32"],
        batch_size=32,
        steps={VIT_TINY_32: 6, "resnet18": 30},
        warmup=1,
        repeat=3,
    ),
    # One GPU, 224 px: ViT-B/16 and ResNet-50 (GroupNorm after ModuleValidator.fix), bf16 and TF32.
    # Measured: 7.3 minutes on one H200 (most of it worker starts; the timed windows are short, so expect
    # spreads of 10-40%; add --steps 30 --repeat 3 for steadier numbers, about 12 minutes).
    "gpu": RunConfig(
        suite="gpu",
        models=["vit_base_patch16_224", "resnet50"],
        methods=list(METHODS),
        precisions=["bf16", "tf32"],
        device="cuda",
        img_size=224,
        num_classes=1000,
        batch_size=64,
        default_steps=10,
        warmup=3,
        repeat=2,
        threads=None,
        check_size=4,
    ),
}


@dataclass(frozen=True)
class Job:
    """One worker process: one method on one model at one precision, in one repeat."""

    model: str
    method: str
    precision: str
    repeat: int
    steps: int
    check: bool
    config: RunConfig

    def key(self) -> tuple[str, str, str]:
        return (self.model, self.precision, self.method)


def parse_model_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``name:key=value,key=value`` into a timm name and extra ``timm.create_model`` keyword arguments."""
    name, _, options = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad model option {item!r} in {spec!r}: write name:key=value[,key=value]")
        kwargs[key.strip()] = _literal(value.strip())
    return name.strip(), kwargs


def _literal(text: str) -> Any:
    """A Python literal if ``text`` is one (4, 0.1, True), else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def plan_jobs(config: RunConfig) -> list[Job]:
    """All jobs, in run order: repeats outermost, methods rotated each repeat so that drift hits all alike.

    Correctness (and the max-batch search) run once per (model, method), in the first repeat's job at the
    first precision.
    """
    jobs = []
    count = len(config.methods)
    for repeat in range(config.repeat):
        order = config.methods[repeat % count:] + config.methods[: repeat % count]
        for model in config.models:
            for p_index, precision in enumerate(config.precisions):
                for method in order:
                    check = repeat == 0 and p_index == 0
                    jobs.append(Job(model, method, precision, repeat, config.steps_for(model), check, config))
    return jobs


def with_overrides(config: RunConfig, **overrides: Any) -> RunConfig:
    """``config`` with every override that is not None applied."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
