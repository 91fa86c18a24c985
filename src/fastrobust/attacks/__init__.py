"""Adversarial attacks: functions ``(model, x, y, *, eps, ...) -> x_adv`` in [0,1] pixel space."""

from ._common import cw_margin, kl_to, model_mode, project
from .apgd import apgd, apgd_ce, apgd_t, dlr_loss, dlr_targeted_loss
from .autoattack import AutoAttackResult, autoattack, autoattack_official
from .fab import fab_t
from .pgd import fgsm, pgd
from .rays import RaySResult, rays
from .square import square

__all__ = [
    "AutoAttackResult",
    "RaySResult",
    "apgd",
    "apgd_ce",
    "apgd_t",
    "autoattack",
    "autoattack_official",
    "cw_margin",
    "dlr_loss",
    "dlr_targeted_loss",
    "fab_t",
    "fgsm",
    "kl_to",
    "model_mode",
    "pgd",
    "project",
    "rays",
    "square",
]
