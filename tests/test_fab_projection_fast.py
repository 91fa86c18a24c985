"""FAB's faster projection (rows that settled leave the Newton search; fewer passes) gives the same numbers, bit for
bit, as the plain formulation: every row stepped NEWTON_STEPS times, fresh buffers, ``max |v_i|`` from ``|v|``."""

import pytest
import torch

from fastrobust.attacks import fab as fab_module
from fastrobust.attacks.fab import _flat_norm, _hyperplane_t_newton, _hyperplane_t_sorted, project_hyperplane_box

# the plain Newton: every row stepped NEWTON_STEPS times, NaN where the last step still moved (the library's own
# sync-free path, used on CUDA, not a copy of it: a copy would only check itself)
plain_t = fab_module._hyperplane_t_newton_all


def plain_projection(p, w, c, norm):
    """The l_inf / l_2 projection written plainly (fresh buffers, no in-place steps), with ``plain_t`` and the sorted
    solution where it is NaN."""
    sign_c = torch.where(c < 0, -1.0, 1.0)
    w = w * sign_c[:, None]
    c = c.abs()
    a, direction = w.abs(), torch.sign(w)
    cap = (p + direction.clamp(min=0) * (1 - 2 * p)).clamp(min=0)
    brk, slope = (cap, a) if norm == "linf" else (cap / a.clamp_min(1e-30), a * a)
    const = a * cap
    feasible = const.sum(1) >= c
    t = plain_t(brk, slope, const, c, feasible)
    t = torch.where(feasible & torch.isnan(t), _hyperplane_t_sorted(brk, slope, const, c), t)
    t = torch.where(feasible, t, torch.full_like(t, float("inf")))
    mag = torch.minimum(t[:, None].expand_as(cap), cap) if norm == "linf" else torch.minimum(t[:, None] * a, cap)
    return direction * mag


def hard_rows(seed: int, rows: int = 300, dim: int = 3 * 8 * 8):
    """Image-like rows with the edge cases: pixels on the 1/255 grid and at 0 and 1, zero weights (whole rows
    too), c = 0, c beyond the box corner (infeasible), tiny and huge weights."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(0, 256, (rows, dim), generator=g).float() / 255
    p[:, :8] = 0.0
    p[:, 8:16] = 1.0
    w = torch.randn(rows, dim, generator=g) * torch.logspace(-6, 2, rows)[:, None]
    w = w * (torch.rand(rows, dim, generator=g) < 0.8)
    w[:5] = 0.0
    w[5:10, :4] = fab_module._FINITE_SLOPE
    c = torch.randn(rows, generator=g) * torch.logspace(-4, 1, rows)
    c[10:15] = 0.0
    c[15:20] = 1e6  # beyond the corner
    return p, w, c


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("steps", [1, 2, 12])
def test_projection_is_bit_identical_to_the_plain_one(monkeypatch, seed, norm, steps):
    monkeypatch.setattr(fab_module, "NEWTON_STEPS", steps)  # 1, 2: rows left unsettled, sorted instead
    p, w, c = hard_rows(seed)
    fast = project_hyperplane_box(p, w, c, norm, sync_free=False)
    plain = plain_projection(p, w, c, norm)
    assert fast.isnan().sum() < fast.numel() // 10  # NaN: l_2 rows of zero weights that cannot reach c, as before
    torch.testing.assert_close(fast, plain, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(project_hyperplane_box(p, w, c, norm, sync_free=True), plain, rtol=0, atol=0,
                               equal_nan=True)


@pytest.mark.parametrize("steps", [1, 2, 3, 12])
def test_newton_stepping_only_moving_rows_gives_the_same_t_and_nans(monkeypatch, steps):
    monkeypatch.setattr(fab_module, "NEWTON_STEPS", steps)
    p, w, c = hard_rows(2)
    a, cap = w.abs(), torch.where(w > 0, 1 - p, p)
    feasible = (a * cap).sum(1) >= c.abs()
    fast = _hyperplane_t_newton(cap, a, a * cap, c.abs(), feasible)
    plain = plain_t(cap, a, a * cap, c.abs(), feasible)
    assert torch.equal(fast[feasible].isnan(), plain[feasible].isnan())
    settled = feasible & ~plain.isnan()
    assert settled.sum() > 0
    assert torch.equal(fast[settled], plain[settled])
    if steps == 1:
        assert plain[feasible].isnan().any()  # the NaN path is exercised


def test_linf_norm_from_max_and_min_equals_max_abs():
    v = torch.randn(50, 30)
    v[0] = 0.0
    v[1] = -3.0
    v[2, 5] = float("nan")
    v[3, 7] = float("-inf")
    expected = v.abs().amax(dim=1)
    got = _flat_norm(v, "linf")
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got[~got.isnan()], expected[~expected.isnan()])
