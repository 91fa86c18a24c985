"""AutoAttack (Croce & Hein, ICML 2020): a parameter-free ensemble reporting the per-example worst case.

``standard``: APGD-CE (100 iterations), APGD-T (9 targets, 100 iterations each), FAB-T (9 targets,
100 iterations each), Square (5,000 queries), each run only on the points every earlier attack left
correctly classified. ``fast``: APGD-CE and APGD-T. ``autoattack_official`` runs the authors' package
(``pip install git+https://github.com/fra31/auto-attack``) when it is importable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..errors import ConfigError, FastRobustError
from ..inputs import entry_point, predicts
from ..numbers import check_eps
from ._common import check_norm, model_mode
from .apgd import apgd_ce, apgd_t
from .fab import fab_t
from .square import square

VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "fast": ("apgd-ce", "apgd-t"),
}
DEFAULTS: dict[str, dict[str, Any]] = {
    "apgd-ce": {"n_iter": 100, "n_restarts": 1},
    "apgd-t": {"n_iter": 100, "n_targets": 9, "n_restarts": 1},
    "fab-t": {"n_iter": 100, "n_targets": 9, "n_restarts": 1},
    "square": {"n_queries": 5000, "p_init": 0.8},
}
_FUNCTIONS: dict[str, Callable[..., Tensor]] = {"apgd-ce": apgd_ce, "apgd-t": apgd_t, "fab-t": fab_t, "square": square}


@dataclass
class AutoAttackResult:
    x_adv: Tensor                 # per-example worst case (the first adversarial found, else x)
    robust: Tensor                # bool [B]: correctly classified at x_adv
    broken_by: list[str | None]   # per example: "clean" (misclassified already), an attack name, or None
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name in self.broken_by:
            if name is not None:
                out[name] = out.get(name, 0) + 1
        return out


@entry_point("autoattack")
def autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    version: str = "standard",
    attacks: tuple[str, ...] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    return_details: bool = False,
    eval_mode: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor | AutoAttackResult:
    """Run the ensemble; ``attacks`` overrides the version's list, ``options`` the settings of each
    component (e.g. ``{"square": {"n_queries": 1000}}``). Returns ``x_adv``, or an AutoAttackResult
    with ``return_details=True``."""
    norm = check_norm(norm)
    eps = check_eps(eps, norm=norm)
    if version not in VERSIONS:
        raise ConfigError(f"version={version!r} is not an AutoAttack version: choose one of {', '.join(VERSIONS)}")
    names = tuple(attacks) if attacks is not None else VERSIONS[version]
    options = options or {}
    for name in list(names) + list(options):
        if name not in _FUNCTIONS:
            raise ConfigError(f"{name!r} is not an AutoAttack component: choose from {', '.join(_FUNCTIONS)}")
    settings = {name: {**DEFAULTS[name], **options.get(name, {})} for name in names}
    x = x.detach()
    with model_mode(model, training=not eval_mode):
        with torch.no_grad():
            robust = predicts(model(x), y)
        broken_by: list[str | None] = [None if r else "clean" for r in robust.tolist()]
        x_adv = x.clone()
        for name in names:
            todo = robust.nonzero().squeeze(1)
            if len(todo) == 0:
                break
            adv = _FUNCTIONS[name](model, x[todo], y[todo], eps=eps, norm=norm, eval_mode=eval_mode,
                                   generator=generator, **settings[name])
            with torch.no_grad():
                fooled = ~predicts(model(adv), y[todo])
            hit = todo[fooled]
            x_adv[hit] = adv[fooled]
            robust[hit] = False
            for i in hit.tolist():
                broken_by[i] = name
    if return_details:
        return AutoAttackResult(x_adv=x_adv, robust=robust, broken_by=broken_by, settings=settings)
    return x_adv


def official_available() -> bool:
    try:
        import autoattack  # noqa: F401
    except ImportError:
        return False
    return True


OFFICIAL_MISSING = (
    "the official autoattack package is not importable: install it with "
    "`pip install git+https://github.com/fra31/auto-attack` or use attack 'autoattack'"
)


@entry_point("autoattack_official")
def autoattack_official(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    version: str = "standard",
    seed: int = 0,
    eval_mode: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The authors' AutoAttack (``autoattack.AutoAttack``) on this batch; FastRobustError when not installed."""
    norm = check_norm(norm)
    eps = check_eps(eps, norm=norm)
    try:
        from autoattack import AutoAttack
    except ImportError:
        raise FastRobustError(OFFICIAL_MISSING) from None
    with model_mode(model, training=not eval_mode):
        runner = AutoAttack(model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, version=version,
                            device=x.device, seed=seed, verbose=False)
        params = [p for p in model.parameters()]
        grads = [p.grad for p in params]
        x_adv = runner.run_standard_evaluation(x.detach(), y, bs=len(x))
        for p, g in zip(params, grads):  # the package may touch parameter gradients; restore them
            p.grad = g
    return x_adv.detach()
