"""Privacy accounting: the ``prv-accountant`` package as an Opacus accountant, and noise calibration.

Importing this package registers :class:`PRVPackageAccountant` in Opacus as ``"prv_accountant"``, so that
``opacus.accountants.create_accountant("prv_accountant")`` and ``PrivacyEngine(accountant="prv_accountant")`` work.
"""

from .calibration import check_upper_bound, get_noise_multiplier
from .prv_package import MECHANISM, PRVPackageAccountant, register

register()

__all__ = ["MECHANISM", "PRVPackageAccountant", "check_upper_bound", "get_noise_multiplier", "register"]
