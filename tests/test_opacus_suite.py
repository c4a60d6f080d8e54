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
_BATCH_SECOND = "batch_first=False: pending"
_OWN_AND_CHILD = (
    "refused with UnsupportedModuleError: ModelWithCustomLinear.extra_param and LinearWithExtraParam.extra_param are "
    "a module's own trainable parameters beside trainable submodules, which BK cannot isolate per example"
)
_FUNCTORCH_ATTRIBUTE = "asserts ft_compute_sample_grad, the attribute Opacus' functorch fallback sets on the module"
_EW_FAILURE = "expects the RuntimeError of Opacus' ExpandedWeights mode (grad_sample_mode='ew') on this module"
_TEXT_TESTS = (
    "test_basic", "test_checkpoints", "test_compare_to_vanilla", "test_deterministic_run", "test_flat_clipping",
    "test_make_private_with_epsilon", "test_noise_changes_every_time", "test_noise_level", "test_per_layer_clipping",
    "test_sample_grad_aggregation",
)
_CUSTOM_LAYER_TESTS = _TEXT_TESTS

#: tests left out, each with its reason
DESELECTED: dict[str, str] = {
    "PrivacyEngineConvNetTest.test_sample_grad_aggregation": _GRAD_SAMPLE,
    "PrivacyEngineConvNetFrozenTest.test_sample_grad_aggregation": _GRAD_SAMPLE,
    "PrivacyEngineTiedWeightsTest.test_sample_grad_aggregation": _GRAD_SAMPLE,
    "PrivacyEngineConvNetHooksTest.test_sample_grad_aggregation": _GRAD_SAMPLE,
    "PrivacyEngineConvNetFrozenHooksTest.test_sample_grad_aggregation": _GRAD_SAMPLE,
    "PrivacyEngineTiedWeightsHooksTest.test_sample_grad_aggregation": _GRAD_SAMPLE,
    # PrivacyEngineTextTest's model runs sequence-first (test_make_private_with_epsilon leaves batch_first at True)
    **{f"PrivacyEngineTextTest.{test}": _BATCH_SECOND for test in _TEXT_TESTS},
    **{f"PrivacyEngineTextHooksTest.{test}": _BATCH_SECOND for test in _TEXT_TESTS},
    **{f"PrivacyEngineCustomLayerTest.{test}": _OWN_AND_CHILD for test in _CUSTOM_LAYER_TESTS},
    **{f"PrivacyEngineCustomLayerHooksTest.{test}": _OWN_AND_CHILD for test in _CUSTOM_LAYER_TESTS},
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
