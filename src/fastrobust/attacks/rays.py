"""RayS (Chen & Gu, KDD 2020): hard-label ray search for the l_inf decision boundary, no gradients.

The search space is the set of sign directions ``s in {-1, +1}^d``; along a ray the point at radius ``r`` is
``clip(x + r s, 0, 1)``, and the boundary distance of ``s`` is the smallest ``r`` at which the prediction (argmax
only; non-finite logits never count as the label ``y``) differs from ``y``. Starting from ``s = +1``, the
coordinates (in flattened order) are split hierarchically into 1, 2, 4, ... blocks; each block's sign is
flipped in turn, the first trial flipping the whole image (as the authors' code). A flip is tested with one
query at the current best radius (at ``r = 1``, the box corner, while no boundary is known); only a flip that
is adversarial there gets a binary search for its (smaller) boundary distance, and it is kept when that is
strictly smaller. After the single-coordinate level the blocks start over at the whole image.

Precision: each binary search stops when its bracket is ``tol`` wide in l_inf. The default
``tol = 1e-3 / sqrt(d)`` is the authors' (uclaml/RayS: tolerance 1e-3 on the radius along the l2-normalised
sign vector ``s / sqrt(d)``), 1.8e-5 for 3x32x32 images.

Budget: every example keeps its own count of queries; a trial starts only when its binary search can finish
within ``n_queries`` (so every distance is tight to ``tol``; a few queries may stay unused), and with
``early_stop`` an example stops once its distance is within ``eps``.

Batching: every example runs its own sequence of trials (its own block counter and binary search) and each
step sends the next query of every example still searching through the model as one batch, so no example
waits for another's binary search. Per example the queries, distance and direction are exactly those of
running it alone. Which examples are still searching is looked up (one host synchronisation) before every
query on the CPU and every ``CUDA_CHECK_EVERY`` queries on CUDA; an example that stops in between is still
sent through the model until the next look-up but changes nothing, so the results do not depend on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastrobust.attacks._engine import check_every
from fastrobust.attacks.toolkit import model_mode
from fastrobust.core.contract import entry_point, predicts
from fastrobust.errors import ConfigError


def official_tol(dim: int) -> float:
    """The authors' binary-search precision in l_inf units for images of ``dim`` values: 1e-3 / sqrt(dim)."""
    return 1e-3 / math.sqrt(dim)


@dataclass
class RaySResult:
    x_adv: Tensor       # the boundary point found (outside the eps-ball where the point resisted); x where none
    queries: Tensor     # int64 [B]: label queries spent per example (0 for points misclassified at the start)
    distance: Tensor    # float [B]: l_inf distance ||x_adv - x|| to the boundary along the best ray (inf: none found)
    direction: Tensor   # the best sign direction (+-1) per example

    def robust(self, eps: float) -> Tensor:
        """Per example: True where no adversarial was found within ``eps`` (distance > eps)."""
        return self.distance > eps

    def official_distance(self, x: Tensor) -> Tensor:
        """Per example, the distance the authors' RayS reports (their ADBD averages it over all test points):
        ``distance`` where a boundary was found, 0 for points misclassified at the start, and where no boundary
        was found the l_inf distance to the box corner ``clip(x + s)`` along the final direction ``s`` (their
        ``x_final = clip(x + inf * s)``)."""
        corner = ((x + self.direction).clamp(0, 1) - x).flatten(1).abs().amax(1)
        return torch.where(torch.isfinite(self.distance), self.distance, corner)

    def within(self, x: Tensor, eps: float) -> Tensor:
        """The adversarial points that lie within ``eps``, and ``x`` elsewhere (for evaluation)."""
        keep = (self.distance <= eps).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(keep, self.x_adv, x)


@entry_point("rays", gradients=False)
def rays(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | None = None,
    norm: str = "linf",
    n_queries: int = 10000,
    tol: float | None = None,
    early_stop: bool = False,
    eval_mode: bool = True,
    generator: torch.Generator | None = None,
) -> RaySResult:
    """Run RayS (Chen & Gu 2020), a hard-label l_inf ray search, on a batch ``x`` with labels ``y``.

    Only predicted labels are queried (no gradients, so ``torch.inference_mode()`` is allowed). ``eps`` is needed
    only for ``early_stop``; robust accuracy at any eps is ``distance > eps`` over the correctly classified
    points. ``tol``: the l_inf precision of each binary search (default ``official_tol(d)``, the authors' 1e-3
    along the l2-normalised direction). ``n_queries``: the per-example budget (10,000 as in the RayS paper's
    tables; the leaderboard uses 40,000). ``generator`` is unused (RayS is deterministic).

    Args:
        model: the classifier, images in [0, 1] -> logits ``[B, C]``.
        x: images ``[B, ...]`` (e.g. ``[B, C, H, W]``), float in [0, 1] (pixel units).
        y: true labels ``[B]``, any integer dtype, in [0, C).
        eps: the l_inf budget in [0, 1] pixel units; text such as ``"8/255"`` is parsed. Default None; needed only
            with ``early_stop``.
        norm: ``"linf"`` only (default).
        n_queries: label queries per example (default 10000).
        tol: the binary search's l_inf precision in (0, 1) (default None: ``official_tol(d)``, 1.8e-5 for 3x32x32).
        early_stop: stop an example once its distance is within ``eps`` (default False).
        eval_mode: run the model in eval mode (default True); its previous mode is restored.
        generator: unused (default None).
    Returns:
        A ``RaySResult``: ``x_adv`` (the boundary point found; ``x`` where none), ``queries`` (int64 ``[B]``),
        ``distance`` (l_inf, ``inf`` where none was found, 0 for points misclassified at the start) and
        ``direction``; ``result.within(x, eps)`` gives the adversarials within ``eps``.
    Raises:
        ConfigError: from the ``entry_point`` input contract (``core/contract.py``): images not float in
            [0, 1], labels not in [0, C), a bad ``norm``, ``eps`` or setting (checked once by
            ``core/attack_options.check_options``);
            also ``norm`` other than ``linf``, ``early_stop`` without ``eps``, ``n_queries`` below 1 or ``tol``
            outside (0, 1); each message names the value and the fix.
    Example:
        >>> result = rays(model, x, y, n_queries=10000)
        >>> robust = result.robust(8 / 255)
    """
    if norm != "linf":
        raise ConfigError(f"norm={norm!r}: RayS searches l_inf sign directions only; use norm='linf'")
    if early_stop and eps is None:
        raise ConfigError("early_stop=True needs eps (stop once the boundary is within eps)")
    if n_queries < 1:
        raise ConfigError(f"n_queries={n_queries} must be at least 1")
    x = x.detach()
    batch = len(x)
    flat = x.flatten(1)
    dim = flat.shape[1]
    tol = official_tol(dim) if tol is None else tol
    if not 0 < tol < 1:
        raise ConfigError(f"tol={tol} must be in (0, 1)")
    device = x.device
    positions = torch.arange(dim, device=device)
    queries = torch.zeros(batch, dtype=torch.long, device=device)
    best_r = torch.full((batch,), float("inf"), device=device)
    best_dir = torch.ones_like(flat)
    # the trial in progress, per example: its block, direction, and bracket [lo, hi] (hi is adversarial once
    # ``searching``; before that, the radius at which the flip is tested)
    level = torch.zeros(batch, dtype=torch.long, device=device)
    block = torch.zeros(batch, dtype=torch.long, device=device)
    attempt = _flip_block(best_dir, level, block, positions)
    lo = torch.zeros(batch, device=device)
    hi = torch.ones(batch, device=device)
    searching = torch.zeros(batch, dtype=torch.bool, device=device)

    every = check_every(device.type)
    with model_mode(model, training=not eval_mode), torch.no_grad():
        correct = predicts(model(x), y)
        alive = correct & (queries + _queries_needed(hi, tol) <= n_queries)
        step = 0
        while True:
            if step % every == 0:  # look up who is still searching: the loop's only host synchronisation
                idx = alive.nonzero().squeeze(1)
                if len(idx) == 0:
                    break
                whole = len(idx) == batch  # the common case: no gather or scatter of the [B, d] tensors
                rows = slice(None) if whole else idx
            step += 1
            live = alive[rows]  # an example that stopped since the last look-up changes nothing below
            hi_i, lo_i, best_i = hi[rows], lo[rows], best_r[rows]
            testing = ~searching[rows]
            r = torch.where(testing, hi_i, (lo_i + hi_i) / 2)
            attempt_i, best_dir_i = attempt[rows], best_dir[rows]
            point = torch.addcmul(flat[rows], r[:, None], attempt_i).clamp_(0, 1).view(-1, *x.shape[1:])
            adv = ~predicts(model(point), y[rows])
            spent = queries[rows] + live.long()
            new_hi = torch.where(adv, r, hi_i)
            new_lo = torch.where(testing | adv, lo_i, r)
            in_search = ~testing | adv  # a bisection step, or a test that opened one
            still = in_search & (new_hi - new_lo > tol) & (spent < n_queries)
            better = in_search & ~still & (new_hi < best_i) & live
            best_i = torch.where(better, new_hi, best_i)
            best_dir_i = torch.where(better[:, None], attempt_i, best_dir_i)
            # the examples whose trial ended start their next one: the next block, flipped in the best direction
            done = ~still & live
            level_i, block_i = _next_block(level[rows], block[rows], dim)
            level_i, block_i = torch.where(done, level_i, level[rows]), torch.where(done, block_i, block[rows])
            attempt_i = torch.where(done[:, None], _flip_block(best_dir_i, level_i, block_i, positions), attempt_i)
            start = torch.where(torch.isfinite(best_i), best_i, torch.ones_like(best_i))
            go = spent + _queries_needed(start, tol) <= n_queries
            if early_stop:
                go &= ~(best_i <= eps)
            queries[rows], best_r[rows], best_dir[rows], attempt[rows] = spent, best_i, best_dir_i, attempt_i
            level[rows], block[rows] = level_i, block_i
            hi[rows] = torch.where(done, start, torch.where(live, new_hi, hi_i))
            lo[rows] = torch.where(done, torch.zeros_like(lo_i), torch.where(live, new_lo, lo_i))
            searching[rows] = torch.where(live, still, searching[rows])
            alive[rows] = torch.where(done, go, alive[rows])

    view = (-1,) + (1,) * (x.dim() - 1)
    found = torch.isfinite(best_r)
    x_adv = torch.where(
        found.view(view),
        (flat + torch.nan_to_num(best_r, posinf=0.0)[:, None] * best_dir).clamp(0, 1).view_as(x),
        x,
    )
    distance = (x_adv - x).flatten(1).abs().amax(1)
    distance = torch.where(found, distance, best_r)
    distance = torch.where(correct, distance, torch.zeros_like(distance))
    x_adv = torch.where(correct.view(view), x_adv, x)
    return RaySResult(x_adv=x_adv, queries=queries, distance=distance, direction=best_dir.view_as(x))


def _queries_needed(radius: Tensor, tol: float) -> Tensor:
    """Queries of a trial at ``radius``: one test, then the bisections that shrink the bracket to ``tol``."""
    return 1 + torch.ceil(torch.log2(radius.clamp_min(tol) / tol)).clamp_min(0).long()


def _block_bounds(level: Tensor, block: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """(start, end, size) of block ``block`` when the ``dim`` coordinates are cut into ``2**level`` blocks."""
    blocks = torch.pow(2, level)
    size = (dim + blocks - 1) // blocks
    start = block * size
    return start, torch.clamp(start + size, max=dim), size


def _next_block(level: Tensor, block: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """The block after ``(level, block)``: the next one of the level, else the first of the next level (after
    the single-coordinate level, the whole image again)."""
    _, end, size = _block_bounds(level, block, dim)
    block = block + 1
    level_done = (block == torch.pow(2, level)) | (end >= dim)
    next_level = torch.where(size == 1, torch.zeros_like(level), level + 1)
    return torch.where(level_done, next_level, level), torch.where(level_done, torch.zeros_like(block), block)


def _flip_block(directions: Tensor, level: Tensor, block: Tensor, positions: Tensor) -> Tensor:
    """``directions`` [n, d] with each row's block ``(level, block)`` negated."""
    start, end, _ = _block_bounds(level, block, positions.numel())
    inside = (positions >= start[:, None]) & (positions < end[:, None])
    return torch.where(inside, -directions, directions)
