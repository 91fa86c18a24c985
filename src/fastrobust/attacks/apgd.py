"""Auto-PGD (Croce & Hein, ICML 2020): APGD-CE, APGD-DLR and the targeted APGD-T.

Randomized models (``eot_iter > 1``, AutoAttack's ``rand`` version): each step's gradient is the mean of
``eot_iter`` gradients at the same iterate (expectation over transformations), and the loss and prediction the
step acts on are those of the last of these passes, as in the authors' code.

The step size is not a parameter: it starts at ``2 * eps`` and is halved at checkpoints (after 22, 41, 57,
70, 80, 87, 93 and 99 of 100 iterations; see ``checkpoints``) whenever, since the previous checkpoint,

1. the loss increased in at most ``rho * (w_j - w_{j-1})`` steps (``rho = 0.75``), or
2. the step was not halved at the previous checkpoint and the best loss has not improved since;

and the iterate then restarts from the best point found so far (keeping its momentum). Each step is a
projected ascent step ``z`` followed by momentum: ``x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1}))``
with ``alpha = 0.75`` (the first step has no momentum). Everything is tracked per example, as in the
authors' code (``autopgd_base.py``), including its details: condition 2 is off at the first checkpoint,
and the first window counts the first loss as an increase when it is positive (the reference compares it
with an unfilled zero).

Speed (the result per example is unchanged): every example's trajectory depends on that example alone, so
an example leaves the working batch as soon as it is misclassified (the reference keeps iterating it), and
APGD-T attacks several target classes of the still-robust points in one batch (``max_rows``) instead of one
pass per target; a point leaves as soon as any of its targets fools it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastrobust.attacks._engine import (
    Execution,
    Rows,
    any_per_point,
    autocast_forward,
    confirm,
    confirm_any,
    execution_for,
    target_rows,
    target_waves,
    write_per_point,
)
from fastrobust.attacks.toolkit import (
    ascent_direction,
    draw,
    input_gradient,
    model_mode,
    project,
    random_start,
)
from fastrobust.core.contract import check_labels, entry_point
from fastrobust.core.values import NORMS
from fastrobust.errors import ConfigError

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
    """The iterations ``w_1 < w_2 < ...`` (<= n_iter) after which APGD may halve its step.

    The authors' integer rule (``autopgd_base.py``): the first window is ``int(0.22 n)`` iterations long,
    each next one ``int(0.03 n)`` shorter, never shorter than ``int(0.06 n)`` (each at least 1). For
    ``n_iter = 100`` these are the paper's ``ceil(p_j n)``: 22, 41, 57, 70, 80, 87, 93, 99.
    """
    first, shrink, shortest = max(int(0.22 * n_iter), 1), max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)
    marks, at, window = [], 0, first
    while at + window <= n_iter:
        at += window
        marks.append(at)
        window = max(window - shrink, shortest)
    return marks


LossFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def _loss_fn(name: str, num_classes: int) -> LossFn:
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


@entry_point("apgd", norms=NORMS)
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
    eot_iter: int = 1,
    large_eps: bool = False,
    eval_mode: bool = True,
    generator: torch.Generator | None = None,
    precision: str = "fp32",
) -> Tensor:
    """Adversarial examples by Auto-PGD (Croce & Hein 2020) maximising ``loss``, l_inf, l_2 or l_1.

    APGD maximises ``loss`` (``ce``, ``dlr``, or targeted ``ce-targeted`` / ``dlr-targeted`` with ``y_target``)
    with a step size that starts at ``2 * eps`` and is halved at checkpoints (see the module docstring), and
    momentum ``alpha``. Per example, the first misclassifying iterate found is kept (targeted
    losses: the first one classified as the target, else the last misclassifying one), otherwise the point of
    highest loss. A point is done once misclassified; with a targeted loss only once classified as its target, so
    a point whose label is already wrong but which is not yet classified as its target is attacked (and restarted)
    like any other. Restarts run only on the points not yet done. ``eot_iter`` (default 1): gradients averaged
    per step, for a model whose outputs are random (AutoAttack's ``rand`` version uses 20). ``norm="l1"``: the
    authors' sparse l_1 APGD (``_apgd_l1_rows``); ``large_eps`` (l_1 only, AutoAttack's l_1 versions) starts it at
    3 and 2 times ``eps`` before ``eps``. A targeted loss with ``y_target`` is l_inf / l_2 only (``apgd_t`` runs l_1).
    ``precision``: ``fp32`` (default), ``bf16`` (autocast forwards; every misclassification is confirmed
    in fp32 before an example stops) or ``auto`` (bf16 on CUDA, fp32 elsewhere).

    Args:
        model: the classifier, images in [0, 1] -> logits ``[B, C]``.
        x: images ``[B, ...]`` (e.g. ``[B, C, H, W]``), float in [0, 1] (pixel units).
        y: true labels ``[B]``, any integer dtype, in [0, C).
        eps: the budget in [0, 1] pixel units: l_inf in (0, 1], l_2 / l_1 a positive radius; text such as
            ``"8/255"`` is parsed. Required.
        norm: the threat model, ``"linf"`` (default), ``"l2"`` or ``"l1"``.
        n_iter: iterations per restart (default 100, the authors').
        loss: ``"ce"`` (default), ``"dlr"`` (needs >= 3 classes), ``"ce-targeted"`` or ``"dlr-targeted"`` (needs
            >= 4 classes; both need ``y_target``).
        y_target: target labels ``[B]`` for a targeted loss (default None).
        n_restarts: runs, each only on the points not yet done (default 1).
        alpha: the momentum weight in (0, 1] (default 0.75, Croce & Hein 2020).
        rho: the checkpoint condition's share of increasing steps in (0, 1] (default 0.75, Croce & Hein 2020).
        random_init: start at a random point of the ball (default True), else at ``x``.
        eot_iter: gradients averaged per step (default 1: no EOT; AutoAttack's ``rand`` version uses 20).
        large_eps: l_1 only: start at 3 and 2 times ``eps`` before ``eps`` (default False).
        eval_mode: run the model in eval mode (default True); its previous mode is restored.
        generator: the ``torch.Generator`` of the random starts (default None: the global RNG).
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"auto"``, as above.
    Returns:
        The adversarial examples, a tensor shaped like ``x`` (per example the rule above; points already done at
        ``x`` are returned unchanged).
    Raises:
        ConfigError: from the ``entry_point`` input contract (``core/contract.py``): images not float in [0, 1],
            labels not in [0, C), a bad ``norm``, ``eps`` or setting (checked once by
            ``core/attack_options.check_options``), or a call inside ``torch.inference_mode()``;
            also an unknown ``loss`` or one with too few classes, a targeted loss without ``y_target`` or with
            ``norm="l1"``, or ``large_eps`` without ``norm="l1"``; each message names the value and the fix.
    Example:
        >>> x_adv = apgd(model, x, y, eps=8 / 255, loss="dlr", n_iter=100)
    """
    if n_iter < 1:
        raise ConfigError(f"n_iter={n_iter} must be at least 1")
    if n_restarts < 1:
        raise ConfigError(f"n_restarts={n_restarts} must be at least 1")
    if eot_iter < 1:
        raise ConfigError(f"eot_iter={eot_iter} must be at least 1 (1: one gradient per step, no EOT)")
    targeted = loss.endswith("-targeted")
    _check_large_eps(large_eps, norm)
    if targeted and norm == "l1":
        raise ConfigError(f"loss={loss!r} with y_target is l_inf / l_2 only: for norm='l1' use apgd_t (AutoAttack's "
                          "APGD-T) or an untargeted loss")
    if targeted and y_target is None:
        raise ConfigError(f"loss={loss!r} needs y_target (the target class of each example); or use apgd_t")
    x = x.detach()
    y = y.detach()
    if y_target is not None:
        y_target = check_labels(y_target, len(x), where="apgd", name="y_target")
    ex = execution_for(model, precision, x.device)
    with model_mode(model, training=not eval_mode):
        with torch.no_grad():
            logits = model(x)
        fn = _loss_fn(loss, logits.shape[1])
        result = x.clone()
        best_loss = torch.full((len(x),), float("-inf"), device=x.device)
        fooled = logits.argmax(1) != y
        done = logits.argmax(1) == y_target if targeted else fooled.clone()
        for _ in range(n_restarts):
            todo = (~done).nonzero().squeeze(1)
            if len(todo) == 0:
                break
            t = y_target[todo] if targeted else None
            adv, adv_loss, adv_fooled = _apgd_rows(
                x[todo], y[todo], t, fn, eps=eps, norm=norm, n_iter=n_iter, alpha=alpha, rho=rho,
                random_init=random_init, generator=generator, execution=ex, until_target=targeted,
                eot_iter=eot_iter, large_eps=large_eps,
            )
            adv_done = _on_target(model, adv, t) if targeted else adv_fooled
            before = fooled[todo]
            # the target reached first, then a misclassifying point over none, then the higher loss
            better = adv_done | (adv_fooled & ~before) | ((adv_fooled == before) & (adv_loss > best_loss[todo]))
            idx = todo[better]
            result[idx] = adv[better]
            best_loss[idx] = adv_loss[better]
            fooled[todo] = before | adv_fooled
            done[todo] = adv_done
    return result


def _check_large_eps(large_eps: bool, norm: str) -> None:
    if large_eps and norm != "l1":
        raise ConfigError(f"large_eps=True is the l1 APGD's start (norm='l1'), not norm={norm!r}: drop large_eps")


def _on_target(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Which points the model (in fp32, the reference of every attack's success) classifies as their target."""
    with torch.no_grad():
        return model(x).argmax(1) == target


def _gradient_fn(execution: Execution, fn: LossFn, eot_iter: int) -> Callable[[Tensor, Tensor, Tensor],
                                                                               tuple[Tensor, Tensor, Tensor]]:
    """``gradient(x, y, target) -> (input gradient, per-row loss, logits)`` evaluating the model as ``execution``
    says; with ``eot_iter > 1`` the gradient is the mean of that many passes, the loss and logits the last one's."""
    forward = autocast_forward(execution, execution.for_gradients)  # the backward runs outside autocast

    def gradient(x_adv: Tensor, labels: Tensor, goals: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        def one() -> tuple[Tensor, Tensor, Tensor]:
            return input_gradient(forward, x_adv, labels, lambda logits, lab: fn(logits, lab, goals))
        if eot_iter == 1:
            return one()
        total = torch.zeros_like(x_adv)
        for _ in range(eot_iter):  # the reference sums, then divides once: the same rounding
            grad, loss, logits = one()
            total += grad
        return total / float(eot_iter), loss, logits

    return gradient


L1_SCHEDULE = ((3.0, 0.3), (2.0, 0.3), (1.0, 0.4))  # large-eps start: (eps factor, share of the iterations)


def _l0(delta: Tensor) -> Tensor:
    return (delta != 0).flatten(1).sum(1)


def _apgd_l1_rows(x: Tensor, y: Tensor, target: Tensor | None, fn: LossFn, *, eps: float, n_iter: int,
                  random_init: bool, generator: torch.Generator | None, execution: Execution, eot_iter: int,
                  large_eps: bool) -> tuple[Tensor, Tensor, Tensor]:
    """APGD in l_1 (the authors' ``autopgd_base.py`` with norm 'L1'; every row runs all its iterations).

    The step moves the ``topk`` share of coordinates with the largest gradient (20% at first) by ``step / k``
    along their gradient signs and projects onto the l_1 ball within [0, 1]; there is no momentum. Every
    ``max(int(0.04 n), 1)`` iterations the sparsity of the best point sets the next ``topk`` (its share of nonzero
    coordinates / 1.5), and the step is reset to ``eps`` (the iterate to the best point) where that sparsity fell by
    more than 5%, else divided by 1.5 (within [eps/10, eps]). With ``large_eps`` (AutoAttack's l_1 versions) the
    run is three stages at 3, 2 and 1 times ``eps`` (30%, 30%, 40% of the iterations, rounded up but the last),
    each started at the previous one's best point projected onto its ball, the first at a normal draw projected
    onto the 3 eps ball; only the last stage, at ``eps``, decides. Returns what ``_apgd_rows`` returns.

    The projection is exact (``project_l1_box``). The authors' leaves float residues of about 1e-8 in coordinates it
    zeroes, which their L0 sparsity counts, so from a random start the ``topk`` schedules can part (on 768 runs of a
    small model: 5 points decided differently from the large-eps start, none from ``x``)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    target = target if target is not None else y
    gradient = _gradient_fn(execution, fn, eot_iter)
    if large_eps:
        iters = [math.ceil(share * n_iter) for _, share in L1_SCHEDULE]
        iters[-1] = n_iter - sum(iters[:-1])
        start = x + draw(torch.randn, x.shape, generator=generator, device=x.device, dtype=x.dtype)
        start = project(start, x, L1_SCHEDULE[0][0] * eps, "l1")
        for (factor, _), stage_iter in zip(L1_SCHEDULE, iters):
            start = project(start, x, factor * eps, "l1")
            start, loss, fooled, x_fool = _apgd_l1_stage(x, y, target, gradient, eps=factor * eps, n_iter=stage_iter,
                                                         start=start, sparse_start=True)
    else:
        start = random_start(x, eps, "l1", generator) if random_init else x.clone()
        start, loss, fooled, x_fool = _apgd_l1_stage(x, y, target, gradient, eps=eps, n_iter=n_iter, start=start,
                                                     sparse_start=not random_init)
    fooled = confirm(execution, x_fool, y, fooled)
    return torch.where(fooled.view(shape), x_fool, start), loss, fooled


def _apgd_l1_stage(x: Tensor, y: Tensor, target: Tensor, gradient, *, eps: float, n_iter: int, start: Tensor,
                   sparse_start: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One l_1 APGD run from ``start``: (best point, best loss, misclassified, last misclassifying iterate).
    ``sparse_start``: the first ``topk`` from the start's own sparsity (a given start), else 20%."""
    n = len(x)
    shape = (-1,) + (1,) * (x.dim() - 1)
    n_fts = x[0].numel()
    rows = torch.arange(n, device=x.device)
    x_adv = start.clamp(0.0, 1.0)
    grad, loss, logits = gradient(x_adv, y, target)
    x_best, grad_best, loss_best, x_fool = x_adv, grad, loss, x_adv
    fooled = logits.argmax(1) != y
    step = torch.full((n,), float(eps), device=x.device)
    every = max(int(0.04 * n_iter), 1)
    if sparse_start:
        sp_old = _l0(x_adv - x).to(x.dtype)
        topk = sp_old / n_fts / 1.5
    else:
        topk = torch.full((n,), 0.2, device=x.device)
        sp_old = torch.full((n,), float(n_fts), device=x.device)
    for k in range(n_iter):
        magnitude = grad.abs().flatten(1)
        rank = torch.clamp((1.0 - topk) * n_fts, min=0, max=n_fts - 1).long()
        threshold = magnitude.sort(dim=1)[0][rows, rank].view(shape)
        direction = (grad * (grad.abs() >= threshold).to(grad.dtype)).sign()
        moved = x_adv + step.view(shape) * direction / (direction.abs().flatten(1).sum(1).view(shape) + 1e-10)
        x_adv = project(moved, x, eps, "l1")
        grad, loss, logits = gradient(x_adv, y, target)
        now = logits.argmax(1) != y
        x_fool = torch.where(now.view(shape), x_adv, x_fool)  # the last misclassifying iterate, as the reference
        fooled = fooled | now
        improved = loss > loss_best
        x_best = torch.where(improved.view(shape), x_adv, x_best)
        grad_best = torch.where(improved.view(shape), grad, grad_best)
        loss_best = torch.where(improved, loss, loss_best)
        if (k + 1) % every == 0:
            sp_curr = _l0(x_best - x).to(x.dtype)
            denser = sp_curr / sp_old < 0.95  # sparsity fell by more than 5%: start over from the best point
            topk = sp_curr / n_fts / 1.5
            step = torch.where(denser, torch.full_like(step, eps), step / 1.5).clamp(eps / 10, eps)
            sp_old = sp_curr
            x_adv = torch.where(denser.view(shape), x_best, x_adv)
            grad = torch.where(denser.view(shape), grad_best, grad)
    return x_best, loss_best, fooled, x_fool


def _apgd_rows(x: Tensor, y: Tensor, target: Tensor | None, fn: LossFn, *, eps: float, norm: str,
               n_iter: int, alpha: float, rho: float, random_init: bool, generator: torch.Generator | None,
               execution: Execution, group: Tensor | None = None, n_groups: int = 0,
               until_target: bool = False, eot_iter: int = 1,
               large_eps: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """APGD on every row (an example, with its own target class for targeted losses), evaluating the model as
    ``execution`` says.

    Returns per row: the last misclassifying iterate (else the highest-loss point), the best loss and the
    misclassified flag. A row leaves the working batch once misclassified (with ``until_target``: once
    classified as its target); with ``group`` (the point each row attacks) every row of a point leaves once
    one of them is done (those rows then report their state at that moment). ``eot_iter``: gradients averaged per
    step (the loss and logits are the last pass's); above 1 (a randomised model) no row leaves early and each keeps
    its last misclassifying iterate, as the authors' code.
    """
    if norm == "l1":
        return _apgd_l1_rows(x, y, target, fn, eps=eps, n_iter=n_iter, random_init=random_init, generator=generator,
                             execution=execution, eot_iter=eot_iter, large_eps=large_eps)
    n = len(x)
    shape = (-1,) + (1,) * (x.dim() - 1)
    start = random_start(x, eps, norm, generator) if random_init else x.clone()
    target = target if target is not None else y
    gradient = _gradient_fn(execution, fn, eot_iter)

    grad, loss, logits = gradient(start, y, target)
    rows = Rows(n, x.device, group=group, n_groups=n_groups, check_every=execution.check_every)
    out = start.clone()
    out_loss = loss.clone()
    out_fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
    fooled = logits.argmax(1) != y
    reached = logits.argmax(1) == target if until_target else fooled
    s = {"x0": x, "y": y, "t": target, "x_adv": start, "x_prev": start, "grad": grad,
         # the reference's first comparison is with an unfilled (zero) loss record
         "loss_prev": torch.zeros_like(loss), "x_best": start, "grad_best": grad, "loss_best": loss,
         "step": torch.full((n,), 2.0 * eps, device=x.device), "successes": torch.zeros(n, device=x.device),
         "reduced_last": torch.ones(n, dtype=torch.bool, device=x.device), "loss_best_last": loss,
         "fooled": fooled, "reached": reached, "x_fool": start}

    def settle(s: dict[str, Tensor]) -> dict[str, Tensor]:
        """Confirm the fooled rows (fp32), write out the finished ones and drop them from the batch."""
        reached, any_reached = confirm_any(execution, s["x_fool"], s["y"], s["reached"],
                                           s["t"] if until_target else None)
        s["reached"] = s["fooled"] & reached
        if not any_reached:  # known from the confirmation's look-up: no row can finish
            return s
        done, kept = rows.split(rows.finished(s["reached"]))
        if len(done) == 0:
            return s
        pos = rows.positions[done]
        x_fool = s["x_fool"].index_select(0, done)
        # rows retired with a confirmed row of their point: their own flag counts only if fp32 agrees too
        fooled_done = confirm(execution, x_fool, s["y"][done], s["fooled"][done])
        out[pos] = torch.where(fooled_done.view(shape), x_fool, s["x_best"].index_select(0, done))
        out_loss[pos] = s["loss_best"][done]
        out_fooled[pos] = fooled_done
        return rows.keep(kept, s)

    if norm == "linf":  # the l_inf ball within [0, 1] is a box: one clamp, the same numbers as project()
        s["lo"], s["hi"] = (x - eps).clamp(min=0), (x + eps).clamp(max=1)

    def into_ball(z: Tensor, s: dict[str, Tensor]) -> Tensor:
        return torch.clamp(z, s["lo"], s["hi"]) if norm == "linf" else project(z, s["x0"], eps, norm)

    # a randomised model (EOT): every row runs every iteration and keeps its last misclassifying iterate, the
    # authors' rule (on a deterministic model any misclassifying iterate decides the same, so rows leave early)
    to_the_end = eot_iter > 1
    if not to_the_end:
        s = settle(s)
    marks = set(checkpoints(n_iter))
    last_mark = 0
    for k in range(n_iter):
        if rows.empty:
            break
        x_adv = s["x_adv"]
        z = into_ball(x_adv + s["step"].view(shape) * ascent_direction(s["grad"], norm), s)
        if k == 0:
            x_new = z
        else:
            x_new = into_ball(x_adv + alpha * (z - x_adv) + (1 - alpha) * (x_adv - s["x_prev"]), s)
        s["x_prev"], s["x_adv"] = x_adv, x_new
        grad, loss, logits = gradient(x_new, s["y"], s["t"])
        s["grad"] = grad
        pred = logits.argmax(1)
        now = pred != s["y"]
        if not to_the_end:
            now = now & ~s["reached"]  # frozen once done (until the batch is next checked)
        s["x_fool"] = torch.where(now.view(shape), x_new, s["x_fool"])
        s["fooled"] = s["fooled"] | now
        s["reached"] = s["reached"] | ((pred == s["t"]) if until_target else now)
        s["successes"] = s["successes"] + (loss > s["loss_prev"]).float()
        s["loss_prev"] = loss
        improved = loss > s["loss_best"]
        s["x_best"] = torch.where(improved.view(shape), x_new, s["x_best"])
        s["grad_best"] = torch.where(improved.view(shape), grad, s["grad_best"])
        s["loss_best"] = torch.where(improved, loss, s["loss_best"])
        if k + 1 in marks and k + 1 < n_iter:
            window = k + 1 - last_mark
            oscillating = s["successes"] <= rho * window
            stalled = ~s["reduced_last"] & (s["loss_best_last"] >= s["loss_best"])
            reduce = oscillating | stalled
            s["step"] = torch.where(reduce, s["step"] / 2, s["step"])
            s["x_adv"] = torch.where(reduce.view(shape), s["x_best"], s["x_adv"])
            s["grad"] = torch.where(reduce.view(shape), s["grad_best"], s["grad"])
            s["successes"] = torch.zeros_like(s["successes"])
            s["reduced_last"] = reduce
            s["loss_best_last"] = s["loss_best"]
            last_mark = k + 1
        if not to_the_end and (rows.check_now(k) or k + 1 == n_iter):
            s = settle(s)
    if not rows.empty:  # never done; with until_target some may still be misclassified
        pos = rows.positions
        fooled = confirm(execution, s["x_fool"], s["y"], s["fooled"])
        out[pos] = torch.where(fooled.view(shape), s["x_fool"], s["x_best"])
        out_loss[pos] = s["loss_best"]
        out_fooled[pos] = fooled
    return out, out_loss, out_fooled


@entry_point("apgd_ce", norms=NORMS)
def apgd_ce(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "linf", n_iter: int = 100, **kwargs) -> Tensor:
    """APGD with the cross-entropy loss (AutoAttack's first attack; Croce & Hein 2020).

    Args:
        model, x, y: as ``apgd``.
        eps: the budget in [0, 1] pixel units (l_inf in (0, 1], l_2 / l_1 a positive radius); text such as
            ``"8/255"`` is parsed. Required.
        norm: ``"linf"`` (default), ``"l2"`` or ``"l1"``.
        n_iter: iterations per restart (default 100).
        **kwargs: ``apgd``'s other settings (``n_restarts``, ``eot_iter``, ``precision``, ...); not ``loss``.
    Returns:
        The adversarial examples (``apgd``'s rule per example), shaped like ``x``.
    Raises:
        ConfigError: from the ``entry_point`` input contract (``core/contract.py``): images not float in [0, 1],
            labels not in [0, C), a bad ``norm``, ``eps`` or setting (checked once by
            ``core/attack_options.check_options``), or a call inside ``torch.inference_mode()``;
            each message names the value and the fix.
    Example:
        >>> x_adv = apgd_ce(model, x, y, eps=8 / 255)
    """
    return apgd(model, x, y, eps=eps, norm=norm, n_iter=n_iter, loss="ce", **kwargs)


@entry_point("apgd_dlr", norms=NORMS)
def apgd_dlr(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "linf", n_iter: int = 100,
             **kwargs) -> Tensor:
    """APGD with the untargeted DLR loss (AutoAttack's ``plus`` and ``rand`` versions; needs >= 3 classes).

    The Difference of Logits Ratio loss of Croce & Hein 2020 (``dlr_loss``), invariant to shifts and scaling of
    the logits.

    Args:
        model, x, y: as ``apgd``.
        eps: the budget in [0, 1] pixel units (l_inf in (0, 1], l_2 / l_1 a positive radius); text such as
            ``"8/255"`` is parsed. Required.
        norm: ``"linf"`` (default), ``"l2"`` or ``"l1"``.
        n_iter: iterations per restart (default 100).
        **kwargs: ``apgd``'s other settings (``n_restarts``, ``eot_iter``, ...); not ``loss``.
    Returns:
        The adversarial examples (``apgd``'s rule per example), shaped like ``x``.
    Raises:
        ConfigError: from the ``entry_point`` input contract (``core/contract.py``): images not float in [0, 1],
            labels not in [0, C), a bad ``norm``, ``eps`` or setting (checked once by
            ``core/attack_options.check_options``), or a call inside ``torch.inference_mode()``;
            also a model of fewer than 3 classes; each message names the value and the fix.
    Example:
        >>> x_adv = apgd_dlr(model, x, y, eps=8 / 255, n_restarts=5)
    """
    return apgd(model, x, y, eps=eps, norm=norm, n_iter=n_iter, loss="dlr", **kwargs)


def targets_used(n_targets: int, num_classes: int) -> int:
    """How many target classes a targeted attack runs with ``num_classes`` outputs: at most C - 1."""
    return max(min(n_targets, num_classes - 1), 0)


def targeted_loss_used(loss: str, num_classes: int) -> str:
    """APGD-T's loss with ``num_classes`` outputs: the targeted DLR needs 4 classes, below that CE is used."""
    return "ce-targeted" if loss == "dlr-targeted" and num_classes < 4 else loss


def targeted_settings_used(name: str, settings: dict, num_classes: int) -> dict:
    """APGD-T's and FAB-T's settings as they run on a model of ``num_classes`` outputs: at most C - 1 targets,
    and APGD-T's loss CE where the targeted DLR has too few classes (other attacks' settings unchanged)."""
    used = dict(settings)
    if name in ("apgd-t", "fab-t") and "n_targets" in used:
        used["n_targets"] = targets_used(used["n_targets"], num_classes)
    if name == "apgd-t":
        loss = used.get("loss", "dlr-targeted")
        if targeted_loss_used(loss, num_classes) != loss:
            used["loss"] = targeted_loss_used(loss, num_classes)
    return used


def ranked_targets(logits: Tensor, n_targets: int) -> list[Tensor]:
    """Target classes per run: the classes ranked 2nd, 3rd, ... by the clean logits (at most C - 1)."""
    order = logits.argsort(dim=1, descending=True)
    n = targets_used(n_targets, logits.shape[1])
    return [order[:, k] for k in range(1, n + 1)]


@entry_point("apgd_t", norms=NORMS)
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
    max_rows: int | None = None,
    **kwargs,
) -> Tensor:
    """APGD-T (Croce & Hein 2020): one targeted APGD run per target class, each on the points not yet misclassified.

    The targets are the top-``n_targets`` non-top classes of the clean logits, in rank order (at most C - 1).
    This is AutoAttack's APGD-T, an untargeted attack: the ranked targets are only directions to search, and a
    point is done as soon as it is misclassified, as any class (the authors' rule, which AutoAttack's per-point
    worst case needs). To reach a chosen class use ``apgd(loss="ce-targeted", y_target=...)``, which stops a point
    only once it is classified as its target.

    ``max_rows`` (default ``len(x)``): how many (point, target) runs share one batch. The points still robust
    are attacked with as many targets at once as fit; a point stops as soon as one of its targets fools it.
    Each run depends on its own point and target only, so which points fall does not depend on
    ``max_rows`` (with ``random_init=False``; random starts are drawn per run).

    Args:
        model: the classifier, images in [0, 1] -> logits ``[B, C]``.
        x: images ``[B, ...]`` (e.g. ``[B, C, H, W]``), float in [0, 1] (pixel units).
        y: true labels ``[B]``, any integer dtype, in [0, C).
        eps: the budget in [0, 1] pixel units (l_inf in (0, 1], l_2 / l_1 a positive radius); text such as
            ``"8/255"`` is parsed. Required.
        norm: ``"linf"`` (default), ``"l2"`` or ``"l1"``.
        n_iter: iterations per run (default 100).
        n_targets: target classes per point (default 9, AutoAttack's; at most C - 1 are used).
        loss: ``"dlr-targeted"`` (default; below 4 classes ``"ce-targeted"`` is used) or ``"ce-targeted"``.
        n_restarts: runs per target, each on the points not yet fooled (default 1).
        eval_mode: run the model in eval mode (default True); its previous mode is restored.
        generator: the ``torch.Generator`` of the random starts (default None: the global RNG).
        max_rows: (point, target) runs per batch, the working memory (default None: ``len(x)``).
        **kwargs: ``apgd``'s ``alpha``, ``rho``, ``random_init``, ``precision``, ``eot_iter`` and ``large_eps``.
    Returns:
        The adversarial examples, shaped like ``x``: per point its last fooling run, else (a robust point) its last
        run.
    Raises:
        ConfigError: from the ``entry_point`` input contract (``core/contract.py``): images not float in [0, 1],
            labels not in [0, C), a bad ``norm``, ``eps`` or setting (checked once by
            ``core/attack_options.check_options``), or a call inside ``torch.inference_mode()``;
            also a loss that is not targeted, a count below 1, ``large_eps`` without ``norm="l1"`` or an unknown
            setting in ``kwargs``; each message names the value and the fix.
    Example:
        >>> x_adv = apgd_t(model, x, y, eps=8 / 255, n_targets=9)
    """
    if loss not in ("dlr-targeted", "ce-targeted"):
        raise ConfigError(f"loss={loss!r} is not a targeted loss: use 'dlr-targeted' or 'ce-targeted'")
    if n_targets < 1:
        raise ConfigError(f"n_targets={n_targets} must be at least 1")
    if n_iter < 1 or n_restarts < 1:
        raise ConfigError(f"n_iter={n_iter} and n_restarts={n_restarts} must be at least 1")
    _check_large_eps(kwargs.get("large_eps", False), norm)
    unknown = set(kwargs) - {"alpha", "rho", "random_init", "precision", "eot_iter", "large_eps"}
    if unknown:
        raise ConfigError(f"apgd_t has no setting(s) {sorted(unknown)}")
    x = x.detach()
    y = y.detach()
    ex = execution_for(model, kwargs.get("precision", "fp32"), x.device)
    with model_mode(model, training=not eval_mode):
        with torch.no_grad():
            logits = model(x)
        loss = targeted_loss_used(loss, logits.shape[1])  # CE where the targeted DLR has too few classes
        fn = _loss_fn(loss, logits.shape[1])
        targets = torch.stack(ranked_targets(logits, n_targets), dim=1)  # [B, K]
        result = x.clone()
        undecided = logits.argmax(1) == y

        def run(points: Tensor, first: int, count: int) -> Tensor:
            rows_point, rows_target, rows_group = target_rows(points, targets, first, count)
            fooled_points = torch.zeros(len(points), dtype=torch.bool, device=x.device)
            for _ in range(n_restarts):
                sel = (~fooled_points[rows_group]).nonzero().squeeze(1)
                if len(sel) == 0:
                    break
                adv, _, fooled = _apgd_rows(
                    x[rows_point[sel]], y[rows_point[sel]], rows_target[sel], fn, eps=eps, norm=norm,
                    n_iter=n_iter, alpha=kwargs.get("alpha", 0.75), rho=kwargs.get("rho", 0.75),
                    random_init=kwargs.get("random_init", True), generator=generator, execution=ex,
                    group=rows_group[sel], n_groups=len(points), eot_iter=kwargs.get("eot_iter", 1),
                    large_eps=kwargs.get("large_eps", False),
                )
                # per point: its last fooling run, else (a robust point) its last run (write_per_point's rule)
                write_per_point(result, rows_point[sel], adv, fooled.long())
                fooled_points |= any_per_point(fooled, rows_group[sel], len(points))
            return fooled_points

        target_waves(undecided, targets.shape[1], max(max_rows or len(x), 1), run)
    return result
