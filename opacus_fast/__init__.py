"""opacus_fast: fast, exact DP-SGD for PyTorch as a drop-in extension of Opacus."""

from .engine import BKEngine, UnsupportedModuleError
from .optimizer import AdaptiveClipDPOptimizer, FastDPOptimizer
from .privacy_engine import BKGradSampleModule, BKHooks, PrivacyEngine
from .validators import fix

__version__ = "0.1.0"

__all__ = [
    "AdaptiveClipDPOptimizer",
    "BKEngine",
    "BKGradSampleModule",
    "BKHooks",
    "FastDPOptimizer",
    "PrivacyEngine",
    "UnsupportedModuleError",
    "fix",
]
