"""One input contract at every public entry point (issue 13, kinds 1-4).

Every public attack, every method loss (and SPROUT's train_step), evaluate, pgd_accuracy,
clean_and_robust_counts and sanity_checks get the same bad inputs and must refuse each with one ConfigError
line naming the value, what was expected and the fix; integer labels of any dtype and (where documented) uint8
images work; values are checked once per outermost call (one host sync), never per step; eps is checked in
the units of its norm; bf16 models are evaluated in their own dtype.
"""

from __future__ import annotations

import contextlib

from collections import OrderedDict

import pytest
import torch
from torch import nn

from fastrobust import methods
from fastrobust.attacks.autoattack import official_available
from fastrobust.attacks import apgd, apgd_ce, apgd_t, autoattack, autoattack_official, fab_t, fgsm, pgd, rays, square
from fastrobust.errors import ConfigError
from fastrobust.evaluate import clean_and_robust_counts, evaluate, pgd_accuracy
from fastrobust.models import create as create_model
from fastrobust.core.values import check_eps
from fastrobust.evaluate.sanity import sanity_checks

pytestmark = pytest.mark.usefixtures("one_thread")

C, H, B = 10, 8, 4
EPS = 8 / 255
CHEAP_AA = {"apgd-ce": {"n_iter": 2}, "apgd-t": {"n_iter": 2, "n_targets": 2}, "fab-t": {"n_iter": 2, "n_targets": 2},
            "square": {"n_queries": 5}}


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# every public attack: (model, x, y, eps, norm) -> adversarials
ATTACKS = {
    "pgd": lambda m, x, y, eps, norm: pgd(m, x, y, eps=eps, norm=norm, steps=2, generator=gen()),
    "fgsm": lambda m, x, y, eps, norm: fgsm(m, x, y, eps=eps, norm=norm),
    "apgd": lambda m, x, y, eps, norm: apgd(m, x, y, eps=eps, norm=norm, n_iter=2, generator=gen()),
    "apgd_ce": lambda m, x, y, eps, norm: apgd_ce(m, x, y, eps=eps, norm=norm, n_iter=2, generator=gen()),
    "apgd_t": lambda m, x, y, eps, norm: apgd_t(m, x, y, eps=eps, norm=norm, n_iter=2, n_targets=2, generator=gen()),
    "fab_t": lambda m, x, y, eps, norm: fab_t(m, x, y, eps=eps, norm=norm, n_iter=2, n_targets=2, generator=gen()),
    "square": lambda m, x, y, eps, norm: square(m, x, y, eps=eps, norm=norm, n_queries=5, generator=gen()),
    "autoattack": lambda m, x, y, eps, norm: autoattack(m, x, y, eps=eps, norm=norm, options=CHEAP_AA, generator=gen()),
    "rays": lambda m, x, y, eps, norm: rays(m, x, y, eps=eps, norm=norm, n_queries=20).within(x, eps),
}
# the data-level entry points (uint8 images accepted)
DATA = {
    "evaluate": lambda m, x, y, eps, norm: evaluate(m, (x, y), ["pgd20"], eps=eps, norm=norm, progress=False),
    "pgd_accuracy": lambda m, x, y, eps, norm: pgd_accuracy(m, x, y, eps=eps, steps=2),
    "clean_and_robust_counts": lambda m, x, y, eps, norm: clean_and_robust_counts(m, x, y, None),
    "sanity_checks": lambda m, x, y, eps, norm: sanity_checks(m, (x, y), eps=eps, norm=norm, n=B, square_queries=5,
                                                              rays_queries=10, apgd_iter=2),
}


def method_entry(name: str):
    def run(m, x, y, eps, norm):
        method = methods.create(name)
        if hasattr(method, "train_step"):
            return method.train_step(m, x, y, torch.optim.SGD(m.parameters(), lr=0.0))
        return method(m, x, y)
    return run


METHODS = {f"method:{name}": method_entry(name) for name in methods.available_methods()}
METHODS["method:sprout.__call__"] = lambda m, x, y, eps, norm: methods.create("sprout")(m, x, y)
EVERY = {**ATTACKS, "autoattack_official": lambda m, x, y, eps, norm: autoattack_official(m, x, y, eps=eps),
         **DATA, **METHODS}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("tinycnn", num_classes=C, image_size=H).eval()


@pytest.fixture
def batch():
    x = torch.rand(B, 3, H, H, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([3, 1, 0, 7])
    return x, y


@pytest.mark.parametrize("entry", sorted(EVERY))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_image_is_refused_naming_the_first_bad_index(model, batch, entry, bad):
    x, y = batch
    x[2] = bad  # the all-NaN (or Inf) image, labelled 0: argmax of NaN logits is 0, so it used to count as correct
    with pytest.raises(ConfigError, match=r"\[2\] holds NaN or Inf values"):
        EVERY[entry](model, x, y, EPS, "linf")


@pytest.mark.parametrize("entry", sorted(EVERY))
def test_0_to_255_floats_are_refused_with_their_range(model, batch, entry):
    x, y = batch
    with pytest.raises(ConfigError, match=r"values in \[\d+, 255\], expected images in \[0, 1\].*divide by 255"):
        EVERY[entry](model, (x * 255).round(), y, EPS, "linf")


@pytest.mark.parametrize("entry", sorted(EVERY))
def test_mean_std_normalised_input_is_refused(model, batch, entry):
    x, y = batch
    with pytest.raises(ConfigError, match=r"values in \[-.*mean/std-normalised"):
        EVERY[entry](model, (x - 0.5) / 0.25, y, EPS, "linf")


@pytest.mark.parametrize("entry", sorted(EVERY))
@pytest.mark.parametrize("labels, message", [
    ([3, 1, 12, 7], r"label 12 is out of range for a model with 10 outputs"),
    ([3, -1, 0, 7], r"negative label \(-1\)"),
])
def test_labels_outside_the_classes_are_refused(model, batch, entry, labels, message):
    x, _ = batch
    if entry == "autoattack_official" and "outputs" in message and not official_available():
        pytest.skip("the label range is compared with the model's outputs, which the missing package never computes")
    with pytest.raises(ConfigError, match=message):
        EVERY[entry](model, x, torch.tensor(labels), EPS, "linf")


@pytest.mark.parametrize("entry", sorted(EVERY))
@pytest.mark.parametrize("labels, message", [
    (torch.tensor([3.0, 1.0, 0.0, 7.0]), r"dtype torch.float32, expected integer class indices"),
    (torch.tensor([3, 1, 0]), r"shape \(3,\) but there are 4 images"),
    (torch.tensor([[3, 1, 0, 7]]), r"shape \(1, 4\)"),
])
def test_labels_of_the_wrong_kind_are_refused(model, batch, entry, labels, message):
    x, _ = batch
    with pytest.raises(ConfigError, match=message):
        EVERY[entry](model, x, labels, EPS, "linf")


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return all(_same(u, v) for u, v in zip(a, b))
    if isinstance(a, dict):
        return all(_same(a[k], b[k]) for k in a if not k.endswith("seconds"))  # timings differ run to run
    return a == b


@pytest.mark.parametrize("entry", sorted(set(EVERY) - {"autoattack_official", "sanity_checks"}))
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_integer_labels_of_any_dtype_give_the_int64_result(model, batch, entry, dtype):
    x, y = batch
    torch.manual_seed(5)
    expected = EVERY[entry](model, x, y, EPS, "linf")
    torch.manual_seed(5)
    got = EVERY[entry](model, x, y.to(dtype), EPS, "linf")
    if isinstance(expected, dict) and "versions" in expected:  # an evaluate record
        expected, got = expected["attacks"], got["attacks"]
    assert _same(got, expected)


@pytest.mark.parametrize("entry", sorted(DATA))
def test_data_entry_points_take_uint8_splits(model, batch, entry):
    x, y = batch
    images = (x * 255).round().to(torch.uint8)
    EVERY[entry](model, images, y, EPS, "linf")


@pytest.mark.parametrize("entry", sorted(set(ATTACKS) | set(METHODS)))
def test_attacks_and_methods_refuse_uint8_images_with_the_fix(model, batch, entry):
    x, y = batch
    with pytest.raises(ConfigError, match=r"dtype torch.uint8, expected float images in \[0, 1\]: use x.float\(\) / 255"):
        EVERY[entry](model, (x * 255).round().to(torch.uint8), y, EPS, "linf")


@pytest.mark.parametrize("entry", sorted(ATTACKS))
def test_float64_images_work_with_a_float32_model(model, batch, entry):
    x, y = batch
    x_adv = EVERY[entry](model, x.double(), y, EPS, "linf")
    assert x_adv.dtype == torch.float64 and ((x_adv - x.double()).abs().amax() <= EPS + 1e-6)


@pytest.mark.parametrize("entry", ["pgd", "apgd_ce", "square", "evaluate"])
def test_batch_without_a_batch_dimension_is_refused(model, batch, entry):
    x, y = batch
    with pytest.raises(ConfigError, match=r"\(8,\).*expected (a batch of )?images \[(B|N), C, H, W\]"):
        EVERY[entry](model, x[0, 0, 0], y, EPS, "linf")


# ----------------------------------------------------------------------------- values once per call, no per-step sync
def count_value_checks(monkeypatch) -> list[int]:
    from fastrobust.core import contract as inputs

    calls = [0]
    original = inputs._check_values

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(inputs, "_check_values", counting)
    return calls


@pytest.mark.parametrize("entry", ["apgd_t", "fab_t", "autoattack", "fgsm", "evaluate", "pgd_accuracy"])
def test_values_are_checked_once_per_outermost_call(model, batch, entry, monkeypatch):
    calls = count_value_checks(monkeypatch)
    x, y = batch
    if entry == "evaluate":
        evaluate(model, (x, y), ["fgsm", "pgd20", "apgd-t"], eps=EPS, batch_size=2, progress=False,
                 attack_options={"apgd-t": {"n_iter": 2, "n_targets": 3}})
    else:
        EVERY[entry](model, x, y, EPS, "linf")
    assert calls[0] == 1  # not once per batch, target, component or step


@pytest.mark.parametrize("name", ["pgd_at", "trades", "sprout"])
def test_methods_check_values_on_their_first_call_only(model, batch, name, monkeypatch):
    """A trainer calls the method every step with batches its DeviceLoader guarantees: no host sync per step."""
    calls = count_value_checks(monkeypatch)
    x, y = batch
    method = methods.create(name)
    for step in range(3):
        if name == "sprout":
            method.train_step(model, x, y, torch.optim.SGD(model.parameters(), lr=0.0))
        else:
            method(model, x, y)
        assert calls[0] == 1, step
    method(model, x * 255, y)  # documented: after the first call only metadata is checked
    with pytest.raises(ConfigError, match="dtype torch.float32, expected integer"):
        method(model, x, y.float())


# ----------------------------------------------------------------------------- threat-model units
def test_check_eps_units_per_norm():
    assert check_eps(2, norm="l2") == 2 and check_eps("0.5", norm="l2") == 0.5 and check_eps(40, norm="l2") == 40
    with pytest.raises(ConfigError, match="did you mean 8/255"):
        check_eps(8)
    for bad in (0, -1, "nan", "inf"):
        with pytest.raises(ConfigError):
            check_eps(bad, norm="l2")
    assert check_eps(12, norm="l1") == 12  # an l1 radius (CIFAR-10's usual 12) may exceed 1
    with pytest.raises(ConfigError, match="usual CIFAR-10 budget"):
        check_eps(-1, norm="l1")
    with pytest.raises(ConfigError, match="norm='l0' is not supported"):
        check_eps(0.1, norm="l0")


L2_ENTRIES = sorted(set(ATTACKS) - {"rays"} | {"evaluate"} | {"sanity_checks"})


@pytest.mark.parametrize("entry", L2_ENTRIES)
def test_an_l2_budget_above_1_is_accepted(model, batch, entry):
    x, y = batch
    large = entry in ("evaluate", "sanity_checks")  # the evaluations say that 2 is a large l2 radius for 3x8x8 images
    with pytest.warns(UserWarning, match="l2 radius 2 is large") if large else contextlib.nullcontext():
        out = EVERY[entry](model, x, y, 2.0, "l2")
    if isinstance(out, torch.Tensor):
        assert ((out - x).flatten(1).norm(dim=1) <= 2.0 + 1e-4).all()


@pytest.mark.parametrize("entry", sorted(set(ATTACKS) | {"evaluate", "sanity_checks", "pgd_accuracy"}))
def test_an_linf_eps_above_1_gets_the_255_hint(model, batch, entry):
    x, y = batch
    with pytest.raises(ConfigError, match="did you mean 8/255"):
        EVERY[entry](model, x, y, 8, "linf")


def test_l2_sanity_checks_run_end_to_end_with_a_sensible_large_eps(model, batch):
    x, y = batch
    flags = {f["name"]: f for f in sanity_checks(model, (x, y), eps=0.5, norm="l2", n=B, square_queries=5,
                                                 apgd_iter=2)}
    assert set(flags) == {"attack_order", "more_steps", "large_eps", "black_box", "gradients", "deterministic"}
    assert "eps=6.9282" in flags["large_eps"]["detail"]  # 0.5 * sqrt(3 * 8 * 8): every image reaches mid-grey


# ----------------------------------------------------------------------------- half precision
@pytest.fixture(scope="module")
def bf16_model():
    torch.manual_seed(0)
    return create_model("tinycnn", num_classes=C, image_size=H).to(torch.bfloat16).eval()


@pytest.mark.parametrize("entry", sorted(ATTACKS))
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attacks_run_a_bf16_model_in_its_own_dtype(bf16_model, batch, entry, norm):
    x, y = batch
    if entry == "rays" and norm == "l2":  # RayS is l_inf only: refused in one line, not run
        with pytest.raises(ConfigError, match="l_inf"):
            EVERY[entry](bf16_model, x, y, 0.5, norm)
        return
    eps = EPS if norm == "linf" else 0.5
    x_adv = EVERY[entry](bf16_model, x, y, eps, norm)
    assert x_adv.dtype == torch.float32 and torch.isfinite(x_adv).all()
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps * (1 + 1e-4) + 1e-6).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    assert next(bf16_model.parameters()).dtype == torch.bfloat16


def test_evaluate_and_sanity_run_a_bf16_model(bf16_model, batch):
    x, y = batch
    with torch.no_grad():
        y = bf16_model(x.to(torch.bfloat16)).argmax(1)  # every point clean-correct in bf16
    record = evaluate(bf16_model, (x, y), ["clean", "pgd20", "apgd-t", "fab-t", "square", "rays", "autoattack"],
                      eps=EPS, progress=False, attack_options={"apgd-t": CHEAP_AA["apgd-t"], "fab-t": CHEAP_AA["fab-t"],
                                                              "square": {"n_queries": 5}, "rays": {"n_queries": 20},
                                                              "autoattack": CHEAP_AA})
    assert record["clean_acc"] == 1.0 and record["clean_non_finite"] == 0
    assert all(entry["robust_acc"] <= 1.0 for entry in record["attacks"].values())
    flags = sanity_checks(bf16_model, (x, y), eps=EPS, n=B, square_queries=5, rays_queries=10, apgd_iter=2)
    assert len(flags) == 6


def test_an_unsupported_parameter_dtype_is_refused_in_one_line(batch):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * H * H, C)).to(torch.float8_e4m3fn)
    x, y = batch
    with pytest.raises(ConfigError, match="float8_e4m3fn"):
        pgd(model, x, y, eps=EPS)


@pytest.mark.parametrize("entry", sorted(EVERY))
@pytest.mark.parametrize("columns", [1, 0])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_logits_with_fewer_than_two_classes_are_refused(entry, columns):
    """argmax of a single logit column is always 0: a [B, 1] model scored 100% clean and robust on label-0 data."""
    if entry == "autoattack_official" and not official_available():
        pytest.skip("the outputs are compared by the official package, which is missing")
    torch.manual_seed(0)
    one = nn.Sequential(OrderedDict(conv1=nn.Conv2d(3, 2, 3, padding=1), flat=nn.Flatten(),  # conv1: SLAT's latent
                                    fc=nn.Linear(2 * H * H, columns)))
    x = torch.rand(B, 3, H, H, generator=gen())
    with pytest.raises(ConfigError, match=rf"logits of shape \[{B}, {columns}\].*C >= 2"):
        EVERY[entry](one, x, torch.zeros(B, dtype=torch.long), EPS, "linf")
