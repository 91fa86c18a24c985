"""Adversarial attacks: functions ``(model, x, y, *, eps, ...) -> x_adv`` in [0,1] pixel space."""

from fastrobust.attacks.apgd import apgd, apgd_ce, apgd_dlr, apgd_t, dlr_loss, dlr_targeted_loss
from fastrobust.attacks.autoattack import AutoAttackResult, autoattack, autoattack_official
from fastrobust.attacks.fab import fab_t, fab_untargeted
from fastrobust.attacks.pgd import fgsm, pgd
from fastrobust.attacks.rays import RaySResult, rays
from fastrobust.attacks.square import square
from fastrobust.attacks.toolkit import cw_margin, kl_to, model_mode, project

__all__ = [
    "AutoAttackResult",
    "RaySResult",
    "apgd",
    "apgd_ce",
    "apgd_dlr",
    "apgd_t",
    "autoattack",
    "autoattack_official",
    "cw_margin",
    "dlr_loss",
    "dlr_targeted_loss",
    "fab_t",
    "fab_untargeted",
    "fgsm",
    "kl_to",
    "model_mode",
    "pgd",
    "project",
    "rays",
    "square",
]
