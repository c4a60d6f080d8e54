"""``examples/train_fsdp.py`` as the docs run it: torchrun, 2 CPU processes, a sharded checkpoint and a resume."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_fsdp.py"


def _torchrun(*args: str) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(EXAMPLE),
               "--epochs", "2", *args]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_trains_privately_and_resumes_from_its_sharded_checkpoint(tmp_path) -> None:
    first = _torchrun("--checkpoint", str(tmp_path))
    accuracies = [float(a) for a in re.findall(r"test accuracy ([0-9.]+)", first)]
    epsilon = re.search(r"done: ε = ([0-9.]+)", first)
    assert len(accuracies) == 2 and accuracies[-1] > 0.5, first  # 10 classes: chance is 0.1
    assert epsilon and 0 < float(epsilon.group(1)) <= 3.0, first
    again = _torchrun("--checkpoint", str(tmp_path))  # both epochs are in the checkpoint: nothing left to train
    assert "starting at epoch 2" in again and "test accuracy" not in again, again
    assert re.search(r"done: ε = ([0-9.]+)", again).group(1) == epsilon.group(1), again
