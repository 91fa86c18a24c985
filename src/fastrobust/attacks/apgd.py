"""Auto-PGD (Croce & Hein, ICML 2020): APGD-CE, APGD-DLR and the targeted APGD-T.

The step size is not a parameter: it starts at ``2 * eps`` and is halved at checkpoints
``w_j = ceil(p_j * n_iter)`` with ``p_0 = 0``, ``p_1 = 0.22`` and
``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` whenever, since the previous checkpoint,

1. the loss increased in fewer than ``rho * (w_j - w_{j-1})`` steps (``rho = 0.75``), or
2. the step was not halved at the previous checkpoint and the best loss has not improved since;

and the iterate then restarts from the best point found so far. Each step is a projected
ascent step ``z`` followed by momentum: ``x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1}))``
with ``alpha = 0.75`` (the first step has no momentum). Everything is tracked per example.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..inputs import check_labels, entry_point
from ..numbers import check_eps
from ._common import ascent_direction, check_norm, input_gradient, model_mode, project, random_start

LOSSES = ("ce", "dlr", "ce-targeted", "dlr-targeted")


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Difference of Logits Ratio: ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)`` (needs >= 3 classes)."""
    logits = logits.float()
    z_sorted, order = logits.sort(dim=1)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    top_is_y = order[:, -1] == y
    z_other = torch.where(top_is_y, z_sorted[:, -2], z_sorted[:, -1])
    return -(z_y - z_other) / (z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def dlr_targeted_loss(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """Targeted DLR: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` (needs >= 4 classes)."""
    logits = logits.float()
    z_sorted, _ = logits.sort(dim=1)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12)


def checkpoints(n_iter: int) -> list[int]:
    """The iterations ``w_1 < w_2 < ...`` (<= n_iter) at which APGD may halve its step."""
    p = [0.0, 0.22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
        if nxt > 1:
            break
        p.append(nxt)
    points = sorted({math.ceil(q * n_iter - 1e-9) for q in p[1:]})
    return [w for w in points if 0 < w <= n_iter]


def _loss_fn(name: str, num_classes: int):
    if name not in LOSSES:
        raise ConfigError(f"loss={name!r} is not supported by APGD: choose one of {', '.join(LOSSES)}")
    need = {"dlr": 3, "dlr-targeted": 4}.get(name, 2)
    if num_classes < need:
        raise ConfigError(f"loss={name!r} needs at least {need} classes but the model has {num_classes}: use loss='ce'")
    if name == "ce":
        return lambda logits, y, t: F.cross_entropy(logits.float(), y, reduction="none")
    if name == "dlr":
        return lambda logits, y, t: dlr_loss(logits, y)
    if name == "ce-targeted":
        return lambda logits, y, t: -F.cross_entropy(logits.float(), t, reduction="none")
    return dlr_targeted_loss


@entry_point("apgd")
def apgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    n_iter: int = 100,
    loss: str = "ce",
    y_target: Tensor | None = None,
    n_restarts: int = 1,
    alpha: float = 0.75,
    rho: float = 0.75,
    random_init: bool = True,
    eval_mode: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Adversarial examples by APGD maximising ``loss`` (``ce``, ``dlr``, or targeted ``ce-targeted`` /
    ``dlr-targeted`` with ``y_target``). Per example, the first misclassifying iterate found is kept,
    otherwise the point of highest loss. Restarts run only on points not yet misclassified."""
    norm = check_norm(norm)
    eps = check_eps(eps, norm=norm)
    if n_iter < 1:
        raise ConfigError(f"n_iter={n_iter} must be at least 1")
    if n_restarts < 1:
        raise ConfigError(f"n_restarts={n_restarts} must be at least 1")
    targeted = loss.endswith("-targeted")
    if targeted and y_target is None:
        raise ConfigError(f"loss={loss!r} needs y_target (the target class of each example); or use apgd_t")
    x = x.detach()
    y = y.detach()
    if y_target is not None:
        y_target = check_labels(y_target, len(x), where="apgd", name="y_target")
    with model_mode(model, training=not eval_mode):
        with torch.no_grad():
            logits = model(x)
        fn = _loss_fn(loss, logits.shape[1])
        result = x.clone()
        best_loss = torch.full((len(x),), float("-inf"), device=x.device)
        fooled = logits.argmax(1) != y
        for _ in range(n_restarts):
            todo = (~fooled).nonzero().squeeze(1)
            if len(todo) == 0:
                break
            t = y_target[todo] if targeted else None
            adv, adv_loss, adv_fooled = _apgd_run(
                model, x[todo], y[todo], t, fn, eps, norm, n_iter, alpha, rho, random_init, generator
            )
            better = adv_fooled | (adv_loss > best_loss[todo])
            idx = todo[better]
            result[idx] = adv[better]
            best_loss[idx] = adv_loss[better]
            fooled[todo] = adv_fooled
    return result


def _apgd_run(model, x, y, target, fn, eps, norm, n_iter, alpha, rho, random_init, generator):
    shape = (-1,) + (1,) * (x.dim() - 1)

    def objective(logits: Tensor, labels: Tensor) -> Tensor:
        return fn(logits, labels, target)

    x_adv = random_start(x, eps, norm, generator) if random_init else x.clone()
    grad, loss, logits = input_gradient(model, x_adv, y, objective)
    fooled = logits.argmax(1) != y
    x_best_adv = x_adv.clone()
    x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), loss.clone()
    step = torch.full((len(x),), 2.0 * eps, device=x.device)
    x_prev = x_adv.clone()
    loss_prev = loss.clone()
    marks = checkpoints(n_iter)
    last_mark = 0
    successes = torch.zeros(len(x), device=x.device)
    step_at_mark = step.clone()
    loss_best_at_mark = loss_best.clone()
    for k in range(n_iter):
        z = project(x_adv + step.view(shape) * ascent_direction(grad, norm), x, eps, norm)
        if k == 0:
            x_new = z
        else:
            x_new = project(x_adv + alpha * (z - x_adv) + (1 - alpha) * (x_adv - x_prev), x, eps, norm)
        x_prev, x_adv = x_adv, x_new
        grad, loss, logits = input_gradient(model, x_adv, y, objective)
        now_fooled = logits.argmax(1) != y
        x_best_adv[now_fooled] = x_adv[now_fooled]
        fooled |= now_fooled
        successes += (loss > loss_prev).float()
        loss_prev = loss
        improved = loss > loss_best
        x_best[improved] = x_adv[improved]
        grad_best[improved] = grad[improved]
        loss_best = torch.where(improved, loss, loss_best)
        if k + 1 in marks and k + 1 < n_iter:
            window = k + 1 - last_mark
            oscillating = successes < rho * window
            stalled = (step_at_mark == step) & (loss_best_at_mark == loss_best)
            reduce = oscillating | stalled
            step = torch.where(reduce, step / 2, step)
            x_adv[reduce] = x_best[reduce]
            x_prev[reduce] = x_best[reduce]
            grad[reduce] = grad_best[reduce]
            loss_prev = torch.where(reduce, loss_best, loss_prev)
            successes.zero_()
            last_mark = k + 1
            step_at_mark = step.clone()
            loss_best_at_mark = loss_best.clone()
    out = torch.where(fooled.view(shape), x_best_adv, x_best)
    return out, loss_best, fooled


@entry_point("apgd_ce")
def apgd_ce(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "linf", n_iter: int = 100, **kwargs) -> Tensor:
    """APGD with the cross-entropy loss (AutoAttack's first attack)."""
    return apgd(model, x, y, eps=eps, norm=norm, n_iter=n_iter, loss="ce", **kwargs)


def targets_used(n_targets: int, num_classes: int) -> int:
    """How many target classes a targeted attack runs with ``num_classes`` outputs: at most C - 1."""
    return max(min(n_targets, num_classes - 1), 0)


def targeted_loss_used(loss: str, num_classes: int) -> str:
    """APGD-T's loss with ``num_classes`` outputs: the targeted DLR needs 4 classes, below that CE is used."""
    return "ce-targeted" if loss == "dlr-targeted" and num_classes < 4 else loss


def ranked_targets(logits: Tensor, n_targets: int) -> list[Tensor]:
    """Target classes per run: the classes ranked 2nd, 3rd, ... by the clean logits (at most C - 1)."""
    order = logits.argsort(dim=1, descending=True)
    n = targets_used(n_targets, logits.shape[1])
    return [order[:, k] for k in range(1, n + 1)]


@entry_point("apgd_t")
def apgd_t(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    n_iter: int = 100,
    n_targets: int = 9,
    loss: str = "dlr-targeted",
    n_restarts: int = 1,
    eval_mode: bool = True,
    generator: torch.Generator | None = None,
    **kwargs,
) -> Tensor:
    """APGD-T: one targeted APGD run per target class (the top-``n_targets`` non-top classes of the clean
    logits, in rank order), each run only on the points not yet misclassified."""
    if loss not in ("dlr-targeted", "ce-targeted"):
        raise ConfigError(f"loss={loss!r} is not a targeted loss: use 'dlr-targeted' or 'ce-targeted'")
    if n_targets < 1:
        raise ConfigError(f"n_targets={n_targets} must be at least 1")
    x = x.detach()
    with model_mode(model, training=not eval_mode):
        with torch.no_grad():
            logits = model(x)
        loss = targeted_loss_used(loss, logits.shape[1])  # CE where the targeted DLR has too few classes
        result = x.clone()
        fooled = logits.argmax(1) != y
        for target in ranked_targets(logits, n_targets):
            todo = (~fooled).nonzero().squeeze(1)
            if len(todo) == 0:
                break
            adv = apgd(
                model, x[todo], y[todo], eps=eps, norm=norm, n_iter=n_iter, loss=loss, y_target=target[todo],
                n_restarts=n_restarts, eval_mode=eval_mode, generator=generator, **kwargs,
            )
            with torch.no_grad():
                adv_fooled = model(adv).argmax(1) != y[todo]
            result[todo] = adv
            fooled[todo] = adv_fooled
    return result
