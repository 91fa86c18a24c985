"""FAB-T, the targeted Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), l_inf, l_2 and l_1, and its
untargeted run ``fab_untargeted`` (AutoAttack's ``plus`` version).

At the iterate ``x_i`` the decision boundary between the true class ``y`` and the target ``t`` is
linearised: ``g(z) ~ g(x_i) + w^T (z - x_i)`` with ``g = f_t - f_y`` and ``w`` its input gradient.
``proj(p)`` is the minimal-norm point of the box ``[0,1]^d`` on that hyperplane, starting from ``p``.
With ``d = proj(x_i) - x_i`` and ``d0 = proj(x) - x`` the step is

    a = min(||d|| / (||d|| + ||d0||), alpha_max)
    x_{i+1} = clip((1 - a) (x_i + eta d) + a (x + eta d0))

with ``||.||`` at least 1e-8 (as the reference), and when ``x_{i+1}`` is misclassified it is pulled back
towards the original point: ``x_{i+1} <- x + beta (x_{i+1} - x)``. Restarts after the first start at a
random point at radius ``eps / 2``. The result is a misclassified point within ``eps`` (the first one found:
the reference keeps searching for closer ones, which decides nothing more at this ``eps``), else the clean
point.

With a chosen target (``fab_t(..., y_target=...)``) the run is targeted instead: ``y`` in ``g`` is the class in
the target's way at ``x_i`` (the highest-scoring other class), a success is reaching the target, and a point is
done only once classified as its target within ``eps``.

The untargeted run (``fab_untargeted``, the component ``fab``) linearises, at each iterate, the boundary between ``y`` and the class ``j`` whose
linearised boundary is closest: the smallest ``|f_j - f_y| / ||grad(f_j - f_y)||_*`` (the dual norm: l_1 for
l_inf, l_2 for l_2, l_inf for l_1), which takes the gradient of every logit (C backward passes per step, as the
authors' code).

Speed (the outcome per point is unchanged): each (point, target) run depends on itself only, so a run
leaves the working batch as soon as its point is fooled within ``eps``, several targets of the still-robust
points share one batch (``max_rows``), and the projection onto the linearised boundary solves for its
radius by Newton's method (exact after a few steps) instead of sorting all coordinates every iteration; on the
CPU each Newton step runs only on the rows still moving, and the step's element-wise work reuses its buffers
(the same numbers, bit for bit: tests/test_fab_projection_fast.py).

l_1 (as the authors' code, the official standard l_1 AutoAttack's FAB-T): the minimal-l_1 point of the box on the
hyperplane moves the coordinates of largest ``|w_i|`` first, each as far as the box lets it, until the hyperplane is
reached (one sort per projection, ``_l1_hyperplane_box``); the restarts' random start is a normal draw scaled to
l_1 radius ``eps / 2``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from fastrobust.attacks._engine import (
    Execution,
    Rows,
    any_per_point,
    autocast_forward,
    confirm_any,
    execution_for,
    predicted,
    target_rows,
    target_waves,
    write_per_point,
)
from fastrobust.attacks.apgd import ranked_targets
from fastrobust.attacks.toolkit import draw, model_mode
from fastrobust.core.contract import check_labels, entry_point
from fastrobust.core.gradients import grad_or_zeros
from fastrobust.core.values import NORMS
from fastrobust.errors import ConfigError


def _flat_norm(v: Tensor, norm: str) -> Tensor:
    v = v.flatten(1)
    if norm == "l1":
        return v.abs().sum(dim=1)
    if norm == "linf":  # max |v_i| from the two extremes: two reads of v instead of writing |v| and reading it
        return torch.maximum(v.amax(dim=1), v.amin(dim=1).neg_())
    return v.norm(dim=1)


DUAL_NORM = {"linf": "l1", "l2": "l2", "l1": "linf"}  # a boundary's distance divides by its gradient's dual norm
# a coordinate whose hyperplane weight is at most this is left where it is by the l_1 projection (the reference's
# cut-off: moving it would buy almost nothing for a large l_1 cost)
L1_MIN_WEIGHT = 1e-8


def project_hyperplane_box(p: Tensor, w: Tensor, c: Tensor, norm: str, *, sync_free: bool | None = None) -> Tensor:
    """The minimal l_inf, l_2 or l_1 perturbation ``d`` (flat ``[B, D]``) with ``w^T d = c`` and ``p + d`` in [0,1].

    Flipping the sign so that ``c >= 0``, each coordinate moves only along ``sign(w_i)`` up to its room
    ``cap_i`` (``1 - p_i`` or ``p_i``). For l_inf ``d_i = sign(w_i) min(t, cap_i)``; for l_2
    ``d_i = sign(w_i) min(t |w_i|, cap_i)``. ``h(t) = w^T d`` is piecewise linear, concave and non-decreasing
    in ``t``, so Newton's method from ``t = 0`` climbs to the smallest feasible ``t`` from below and is exact
    once a step crosses no breakpoint (typically after a few steps); rows still moving after
    ``NEWTON_STEPS`` are solved by sorting the breakpoints (``_hyperplane_t_sorted``). When even the box
    corner does not reach the hyperplane, the corner (the box point closest to it) is returned.
    ``sync_free`` (default: on CUDA) runs every Newton step and takes the sorted solution for the rows still
    moving without asking the host which they are (the sort of every row costs the GPU less than the stall).
    l_1 has no radius to solve for: see ``_l1_hyperplane_box``.
    """
    dtype = torch.promote_types(torch.promote_types(p.dtype, w.dtype), c.dtype)  # float64 images, float32 model
    p, w, c = p.to(dtype), w.to(dtype), c.to(dtype)
    sign_c = torch.where(c < 0, -1.0, 1.0).to(w.dtype)
    w = w * sign_c[:, None]
    c = c.abs()
    a = w.abs()
    direction = torch.sign(w)
    # room along sign(w_i): 1 - p_i upwards, p_i downwards (float arithmetic: boolean masks are slow on CPU;
    # in place: fewer fresh buffers of the batch's size)
    cap = direction.clamp(min=0).mul_(p.mul(-2).add_(1)).add_(p).clamp_(min=0)
    if norm == "l1":
        return direction * _l1_hyperplane_box(a, cap, c)
    if norm == "linf":
        brk, slope = cap, a
    else:
        brk = cap / a.clamp_min(1e-30)  # a_i = 0: a huge breakpoint with no slope, so no effect
        slope = a * a
    const = a * cap  # contribution once coordinate i is saturated (= slope_i * brk_i)
    total = const.sum(1)
    feasible = total >= c
    sync_free = p.device.type == "cuda" if sync_free is None else sync_free
    t = _hyperplane_t_newton(brk, slope, const, c, feasible, early_exit=not sync_free, total=total)
    stuck = feasible & torch.isnan(t)
    if sync_free:
        t = torch.where(stuck, _hyperplane_t_sorted(brk, slope, const, c), t)
    elif bool(stuck.any()):
        t[stuck] = _hyperplane_t_sorted(brk[stuck], slope[stuck], const[stuck], c[stuck])
    t = torch.where(feasible, t, torch.full_like(t, float("inf")))
    if norm == "linf":
        mag = torch.minimum(cap, t[:, None], out=cap)  # cap (= brk) is not needed any more
    else:
        mag = torch.minimum(t[:, None] * a, cap)
    return direction.mul_(mag)  # w already carries the sign of c


def _l1_hyperplane_box(a: Tensor, cap: Tensor, c: Tensor) -> Tensor:
    """The magnitudes ``m_i`` in ``[0, cap_i]`` of least ``sum_i m_i`` with ``sum_i a_i m_i = c`` (``a, cap >= 0``,
    ``c >= 0``; flat ``[B, D]``): a fractional knapsack, so the coordinates are filled in decreasing order of
    ``a_i`` (the most boundary per unit of l_1), each to its room, the last one only as far as ``c`` needs. When even
    all of them together fall short, every coordinate is at its room (the box corner). Coordinates with ``a_i`` at
    most ``L1_MIN_WEIGHT`` stay at 0. The running sums are taken in float64, so the coordinate that is cut is the
    exact one."""
    a = torch.where(a > L1_MIN_WEIGHT, a, torch.zeros_like(a))
    order = a.argsort(dim=1, descending=True, stable=True)
    a_sorted = a.gather(1, order).double()
    room_sorted = cap.gather(1, order).double() * (a_sorted > 0)
    gain = a_sorted * room_sorted  # what filling coordinate i to its room adds to w^T d
    before = gain.cumsum(1) - gain  # what the coordinates ahead of it add
    need = c.double()[:, None] - before
    # full where the ones ahead fall short by at least its whole gain, the cut one partly, the rest untouched
    partial = (need / a_sorted.clamp_min(L1_MIN_WEIGHT)).clamp(min=0)
    mag_sorted = torch.minimum(room_sorted, partial).to(a.dtype)
    return torch.zeros_like(a).scatter_(1, order, mag_sorted)


NEWTON_STEPS = 12
_FINITE_SLOPE = 1e15  # its square, summed over an image, stays finite in float32


def _hyperplane_t_newton(brk: Tensor, slope: Tensor, const: Tensor, c: Tensor, feasible: Tensor,
                         early_exit: bool = True, total: Tensor | None = None) -> Tensor:
    """Smallest ``t`` with ``sum_i min(t slope_i, const_i) = c`` (breakpoints ``brk_i = const_i / slope_i``);
    NaN where Newton has not settled within NEWTON_STEPS. Infeasible rows are left alone (any value).

    On the linear piece where the coordinates with ``brk_i > t`` are still free, ``h(s) = base + rate * s``;
    the step goes to where that line meets ``c``. It has settled when the free set (hence ``rate`` and
    ``base``) does not change: ``t`` then lies on its own piece and is the solution. ``early_exit`` stops once
    every row has settled and steps only the rows still moving (a host sync per step); without it all steps run
    on every row (``_hyperplane_t_newton_all``). Either way a row's ``t`` is the same: a settled row's next step
    would return the same ``t`` (the same ``rate`` and ``base``). ``total``: ``const.sum(1)`` when the caller
    has it."""
    if not early_exit:
        return _hyperplane_t_newton_all(brk, slope, const, c, feasible)
    total = const.sum(1) if total is None else total
    # at t = 0 every coordinate with brk_i > 0 is free, and every other one has const_i = 0: base is 0
    rate, base = (torch.sign(brk) * slope).sum(1), total - total  # float masks: boolean ones are slow on CPU
    t = torch.zeros_like(c)
    rows = feasible.nonzero().squeeze(1)  # the rows still moving; the infeasible ones need no t
    if len(rows) < len(c):
        brk, slope, const, c, total, rate, base = (v.index_select(0, rows) for v in (brk, slope, const, c, total,
                                                                                      rate, base))
    t_rows = t.index_select(0, rows)
    for _ in range(NEWTON_STEPS):
        t_rows = torch.where(rate > 0, (c - base) / rate.clamp_min(1e-30), t_rows)
        t.index_copy_(0, rows, t_rows)
        free = torch.sign(brk - t_rows[:, None]).clamp_(min=0)
        rate_next, base_next = (free * slope).sum(1), total - (free * const).sum(1)
        moving = (rate_next != rate) | (base_next != base)
        keep = moving.nonzero().squeeze(1)
        if len(keep) == 0:
            return t
        rate, base = rate_next, base_next
        if 2 * len(keep) <= len(moving):  # worth a copy: the settled rows would step on to the same t
            rows = rows.index_select(0, keep)
            brk, slope, const, c, total, t_rows, rate, base = (
                v.index_select(0, keep) for v in (brk, slope, const, c, total, t_rows, rate, base))
            moving = moving.index_select(0, keep)  # all of them: which rows moved at the last step
    return t.index_fill_(0, rows[moving], float("nan"))


def _hyperplane_t_newton_all(brk: Tensor, slope: Tensor, const: Tensor, c: Tensor, feasible: Tensor) -> Tensor:
    """``_hyperplane_t_newton`` without a host sync: NEWTON_STEPS steps on every row."""
    total = const.sum(1)
    t = torch.zeros_like(c)
    free = torch.sign(brk)  # 1 where brk_i > 0 (breakpoints are >= 0), as floats: masks are slow on CPU
    rate, base = (free * slope).sum(1), total - (free * const).sum(1)
    settled = ~feasible
    for _ in range(NEWTON_STEPS):
        t = torch.where(rate > 0, (c - base) / rate.clamp_min(1e-30), t)
        free = torch.sign(brk - t[:, None]).clamp_(min=0)
        rate_next, base_next = (free * slope).sum(1), total - (free * const).sum(1)
        settled = ((rate_next == rate) & (base_next == base)) | ~feasible
        rate, base = rate_next, base_next
    return torch.where(settled, t, torch.full_like(t, float("nan")))


def _hyperplane_t_sorted(brk: Tensor, slope: Tensor, const: Tensor, c: Tensor) -> Tensor:
    """The same ``t`` by sorting the breakpoints: ``h(brk_k) = sum_{j<k} const_j + brk_k sum_{j>=k} slope_j``."""
    brk_sorted, order = brk.sort(dim=1)
    slope_sorted = slope.gather(1, order)
    const_sorted = const.gather(1, order)
    const_before = torch.cumsum(const_sorted, dim=1) - const_sorted
    slope_from = slope_sorted.flip(1).cumsum(1).flip(1)
    h = const_before + brk_sorted * slope_from
    reached = h >= c[:, None]
    k = torch.where(reached.any(dim=1), reached.float().argmax(dim=1), torch.zeros_like(c, dtype=torch.long))
    return (c - const_before.gather(1, k[:, None]).squeeze(1)) / slope_from.gather(1, k[:, None]).squeeze(1).clamp_min(1e-30)


@entry_point("fab_t", norms=NORMS)
def fab_t(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    n_iter: int = 100,
    n_targets: int = 9,
    n_restarts: int = 1,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    y_target: Tensor | None = None,
    eval_mode: bool = True,
    generator: torch.Generator | None = None,
    max_rows: int | None = None,
    precision: str = "fp32",
) -> Tensor:
    """Targeted FAB (Croce & Hein 2020): per target, runs on the points not yet done.

    For each target (given ``y_target``, else the top-``n_targets`` ranked classes of the
    clean logits), run on the points not yet done; returns per example the first point within ``eps`` that is
    done, else the first misclassified one within ``eps``, else ``x``.

    Without ``y_target`` this is AutoAttack's FAB-T, an untargeted attack: the ranked targets are only
    boundaries to search (the one between the target and the true class, as in the authors' code), and a point
    is done once misclassified within ``eps`` (as any class). With ``y_target`` the run is targeted: each step
    linearises the boundary between the target and the class in its way (the highest-scoring other class, the
    true class while the point is classified correctly), a success that pulls the iterate back towards ``x``
    is reaching the target, and a point is done only once it is classified as its target within ``eps`` -- a
    point whose label is already wrong is attacked too.

    ``max_rows`` (default ``len(x)``): how many (point, target) runs share one batch; a point stops as soon as
    one of its runs is done. Runs are independent of each other, so which points fall does not depend on
    ``max_rows``. ``precision``: as in ``apgd`` (fp32 by default).

    Args:
        model: the classifier, images in [0, 1] -> logits ``[B, C]``.
        x: images ``[B, ...]`` (e.g. ``[B, C, H, W]``), float in [0, 1] (pixel units).
        y: true labels ``[B]``, any integer dtype, in [0, C).
        eps: the budget in [0, 1] pixel units (l_inf in (0, 1], l_2 / l_1 a positive radius); text such as
            ``"8/255"`` is parsed. Required.
        norm: ``"linf"`` (default), ``"l2"`` or ``"l1"``.
        n_iter: steps per run (default 100, the authors').
        n_targets: ranked target classes per point without ``y_target`` (default 9, AutoAttack's; at most C - 1).
        n_restarts: runs per target (default 1); the first starts at ``x``, the others at a random point at radius
            ``eps / 2``.
        alpha_max, eta, beta: FAB's step settings (defaults 0.1, 1.05, 0.9, the authors'; see the module docstring).
        y_target: target labels ``[B]`` for a targeted run (default None: AutoAttack's FAB-T).
        eval_mode: run the model in eval mode (default True); its previous mode is restored.
        generator: the ``torch.Generator`` of the restarts' random starts (default None: the global RNG).
        max_rows: (point, target) runs per batch, the working memory (default None: ``len(x)``).
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"auto"``, as in ``apgd``.
    Returns:
        The adversarial examples, shaped like ``x`` (the rule above; ``x`` where nothing was found within ``eps``).
    Raises:
        ConfigError: from the ``entry_point`` input contract (``core/contract.py``): images not float in
            [0, 1], labels not in [0, C), a bad ``norm``, ``eps`` or setting (checked once by
            ``core/attack_options.check_options``), or a call inside ``torch.inference_mode()``;
            also a count below 1; each message names the value and the fix.
    Example:
        >>> x_adv = fab_t(model, x, y, eps=8 / 255, n_targets=9)
    """
    if n_iter < 1 or n_restarts < 1 or n_targets < 1:
        raise ConfigError(f"n_iter={n_iter}, n_restarts={n_restarts}, n_targets={n_targets} must all be at least 1")
    x = x.detach()
    y = y.detach()
    if y_target is not None:
        y_target = check_labels(y_target, len(x), where="fab_t", name="y_target")
    ex = execution_for(model, precision, x.device)
    with model_mode(model, training=not eval_mode):
        with torch.no_grad():
            logits = model(x)
        targeted = y_target is not None
        if targeted:
            targets = y_target.detach().view(-1, 1)
        else:
            targets = torch.stack(ranked_targets(logits, n_targets), dim=1)  # [B, K]
        result = x.clone()
        undecided = logits.argmax(1) != y_target if targeted else logits.argmax(1) == y
        misclassified_kept = logits.argmax(1) != y  # result holds a misclassified point (x itself, at first)

        def run(points: Tensor, first: int, count: int) -> Tensor:
            rows_point, rows_target, rows_group = target_rows(points, targets, first, count)
            done_points = torch.zeros(len(points), dtype=torch.bool, device=x.device)
            for restart in range(n_restarts):
                live = (~done_points[rows_group]).nonzero().squeeze(1)
                if len(live) == 0:
                    break
                xs = x[rows_point[live]]
                start = xs.clone() if restart == 0 else _random_start_half_eps(xs, eps, norm, generator)
                adv, done, found = _fab_rows(xs, y[rows_point[live]], rows_target[live], start=start, eps=eps,
                                             norm=norm, n_iter=n_iter, alpha_max=alpha_max, eta=eta, beta=beta,
                                             execution=ex, group=rows_group[live], n_groups=len(points),
                                             until_target=targeted)
                # per point (write_per_point's rule: highest rank, then the last row): a run that is done wins; a
                # misclassified point is kept where the point holds none yet; the other runs write nothing
                fresh = found & ~misclassified_kept[rows_point[live]]
                write_per_point(result, rows_point[live], adv, torch.where(done, 1, torch.where(fresh, 0, -1)))
                misclassified_kept.logical_or_(any_per_point(found, rows_point[live], len(x)))
                done_points |= any_per_point(done, rows_group[live], len(points))
            return done_points

        target_waves(undecided, targets.shape[1], max(max_rows or len(x), 1), run)
    return result


@entry_point("fab_untargeted", norms=NORMS)
def fab_untargeted(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    n_iter: int = 100,
    n_restarts: int = 1,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    eval_mode: bool = True,
    generator: torch.Generator | None = None,
    precision: str = "fp32",
) -> Tensor:
    """Untargeted FAB (AutoAttack's ``fab``): each step crosses the closest linearised boundary of the true class.

    Fast Adaptive Boundary attack (Croce & Hein 2020): at each iterate the boundary between ``y`` and the class
    whose linearised boundary is closest is projected onto (C backward passes per step, as the authors' code);
    see the module docstring. AutoAttack's ``plus`` version runs it with 5 restarts.

    Args:
        model: the classifier, images in [0, 1] -> logits ``[B, C]``.
        x: images ``[B, ...]`` (e.g. ``[B, C, H, W]``), float in [0, 1] (pixel units).
        y: true labels ``[B]``, any integer dtype, in [0, C).
        eps: the budget a found point must be within, in [0, 1] pixel units (l_inf in (0, 1], l_2 / l_1 a
            positive radius); text such as ``"8/255"`` is parsed. Required.
        norm: ``"linf"`` (default), ``"l2"`` or ``"l1"``.
        n_iter: steps per run (default 100).
        n_restarts: runs (default 1); the first starts at ``x``, the others at a random point at radius
            ``eps / 2``, each only on the points not yet fooled (AutoAttack ``plus``: 5).
        alpha_max, eta, beta: FAB's step settings (defaults 0.1, 1.05, 0.9, the authors').
        eval_mode: run the model in eval mode (default True); its previous mode is restored.
        generator: the ``torch.Generator`` of the restarts' random starts (default None: the global RNG).
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"auto"``, as in ``apgd``.
    Returns:
        Per example the first misclassified point found within ``eps``, else ``x``.
    Raises:
        ConfigError: from the ``entry_point`` input contract (``core/contract.py``): images not float in
            [0, 1], labels not in [0, C), a bad ``norm``, ``eps`` or setting (checked once by
            ``core/attack_options.check_options``), or a call inside ``torch.inference_mode()``;
            also a count below 1; each message names the value and the fix.
    Example:
        >>> x_adv = fab_untargeted(model, x, y, eps=8 / 255, n_restarts=5)
    """
    if n_iter < 1 or n_restarts < 1:
        raise ConfigError(f"n_iter={n_iter} and n_restarts={n_restarts} must be at least 1")
    x = x.detach()
    y = y.detach()
    ex = execution_for(model, precision, x.device)
    with model_mode(model, training=not eval_mode):
        with torch.no_grad():
            todo_mask = model(x).argmax(1) == y
        result = x.clone()
        for restart in range(n_restarts):
            todo = todo_mask.nonzero().squeeze(1)
            if len(todo) == 0:
                break
            xs = x[todo]
            start = xs.clone() if restart == 0 else _random_start_half_eps(xs, eps, norm, generator)
            adv, done, _ = _fab_rows(xs, y[todo], None, start=start, eps=eps, norm=norm, n_iter=n_iter,
                                     alpha_max=alpha_max, eta=eta, beta=beta, execution=ex)
            result[todo[done]] = adv[done]
            todo_mask[todo[done]] = False
    return result


def _random_start_half_eps(x: Tensor, eps: float, norm: str, generator: torch.Generator | None) -> Tensor:
    """A restart's start: a random direction at radius eps / 2 (the reference resets its best distance at
    every restart, so its ``min(best distance, eps) / 2`` is always ``eps / 2``)."""
    if norm == "linf":
        noise = draw(torch.rand, x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
    else:  # l_2 and l_1: a normal draw, scaled to the radius in that norm (as the reference)
        noise = draw(torch.randn, x.shape, generator=generator, device=x.device, dtype=x.dtype)
    noise = noise / _flat_norm(noise, norm).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
    return (x + 0.5 * eps * noise).clamp(0, 1)


def _jacobian_row(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, t: Tensor,
                  rival: bool = False) -> tuple[Tensor, Tensor]:
    """g = f_t - f_y at x and its input gradient (``model``: the module, or a function that calls it); with
    ``rival``, ``y`` is replaced by the class in the target's way at x (the highest-scoring class other than t),
    the boundary a targeted run has to cross."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        if rival:
            y = logits.detach().scatter(1, t[:, None], float("-inf")).argmax(1)
        g = (logits.gather(1, t[:, None]) - logits.gather(1, y[:, None])).squeeze(1).float()
        (grad,) = grad_or_zeros(g.sum(), [x])  # zero when the logits do not depend on x
    # an infinite entry (e.g. sqrt at 0) becomes a large finite slope, so the linearised boundary still
    # moves that coordinate (by a tiny step) instead of turning the projection into NaN; NaN counts 0
    grad = torch.nan_to_num(grad.detach(), nan=0.0, posinf=_FINITE_SLOPE, neginf=-_FINITE_SLOPE)
    return g.detach(), grad


def _closest_boundary(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, norm: str) -> tuple[Tensor, Tensor]:
    """``g = f_j - f_y`` at x and its input gradient for the class ``j != y`` whose linearised boundary is closest
    (``|g_j| / ||grad g_j||_*``, the dual norm), from the gradients of all C logits (the authors' rule: each logit's
    gradient, then the differences)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        grads = []
        for c in range(logits.shape[1]):
            (grad,) = grad_or_zeros(logits[:, c].float().sum(), [x], retain_graph=True)
            grads.append(grad.detach())
    rows = torch.arange(len(x), device=x.device)
    jac = torch.stack(grads, dim=1)  # [B, C, ...]
    jac = torch.nan_to_num(jac, nan=0.0, posinf=_FINITE_SLOPE, neginf=-_FINITE_SLOPE)
    f = logits.detach().float()
    df = f - f[rows, y][:, None]
    dg = (jac - jac[rows, y][:, None]).flatten(2)
    dual = _flat_norm(dg.reshape(-1, dg.shape[2]), DUAL_NORM[norm]).view(dg.shape[:2])
    dist = df.abs() / (dual + 1e-12)
    dist[rows, y] = float("inf")  # not a boundary
    j = dist.argmin(1)
    return df[rows, j], dg[rows, j].view_as(x)


def _fab_rows(x: Tensor, y: Tensor, t: Tensor | None, *, start: Tensor, eps: float, norm: str, n_iter: int,
              alpha_max: float, eta: float, beta: float, execution: Execution, group: Tensor | None = None,
              n_groups: int = 0, until_target: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """FAB-T iterations on every row (an example and its target; ``t=None``: untargeted FAB, the closest boundary
    of each step, see ``_closest_boundary``). Returns per row the point found (the first
    one within ``eps`` classified as the target with ``until_target``, else the first misclassified one within
    ``eps``, else ``x``), whether the row is done (misclassified within ``eps``; with ``until_target``: on its
    target) and whether a misclassified point within ``eps`` was found. A row leaves the batch once done; with
    ``group`` all rows of the same point leave together."""
    n = len(x)
    shape = (-1,) + (1,) * (x.dim() - 1)
    rows = Rows(n, x.device, group=group, n_groups=n_groups, check_every=execution.check_every)
    forward = autocast_forward(execution, execution.for_gradients)  # the backward runs outside autocast
    out = x.clone()
    out_done = torch.zeros(n, dtype=torch.bool, device=x.device)
    out_found = torch.zeros(n, dtype=torch.bool, device=x.device)
    nothing = torch.zeros(n, dtype=torch.bool, device=x.device)
    untargeted = t is None
    t = y if untargeted else t  # unused by the untargeted steps; keeps every row's state the same shape
    s = {"x0": x, "y": y, "t": t, "x_i": start, "found": nothing, "x_found": x, "reached": nothing, "x_reached": x}

    def write_out(s: dict[str, Tensor], idx: Tensor, pos: Tensor) -> None:
        found, reached = s["found"][idx], s["reached"][idx]
        best = torch.where(found.view(shape), s["x_found"].index_select(0, idx), s["x0"].index_select(0, idx))
        out[pos] = torch.where(reached.view(shape), s["x_reached"].index_select(0, idx), best)
        out_done[pos] = reached if until_target else found
        out_found[pos] = found

    def settle(s: dict[str, Tensor]) -> dict[str, Tensor]:
        s["found"], any_done = confirm_any(execution, s["x_found"], s["y"], s["found"])
        if until_target:
            s["reached"], any_done = confirm_any(execution, s["x_reached"], s["y"], s["reached"], s["t"])
        if not any_done:  # known from the confirmation's look-up: no row can finish
            return s
        done, kept = rows.split(rows.finished(s["reached"] if until_target else s["found"]))
        if len(done) == 0:
            return s
        write_out(s, done, rows.positions[done])
        return rows.keep(kept, s)

    for k in range(n_iter):
        x0, x_i = s["x0"], s["x_i"]
        if untargeted:
            g, w = _closest_boundary(forward, x_i, s["y"], norm)
        else:
            g, w = _jacobian_row(forward, x_i, s["y"], s["t"], rival=until_target)
        w = w.flatten(1)
        flat_i, flat_x = x_i.flatten(1), x0.flatten(1)
        # the linearised boundary g + w^T (z - x_i) = 0, seen from x_i and from the original point
        d = project_hyperplane_box(flat_i, w, -g, norm, sync_free=execution.sync_free)
        d0 = project_hyperplane_box(flat_x, w, -g - (w * (flat_x - flat_i)).sum(1), norm,
                                    sync_free=execution.sync_free)
        nd = _flat_norm(d, norm).clamp_min(1e-8)
        nd0 = _flat_norm(d0, norm).clamp_min(1e-8)
        a = torch.clamp(nd / (nd + nd0), max=alpha_max)[:, None]
        # (x_i + eta d)(1 - a) + (x + eta d0) a, in place in d and d0 (not needed any more): fewer fresh buffers
        nxt = d.mul_(eta).add_(flat_i).mul_(1 - a).add_(d0.mul_(eta).add_(flat_x).mul_(a)).clamp_(0, 1)
        nxt = nxt.nan_to_num_(nan=0.0).view_as(x0)
        pred = predicted(execution, nxt)
        adv_now = pred != s["y"]
        moved = nxt - x0
        within = _flat_norm(moved, norm) <= eps
        win = adv_now & within & ~s["found"]
        if execution.sync_free or bool(win.any()):  # on the CPU a look costs less than rewriting every row
            s["x_found"] = torch.where(win.view(shape), nxt, s["x_found"])
            s["found"] = s["found"] | win
        if until_target:
            on_target = (pred == s["t"]) & within & ~s["reached"]
            if execution.sync_free or bool(on_target.any()):
                s["x_reached"] = torch.where(on_target.view(shape), nxt, s["x_reached"])
                s["reached"] = s["reached"] | on_target
        success = pred == s["t"] if until_target else adv_now  # a success steps back towards x0
        s["x_i"] = torch.where(success.view(shape), x0 + moved.mul_(beta), nxt)
        if rows.check_now(k) or k + 1 == n_iter:
            s = settle(s)
            if rows.empty:
                break
    if until_target and not rows.empty:  # rows that never reached their target keep what they found
        write_out(s, torch.arange(len(rows.positions), device=x.device), rows.positions)
    return out, out_done, out_found
