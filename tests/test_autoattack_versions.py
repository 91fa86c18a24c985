"""AutoAttack's ``plus`` and ``rand`` versions and their components (APGD-DLR, untargeted FAB, APGD with EOT), and the
l_1 APGD (the official standard version's), against the authors' code (``pyautoattack``), on a small fixed model of
3x8x8 images.

Components started at the clean point (no random start on either side) must fool the same points; the whole
versions, whose random starts differ (the official draws a start on the faces of the l_inf ball from the global
RNG, fastrobust a uniform one from its generator), must reach the same robust accuracy within one point of 24.
"""

from __future__ import annotations

from importlib import import_module

import pytest
import torch
from torch import nn

from fastrobust.attacks import apgd, apgd_ce, apgd_dlr, autoattack, fab_untargeted, pgd
from fastrobust.attacks.autoattack import EOT_SAMPLES, VERSIONS, version_settings
from fastrobust.attacks.official import (
    OFFICIAL_VERSIONS,
    official_apgd_flags,
    official_available,
    official_package,
    official_runner,
    run_official,
)
from fastrobust.attacks.toolkit import project_l1_box
from fastrobust.core.values import check_eps, check_eps_fits
from fastrobust.errors import ConfigError
from fastrobust.evaluate import evaluate

pytestmark = pytest.mark.skipif(
    not official_available(), reason="the official AutoAttack (pip install pyautoattack) is not installed")

EPS = 0.02  # about a third of the 24 points stay robust on this model
N_ITER = 20  # components: fewer iterations than AutoAttack's 100, the same on both sides


@pytest.fixture(scope="module")
def small():
    """A fixed (seeded) MLP on 3x8x8 images, 24 points; 4 of them misclassified from the start."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.rand(24, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:4] = (y[:4] + 1) % 10
    return model, x, y


def _fooled(model, x_adv, y):
    with torch.no_grad():
        return model(x_adv).argmax(1) != y


def test_versions_run_the_officials_attacks_with_its_settings(small):
    model = small[0]
    for version in ("plus", "rand"):
        assert VERSIONS[version] == OFFICIAL_VERSIONS[version]
        runner = official_runner(model, eps=EPS, version=version)
        assert tuple(runner.attacks_to_run) == VERSIONS[version]
        ce = version_settings(version, "apgd-ce")
        assert (ce["n_iter"], ce["n_restarts"], ce.get("eot_iter", 1)) == (
            runner.apgd.n_iter, runner.apgd.n_restarts, runner.apgd.eot_iter)
        assert version_settings(version, "apgd-dlr") == ce  # the official's one APGD object runs both losses
    plus = official_runner(model, eps=EPS, version="plus")
    assert version_settings("plus", "fab")["n_restarts"] == plus.fab.n_restarts == 5
    assert version_settings("plus", "fab-t")["n_restarts"] == 1  # the official sets 1 before it runs FAB-T
    assert version_settings("plus", "apgd-t")["n_targets"] == plus.apgd_targeted.n_target_classes
    assert version_settings("plus", "square")["n_queries"] == plus.square.n_queries
    assert version_settings("rand", "apgd-ce")["eot_iter"] == EOT_SAMPLES == 20


def test_apgd_dlr_and_eot_fool_the_officials_points(small):
    """Started at x: APGD-DLR, and APGD-CE with 20 EOT samples on a deterministic model (the mean of 20 equal
    gradients has their signs, so the l_inf trajectory is the plain one), point for point."""
    model, x, y = small
    correct = ~_fooled(model, x, y)
    x, y = x[correct], y[correct]
    official = official_apgd_flags(model, x, y, eps=EPS, loss="dlr", n_iter=N_ITER)
    ours = _fooled(model, apgd_dlr(model, x, y, eps=EPS, n_iter=N_ITER, random_init=False), y)
    assert torch.equal(ours, official)
    assert 0 < int(official.sum()) < len(y)  # the comparison decides something
    base = import_module(f"{official_package().__name__}.autopgd_base")
    attack = base.APGDAttack(model, n_iter=N_ITER, norm="Linf", eps=EPS, seed=0, loss="ce", eot_iter=EOT_SAMPLES)
    attack.init_hyperparam(x)
    _, robust, _, _ = attack.attack_single_run(x, y, x_init=x.clone())
    ours = _fooled(model, apgd_ce(model, x, y, eps=EPS, n_iter=N_ITER, eot_iter=EOT_SAMPLES, random_init=False), y)
    assert torch.equal(ours, ~robust.bool())


@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", 0.3)])
def test_untargeted_fab_fools_the_officials_points(small, norm, eps):
    model, x, y = small
    correct = ~_fooled(model, x, y)
    x, y = x[correct], y[correct]
    module = import_module(f"{official_package().__name__}.fab_pt")
    attack = module.FABAttack_PT(model, norm={"linf": "Linf", "l2": "L2"}[norm], n_restarts=1, n_iter=N_ITER,
                                 eps=eps, seed=0, targeted=False, device=x.device)
    with torch.no_grad():
        adv = attack.attack_single_run(x, y, use_rand_start=False, is_targeted=False)
    distance = (adv - x).flatten(1).abs().amax(1) if norm == "linf" else (adv - x).flatten(1).norm(dim=1)
    official = _fooled(model, adv, y) & (distance <= eps)
    x_adv = fab_untargeted(model, x, y, eps=eps, norm=norm, n_iter=N_ITER)
    ours = _fooled(model, x_adv, y)
    assert torch.equal(ours, official)
    assert 0 < int(official.sum()) < len(y)
    ours_distance = (x_adv - x).flatten(1).abs().amax(1) if norm == "linf" else (x_adv - x).flatten(1).norm(dim=1)
    assert (ours_distance[ours] <= eps + 1e-6).all()


def test_versions_record_their_settings(small):
    model, x, y = small
    options = {name: {"n_iter": 5} for name in ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t")}
    options["square"] = {"n_queries": 50}
    plus = autoattack(model, x, y, eps=EPS, version="plus", options=options, return_details=True,
                      generator=torch.Generator().manual_seed(0))
    assert list(plus.settings) == list(VERSIONS["plus"])
    assert plus.settings["fab"]["n_restarts"] == 5 and plus.settings["apgd-dlr"]["n_restarts"] == 5
    assert torch.equal(plus.robust, ~_fooled(model, plus.x_adv, y))
    assert (plus.x_adv - x).abs().max() <= EPS + 1e-6
    rand = autoattack(model, x, y, eps=EPS, version="rand", options={"apgd-ce": {"n_iter": 5},
                      "apgd-dlr": {"n_iter": 5}}, return_details=True)
    assert {name: s["eot_iter"] for name, s in rand.settings.items()} == {"apgd-ce": 20, "apgd-dlr": 20}


@pytest.mark.slow
def test_whole_versions_have_the_officials_robust_accuracy(small):
    """The versions as defined (100 iterations, every restart and target): the same robust accuracy within one
    point of 24 (the random starts differ)."""
    model, x, y = small
    for version in ("plus", "rand"):
        official = ~_fooled(model, run_official(model, x, y, eps=EPS, version=version, seed=0), y)
        ours = autoattack(model, x, y, eps=EPS, version=version, return_details=True,
                          generator=torch.Generator().manual_seed(0))
        assert torch.equal(ours.robust, ~_fooled(model, ours.x_adv, y))
        assert int((ours.robust != official).sum()) <= 1, (version, ours.robust.tolist(), official.tolist())
        assert 0 < int(official.sum()) < len(y)


# ------------------------------------------------------------------------------------------------ l_1
L1_EPS = 1.0  # on 3x8x8 images (192 values); 12 is CIFAR-10's (3x32x32)


def test_l1_projection_is_the_officials(small):
    base = import_module(f"{official_package().__name__}.autopgd_base")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 8, 8, generator=gen)
    for scale in (0.01, 0.3, 3.0):
        delta = scale * torch.randn(32, 3, 8, 8, generator=gen)
        for eps in (0.5, 4.0):
            ours = project_l1_box(delta, x, eps)
            theirs = delta + base.L1_projection(x, delta, eps)
            assert torch.allclose(ours, theirs, atol=1e-4), (scale, eps)  # theirs sums in float32
            assert (ours.flatten(1).abs().sum(1) <= eps * (1 + 1e-6)).all()
            assert ((x + ours) >= 0).all() and ((x + ours) <= 1).all()


def test_l1_settings_are_the_officials(small):
    runner = official_runner(small[0], eps=L1_EPS, norm="l1")
    ce, t = version_settings("standard", "apgd-ce", "l1"), version_settings("standard", "apgd-t", "l1")
    assert (ce["n_restarts"], ce["large_eps"]) == (runner.apgd.n_restarts, runner.apgd.use_largereps) == (5, True)
    assert (t["n_targets"], t["large_eps"]) == (runner.apgd_targeted.n_target_classes, True) and t["n_targets"] == 5


@pytest.mark.filterwarnings("ignore:there are .* points with zero gradient")  # the official's own pre-check
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_l1_apgd_fools_the_officials_points(small, loss):
    """Started at x: point for point. From the large-eps start drawn from the same normal numbers: within one point
    of 24 (the authors' projection leaves float residues that their L0 sparsity counts; see apgd._apgd_l1_rows)."""
    model, x, y = small
    base = import_module(f"{official_package().__name__}.autopgd_base")
    official = official_apgd_flags(model, x, y, eps=L1_EPS, loss=loss, n_iter=N_ITER, norm="l1")
    ours = _fooled(model, apgd(model, x, y, eps=L1_EPS, norm="l1", loss=loss, n_iter=N_ITER, random_init=False), y)
    assert torch.equal(ours, official)
    attack = base.APGDAttack(model, n_iter=N_ITER, norm="L1", eps=L1_EPS, seed=0, loss=loss, use_largereps=True)
    attack.init_hyperparam(x)
    torch.manual_seed(3)  # the official draws its start from the global generator
    _, robust, _, _ = attack.decr_eps_pgd(x, y, [3 * L1_EPS, 2 * L1_EPS, L1_EPS], [6, 6, 8])
    x_adv = apgd(model, x, y, eps=L1_EPS, norm="l1", loss=loss, n_iter=N_ITER, large_eps=True,
                 generator=torch.Generator().manual_seed(3))
    assert int((_fooled(model, x_adv, y) != ~robust.bool()).sum()) <= 1
    assert 0 < int((~robust.bool()).sum()) < len(y)
    assert (x_adv - x).abs().flatten(1).sum(1).max() <= L1_EPS * (1 + 1e-5)


def test_l1_autoattack_apgd_has_the_officials_points(small):
    """AutoAttack's l_1 APGD-CE (5 restarts from the large-eps start, 100 iterations; its restarts draw the same
    numbers on both sides here) and APGD-T (5 targets; drawn differently): within one point of 24 (the same points
    on this model)."""
    model, x, y = small
    for name in ("apgd-ce", "apgd-t"):
        official = ~_fooled(model, run_official(model, x, y, eps=L1_EPS, norm="l1", seed=0, attacks=[name]), y)
        ours = autoattack(model, x, y, eps=L1_EPS, norm="l1", attacks=(name,), return_details=True,
                          generator=torch.Generator().manual_seed(0))
        differ = int((ours.robust != official).sum())
        assert differ <= 1, (name, ours.robust.tolist(), official.tolist())
        assert 0 < int(official.sum()) < len(y)


def test_l1_is_refused_where_it_does_not_run(small):
    model, x, y = small
    with pytest.raises(ConfigError, match=r"autoattack \(fab-t\): norm='l1'.*autoattack-fast"):
        autoattack(model, x, y, eps=L1_EPS, norm="l1")
    with pytest.raises(ConfigError, match="pgd: norm='l1' is not supported here"):
        pgd(model, x, y, eps=L1_EPS, norm="l1")
    with pytest.raises(ConfigError, match="'pgd20' has no l1 version"):
        evaluate(model, (x, y), ["pgd20"], eps=L1_EPS, norm="l1", progress=False)
    with pytest.raises(ConfigError, match="usual CIFAR-10 budget"):
        check_eps(-1, norm="l1")
    with pytest.raises(ConfigError, match="l1 diameter"):
        check_eps_fits(200.0, "l1", (3, 8, 8))


def test_evaluate_runs_l1_with_the_officials_settings(small):
    model, x, y = small
    record = evaluate(model, (x, y), ["apgd-ce", "autoattack-fast"], eps=L1_EPS, norm="l1", progress=False,
                      attack_options={"autoattack-fast": {"apgd-ce": {"n_iter": 10}, "apgd-t": {"n_iter": 10}},
                                      "apgd-ce": {"n_iter": 10}})
    options = record["attacks"]["autoattack-fast"]["settings"]["options"]
    assert options["apgd-ce"]["n_restarts"] == 5 and options["apgd-ce"]["large_eps"] is True
    assert options["apgd-t"]["n_targets"] == 5
    assert record["norm"] == "l1" and 0 < record["robust"] < record["clean_correct"]
