"""Step sizes that follow eps: a run given another eps and no step size trains with the steps each method's
source prescribes for that eps, not with the 8/255-era defaults.

Every published rule below is a fixed ratio of eps, so a step size is scaled as
``step = eps * default_step / default_eps`` (the defaults are the method's ``Config``; a test pins each
ratio against them). Step sizes given explicitly (``method_params``, ``--set method.step_size=...``) are kept.
A method with a step size that no rule covers keeps it and says so (one line).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fastrobust.core.values import parse_number, pixel_text
from fastrobust.methods.base import method_class

# method -> step-size field -> (ratio to eps, the source of the rule)
RULES: dict[str, dict[str, tuple[float, str]]] = {
    "pgd_at": {"step_size": (0.25, "eps/4: Madry et al. 2018, 2.5*eps/K with K = 10 (2/255 at 8/255)")},
    "fast_at_2step": {"step_size": (0.5, "eps/2: PGD-2, 4/255 at 8/255 (Backward Smoothing paper's baseline)")},
    "trades": {"step_size": (0.25, "eps/4: Zhang et al. 2019, 2/255 at 8/255 (authors' code 0.007 at 0.031)")},
    "fast_at": {"step_size": (1.25, "1.25*eps: Wong et al. 2020, FGSM-RS alpha = 1.25 eps")},
    "fast_at_plus": {"step_size": (1.25, "1.25*eps: its FGSM-RS step, Wong et al. 2020"),
                     "fallback_step_size": (0.25, "eps/4: its PGD-10 fallback, Madry et al. 2018")},
    "fast_trades": {"step_size": (0.75, "0.75*eps: Backward Smoothing paper, 6/255 best at 8/255")},
    "backward_smoothing": {"step_size": (1.0, "eps: the authors' trades_backward.py takes the full step a = eps")},
    "backward_smoothing_at": {"step_size": (1.0, "eps: as backward_smoothing (authors' code)")},
}


def step_fields(method: str) -> list[dataclasses.Field]:
    """The step-size fields (``*step_size``, pixel units) of ``method``'s Config."""
    return [f for f in dataclasses.fields(method_class(method).Config) if f.name.endswith("step_size")]


def scale_steps(method: str, params: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """``params`` (the method's parameters, eps included when the run sets one) with every step size not
    given scaled to that eps by ``RULES``, and one line saying which step sizes are used (None when eps is
    the method's default or the method has no step size: nothing changes)."""
    config_fields = {f.name: f for f in dataclasses.fields(method_class(method).Config)}
    steps = step_fields(method)
    if "eps" not in params or "eps" not in config_fields or not steps:
        return params, None
    eps, default_eps = parse_number(params["eps"], name="eps"), float(config_fields["eps"].default)
    if abs(eps - default_eps) < 1e-12:
        return params, None
    scaled, parts, unscaled = dict(params), [], []
    for f in steps:
        rule = RULES.get(method, {}).get(f.name)
        if f.name in params:
            parts.append(f"{f.name} {pixel_text(parse_number(params[f.name], name=f.name))} (as given)")
        elif rule is not None:
            scaled[f.name] = eps * rule[0]
            parts.append(f"{f.name} {pixel_text(scaled[f.name])} ({rule[1]})")
        else:
            unscaled.append(f.name)
            parts.append(f"{f.name} {pixel_text(float(f.default))} (default, NOT scaled: no published rule)")
    line = f"{method} at eps {pixel_text(eps)}: {'; '.join(parts)}"
    if unscaled:
        line += f"; set {', '.join('method.' + name for name in unscaled)}=... to change"
    return scaled, line
