"""Robust accuracy of any ``nn.Module``: the evaluation loop, its attacks by name, its resumable state, the
pre-checks that refuse or flag an evaluation which would be wrong, sanity checks and invariance evaluations.

``from fastrobust.evaluate import evaluate, sanity_checks`` is the public face; the modules inside hold the
machinery: ``evaluation`` (the loop), ``attack_table`` (the attacks by name), ``state`` (the resumable state),
``prechecks`` (checks and warnings), ``record`` (the record), ``batching`` (the batch walker), ``sanity`` and
``invariance``.
"""

from fastrobust.evaluate.attack_table import ATTACKS, attack_settings, default_step, query_budget, settings_used
from fastrobust.evaluate.batching import iterate_split
from fastrobust.evaluate.evaluation import clean_and_robust_counts, evaluate, pgd_accuracy
from fastrobust.evaluate.sanity import sanity_checks
from fastrobust.evaluate.state import read_state_file

__all__ = [
    "ATTACKS",
    "attack_settings",
    "clean_and_robust_counts",
    "default_step",
    "evaluate",
    "iterate_split",
    "pgd_accuracy",
    "query_budget",
    "read_state_file",
    "sanity_checks",
    "settings_used",
]
