"""Models whose logits have no autograd path to the input (bit-depth reduction, ``x.detach()`` or a ``no_grad``
input transform, logits without a ``grad_fn``): every gradient an attack, evaluation, sanity check or training
method takes counts the missing input gradient as zero (``fastrobust.core.gradients.grad_or_zeros``).

Before, each of these entry points died inside ``torch.autograd.grad`` ("differentiated Tensor ... not used in
the graph", "element 0 of tensors does not require grad"), and ``fastrobust eval --sanity``, whose ``gradients``
check exists for such models, exited 1 with a traceback and lost the record.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from fastrobust import methods
from fastrobust.attacks import apgd_ce, apgd_t, autoattack, fab_t, fgsm, pgd
from fastrobust.cli import main
from fastrobust.evaluate import evaluate
from fastrobust.core.gradients import grad_or_zeros
from fastrobust.core.precision import AttackPrecision, attack_gradients, attack_precision
from fastrobust.evaluate.sanity import sanity_checks

from helpers import write_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")
C = 5


class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, C))


class Plain(Body):
    """The same network with its input gradient (the control)."""

    def forward(self, x):
        return self.net(x)


class Binarized(Body):
    """Bit-depth reduction before the classifier: the classic gradient-masking defence."""

    def forward(self, x):
        return self.net((x > 0.5).float())


class Detached(Body):
    def forward(self, x):
        return self.net(x.detach() * 2 - 1)


class NoGradTransform(Body):
    def forward(self, x):
        with torch.no_grad():
            x = x * 2 - 1
        return self.net(x)


class NoGradFn(Body):
    """Logits without any grad_fn (the loss does not require grad at all)."""

    def forward(self, x):
        with torch.no_grad():
            return self.net(x)


MODELS = (Binarized, Detached, NoGradTransform, NoGradFn)
EPS = 0.1
ATTACKS = {
    "fgsm": lambda m, x, y: fgsm(m, x, y, eps=EPS),
    "pgd": lambda m, x, y: pgd(m, x, y, eps=EPS, steps=3),
    "pgd-l2": lambda m, x, y: pgd(m, x, y, eps=EPS, steps=3, norm="l2"),
    "apgd-ce": lambda m, x, y: apgd_ce(m, x, y, eps=EPS, n_iter=4),
    "apgd-t": lambda m, x, y: apgd_t(m, x, y, eps=EPS, n_iter=4, n_targets=2),
    "fab-t": lambda m, x, y: fab_t(m, x, y, eps=EPS, n_iter=4, n_targets=2),
    "fab-t-l2": lambda m, x, y: fab_t(m, x, y, eps=EPS, n_iter=4, n_targets=2, norm="l2"),
}
AA_OPTIONS = {"apgd-ce": {"n_iter": 4}, "apgd-t": {"n_iter": 4, "n_targets": 2},
              "fab-t": {"n_iter": 4, "n_targets": 2}, "square": {"n_queries": 30}}


def batch(cls, n: int = 12):
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def assert_valid(x_adv, x, eps, norm="linf"):
    assert x_adv.shape == x.shape and bool(torch.isfinite(x_adv).all())
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    distance = (x_adv - x).abs().amax() if norm == "linf" else (x_adv - x).flatten(1).norm(dim=1).amax()
    assert float(distance) <= eps + 1e-6


def test_grad_or_zeros_gives_zeros_for_unused_inputs_and_the_gradient_otherwise():
    x = torch.rand(2, 3, requires_grad=True)
    w = torch.rand(3, requires_grad=True)
    (gx, gw) = grad_or_zeros((w * 2).sum(), [x, w])  # x unused
    assert torch.equal(gx, torch.zeros_like(x)) and torch.equal(gw, torch.full((3,), 2.0))
    (gx,) = grad_or_zeros((x > 0.5).float().sum(), [x])  # no grad_fn at all
    assert torch.equal(gx, torch.zeros_like(x))
    (gx,) = grad_or_zeros((x ** 2).sum(), [x])
    assert torch.allclose(gx, 2 * x)
    assert x.grad is None and w.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attack_gradients_under_every_attack_precision_give_zeros(dtype):
    """The fp16 policy's loss-scaled backward goes through the logits first: both steps count 'unused' as 0."""
    model, x, y = batch(Binarized, 4)
    policy = AttackPrecision("cpu", None if dtype == torch.float32 else dtype)
    xr = x.clone().requires_grad_(True)
    with attack_precision(policy), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        logits = model(xr).float()
    loss = torch.nn.functional.cross_entropy(logits, y)
    with attack_precision(policy):
        (grad,) = attack_gradients(loss, logits, [xr])
    assert torch.equal(grad.float(), torch.zeros_like(x))


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_every_gradient_attack_runs_and_stays_in_the_ball(cls):
    model, x, y = batch(cls)
    for name, attack in ATTACKS.items():
        x_adv = attack(model, x, y)
        assert_valid(x_adv, x, EPS, "l2" if name.endswith("l2") else "linf")
        assert all(p.grad is None for p in model.parameters()) and not model.training
    assert torch.equal(fgsm(model, x, y, eps=EPS), x)  # a zero gradient: FGSM (no random start) does not move
    for freeze in (None, False):  # the default (frozen copies on the CPU) and the model itself
        result = autoattack(model, x, y, eps=EPS, options=AA_OPTIONS, freeze=freeze, return_details=True,
                            generator=torch.Generator().manual_seed(0))
        assert_valid(result.x_adv, x, EPS)
        with torch.no_grad():
            assert torch.equal(result.robust, model(result.x_adv).argmax(1) == y)


def test_frozen_copies_are_equal_in_behaviour_or_refused_with_a_note():
    """A trace keeps bit-depth reduction (the copy's gradient is zero too: copies used) but drops a detach or a
    no_grad block (the copy would have a gradient the model lacks: refused, the note says why)."""
    for cls, used in ((Binarized, True), (Detached, False), (NoGradTransform, False), (NoGradFn, False)):
        model, x, y = batch(cls)
        notes = autoattack(model, x, y, eps=1e-4, options=AA_OPTIONS, return_details=True,
                           attacks=("apgd-ce", "apgd-t")).notes
        if used:
            assert any(n.startswith("frozen TorchScript") for n in notes), notes
        else:
            assert any("the model's input gradient is zero" in n for n in notes), notes


@pytest.mark.parametrize("cls", (Binarized, NoGradFn), ids=lambda c: c.__name__)
def test_evaluate_scores_gradient_and_gradient_free_attacks(cls):
    model, x, y = batch(cls, 16)
    record = evaluate(model, (x, y), ["fgsm", "pgd20", "apgd-ce", "square"], eps=EPS, progress=False,
                      attack_options={"apgd-ce": {"n_iter": 4}, "square": {"n_queries": 50}})
    assert record["clean_acc"] == 1.0
    assert record["attacks"]["fgsm"]["robust_acc"] == 1.0  # no gradient, no FGSM step
    assert all(0.0 <= entry["robust_acc"] <= 1.0 for entry in record["attacks"].values())


def test_sanity_checks_flag_the_missing_gradient():
    model, x, y = batch(Binarized, 16)
    flags = {f["name"]: f for f in sanity_checks(model, (x, y), eps=EPS, n=16, square_queries=30, rays_queries=60,
                                                 apgd_iter=4)}
    assert not flags["gradients"]["passed"]
    assert flags["gradients"]["detail"].startswith("100.00% of points have an all-zero")


@pytest.mark.parametrize("name", ["pgd_at", "trades", "fast_at", "fast_at_2step", "fast_at_plus", "fast_trades",
                                  "backward_smoothing", "backward_smoothing_at", "slat"])
def test_training_methods_attack_such_a_model(name):
    """The methods' own attacks (through input_gradient or attack_gradients) take a zero input gradient."""
    model, x, y = batch(Binarized)
    method = methods.create(name, **({"latent_modules": "net.0"} if name == "slat" else {}))
    model.train()
    loss, _ = method(model, x, y)
    assert bool(torch.isfinite(loss)) and loss.requires_grad  # the network's own gradient is intact
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("cls", (Binarized, NoGradFn), ids=lambda c: c.__name__)
def test_the_official_autoattack_sees_a_zero_gradient_too(cls):
    """The authors' code calls torch.autograd.grad without allow_unused; the model it gets adds an exact zero
    computed from x, so it runs (and warns about zero gradients, its own flag for such models)."""
    from fastrobust.attacks.official import official_apgd_flags, official_available, run_official

    if not official_available():
        pytest.skip("pyautoattack is not installed")
    model, x, y = batch(cls)
    x_adv = run_official(model, x, y, eps=EPS, attacks=["apgd-ce"])
    assert_valid(x_adv, x, EPS)
    assert not bool(official_apgd_flags(model, x, y, eps=EPS, n_iter=3).any())  # from x, a zero step stays at x


@pytest.mark.parametrize("cls", (Binarized, NoGradFn), ids=lambda c: c.__name__)
def test_input_hessian_of_such_a_model_is_zero(cls):
    """The curvature analysis (fastrobust analyze) differentiates twice: both derivatives are zero."""
    from fastrobust.analysis.hessian import input_hessian_eigenvalues

    model, x, y = batch(cls, 4)
    values = input_hessian_eigenvalues(model, x, y, eps=EPS, iterations=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(values, torch.zeros(4))


FACTORY = '''
import torch
from torch import nn


class Binarized(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, num_classes))

    def forward(self, x):
        return self.net((x > 0.5).float())


def binarized(num_classes=10):
    return Binarized(num_classes)
'''


def test_cli_sanity_on_such_a_model_prints_the_record_and_exits_3(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_models.py").write_text(textwrap.dedent(FACTORY))
    write_image_folder(tmp_path / "images", ["c0", "c1", "c2"], {"train": 2, "test": 4})
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).state_dict(), tmp_path / "net.pt")
    state = torch.load(tmp_path / "net.pt", weights_only=True)
    torch.save({f"net.{k}": v for k, v in state.items()}, tmp_path / "net.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTROBUST_CACHE", str(tmp_path / "cache"))
    code = main(["eval", "--checkpoint", "net.pt", "--model-factory", "my_models.py:binarized", "--dataset",
                 "imagefolder", "--data-root", "images", "--device", "cpu", "--eps", "0.1", "--attack", "pgd20",
                 "--quiet", "--sanity"])
    out, err = capsys.readouterr()
    assert code == 3, err
    assert "Traceback" not in err and "sanity check(s) failed:" in err and "gradients" in err
    assert "pgd20" in out and "sanity FAIL gradients: 100.00% of points have an all-zero" in out


def test_evaluate_warns_when_the_gradient_attacks_cannot_move_the_points():
    """robust = clean with no word: the record now says the gradients are zero (the official AutoAttack warns too)."""
    for model, x, y, warned in (*batch(Binarized, 32), True), (*batch(Plain, 32), False):
        record = evaluate(model, (x, y), ["pgd20"], eps=8 / 255, progress=False)
        said = [w for w in record["warnings"] if "32 of the first 32 points have an all-zero input gradient" in w]
        assert bool(said) == warned
        assert evaluate(model, (x, y), ["square"], eps=8 / 255, progress=False,
                        attack_options={"square": {"n_queries": 5}})["warnings"] == []  # no gradients asked for
