"""Adversarial attacks: functions ``(model, x, y, *, eps, ...) -> x_adv`` in [0,1] pixel space."""

from ._common import cw_margin, kl_to, model_mode, project
from .pgd import fgsm, pgd

__all__ = ["cw_margin", "fgsm", "kl_to", "model_mode", "pgd", "project"]
