"""Square Attack (Andriushchenko et al., ECCV 2020), l_inf: a score-based random search, no gradients.

Start: vertical stripes, ``x + eps * s`` with one random sign per (channel, column). Each query
changes one random square window of side ``s = round(sqrt(p * H * W))`` to ``x + eps * (random sign
per channel)`` and keeps it when the margin loss ``f_y - max_{j != y} f_j`` decreases. The fraction ``p``
follows the published schedule (``p_init`` halved at 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000
of 10,000 iterations, rescaled to the query budget). A point stops (and saves queries) once misclassified.
Only forward passes under ``torch.no_grad`` are used, so the model is never differentiated.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..numbers import check_eps
from ._common import check_norm, cw_margin, model_mode

_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256))


def p_selection(p_init: float, it: int, n_queries: int) -> float:
    """The share of pixels changed at iteration ``it`` (the schedule is written for 10,000 queries)."""
    it = int(it / n_queries * 10000)
    for bound, divisor in _SCHEDULE:
        if it <= bound:
            return p_init / divisor
    return p_init / 512


def _margin(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return -cw_margin(model(x).float(), y)  # f_y - max_{j != y} f_j: <= 0 when misclassified


def _signs(shape, generator, device) -> Tensor:
    return torch.randint(0, 2, shape, generator=generator, device=device).float() * 2 - 1


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
) -> Tensor | tuple[Tensor, Tensor]:
    """Square attack; returns ``x_adv`` (and the queries used per example with ``return_queries``)."""
    eps = check_eps(eps)
    norm = check_norm(norm)
    if n_queries < 1:
        raise ConfigError(f"n_queries={n_queries} must be at least 1")
    if not 0 < p_init <= 1:
        raise ConfigError(f"p_init={p_init} must be in (0, 1]")
    if x.dim() != 4:
        raise ConfigError(f"the Square attack needs images [B, C, H, W]; got shape {tuple(x.shape)}")
    x = x.detach()
    with model_mode(model, training=not eval_mode), torch.no_grad():
        if norm == "linf":
            x_best, queries = _square_linf(model, x, y, eps, n_queries, p_init, generator)
        else:
            x_best, queries = _square_l2(model, x, y, eps, n_queries, p_init, generator)
    return (x_best, queries) if return_queries else x_best


def _windows(batch: int, h: int, w: int, s: int, generator, device) -> Tensor:
    """A boolean mask [B, 1, H, W] with one random s x s window per example."""
    vh = torch.randint(0, h - s + 1, (batch,), generator=generator, device=device)
    vw = torch.randint(0, w - s + 1, (batch,), generator=generator, device=device)
    rows = torch.arange(h, device=device)[None, :]
    cols = torch.arange(w, device=device)[None, :]
    mh = (rows >= vh[:, None]) & (rows < vh[:, None] + s)
    mw = (cols >= vw[:, None]) & (cols < vw[:, None] + s)
    return (mh[:, :, None] & mw[:, None, :])[:, None]


def _square_linf(model, x, y, eps, n_queries, p_init, generator):
    b, c, h, w = x.shape
    x_best = (x + eps * _signs((b, c, 1, w), generator, x.device)).clamp(0, 1)
    margin = _margin(model, x_best, y)
    queries = torch.ones(b, dtype=torch.long, device=x.device)
    for it in range(1, n_queries):
        active = (margin > 0).nonzero().squeeze(1)
        if len(active) == 0:
            break
        xa, xb = x[active], x_best[active]
        p = p_selection(p_init, it, n_queries)
        s = min(max(int(round(math.sqrt(p * h * w))), 1), min(h, w) - 1) if min(h, w) > 1 else 1
        mask = _windows(len(active), h, w, s, generator, x.device)
        vals = eps * _signs((len(active), c, 1, 1), generator, x.device)
        candidate = torch.where(mask, (xa + vals).clamp(0, 1), xb)
        # a window that changes nothing (e.g. clipped pixels) gets one fresh draw of signs
        same = ((candidate - xb).abs().flatten(1).amax(1) < 1e-7)
        if same.any():
            vals2 = eps * _signs((len(active), c, 1, 1), generator, x.device)
            candidate2 = torch.where(mask, (xa + vals2).clamp(0, 1), xb)
            candidate = torch.where(same.view(-1, 1, 1, 1), candidate2, candidate)
        new_margin = _margin(model, candidate, y[active])
        queries[active] += 1
        better = new_margin < margin[active]
        idx = active[better]
        x_best[idx] = candidate[better]
        margin[idx] = new_margin[better]
    return x_best, queries


def _square_l2(model, x, y, eps, n_queries, p_init, generator):
    """The l_2 variant: a start of ``eps``-scaled centred squares, then each query redistributes the
    perturbation of one window onto a new window with a centred-square pattern (paper, Alg. 3)."""
    b, c, h, w = x.shape
    n = min(h, w)
    delta = torch.zeros_like(x)
    side = max(n // 5, 1)
    for i in range(0, h, side):
        for j in range(0, w, side):
            hh, ww = min(side, h - i), min(side, w - j)
            pattern = _meta_square(hh, ww, x.device) * _signs((b, c, 1, 1), generator, x.device)
            delta[:, :, i : i + hh, j : j + ww] = pattern
    delta = eps * delta / delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    x_best = (x + delta).clamp(0, 1)
    margin = _margin(model, x_best, y)
    queries = torch.ones(b, dtype=torch.long, device=x.device)
    for it in range(1, n_queries):
        active = (margin > 0).nonzero().squeeze(1)
        if len(active) == 0:
            break
        xa, xb = x[active], x_best[active]
        d = xb - xa
        m = len(active)
        p = p_selection(p_init, it, n_queries)
        s = min(max(int(round(math.sqrt(p * h * w))), 3), n - 1) if n > 3 else 1
        if s % 2 == 0:
            s += 1 if s + 1 <= n - 1 else -1
        w1 = _windows(m, h, w, s, generator, x.device)
        w2 = _windows(m, h, w, s, generator, x.device)
        union = w1 | w2
        norm_w1 = (d * w1).pow(2).sum(dim=(2, 3), keepdim=True).sqrt()
        norm_rest = (d * ~union).pow(2).flatten(1).sum(1).view(-1, 1, 1, 1)
        # budget left for the new window: what the old window and the rest leave of eps^2
        budget = (eps**2 - norm_rest).clamp_min(0).sqrt()
        pattern = torch.zeros_like(d)
        rows = w2.float().squeeze(1).any(dim=2).float().argmax(1)
        cols = w2.float().squeeze(1).any(dim=1).float().argmax(1)
        base = _meta_square(s, s, x.device)
        for k in range(m):  # paste one centred pattern per example (s x s, cheap)
            r, q = int(rows[k]), int(cols[k])
            pattern[k, :, r : r + s, q : q + s] = base
        signs = _signs((m, c, 1, 1), generator, x.device)
        old_w2 = d * w2
        new_w2 = old_w2 + pattern * signs * torch.maximum(norm_w1, torch.full_like(norm_w1, 1e-12))
        new_w2 = new_w2 / new_w2.pow(2).sum(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12) * budget
        candidate_delta = torch.where(union, torch.zeros_like(d), d) + torch.where(w2, new_w2, torch.zeros_like(d))
        nrm = candidate_delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        candidate_delta = candidate_delta * torch.clamp(eps / nrm, max=1.0)
        candidate = (xa + candidate_delta).clamp(0, 1)
        new_margin = _margin(model, candidate, y[active])
        queries[active] += 1
        better = new_margin < margin[active]
        idx = active[better]
        x_best[idx] = candidate[better]
        margin[idx] = new_margin[better]
    return x_best, queries


def _meta_square(hh: int, ww: int, device) -> Tensor:
    """The centred pattern of the l_2 Square attack: nested rings of weight 1/(r+1)^2, normalised."""
    rows = torch.arange(hh, device=device, dtype=torch.float32)
    cols = torch.arange(ww, device=device, dtype=torch.float32)
    dr = (rows - (hh - 1) / 2).abs()[:, None]
    dc = (cols - (ww - 1) / 2).abs()[None, :]
    ring = torch.maximum(dr, dc).floor()
    pattern = 1.0 / (ring + 1) ** 2
    return pattern / pattern.norm().clamp_min(1e-12)
