"""FAB-T, the targeted Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), l_inf and l_2.

At the iterate ``x_i`` the decision boundary between the true class ``y`` and the target ``t`` is
linearised: ``g(z) ~ g(x_i) + w^T (z - x_i)`` with ``g = f_t - f_y`` and ``w`` its input gradient.
``proj(p)`` is the minimal-norm point of the box ``[0,1]^d`` on that hyperplane, starting from ``p``.
With ``d = proj(x_i) - x_i`` and ``d0 = proj(x) - x`` the step is

    a = min(||d|| / (||d|| + ||d0||), alpha_max)
    x_{i+1} = clip((1 - a) (x_i + eta d) + a (x + eta d0))

and when ``x_{i+1}`` is misclassified it is recorded (if closer than the best so far) and pulled back
towards the original point: ``x_{i+1} <- (1 - beta) x + beta x_{i+1}``. Restarts after the first start
at a random point at half the radius of ``min(best distance, eps)``. The result is the closest
misclassified point found when it lies within ``eps``, else the clean point.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..inputs import check_labels, entry_point
from ..numbers import check_eps
from ._common import check_norm, model_mode
from .apgd import ranked_targets


def _flat_norm(v: Tensor, norm: str) -> Tensor:
    v = v.flatten(1)
    return v.abs().amax(dim=1) if norm == "linf" else v.norm(dim=1)


def project_hyperplane_box(p: Tensor, w: Tensor, c: Tensor, norm: str) -> Tensor:
    """The minimal l_inf or l_2 perturbation ``d`` (flat ``[B, D]``) with ``w^T d = c`` and ``p + d`` in [0,1].

    Flipping the sign so that ``c >= 0``, each coordinate moves only along ``sign(w_i)`` up to its room
    ``cap_i`` (``1 - p_i`` or ``p_i``). For l_inf ``d_i = sign(w_i) min(t, cap_i)``; for l_2
    ``d_i = sign(w_i) min(t |w_i|, cap_i)``. ``w^T d`` is piecewise linear and non-decreasing in ``t``,
    so the smallest feasible ``t`` comes from sorting the breakpoints. When even the box corner does not
    reach the hyperplane, the corner (the box point closest to it) is returned.
    """
    sign_c = torch.where(c < 0, -1.0, 1.0).to(w.dtype)
    w = w * sign_c[:, None]
    c = c.abs()
    a = w.abs()
    cap = torch.where(w > 0, 1 - p, p).clamp_min(0)
    if norm == "linf":
        brk, slope = cap, a
    else:
        brk = torch.where(a > 0, cap / a.clamp_min(1e-30), torch.zeros_like(cap))
        slope = a * a
    const = a * cap  # contribution once coordinate i is saturated
    brk_sorted, order = brk.sort(dim=1)
    slope_sorted = slope.gather(1, order)
    const_sorted = const.gather(1, order)
    # h(brk_k) = sum_{j<k} const_j + brk_k * sum_{j>=k} slope_j
    const_before = torch.cumsum(const_sorted, dim=1) - const_sorted
    slope_from = slope_sorted.flip(1).cumsum(1).flip(1)
    h = const_before + brk_sorted * slope_from
    reached = h >= c[:, None]
    feasible = reached.any(dim=1)
    k = torch.where(feasible, reached.float().argmax(dim=1), torch.zeros_like(c, dtype=torch.long))
    t = (c - const_before.gather(1, k[:, None]).squeeze(1)) / slope_from.gather(1, k[:, None]).squeeze(1).clamp_min(1e-30)
    t = torch.where(feasible, t, torch.full_like(t, float("inf")))
    if norm == "linf":
        mag = torch.minimum(t[:, None].expand_as(cap), cap)
    else:
        mag = torch.minimum(t[:, None] * a, cap)
    return torch.sign(w) * mag  # w already carries the sign of c


@entry_point("fab_t")
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
) -> Tensor:
    """Targeted FAB: for each target (given ``y_target``, else the top-``n_targets`` ranked classes of the
    clean logits), run on the points not yet misclassified within ``eps``; returns the closest
    misclassified point within ``eps`` per example, or ``x`` where none was found."""
    norm = check_norm(norm)
    eps = check_eps(eps, norm=norm)
    if n_iter < 1 or n_restarts < 1 or n_targets < 1:
        raise ConfigError(f"n_iter={n_iter}, n_restarts={n_restarts}, n_targets={n_targets} must all be at least 1")
    x = x.detach()
    y = y.detach()
    if y_target is not None:
        y_target = check_labels(y_target, len(x), where="fab_t", name="y_target")
    with model_mode(model, training=not eval_mode):
        with torch.no_grad():
            logits = model(x)
        targets = [y_target] if y_target is not None else ranked_targets(logits, n_targets)
        result = x.clone()
        fooled = logits.argmax(1) != y
        for target in targets:
            todo = (~fooled).nonzero().squeeze(1)
            if len(todo) == 0:
                break
            adv, dist = _fab_run(model, x[todo], y[todo], target[todo], eps, norm, n_iter, n_restarts,
                                 alpha_max, eta, beta, generator)
            ok = dist <= eps
            result[todo[ok]] = adv[ok]
            fooled[todo[ok]] = True
    return result


def _jacobian_row(model: nn.Module, x: Tensor, y: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Logits at x, g = f_t - f_y and its input gradient."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        g = (logits.gather(1, t[:, None]) - logits.gather(1, y[:, None])).squeeze(1).float()
        (grad,) = torch.autograd.grad(g.sum(), x)
    return logits.detach(), g.detach(), grad.detach()


def _fab_run(model, x, y, t, eps, norm, n_iter, n_restarts, alpha_max, eta, beta, generator):
    batch = len(x)
    flat_x = x.flatten(1)
    best = x.clone()
    best_dist = torch.full((batch,), float("inf"), device=x.device)
    for restart in range(n_restarts):
        if restart == 0:
            x_i = x.clone()
        else:
            radius = torch.minimum(best_dist, torch.full_like(best_dist, eps)).view(-1, *([1] * (x.dim() - 1)))
            if norm == "linf":
                noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
            else:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            noise = noise / _flat_norm(noise, norm).clamp_min(1e-12).view_as(radius)
            x_i = (x + 0.5 * radius * noise).clamp(0, 1)
        for _ in range(n_iter):
            _, g, w = _jacobian_row(model, x_i, y, t)
            w = w.flatten(1)
            flat_i = x_i.flatten(1)
            # hyperplane: g + w^T (z - x_i) = 0
            d = project_hyperplane_box(flat_i, w, -g, norm)
            d0 = project_hyperplane_box(flat_x, w, -g - (w * (flat_x - flat_i)).sum(1), norm)
            nd, nd0 = _flat_norm(d, norm), _flat_norm(d0, norm)
            a = torch.clamp(nd / (nd + nd0).clamp_min(1e-12), max=alpha_max)[:, None]
            nxt = ((1 - a) * (flat_i + eta * d) + a * (flat_x + eta * d0)).clamp(0, 1)
            nxt = torch.nan_to_num(nxt, nan=0.0).view_as(x)
            with torch.no_grad():
                adv_now = model(nxt).argmax(1) != y
            dist = _flat_norm(nxt - x, norm)
            closer = adv_now & (dist < best_dist)
            best[closer] = nxt[closer]
            best_dist = torch.where(closer, dist, best_dist)
            pulled = (1 - beta) * x + beta * nxt
            x_i = torch.where(adv_now.view(-1, *([1] * (x.dim() - 1))), pulled, nxt)
    return best, best_dist
