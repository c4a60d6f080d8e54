"""Loading the example scripts (not a package) as modules, and keeping them off the network, for their tests."""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(filename: str) -> ModuleType:
    """``examples/<filename>`` imported as a module (registered in sys.modules: dataclasses look it up there)."""
    spec = importlib.util.spec_from_file_location(f"opacus_fast_example_{Path(filename).stem}", EXAMPLES / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def refuse_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to open a connection (a download) fail loudly instead of reaching the network."""

    def refuse(*args, **kwargs):
        raise AssertionError("the example tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
