"""Square Attack (Andriushchenko et al., ECCV 2020), l_inf, l_2 and l_1: a score-based random search, no gradients.

l_inf start: vertical stripes, ``x + eps * s`` with one random sign per (channel, column). Each later query
(iteration ``i = 0, 1, ...``) changes one random square window of side ``s = round(sqrt(p * H * W))`` to
``x + eps * (random sign per channel)`` and keeps it when the margin loss ``f_y - max_{j != y} f_j``
decreases. As in the authors' code the window and the signs of an iteration are shared by the whole batch
(one draw per iteration, so a point's search does not depend on which other points are still active).
A point stops (and saves queries) once misclassified.

The fraction ``p`` follows the published schedule: ``p_init`` halved after iterations 10, 50, 200, 500,
1000, 2000, 4000, 6000 and 8000. ``rescale_schedule=True`` (the default of standalone ``square``, as the
authors' ``SquareAttack`` class) stretches it to the budget (``i * 10000 / n_queries``: it was written for
10,000 queries); ``False`` uses the iterations as they are, which is what AutoAttack does (its Square runs
5,000 queries with ``resc_schedule=False``: halvings at 10, 50, 200, 500, 1000, 2000 and 4000), so
``autoattack`` passes ``False``.

Differences from the authors' code, none of which weakens the attack: ``n_queries`` counts the start too
(the reference makes ``1 + n_queries``), and the window corner is uniform over all ``H - s + 1`` positions
(the reference never draws the last one). As there, a window that changes nothing is not drawn again.

l2 (paper, Alg. 3 and appendix): a grid of squares holding the pattern eta with random signs, then per
query the perturbation mass of two random windows moved into the first with a fresh signed eta; see
``_square_l2``.

l_1 (the authors' code, the official standard l_1 AutoAttack's Square): the same scheme with l_1 masses, a pattern
whose rings weigh ``1 / (k + 1)^4`` and, instead of a rescaling, the exact projection onto the l_1 ball within
[0, 1] after every change; see ``_square_l1``.
Only forward passes under ``torch.no_grad`` are used, so the model is never differentiated.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastrobust.attacks._engine import Execution, Rows, execution_for, forward_context
from fastrobust.attacks.toolkit import cw_margin, draw, model_mode, project_l1_box
from fastrobust.core.contract import entry_point
from fastrobust.core.precision import no_tf32
from fastrobust.core.values import NORMS
from fastrobust.errors import ConfigError

_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256))


def p_selection(p_init: float, it: int, n_queries: int, rescale: bool = True) -> float:
    """The share of pixels changed at iteration ``it`` (0 = the first query after the start); with
    ``rescale`` the schedule, written for 10,000 queries, is stretched to ``n_queries``."""
    if rescale:
        it = int(it / n_queries * 10000)
    for bound, divisor in _SCHEDULE:
        if it <= bound:
            return p_init / divisor
    return p_init / 512


def window_side(p: float, c: int, h: int, w: int) -> int:
    """Side of the square window changing a share ``p`` of the pixels (at least 1, at most the image)."""
    return min(max(int(round(math.sqrt(p * c * h * w / c))), 1), min(h, w))


def _margin(execution: Execution, x: Tensor, y: Tensor) -> Tensor:
    with forward_context(execution):
        logits = execution.for_queries(x)
    return -cw_margin(logits.float(), y)  # f_y - max_{j != y} f_j: <= 0 when misclassified


def _fp32_margins(ex: Execution, x_best: Tensor, y: Tensor, margin: Tensor, rows: Tensor) -> None:
    """Recompute ``margin[rows]`` with the model itself in fp32, TF32 off (in place): a point stops only on a
    misclassification the model confirms, and one the query model got wrong keeps its true margin."""
    if len(rows):
        with torch.no_grad(), no_tf32():
            margin[rows] = -cw_margin(ex.model(x_best[rows]).float(), y[rows])


def _keep_improvements(execution: Execution, candidate: Tensor, y: Tensor, active: Tensor, live: Tensor,
                       x_best: Tensor, margin: Tensor, queries: Tensor) -> None:
    """One query for the ``live`` rows of ``active`` (distinct points): keep each candidate that lowers its margin
    (updates in place, no host synchronisation)."""
    new_margin = _margin(execution, candidate, y[active])
    queries[active] += live.long()
    better = (new_margin < margin[active]) & live
    x_best[active] = torch.where(better.view(-1, 1, 1, 1), candidate, x_best[active])
    margin[active] = torch.where(better, new_margin, margin[active])


def _signs(shape, generator, device) -> Tensor:
    return draw(torch.randint, 0, 2, shape, generator=generator, device=device).float() * 2 - 1


@entry_point("square", gradients=False, norms=NORMS)
def square(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    n_queries: int = 5000,
    p_init: float = 0.8,
    eval_mode: bool = True,
    return_queries: bool = False,
    generator: torch.Generator | None = None,
    rescale_schedule: bool = True,
    precision: str = "fp32",
) -> Tensor | tuple[Tensor, Tensor]:
    """Square Attack (Andriushchenko et al. 2020); returns ``x_adv`` (and the queries used with ``return_queries``).

    A score-based random search with forward passes only (no gradients, so ``torch.inference_mode()`` is
    allowed): each query changes one random square window and is kept when the margin loss decreases; a point
    stops once misclassified (see the module docstring). ``n_queries`` is the budget per example, the start
    included. ``rescale_schedule`` stretches the p schedule to the budget (default True, the authors'
    ``SquareAttack`` default; AutoAttack uses False).
    ``precision``: as in ``apgd`` (fp32 by default; with bf16 a point stops only once an fp32 forward
    confirms it is misclassified).

    Args:
        model: the classifier, images in [0, 1] -> logits ``[B, C]``.
        x: images ``[B, C, H, W]``, float in [0, 1] (pixel units).
        y: true labels ``[B]``, any integer dtype, in [0, C).
        eps: the budget in [0, 1] pixel units (l_inf in (0, 1], l_2 / l_1 a positive radius); text such as
            ``"8/255"`` is parsed. Required.
        norm: ``"linf"`` (default), ``"l2"`` or ``"l1"``.
        n_queries: model queries per example, the start included (default 5000, AutoAttack's).
        p_init: the initial share of pixels changed per query, in (0, 1] (default 0.8, AutoAttack's).
        eval_mode: run the model in eval mode (default True); its previous mode is restored.
        return_queries: also return the queries used per example (default False).
        generator: the ``torch.Generator`` of the windows and signs (default None: the global RNG).
        rescale_schedule: stretch the p schedule, written for 10,000 queries, to ``n_queries`` (default True).
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"auto"``, as in ``apgd``.
    Returns:
        ``x_adv`` shaped like ``x``; with ``return_queries`` the pair ``(x_adv, queries)``, ``queries`` an int64
        ``[B]`` tensor.
    Raises:
        ConfigError: from the ``entry_point`` input contract (``core/contract.py``): images not float in
            [0, 1], labels not in [0, C), a bad ``norm``, ``eps`` or setting (checked once by
            ``core/attack_options.check_options``);
            also ``n_queries`` below 1, ``p_init`` outside (0, 1] or images that are not 4-d; each message names
            the value and the fix.
    Example:
        >>> x_adv = square(model, x, y, eps=8 / 255, n_queries=5000)
    """
    if n_queries < 1:
        raise ConfigError(f"n_queries={n_queries} must be at least 1")
    if not 0 < p_init <= 1:
        raise ConfigError(f"p_init={p_init} must be in (0, 1]")
    if x.dim() != 4:
        raise ConfigError(f"the Square attack needs images [B, C, H, W]; got shape {tuple(x.shape)}")
    x = x.detach()
    ex = execution_for(model, precision, x.device)
    with model_mode(model, training=not eval_mode), torch.no_grad():
        search = {"linf": _square_linf, "l2": _square_l2, "l1": _square_l1}[norm]
        x_best, queries = search(ex, x, y, eps, n_queries, p_init, generator, rescale_schedule)
    return (x_best, queries) if return_queries else x_best


def _draws(n_iter: int, p_init: float, n_queries: int, rescale: bool, c: int, h: int, w: int,
           generator: torch.Generator | None, device: torch.device) -> tuple[list[tuple[int, int, int]], Tensor]:
    """Every iteration's window (side, top, left) and signs [n_iter, C], one draw per iteration for the batch."""
    corners = draw(torch.rand, (n_iter, 2), generator=generator, device=device).tolist()
    signs = _signs((n_iter, c), generator, device)
    windows = []
    for i, (u, v) in enumerate(corners):
        side = window_side(p_selection(p_init, i, n_queries, rescale), c, h, w)
        windows.append((side, min(int(u * (h - side + 1)), h - side), min(int(v * (w - side + 1)), w - side)))
    return windows, signs


# Below this many active points a query batch is too small to use the hardware well, so the search evaluates
# the next few iterations' candidates of every point in one batch ("speculation"), see _square_linf. The CPU
# value is measured (tinycnn, 7 points left, one thread: Square 4.9 s without, 3.5 s at 24 rows, 2.7 s at 64,
# 3.5 s at 192); the CUDA one is a guess for a GPU's appetite for rows, to be measured.
SPECULATE_BELOW = {"cpu": 64, "cuda": 512}
MAX_DEPTH = 16


def speculation_depth(active: int, device: torch.device) -> int:
    """How many iterations ahead each active point's candidates are evaluated in one batch (1: none)."""
    return max(1, min(MAX_DEPTH, SPECULATE_BELOW.get(device.type, 0) // max(active, 1)))


def _square_linf(ex, x, y, eps, n_queries, p_init, generator, rescale):
    """The l_inf search on a compact working batch, points leaving once misclassified.

    While many points are active, all of them are at the same iteration: each query writes its window into
    the batch in place, runs one forward and puts back the old window where the margin did not improve
    (window-sized work besides the forward). Once few are left (``speculation_depth``), each point runs
    ahead on its own: its candidates for its next ``k`` iterations (each its best point with that
    iteration's window) go into one batch, and it takes the first that improves, advancing past it, or all
    ``k`` when none does. That is exactly the sequential search (a candidate after an improvement would have
    been built from the improved point, so those are discarded), with fewer, larger batches.
    """
    b, c, h, w = x.shape
    # the batch's draws first, so that they do not depend on the batch size
    windows, signs = _draws(n_queries - 1, p_init, n_queries, rescale, c, h, w, generator, x.device)
    n_iter = len(windows)
    x_best = (x + eps * _signs((b, c, 1, w), generator, x.device)).clamp(0, 1)
    margin = _margin(ex, x_best, y)
    queries = torch.ones(b, dtype=torch.long, device=x.device)
    signs = eps * signs.view(-1, c, 1, 1)
    rows = Rows(b, x.device, check_every=ex.check_every)
    s = {"x": x, "xb": x_best.clone(), "y": y, "margin": margin, "queries": queries,
         "it": torch.zeros(b, dtype=torch.long, device=x.device)}

    def settle(s: dict[str, Tensor], final: bool = False) -> dict[str, Tensor]:
        if ex.approximate:  # stop only on a misclassification the model confirms
            _fp32_margins(ex, s["xb"], s["y"], s["margin"], (s["margin"] <= 0).nonzero().squeeze(1))
        done = s["margin"] <= 0
        done = done | (s["it"] >= n_iter) if not final else torch.ones_like(done)
        done, kept = rows.split(done)
        if len(done) == 0:
            return s
        pos = rows.positions[done]
        x_best[pos] = s["xb"].index_select(0, done)
        queries[pos] = s["queries"][done]
        return rows.keep(kept, s)

    s = settle(s)
    i = 0
    while i < n_iter and not rows.empty and speculation_depth(len(rows.positions), x.device) == 1:
        side, top, left = windows[i]
        xb = s["xb"]
        window = (slice(None), slice(None), slice(top, top + side), slice(left, left + side))
        old = xb[window].clone()
        new = (s["x"][window] + signs[i]).clamp(0, 1)
        xb[window] = new
        new_margin = _margin(ex, xb, s["y"])
        live = s["margin"] > 0
        better = (new_margin < s["margin"]) & live
        xb[window] = torch.where(better.view(-1, 1, 1, 1), new, old)
        s["margin"] = torch.where(better, new_margin, s["margin"])
        s["queries"] = s["queries"] + live.long()
        i += 1
        s["it"] = torch.full_like(s["it"], i)
        if rows.check_now(i - 1) or i == n_iter:
            s = settle(s)
    s = settle(s)  # (on CUDA the in-place phase settles every few iterations only)
    if not rows.empty:
        s = _speculate(ex, s, rows, settle, windows, signs, (c, h, w))
    if not rows.empty:
        settle(s, final=True)
    return x_best, queries


def _speculate(ex, s, rows, settle, windows, signs, shape) -> dict[str, Tensor]:
    """The few-points phase of _square_linf: every point at its own iteration ``s["it"]``."""
    c, h, w = shape
    device = s["x"].device
    n_iter = len(windows)
    side_t, top_t, left_t = torch.tensor(windows, dtype=torch.long, device=device).unbind(1)
    grid_h, grid_w = torch.arange(h, device=device), torch.arange(w, device=device)
    while not rows.empty:
        m = len(rows.positions)
        k = speculation_depth(m, device)
        its = s["it"][None, :] + torch.arange(k, device=device)[:, None]  # [k, m]
        valid = its < n_iter
        its = its.clamp(max=n_iter - 1)
        side, top, left = side_t[its][..., None], top_t[its][..., None], left_t[its][..., None]
        in_rows = (grid_h >= top) & (grid_h < top + side)  # [k, m, H]
        in_cols = (grid_w >= left) & (grid_w < left + side)  # [k, m, W]
        window = (in_rows[..., :, None] & in_cols[..., None, :]).unsqueeze(2)  # [k, m, 1, H, W]
        candidates = torch.where(window, (s["x"][None] + signs[its]).clamp(0, 1), s["xb"][None])
        margins = _margin(ex, candidates.view(k * m, c, h, w), s["y"].repeat(k)).view(k, m)
        better = (margins < s["margin"][None, :]) & valid
        improved = better.any(0)
        first = torch.where(improved, better.float().argmax(0), torch.full_like(s["it"], k))
        pick, column = first.clamp(max=k - 1), torch.arange(m, device=device)  # no host synchronisation
        s["xb"] = torch.where(improved.view(-1, 1, 1, 1), candidates[pick, column], s["xb"])
        s["margin"] = torch.where(improved, margins[pick, column], s["margin"])
        steps = torch.where(improved, first + 1, valid.sum(0))
        s["queries"] = s["queries"] + steps
        s["it"] = s["it"] + steps
        s = settle(s)
    return s


RING_POWER = {"l2": 2, "l1": 4}  # ring k of the window pattern weighs 1 / (k + 1)^power (the authors' choice)


def _unit(t: Tensor, norm: str) -> Tensor:
    """``t`` divided by its l_2 or l_1 norm (over all of it)."""
    size = t.norm() if norm == "l2" else t.abs().sum()
    return t / size.clamp_min(1e-12)


def _rings(rows: int, cols: int, device, norm: str = "l2") -> Tensor:
    """Concentric rectangles around the centre ``(rows // 2, cols // 2)``: ring ``k`` (Chebyshev distance ``k``)
    gets ``sum_{j >= k} 1 / (j + 1)^q`` over the ``K = max(rows, cols) // 2 + 1`` rings (``q``: 2 for l_2, 4 for
    l_1); unit norm in ``norm``."""
    if rows == 0 or cols == 0:
        return torch.zeros(rows, cols, device=device)
    n_rings = max(rows // 2, cols // 2) + 1
    weights = 1.0 / torch.arange(1, n_rings + 1, device=device, dtype=torch.float32) ** RING_POWER[norm]
    tail = weights.flip(0).cumsum(0).flip(0)  # tail[k] = sum_{j >= k} weights[j]
    dr = (torch.arange(rows, device=device) - rows // 2).abs()[:, None]
    dc = (torch.arange(cols, device=device) - cols // 2).abs()[None, :]
    return _unit(tail[torch.maximum(dr, dc)], norm)


def _eta(s: int, device, norm: str = "l2") -> Tensor:
    """The paper's window pattern eta (s x s): ring pattern on the top half, the negated ring pattern on the
    bottom half, unit norm in ``norm`` (l_2 or l_1; the caller transposes it at random)."""
    top = s // 2
    pattern = torch.cat([_rings(top, s, device, norm), -_rings(s - top, s, device, norm)], dim=0)
    return _unit(pattern, norm)


def _eta_batch(m: int, s: int, generator, device) -> Tensor:
    """``m`` copies of eta [m, s, s], each transposed with probability 1/2."""
    eta = _eta(s, device)
    flip = draw(torch.rand, m, generator=generator, device=device) < 0.5
    return torch.where(flip[:, None, None], eta.t()[None], eta[None])


def _paste(patterns: Tensor, top: Tensor, left: Tensor, h: int, w: int) -> Tensor:
    """Place pattern ``k`` [s, s] at ``(top[k], left[k])`` of an otherwise zero [m, 1, H, W] image."""
    m, s, _ = patterns.shape
    rows = torch.arange(h, device=patterns.device)[None, :] - top[:, None]  # [m, H]
    cols = torch.arange(w, device=patterns.device)[None, :] - left[:, None]  # [m, W]
    inside = ((rows >= 0) & (rows < s))[:, :, None] & ((cols >= 0) & (cols < s))[:, None, :]
    picked = patterns[torch.arange(m, device=patterns.device)[:, None, None],
                      rows.clamp(0, s - 1)[:, :, None], cols.clamp(0, s - 1)[:, None, :]]
    return (picked * inside)[:, None]


def _corners(m: int, h: int, w: int, s: int, generator, device) -> tuple[Tensor, Tensor]:
    top = draw(torch.randint, 0, h - s + 1, (m,), generator=generator, device=device)
    left = draw(torch.randint, 0, w - s + 1, (m,), generator=generator, device=device)
    return top, left


def _still_searching(ex: Execution, x_best: Tensor, y: Tensor, margin: Tensor, confirmed: Tensor) -> tuple[Tensor, Tensor]:
    """At a check: the rows still searching (margin > 0) and the rows confirmed fooled. Under an approximate
    (bf16) model a new misclassification is confirmed first by the model itself in fp32 (``margin`` is updated in
    place), so a search stops only on a misclassification the model confirms."""
    if ex.approximate:
        _fp32_margins(ex, x_best, y, margin, ((margin <= 0) & ~confirmed).nonzero().squeeze(1))
        confirmed = margin <= 0
    return (margin > 0).nonzero().squeeze(1), confirmed


def _l2_init(x: Tensor, eps: float, generator) -> Tensor:
    """The l_2 start: a centred grid of squares of side ``min(H, W) // 5`` (at least 1), each filled with eta
    (random transpose) times a random sign per (example, channel), rescaled to ``||delta||_2 = eps``, clipped."""
    b, c, h, w = x.shape
    side = max(min(h, w) // 5, 1)
    delta = torch.zeros_like(x)
    offset_h, offset_w = max(h - 5 * side, 0) // 2, max(w - 5 * side, 0) // 2
    for i in range(offset_h, h - side + 1, side):
        for j in range(offset_w, w - side + 1, side):
            pattern = _eta_batch(b, side, generator, x.device)[:, None]  # [b, 1, side, side]
            delta[:, :, i : i + side, j : j + side] = pattern * _signs((b, c, 1, 1), generator, x.device)
    delta = eps * delta / delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (x + delta).clamp(0, 1)


def _square_l2(ex, x, y, eps, n_queries, p_init, generator, rescale):
    """The l_2 Square attack (Andriushchenko et al. 2020, Alg. 3 and its appendix).

    Each query picks two random windows W1, W2 of side ``s`` (odd, at least 3, from the p schedule) per
    example. Per channel, the new content of W1 is ``eta * sign + delta_W1 / ||delta_W1||``, rescaled to norm
    ``sqrt(max(eps^2 - ||delta||^2, 0) / C + ||delta_{W1 u W2}||^2)``: the mass of both windows plus the budget
    that clipping left unused moves into W1; W2 is zeroed (W1 is written after). The whole perturbation is
    rescaled to ``||delta||_2 = eps``, the image clipped to [0, 1], and the candidate kept only when the
    margin loss decreases.

    The points still searching are looked up every ``ex.check_every`` queries (each a host synchronisation);
    in between, a point that became misclassified makes no more queries and changes nothing.
    """
    b, c, h, w = x.shape
    x_best = _l2_init(x, eps, generator)
    margin = _margin(ex, x_best, y)
    queries = torch.ones(b, dtype=torch.long, device=x.device)
    confirmed = torch.zeros(b, dtype=torch.bool, device=x.device)  # fooled, as the model itself in fp32 says
    for it in range(1, n_queries):
        if (it - 1) % ex.check_every == 0:
            active, confirmed = _still_searching(ex, x_best, y, margin, confirmed)
            if len(active) == 0:
                break
        live = margin[active] > 0
        m = len(active)
        xa, xb = x[active], x_best[active]
        d = xb - xa
        p = p_selection(p_init, it - 1, n_queries, rescale)
        s = _odd_window_side(p, h, w)
        top1, left1 = _corners(m, h, w, s, generator, x.device)
        top2, left2 = _corners(m, h, w, s, generator, x.device)
        ones = torch.ones(m, s, s, device=x.device)
        w1 = _paste(ones, top1, left1, h, w) > 0  # [m, 1, H, W]
        w2 = _paste(ones, top2, left2, h, w) > 0

        def norm_hw(t: Tensor) -> Tensor:  # per (example, channel) [m, C, 1, 1]
            return t.pow(2).sum(dim=(2, 3), keepdim=True).sqrt()

        norm_w1 = norm_hw(d * w1)
        norm_union = norm_hw(d * (w1 | w2))
        norm_image = norm_hw(d)
        eta = _paste(_eta_batch(m, s, generator, x.device), top1, left1, h, w)
        new_w1 = eta * _signs((m, c, 1, 1), generator, x.device) + d * w1 / (norm_w1 + 1e-10)
        target = ((eps**2 - norm_image.pow(2)).clamp_min(0) / c + norm_union.pow(2)).sqrt()
        new_w1 = new_w1 / norm_hw(new_w1).clamp_min(1e-12) * target
        cand = torch.where(w2, torch.zeros_like(d), d)
        cand = torch.where(w1, new_w1, cand)
        cand = eps * cand / cand.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        candidate = (xa + cand).clamp(0, 1)
        _keep_improvements(ex, candidate, y, active, live, x_best, margin, queries)
    return x_best, queries


def _odd_window_side(p: float, h: int, w: int) -> int:
    """The side of the l_2 / l_1 windows for the share ``p``: odd, at least 3, at most the image."""
    s = max(round(math.sqrt(p * h * w)), 3)
    if s % 2 == 0:
        s += 1
    return min(s, min(h, w))


def _l1_init(x: Tensor, generator) -> Tensor:
    """The l_1 start's perturbation, before its projection: a centred grid of squares of side ``min(H, W) // 5`` (at
    least 1), each the l_1 pattern eta (transposed at random, one draw per square for the batch, as the authors')
    times a random sign per (example, channel)."""
    b, c, h, w = x.shape
    side = max(min(h, w) // 5, 1)
    delta = torch.zeros_like(x)
    offset_h, offset_w = max(h - 5 * side, 0) // 2, max(w - 5 * side, 0) // 2
    corners = [(i, j) for i in range(offset_h, h - side + 1, side) for j in range(offset_w, w - side + 1, side)]
    # the orientations at once (one host transfer), then each square's signs
    flips = draw(torch.rand, len(corners), generator=generator, device=torch.device("cpu")).tolist()
    eta = _eta(side, x.device, "l1")
    for (i, j), flip in zip(corners, flips):
        pattern = eta.t() if flip < 0.5 else eta
        delta[:, :, i : i + side, j : j + side] = pattern * _signs((b, c, 1, 1), generator, x.device)
    return delta


def _l1_windows(n_iter: int, p_init: float, n_queries: int, rescale: bool, h: int, w: int,
                generator) -> list[tuple[int, int, int, int, int, bool]]:
    """Every iteration's two windows and pattern orientation, shared by the batch (as the authors' l_1 code):
    ``(side, top1, left1, top2, left2, transposed)``, drawn at once (one host transfer for the whole run). The
    corners are uniform over all ``H - s + 1`` positions (the reference never draws the last one)."""
    u = draw(torch.rand, (n_iter, 5), generator=generator, device=torch.device("cpu")).tolist()
    out = []
    for i, (*corners, flip) in enumerate(u):
        s = _odd_window_side(p_selection(p_init, i, n_queries, rescale), h, w)
        top1, left1, top2, left2 = (min(int(v * (n - s + 1)), n - s) for v, n in zip(corners, (h, w, h, w)))
        out.append((s, top1, left1, top2, left2, flip < 0.5))
    return out


def _square_l1(ex, x, y, eps, n_queries, p_init, generator, rescale):
    """The l_1 Square attack, as the authors' code (the official standard l_1 AutoAttack) defines it.

    Start: ``_l1_init`` projected onto the l_1 ball of radius ``eps (1 - 1e-6)`` within [0, 1]
    (``project_l1_box``; the reference's radius, a hair inside so float rounding never leaves the ball). Each query
    takes two windows W1, W2 of side ``s`` (odd, at least 3, from the p schedule) and the pattern eta, shared by the
    batch, and a random sign per (example, channel). Per channel, the new content of W1 is
    ``eta * sign + delta_W1 / ||delta_W1||_1``, rescaled to l_1 mass
    ``C * (max(eps - ||delta||_1, 0) / C + ||delta_{W1 u W2}||_1)`` (the reference's formula, the factor C
    included): the mass of both windows plus the unused budget moves into W1; W2 is zeroed (W1 written after).
    The perturbation is projected onto the ball within [0, 1] again and the candidate kept only when the margin loss
    decreases. A point stops once misclassified (looked up every ``ex.check_every`` queries, as ``_square_l2``).
    """
    b, c, h, w = x.shape
    radius = eps * (1 - 1e-6)
    x_best = (x + project_l1_box(_l1_init(x, generator), x, radius)).clamp(0, 1)
    margin = _margin(ex, x_best, y)
    queries = torch.ones(b, dtype=torch.long, device=x.device)
    confirmed = torch.zeros(b, dtype=torch.bool, device=x.device)  # fooled, as the model itself in fp32 says
    patterns: dict[tuple[int, bool], Tensor] = {}
    windows = _l1_windows(n_queries - 1, p_init, n_queries, rescale, h, w, generator)
    for it, (s, top1, left1, top2, left2, transposed) in enumerate(windows):
        if it % ex.check_every == 0:
            active, confirmed = _still_searching(ex, x_best, y, margin, confirmed)
            if len(active) == 0:
                break
        # drawn for every point, so that no point's search depends on which others are still searching
        signs = _signs((b, c, 1, 1), generator, x.device)[active]
        live = margin[active] > 0
        xa = x[active]
        d = x_best[active] - xa
        w1 = (slice(None), slice(None), slice(top1, top1 + s), slice(left1, left1 + s))
        w2 = (slice(None), slice(None), slice(top2, top2 + s), slice(left2, left2 + s))
        union = torch.zeros(h, w, dtype=torch.bool, device=x.device)
        union[w1[2:]] = True
        union[w2[2:]] = True
        mass_w1 = d[w1].abs().sum(dim=(2, 3), keepdim=True)  # [m, C, 1, 1]
        mass_union = (d.abs() * union).sum(dim=(2, 3), keepdim=True)
        mass_image = d.abs().flatten(1).sum(1).view(-1, 1, 1, 1)
        key = (s, transposed)
        if key not in patterns:
            eta = _eta(s, x.device, "l1")
            patterns[key] = eta.t() if transposed else eta
        new_w1 = patterns[key] * signs + d[w1] / (mass_w1 + 1e-12)
        new_w1 = new_w1 / (new_w1.abs().sum(dim=(2, 3), keepdim=True) + 1e-12) * (
            (eps - mass_image).clamp_min(0) / c + mass_union) * c
        cand = d.clone()
        cand[w2] = 0
        cand[w1] = new_w1
        candidate = (xa + project_l1_box(cand, xa, radius)).clamp(0, 1)
        _keep_improvements(ex, candidate, y, active, live, x_best, margin, queries)
    return x_best, queries
