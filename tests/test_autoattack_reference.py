"""fastrobust's AutoAttack against the authors' code (``pyautoattack``), on a real CIFAR-10 model and the same points.

The components are compared started identically (at the clean point, no random start, the same target class):
the points each one fools must be the same, and APGD's best loss on the points it does not fool must agree (it
pins the step-size rule, the checkpoints and the restarts from the best point). The whole AutoAttack standard
(random starts on both sides, different random numbers) must give the same robust accuracy within 0.5 point.
The model is the fast_at + SiLU tinycnn that tests/test_sat.py trains too (trained once per session).
"""

from __future__ import annotations

from importlib import import_module

import pytest
import torch

from fastrobust.attacks import apgd, autoattack
from fastrobust.attacks.apgd import _apgd_rows, _loss_fn, ranked_targets
from fastrobust.attacks._engine import execution_for
from fastrobust.attacks.fab import _fab_rows
from fastrobust.attacks.official import (
    official_apgd_flags,
    official_available,
    official_fab_t_flags,
    official_package,
    official_runner,
    run_official,
)
from fastrobust.models.checkpoint import load_model
from helpers import train_tinycnn_once

pytestmark = pytest.mark.skipif(
    not official_available(), reason="the official AutoAttack (pip install pyautoattack) is not installed")

EPS = 8 / 255
N_POINTS = 40        # components: the first 40 (class-balanced) test images, about half of them clean-correct
N_AUTOATTACK = 16    # the whole AutoAttack (5,000 Square queries per robust point on each side): the first 16
TARGETS_CHECKED = 2  # APGD-T / FAB-T runs compared one target at a time (ranks 2 and 3)


@pytest.fixture(scope="module")
def real(cifar_subset, tmp_path_factory, one_thread):
    _, run = train_tinycnn_once(cifar_subset, tmp_path_factory.getbasetemp(), "fast_at", "silu")
    model, _ = load_model(run)
    model.eval()
    x = cifar_subset.test.images[:N_POINTS].float() / 255
    y = cifar_subset.test.labels[:N_POINTS].long()
    with torch.no_grad():
        logits = model(x)
    correct = logits.argmax(1) == y
    return model, x, y, x[correct], y[correct], logits[correct]


def _fooled(model, x_adv, y):
    with torch.no_grad():
        return model(x_adv).argmax(1) != y


def test_apgd_ce_fools_the_same_points_with_the_same_losses(real):
    model, _, _, x, y, logits = real
    official = official_apgd_flags(model, x, y, eps=EPS, loss="ce")
    ours = _fooled(model, apgd(model, x, y, eps=EPS, loss="ce", random_init=False), y)
    assert torch.equal(ours, official)
    assert 0 < int(official.sum()) < len(y)  # the comparison decides something
    # the trajectories themselves: the best loss of every point neither fools, for CE and for the targeted DLR
    # (the reference's step-size rule to the letter; the paper's wording of it drifts by up to 1e-5 here)
    base = import_module(f"{official_package().__name__}.autopgd_base")
    runner_up = ranked_targets(logits, 1)[0]
    for loss, target in (("ce", None), ("dlr-targeted", runner_up)):
        if target is None:
            attack = base.APGDAttack(model, n_iter=100, norm="Linf", eps=EPS, seed=0, loss=loss, device=x.device)
        else:
            attack = base.APGDAttack_targeted(model, n_iter=100, norm="Linf", eps=EPS, seed=0, device=x.device)
            attack.y_target = target
        attack.init_hyperparam(x)
        _, robust, official_loss, _ = attack.attack_single_run(x, y, x_init=x.clone())
        _, our_loss, our_fooled = _apgd_rows(x, y, target, _loss_fn(loss, 10), eps=EPS, norm="linf",
                                             n_iter=100, alpha=0.75, rho=0.75, random_init=False, generator=None,
                                             execution=execution_for(model, "fp32", x.device))
        kept = robust.bool()
        assert torch.equal(our_fooled, ~kept), loss
        assert torch.allclose(our_loss[kept], official_loss[kept], rtol=1e-6, atol=1e-7), loss


def test_square_schedule_is_autoattacks(real):
    """AutoAttack builds its Square with resc_schedule=False; standalone SquareAttack rescales by default."""
    from fastrobust.attacks.autoattack import DEFAULTS
    from fastrobust.attacks.square import p_selection

    model = real[0]
    square_module = import_module(f"{official_package().__name__}.square")
    for rescale in (False, True):
        reference = square_module.SquareAttack(model, p_init=0.8, n_queries=5000, eps=EPS, resc_schedule=rescale)
        ours = [p_selection(0.8, i, 5000, rescale=rescale) for i in range(5000)]
        assert ours == [reference.p_selection(i) for i in range(5000)], rescale
    assert DEFAULTS["square"]["rescale_schedule"] is False
    runner = official_runner(model, eps=EPS)
    assert runner.square.rescale_schedule is False and runner.square.n_queries == DEFAULTS["square"]["n_queries"]


def test_apgd_t_and_fab_t_fool_the_same_points_per_target(real):
    model, _, _, x, y, logits = real
    targets = ranked_targets(logits, TARGETS_CHECKED)
    decided = 0
    for rank, target in enumerate(targets, start=2):
        official = official_apgd_flags(model, x, y, eps=EPS, loss="dlr-targeted", target=target)
        ours = _fooled(model, apgd(model, x, y, eps=EPS, loss="dlr-targeted", y_target=target, random_init=False), y)
        assert torch.equal(ours, official), f"APGD-T target rank {rank}"
        official_fab = official_fab_t_flags(model, x, y, eps=EPS, target_rank=rank)
        # one FAB-T run of AutoAttack's kind (the boundary to the true class, done once misclassified);
        # fab_t(y_target=...) is a targeted run, which crosses the boundary of whichever class is in the way
        ours_fab = _fooled(model, _fab_rows(x, y, target, start=x.clone(), eps=EPS, norm="linf", n_iter=100,
                                            alpha_max=0.1, eta=1.05, beta=0.9,
                                            execution=execution_for(model, "fp32", x.device))[0], y)
        assert torch.equal(ours_fab, official_fab), f"FAB-T target rank {rank}"
        decided += int(official.sum()) + int(official_fab.sum())
    assert decided > 0


def test_autoattack_standard_has_the_official_robust_accuracy(real):
    model, x_all, y_all, _, _, _ = real
    x_all, y_all = x_all[:N_AUTOATTACK], y_all[:N_AUTOATTACK]
    official = ~_fooled(model, run_official(model, x_all, y_all, eps=EPS, seed=0), y_all)
    result = autoattack(model, x_all, y_all, eps=EPS, return_details=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(result.robust, ~_fooled(model, result.x_adv, y_all))
    assert (result.x_adv - x_all).abs().max() <= EPS + 1e-6
    n = len(y_all)
    ours, theirs = int(result.robust.sum()), int(official.sum())
    assert abs(ours - theirs) / n <= 0.005, (ours, theirs)
    assert 0 < theirs < n
