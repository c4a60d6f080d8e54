"""opacus_fast: fast, exact DP-SGD for PyTorch as a drop-in extension of Opacus."""

from .engine import BKEngine, UnsupportedModuleError
from .optimizer import FastDPOptimizer
from .privacy_engine import BKGradSampleModule, PrivacyEngine
from .validators import fix

__version__ = "0.1.0"

__all__ = ["BKEngine", "BKGradSampleModule", "FastDPOptimizer", "PrivacyEngine", "UnsupportedModuleError", "fix"]
