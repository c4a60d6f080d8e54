"""Opacus' own tests, run against ``make_private_fast``.

The test classes of the Opacus modules in ``MODULES`` (shipped in the Opacus wheel as ``opacus.tests``) run here with
``PrivacyEngine.make_private`` routed to ``make_private_fast`` and ``make_private_with_epsilon`` to
``make_private_fast_with_epsilon``; nothing else is changed. ``grad_sample_mode`` names Opacus' own way of computing
per-sample gradients ("hooks", "functorch", "ew"): the routing replaces it with BK, which is the point of the swap.

To fit CI's time (the whole suite must stay under about 10 minutes on 2 cores), this runs a chosen subset:
- ``EXAMPLES`` hypothesis examples per property test instead of Opacus' profile of 100;
- the classes in ``SAME_UNDER_ROUTING`` are left out: each differs from its base class only in ``grad_sample_mode``,
  so under the routing it runs exactly its base class's code;
- the tests in ``MODEL_INDEPENDENT`` build their own torchvision model, whatever the class's model: they run in
  ``PrivacyEngineConvNetTest`` only.
Every other test runs, except those in ``DESELECTED``, each with its reason (shown as the skip reason).
"""

from __future__ import annotations

import importlib
import unittest
from typing import Any

import pytest
from hypothesis import settings

from opacus_fast import PrivacyEngine

MODULES = (
    "privacy_engine_test",
    "batch_memory_manager_test",
    "gradient_accumulation_test",
    "privacy_engine_validation_test",
    "randomness_test",
)

#: hypothesis examples per property test (Opacus' default profile runs 100)
EXAMPLES = 2

SAME_UNDER_ROUTING = (
    "PrivacyEngineConvNetFrozenTestFunctorch",
    "PrivacyEngineConvNetTestExpandedWeights",
    "PrivacyEngineConvNetTestFunctorch",
    "PrivacyEngineTextTestFunctorch",
    "PrivacyEngineTiedWeightsTestFunctorch",
    "BatchMemoryManagerTestWithExpandedWeights",
    "BatchMemoryManagerTestWithFunctorch",
    "GradientAccumulationTestFunctorch",
)

MODEL_INDEPENDENT = ("test_model_validator", "test_model_validator_after_fix", "test_validator_weight_update_check")

_GRAD_SAMPLE = "reads p.grad_sample, Opacus' per-sample gradients, which BK never builds"
_SEQUENCE_FIRST = (
    "passes batch_first=True for its sequence-first model; BK follows the batch and refuses the mismatch, where "
    "Opacus computes per-sample gradients along the sequence (this test checks only the calibrated noise)"
)
_FUNCTORCH_ATTRIBUTE = "asserts ft_compute_sample_grad, the attribute Opacus' functorch fallback sets on the module"
_EW_FAILURE = "expects the RuntimeError of Opacus' ExpandedWeights mode (grad_sample_mode='ew') on this module"

#: tests left out, each with its reason
DESELECTED: dict[str, str] = {
    "PrivacyEngineConvNetTest.test_sample_grad_aggregation": _GRAD_SAMPLE,
    "PrivacyEngineConvNetFrozenTest.test_sample_grad_aggregation": _GRAD_SAMPLE,
    "PrivacyEngineTiedWeightsTest.test_sample_grad_aggregation": _GRAD_SAMPLE,
    "PrivacyEngineConvNetHooksTest.test_sample_grad_aggregation": _GRAD_SAMPLE,
    "PrivacyEngineConvNetFrozenHooksTest.test_sample_grad_aggregation": _GRAD_SAMPLE,
    "PrivacyEngineTiedWeightsHooksTest.test_sample_grad_aggregation": _GRAD_SAMPLE,
    "PrivacyEngineTextTest.test_sample_grad_aggregation": _GRAD_SAMPLE,
    "PrivacyEngineTextHooksTest.test_sample_grad_aggregation": _GRAD_SAMPLE,
    "PrivacyEngineCustomLayerTest.test_sample_grad_aggregation": _GRAD_SAMPLE,
    "PrivacyEngineCustomLayerHooksTest.test_sample_grad_aggregation": _GRAD_SAMPLE,
    "PrivacyEngineTextTest.test_make_private_with_epsilon": _SEQUENCE_FIRST,
    "PrivacyEngineTextHooksTest.test_make_private_with_epsilon": _SEQUENCE_FIRST,
    "PrivacyEngineValidationTest.test_custom_linear_hooks": _FUNCTORCH_ATTRIBUTE,
    "PrivacyEngineValidationTest.test_unsupported_hooks": _FUNCTORCH_ATTRIBUTE,
    "PrivacyEngineValidationTest.test_extra_param_hooks_requires_grad": _FUNCTORCH_ATTRIBUTE,
    "PrivacyEngineValidationTest.test_unsupported_ew": _EW_FAILURE,
    "PrivacyEngineValidationTest.test_extra_param_ew": _EW_FAILURE,
}


class RoutedPrivacyEngine(PrivacyEngine):
    """Opacus' PrivacyEngine whose ``make_private`` is ``make_private_fast``."""

    def make_private(self, **kwargs: Any) -> Any:
        return self.make_private_fast(**{**kwargs, "grad_sample_mode": "bk"})

    def make_private_with_epsilon(self, **kwargs: Any) -> Any:
        return self.make_private_fast_with_epsilon(**{**kwargs, "grad_sample_mode": "bk"})


_modules = {name: importlib.import_module(f"opacus.tests.{name}") for name in MODULES}


@pytest.fixture(autouse=True)
def _route(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Route ``PrivacyEngine`` in Opacus' test modules, and give property tests ``EXAMPLES`` examples."""
    for module in _modules.values():
        monkeypatch.setattr(module, "PrivacyEngine", RoutedPrivacyEngine)
    test = getattr(type(request.instance), request.function.__name__, None) if request.instance else None
    chosen = getattr(test, "_hypothesis_internal_use_settings", None)
    if chosen is not None:
        monkeypatch.setattr(test, "_hypothesis_internal_use_settings", settings(chosen, max_examples=EXAMPLES))


def _skipped(reason: str) -> Any:
    @unittest.skip(reason)
    def test(self: unittest.TestCase) -> None:
        """Left out (see the reason)."""

    return test


def _routed_classes(module: Any) -> dict[str, type]:
    """Subclasses of ``module``'s test classes, collected here (and so routed), with the tests left out skipped."""
    classes = {}
    for name, cls in vars(module).items():
        if not (isinstance(cls, type) and issubclass(cls, unittest.TestCase) and cls.__module__ == module.__name__):
            continue
        if name in SAME_UNDER_ROUTING:
            continue
        left_out = {test: _skipped(reason) for key, reason in DESELECTED.items() for owner, test in [key.split(".")]
                    if owner == name}
        if name != "PrivacyEngineConvNetTest":
            left_out.update({test: _skipped("runs in PrivacyEngineConvNetTest only (its model is its own)")
                             for test in MODEL_INDEPENDENT if hasattr(cls, test)})
        classes[name] = type(name, (cls,), {**left_out, "__module__": __name__})
    return classes


def test_every_left_out_test_exists() -> None:
    """Each entry names a test of Opacus' modules (a renamed test must not hide behind a stale entry)."""
    classes = {name: cls for module in _modules.values() for name, cls in vars(module).items() if isinstance(cls, type)}
    for key in DESELECTED:
        owner, test = key.split(".")
        assert callable(getattr(classes[owner], test, None)), key
    assert all(name in classes for name in SAME_UNDER_ROUTING)


for _module in _modules.values():
    globals().update(_routed_classes(_module))
del _module
