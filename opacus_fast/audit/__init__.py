"""Empirical privacy auditing: a statistically valid lower bound on ε from one training run, beside the accountant's.

The accountant's ε is an upper bound that holds only if clipping, noise and sampling are implemented exactly. An
audit inserts canaries, each included with probability 1/2, trains once, and turns the success of a membership test
on them into a lower bound on ε (Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS
2023). A lower bound above the accountant's ε proves a leak; a lower bound below it proves nothing about privacy.

    from opacus_fast.audit import TrainingConfig, audit
    result = audit(model, train_set, TrainingConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.03,
                                                    steps=400, lr=2.0), canaries=5000)
    print(result.summary())

``python -m opacus_fast.audit --example digits`` runs one on scikit-learn's digits.
"""

from .bound import Bound, audit_bound, default_guessers, epsilon_lower_bound, guess, one_run_p_value
from .canaries import CANARY_NORM, GradientCanaries, StepScores
from .run import AuditResult, TrainingConfig, accountant_epsilon, audit

__all__ = [
    "CANARY_NORM",
    "AuditResult",
    "Bound",
    "GradientCanaries",
    "StepScores",
    "TrainingConfig",
    "accountant_epsilon",
    "audit",
    "audit_bound",
    "default_guessers",
    "epsilon_lower_bound",
    "guess",
    "one_run_p_value",
]
