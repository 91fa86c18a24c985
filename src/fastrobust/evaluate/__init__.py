"""Robust accuracy of any ``nn.Module``: the evaluation loop, its attacks by name, its resumable state, the
pre-checks that refuse an evaluation which would be wrong, sanity checks and invariance evaluations.

``from fastrobust.evaluate import evaluate, sanity_checks`` is the public face; the modules inside hold the
machinery.
"""

from fastrobust.evaluate.evaluation import (
    ATTACKS,
    attack_settings,
    clean_and_robust_counts,
    default_step,
    evaluate,
    iterate_split,
    pgd_accuracy,
    read_state_file,
)
from fastrobust.evaluate.sanity import sanity_checks

__all__ = [
    "ATTACKS",
    "attack_settings",
    "clean_and_robust_counts",
    "default_step",
    "evaluate",
    "iterate_split",
    "pgd_accuracy",
    "read_state_file",
    "sanity_checks",
]
