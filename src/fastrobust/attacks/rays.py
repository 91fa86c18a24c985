"""RayS (Chen & Gu, KDD 2020): hard-label ray search for the l_inf decision boundary, no gradients.

The search space is the set of sign directions ``s in {-1, +1}^d``; along a ray the point at radius
``r`` is ``clip(x + r s, 0, 1)``, and the boundary distance of ``s`` is the smallest ``r`` at which the
predicted label (argmax only is used) differs from ``y``. Starting from ``s = +1`` (everywhere), the
coordinates (in flattened order) are split hierarchically into 1, 2, 4, ... blocks; each block's sign is
flipped in turn. A flip is kept when the flipped ray is adversarial at the current best radius (one query),
after which a binary search finds its (smaller) boundary distance. Every example keeps its own count of
queries and stops at the budget (or, with ``early_stop``, once its distance is within ``eps``); a block
trial starts only when its binary search can finish within the budget, so distances are tight to ``tol``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..numbers import check_eps
from ._common import model_mode


@dataclass
class RaySResult:
    x_adv: Tensor       # the boundary point found (outside the eps-ball where the point resisted); x where none
    queries: Tensor     # int64 [B]: label queries spent per example (0 for points misclassified at the start)
    distance: Tensor    # float [B]: l_inf distance ||x_adv - x|| to the boundary along the best ray (inf: none found)
    direction: Tensor   # the best sign direction (+-1) per example

    def robust(self, eps: float) -> Tensor:
        """Per example: True where no adversarial was found within ``eps`` (distance > eps)."""
        return self.distance > eps

    def within(self, x: Tensor, eps: float) -> Tensor:
        """The adversarial points that lie within ``eps``, and ``x`` elsewhere (for evaluation)."""
        keep = (self.distance <= eps).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(keep, self.x_adv, x)


def rays(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | None = None,
    norm: str = "linf",
    n_queries: int = 10000,
    tol: float = 1e-4,
    early_stop: bool = False,
    eval_mode: bool = True,
    generator: torch.Generator | None = None,
) -> RaySResult:
    """Run RayS on a batch. ``eps`` is needed only for ``early_stop``; robust accuracy at any eps is
    ``(distance > eps)`` over the correctly classified points, ADBD the mean distance over them.
    ``tol`` is the l_inf precision of each binary search. ``generator`` is unused (RayS is deterministic)."""
    if norm != "linf":
        raise ConfigError(f"norm={norm!r}: RayS searches l_inf sign directions only; use norm='linf'")
    if eps is not None:
        eps = check_eps(eps)
    if early_stop and eps is None:
        raise ConfigError("early_stop=True needs eps (stop once the boundary is within eps)")
    if n_queries < 1:
        raise ConfigError(f"n_queries={n_queries} must be at least 1")
    if not 0 < tol < 1:
        raise ConfigError(f"tol={tol} must be in (0, 1)")
    x = x.detach()
    batch = len(x)
    flat = x.flatten(1)
    dim = flat.shape[1]
    view = (-1,) + (1,) * (x.dim() - 1)
    queries = torch.zeros(batch, dtype=torch.long, device=x.device)
    best_r = torch.full((batch,), float("inf"), device=x.device)
    best_dir = torch.ones_like(flat)

    with model_mode(model, training=not eval_mode), torch.no_grad():

        def is_adv(idx: Tensor, directions: Tensor, r: Tensor) -> Tensor:
            """One query per listed example: is clip(x + r s) misclassified?"""
            point = (flat[idx] + r[:, None] * directions).clamp(0, 1).view(-1, *x.shape[1:])
            queries[idx] += 1
            return model(point).argmax(1) != y[idx]

        def budget_left(idx: Tensor) -> Tensor:
            return queries[idx] < n_queries

        def search(idx: Tensor, directions: Tensor) -> None:
            """Try the directions for the listed examples; keep those that shorten the distance."""
            hi = best_r[idx].clone()
            finite = torch.isfinite(hi)
            hi = torch.where(finite, hi, torch.ones_like(hi))  # r = 1 reaches the box corner
            ok = is_adv(idx, directions, hi)
            lo = torch.zeros_like(hi)
            # binary search on the examples whose flipped ray is adversarial at the current radius
            active = ok & budget_left(idx)
            while True:
                active = active & ((hi - lo) > tol) & budget_left(idx)
                if not active.any():
                    break
                sel = active.nonzero().squeeze(1)
                mid = (lo[sel] + hi[sel]) / 2
                adv = is_adv(idx[sel], directions[sel], mid)
                hi[sel] = torch.where(adv, mid, hi[sel])
                lo[sel] = torch.where(adv, lo[sel], mid)
            better = ok & (hi < best_r[idx])
            best_r[idx[better]] = hi[better]
            best_dir[idx[better]] = directions[better]

        with torch.no_grad():
            correct = model(x).argmax(1) == y
        alive = correct.clone()
        start = alive.nonzero().squeeze(1)
        if len(start):
            search(start, best_dir[start].clone())
        level, block = 0, 0
        while True:
            # start a block trial only where its binary search can finish within the budget, so every
            # reported distance is tight to ``tol`` (a few queries of the budget may stay unused)
            radius = torch.where(torch.isfinite(best_r), best_r, torch.ones_like(best_r)).clamp_min(tol)
            needed = 1 + torch.ceil(torch.log2(radius / tol)).clamp_min(0).long()
            alive = correct & (queries + needed <= n_queries)
            if early_stop:
                alive &= ~(best_r <= eps)
            idx = alive.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            blocks = 2**level
            size = math.ceil(dim / blocks)
            lo_i, hi_i = block * size, min(dim, (block + 1) * size)
            attempt = best_dir[idx].clone()
            attempt[:, lo_i:hi_i] *= -1
            search(idx, attempt)
            block += 1
            if block == blocks or hi_i >= dim:
                level, block = level + 1, 0
                if size == 1:  # every single coordinate has been tried: start over with the whole image
                    level = 0

    x_adv = torch.where(
        torch.isfinite(best_r).view(view),
        (flat + torch.nan_to_num(best_r, posinf=0.0)[:, None] * best_dir).clamp(0, 1).view_as(x),
        x,
    )
    distance = (x_adv - x).flatten(1).abs().amax(1)
    distance = torch.where(torch.isfinite(best_r), distance, best_r)
    distance = torch.where(correct, distance, torch.zeros_like(distance))
    x_adv = torch.where(correct.view(view), x_adv, x)
    return RaySResult(x_adv=x_adv, queries=queries, distance=distance, direction=best_dir.view_as(x))
