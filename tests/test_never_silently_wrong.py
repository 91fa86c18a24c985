"""Evaluation that is never silently wrong (issue 13): non-finite values, state bound to the model, records
that say what ran, the AutoAttack pre-checks, RayS at the authors' precision and both ADBD definitions, the
import direction evaluate <- sanity, the evaluation docs' snippets and the `fastrobust eval` errors.

Each small input has a hand-computable right answer; the assertions are that answer.
"""

from __future__ import annotations

import ast
import copy
import json
import math
import re
import runpy
from pathlib import Path

import pytest
import torch
from torch import nn

import fastrobust.evaluate.evaluation as evaluate_module
from fastrobust.attacks import apgd, apgd_ce, apgd_t, autoattack, fab_t, fgsm, pgd, rays, square
from fastrobust.errors import FastRobustError
from fastrobust.evaluate import clean_and_robust_counts, evaluate, pgd_accuracy
from fastrobust.evaluate.sanity import sanity_checks

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def official_tol(dim: int) -> float:
    """The authors' RayS precision in l_inf units: 1e-3 along the l2-normalised sign direction."""
    return 1e-3 / math.sqrt(dim)


# ----------------------------------------------------------------------------- an infinite input gradient
class SqrtModel(nn.Module):
    """logits ``[0, 10 - sum_i sqrt(x_i)]`` on 1x4x4 images: the input gradient is infinite at black pixels."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 2)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.weight[1] = -1.0
            self.linear.bias.copy_(torch.tensor([0.0, 10.0]))

    def forward(self, x):
        return self.linear(torch.sqrt(x.flatten(1)))


@pytest.fixture(scope="module")
def sqrt_case():
    """Four points of class 1, half of each image black. Points 0 and 2 (8 pixels at 0.04) have margin 8.4,
    more than any l2 perturbation of norm 0.5 can remove (sum_i sqrt|d_i| <= 16^(3/4) sqrt(0.5) = 5.66): robust.
    Points 1 and 3 (8 white pixels) have margin 2, and spreading the budget over the 8 black pixels removes
    8 sqrt(0.5 / sqrt(8)) = 3.36: broken. So the right l2 robust accuracy at eps 0.5 is exactly 1/2."""
    x = torch.zeros(4, 1, 4, 4)
    x[:, :, :2] = torch.tensor([0.04, 1.0, 0.04, 1.0]).view(4, 1, 1, 1)
    return SqrtModel().eval(), x, torch.ones(4, dtype=torch.long)


def g():
    return torch.Generator().manual_seed(0)


SQRT_ATTACKS = {
    "pgd": lambda m, x, y: pgd(m, x, y, eps=0.5, norm="l2", steps=20, random_init=False),
    "pgd-random-start": lambda m, x, y: pgd(m, x, y, eps=0.5, norm="l2", steps=20, generator=g()),
    "fgsm": lambda m, x, y: fgsm(m, x, y, eps=0.5, norm="l2"),
    "apgd": lambda m, x, y: apgd(m, x, y, eps=0.5, norm="l2", n_iter=20, loss="ce", generator=g()),
    "apgd_ce": lambda m, x, y: apgd_ce(m, x, y, eps=0.5, norm="l2", n_iter=20, generator=g()),
    "apgd_t": lambda m, x, y: apgd_t(m, x, y, eps=0.5, norm="l2", n_iter=20, generator=g()),
    "fab_t": lambda m, x, y: fab_t(m, x, y, eps=0.5, norm="l2", n_iter=20, generator=g()),
    "square": lambda m, x, y: square(m, x, y, eps=0.5, norm="l2", n_queries=200, generator=g()),
    "autoattack": lambda m, x, y: autoattack(m, x, y, eps=0.5, norm="l2", generator=g(), options={
        "apgd-ce": {"n_iter": 20}, "apgd-t": {"n_iter": 20}, "fab-t": {"n_iter": 20}, "square": {"n_queries": 200}}),
}


@pytest.mark.parametrize("name", sorted(SQRT_ATTACKS))
def test_l2_attacks_stay_finite_where_the_input_gradient_is_infinite(sqrt_case, name):
    model, x, y = sqrt_case
    x_adv = SQRT_ATTACKS[name](model, x, y)
    assert torch.isfinite(x_adv).all()
    assert ((x_adv - x).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert model(x_adv).argmax(1).tolist() == [1, 0, 1, 0]


def test_rays_on_the_sqrt_model_is_finite(sqrt_case):
    model, x, y = sqrt_case
    result = rays(model, x, y, n_queries=100)
    assert torch.isfinite(result.x_adv).all() and torch.isfinite(result.distance).all()


def test_evaluate_scores_the_sqrt_model_right_under_every_l2_attack(sqrt_case):
    model, x, y = sqrt_case
    attacks = ["fgsm", "pgd20", "cw20", "apgd-ce", "apgd-t", "fab-t", "square", "autoattack"]
    options = {"apgd-ce": {"n_iter": 20}, "apgd-t": {"n_iter": 20}, "fab-t": {"n_iter": 20},
               "square": {"n_queries": 200},
               "autoattack": {"apgd-ce": {"n_iter": 20}, "apgd-t": {"n_iter": 20}, "fab-t": {"n_iter": 20},
                              "square": {"n_queries": 200}}}
    record = evaluate(model, (x, y), attacks, eps=0.5, norm="l2", progress=False, attack_options=options)
    assert record["clean_acc"] == 1.0
    for name in attacks:
        assert record["attacks"][name]["robust_acc"] == 0.5, name
        assert record["attacks"][name]["non_finite"] == 0, name
    assert record["robust_acc"] == 0.5 and record["warnings"] == []


def test_sanity_checks_flag_the_infinite_gradients_of_the_sqrt_model(sqrt_case):
    model, x, y = sqrt_case
    flags = {f["name"]: f for f in sanity_checks(model, (x, y), eps=0.5, norm="l2", n=4, square_queries=50,
                                                 apgd_iter=10)}
    assert not flags["gradients"]["passed"] and "100.00% a NaN/inf input gradient" in flags["gradients"]["detail"]


def test_ascent_direction_of_infinite_gradients():
    from fastrobust.attacks.toolkit import ascent_direction

    inf, nan = float("inf"), float("nan")
    grad = torch.tensor([[inf, -inf, 3.0, nan], [1e38, 1e38, 0.0, nan], [0.0, 0.0, 0.0, 0.0]])
    step = ascent_direction(grad, "l2")
    half = 1 / math.sqrt(2)
    assert torch.allclose(step, torch.tensor([[half, -half, 0, 0], [half, half, 0, 0], [0.0, 0, 0, 0]]))
    assert torch.equal(ascent_direction(grad, "linf"), torch.tensor([[1.0, -1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]))


# ----------------------------------------------------------------------------- non-finite logits
class NaNAtBlack(nn.Module):
    """Class 0 with margin ``1 + 5 x_0`` wherever the first pixel ``x_0 > 0``; NaN logits where ``x_0 = 0``
    (``x_0 / x_0``). The CE gradient pushes ``x_0`` down."""

    def forward(self, x):
        x0 = x.flatten(1)[:, 0]
        z = 1 + 5 * x0 + (x0 / x0 - 1)
        return torch.stack([z, torch.zeros_like(z)], 1)


@pytest.fixture(scope="module")
def nan_case():
    """Point 0: x_0 = 0, NaN clean logits (argmax of NaN is 0 = its label: it used to count as correct). Point 1:
    x_0 = 0.01 < eps, the attacks reach x_0 = 0 and NaN logits (it used to count as robust). Point 2: x_0 = 0.5,
    class 0 everywhere in the ball: robust. Right answer at eps 0.03: clean 2/3, robust 1/3."""
    x = torch.full((3, 1, 2, 2), 0.5)
    x[:, 0, 0, 0] = torch.tensor([0.0, 0.01, 0.5])
    return NaNAtBlack().eval(), x, torch.zeros(3, dtype=torch.long)


def test_non_finite_logits_never_count_as_correct_or_robust(nan_case, capsys):
    model, x, y = nan_case
    record = evaluate(model, (x, y), ["clean", "fgsm", "pgd20"], eps=0.03, progress=False)
    assert record["clean_correct"] == 2 and record["clean_non_finite"] == 1
    assert record["attacks"]["clean"]["non_finite"] == 1
    for name in ("fgsm", "pgd20"):
        entry = record["attacks"][name]
        assert (entry["robust"], entry["broken"], entry["non_finite"]) == (1, 1, 1), name
    assert record["robust"] == 1
    assert any("NaN or inf logits on 1 of 3 clean points" in w for w in record["warnings"])
    assert "NaN or inf logits" in capsys.readouterr().err
    result = pgd_accuracy(model, x, y, eps=0.03, steps=5, step_size=0.01)
    assert (result["clean_acc"], result["robust_acc"]) == (2 / 3, 1 / 3)
    assert clean_and_robust_counts(model, x, y, None) == (2, 2, 3)
    details = autoattack(model, x, y, eps=0.03, version="fast", return_details=True, generator=g(),
                         options={"apgd-ce": {"n_iter": 10}, "apgd-t": {"n_iter": 10}})
    assert details.robust[0].item() is False and details.broken_by[0] == "clean" and details.robust[2].item()


def test_a_non_finite_adversarial_cannot_pass_the_ball_check(nan_case, monkeypatch):
    model, x, y = nan_case
    original = evaluate_module.run_attack

    def nan_attack(*args, **kwargs):
        x_adv, extras = original(*args, **kwargs)
        return torch.full_like(x_adv, float("nan")), extras

    monkeypatch.setattr(evaluate_module, "run_attack", nan_attack)
    with pytest.raises(RuntimeError, match="non-finite"):
        evaluate(model, (x, y), ["fgsm"], eps=0.03, progress=False)


# ----------------------------------------------------------------------------- state bound to the model
def small_model(seed: int, activation: type[nn.Module] = nn.ReLU) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), activation(), nn.BatchNorm1d(16), nn.Linear(16, 3)).eval()


def test_a_state_file_is_bound_to_the_model_it_measured(tmp_path):
    x = torch.rand(12, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    y = torch.arange(12) % 3
    kwargs = dict(eps=0.1, batch_size=4, progress=False, state_file=tmp_path / "state.json")
    model_a = small_model(0)
    first = evaluate(model_a, (x, y), ["pgd20"], **kwargs)
    again = evaluate(copy.deepcopy(model_a), (x, y), ["pgd20"], **kwargs)  # same weights: resumes
    assert again["attacks"]["pgd20"]["robust"] == first["attacks"]["pgd20"]["robust"]
    with pytest.raises(FastRobustError, match=r"different model weights\)"):
        evaluate(small_model(1), (x, y), ["pgd20"], **kwargs)  # model B with model A's state
    buffers = copy.deepcopy(model_a)
    buffers[3].running_mean += 0.5  # a buffer is part of the weights
    with pytest.raises(FastRobustError, match=r"different model weights\)"):
        evaluate(buffers, (x, y), ["pgd20"], **kwargs)
    with pytest.raises(FastRobustError, match=r"different model architecture\)"):
        evaluate(small_model(0, nn.Tanh), (x, y), ["pgd20"], **kwargs)  # same weights, other activation


# ----------------------------------------------------------------------------- records say what ran
def test_records_hold_the_settings_actually_used(tmp_path):
    model = small_model(0)  # 3 classes: at most 2 targets, APGD-T falls back to the targeted CE
    x = torch.rand(6, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    cheap = {"apgd-t": {"n_iter": 2}, "fab-t": {"n_iter": 2}, "rays": {"n_queries": 20},
             "autoattack": {"apgd-ce": {"n_iter": 2}, "apgd-t": {"n_iter": 2}, "fab-t": {"n_iter": 2},
                            "square": {"n_queries": 5}}}
    record = evaluate(model, (x, y), ["apgd-t", "fab-t", "rays", "autoattack"], eps=0.1, progress=False,
                      attack_options=cheap)
    attacks = record["attacks"]
    assert attacks["apgd-t"]["settings"]["n_targets"] == 2 and attacks["apgd-t"]["settings"]["loss"] == "ce-targeted"
    assert attacks["apgd-t"]["settings_requested"]["n_targets"] == 9
    assert attacks["fab-t"]["settings"]["n_targets"] == 2
    assert attacks["autoattack"]["settings"]["options"]["apgd-t"]["n_targets"] == 2
    assert attacks["autoattack"]["settings"]["options"]["fab-t"]["n_targets"] == 2
    assert attacks["rays"]["settings"]["tol"] == pytest.approx(1e-3 / math.sqrt(12))
    assert "settings_requested" not in attacks["rays"]  # a default resolved is not a setting clipped
    assert record["num_classes"] == 3


# ----------------------------------------------------------------------------- pre-checks
class Noisy(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x + 0.01 * torch.randn_like(x))


@pytest.mark.parametrize("wrap, expected", [
    (lambda m: nn.Sequential(m, nn.Softmax(dim=1)), "look like probabilities"),
    (Noisy, "randomised"),
    (lambda m: m, None),
])
def test_prechecks_warn_like_the_official_autoattack(wrap, expected, capsys):
    model = wrap(small_model(0))
    x = torch.rand(6, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    y = torch.arange(6) % 3
    record = evaluate(model, (x, y), ["clean"], eps=0.1, progress=False)
    err = capsys.readouterr().err
    if expected is None:
        assert record["warnings"] == [] and err == ""
    else:
        assert len(record["warnings"]) == 1 and expected in record["warnings"][0] and expected in err


# ----------------------------------------------------------------------------- RayS precision and ADBD
class Linear(nn.Module):
    """logits ``[0, w . (x - 0.5)]`` with w > 0: for ``x = 0.5 + c`` (every pixel) the margin is ``c ||w||_1``, and
    along the sign direction ``-1`` (RayS's first trial) the boundary is at l_inf radius exactly ``c``."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("w", torch.rand(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5)

    def forward(self, x):
        z = (x.flatten(1).double() - 0.5) @ self.w
        return torch.stack([torch.zeros_like(z), z], 1).float()


def uniform_images(values, shape=(3, 32, 32)):
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, *shape).contiguous()


def test_rays_reaches_the_exact_boundary_at_the_authors_precision():
    c = [0.001, 0.0123456, 0.02, 0.031, 0.0456, 0.1]
    x = uniform_images([0.5 + v for v in c])
    result = rays(Linear(3 * 32 * 32), x, torch.ones(6, dtype=torch.long), n_queries=300)
    from fastrobust.attacks.rays import official_tol as library_tol

    tol = official_tol(3 * 32 * 32)
    assert library_tol(3 * 32 * 32) == pytest.approx(tol) and tol == pytest.approx(1.8042e-5, rel=1e-3)
    error = result.distance - torch.tensor(c)
    assert (error >= -1e-6).all() and (error <= tol + 1e-6).all(), error / tol
    assert (result.direction.flatten(1) == -1).all()


def test_adbd_has_the_leaderboard_and_the_correct_only_definitions():
    # a linear model: three clean-correct points at distances 0.01, 0.02, 0.03, one misclassified (counts 0)
    x = uniform_images([0.51, 0.52, 0.53, 0.49])
    record = evaluate(Linear(3 * 32 * 32), (x, torch.ones(4, dtype=torch.long)), ["rays"], eps=8 / 255,
                      progress=False, attack_options={"rays": {"n_queries": 100}})
    entry = record["attacks"]["rays"]
    tol = official_tol(3 * 32 * 32)
    assert entry["adbd"] == pytest.approx((0.01 + 0.02 + 0.03 + 0) / 4, abs=tol)
    assert entry["adbd_correct_only"] == pytest.approx((0.01 + 0.02 + 0.03) / 3, abs=tol)
    assert entry["no_boundary_found"] == 0 and record["clean_correct"] == 3

    # a constant model: no boundary anywhere; the authors count the distance to the box corner clip(x + s)
    # along the final direction (s = +1 when no flip was ever kept): 1 - x
    class Constant(nn.Module):
        def forward(self, x):
            return torch.tensor([0.0, 2.0]).expand(len(x), 2) + 0 * x.flatten(1)[:, :1]

    x = uniform_images([0.2, 0.7, 0.5], shape=(1, 4, 4))
    record = evaluate(Constant(), (x, torch.tensor([1, 1, 0])), ["rays"], eps=8 / 255, progress=False,
                      attack_options={"rays": {"n_queries": 30}})
    entry = record["attacks"]["rays"]
    assert entry["adbd"] == pytest.approx((0.8 + 0.3 + 0) / 3)
    assert entry["adbd_correct_only"] is None and entry["no_boundary_found"] == 2


def rays_one_by_one(model, x, y, n_queries, tol):
    """An independent reference: RayS on one example at a time, written from the paper (block flips, one test
    at the best radius, a binary search for improving flips only, a trial only when its search fits)."""
    distances, queries, directions = [], [], []
    for xi, yi in zip(x, y):
        flat, dim = xi.flatten(), xi.numel()
        used = 0

        def adversarial(s, r):
            nonlocal used
            used += 1
            with torch.no_grad():
                return bool(model((flat + r * s).clamp(0, 1).view(1, *xi.shape)).argmax(1) != yi)

        best_r, best_s = torch.tensor(float("inf")), torch.ones(dim)
        level = block = 0
        with torch.no_grad():
            correct = bool(model(xi[None]).argmax(1) == yi)
        while correct:
            size = math.ceil(dim / 2**level)
            start, end = block * size, min(dim, (block + 1) * size)
            radius = best_r if torch.isfinite(best_r) else torch.tensor(1.0)
            if used + 1 + int(torch.ceil(torch.log2(radius.clamp_min(tol) / tol)).clamp_min(0)) > n_queries:
                break
            s = best_s.clone()
            s[start:end] *= -1
            if adversarial(s, radius):
                lo, hi = torch.tensor(0.0), radius.clone()
                while hi - lo > tol and used < n_queries:
                    mid = (lo + hi) / 2
                    if adversarial(s, mid):
                        hi = mid
                    else:
                        lo = mid
                if hi < best_r:
                    best_r, best_s = hi, s
            block += 1
            if block == 2**level or end >= dim:
                level, block = (0 if size == 1 else level + 1), 0
        distances.append(float(((flat + best_r * best_s).clamp(0, 1) - flat).abs().max()) if torch.isfinite(best_r)
                         else (0.0 if not correct else float("inf")))
        queries.append(used)
        directions.append(best_s)
    return torch.tensor(distances), torch.tensor(queries), torch.stack(directions)


@pytest.fixture(scope="module")
def small_cnn_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4)).eval()
    x = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[5] = (y[5] + 1) % 4  # one point misclassified at the start
    return model, x, y


def test_batched_rays_equals_rays_one_example_at_a_time(small_cnn_batch):
    model, x, y = small_cnn_batch
    tol = official_tol(48)
    result = rays(model, x, y, n_queries=300)
    distances, queries, directions = rays_one_by_one(model, x, y, 300, tol)
    assert torch.equal(result.queries, queries)
    assert torch.allclose(result.distance, distances, atol=1e-7)
    correct = torch.isfinite(distances) & (distances > 0)
    assert torch.equal(result.direction.flatten(1)[correct], directions[correct])


def test_rays_sends_the_whole_remaining_batch_in_each_model_call(small_cnn_batch):
    """All examples' trials and binary searches advance together: at most one model call per query of the
    busiest example (plus the clean pass), not one call per binary-search step of every trial."""
    model, x, y = small_cnn_batch
    calls = []
    handle = model.register_forward_pre_hook(lambda _m, args: calls.append(len(args[0])))
    try:
        result = rays(model, x, y, n_queries=300)
    finally:
        handle.remove()
    assert len(calls) <= int(result.queries.max()) + 1
    assert sum(calls) == int(result.queries.sum()) + len(x)


# ----------------------------------------------------------------------------- import direction, docs
def test_evaluate_does_not_import_sanity():
    tree = ast.parse(Path(evaluate_module.__file__).read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [name for name in imported if "sanity" in name]


def python_snippets(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(python_snippets(ROOT / "docs/evaluation.md"))))
def test_evaluation_docs_snippets_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = python_snippets(ROOT / "docs/evaluation.md")[index]
    (tmp_path / "snippet.py").write_text(code)
    runpy.run_path(str(tmp_path / "snippet.py"), run_name="__main__")


# ----------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    """A 10-class grey 8x8 image folder (2 test images per class) and three tinycnn checkpoints: A and B
    (different weights) and one whose last layer is NaN."""
    from PIL import Image

    from fastrobust.models.checkpoint import save_model
    from fastrobust.models import create

    root = tmp_path_factory.mktemp("eval-cli")
    generator = torch.Generator().manual_seed(0)
    for split, per_class in (("train", 2), ("test", 2)):
        for label in range(10):
            folder = root / "data" / split / f"c{label}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (8, 8), generator=generator, dtype=torch.uint8)
                Image.fromarray(pixels.numpy(), mode="L").save(folder / f"{i}.png")
    paths = {}
    for name, seed in (("a", 0), ("b", 1), ("nan", 0)):
        torch.manual_seed(seed)
        model = create("tinycnn", num_classes=10, in_channels=1, image_size=8)
        if name == "nan":
            with torch.no_grad():
                model.fc.weight.fill_(float("nan"))
        paths[name] = root / f"{name}.safetensors"
        save_model(model, paths[name], {})
    return root, paths


def run_cli(capsys, *argv):
    from fastrobust.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def eval_args(root, checkpoint, *extra):
    return ["eval", "--checkpoint", checkpoint, "--dataset", "imagefolder", "--data-root", root / "data",
            "--device", "cpu", "--quiet", "--batch-size", "8", *extra]


def assert_one_line_error(code, err, *fragments):
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_l2_budgets_above_1_work_and_bad_ones_are_one_line(cli_setup, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FASTROBUST_CACHE", str(tmp_path / "cache"))
    root, paths = cli_setup
    code, out, err = run_cli(capsys, *eval_args(root, paths["a"], "--norm", "l2", "--eps", "2", "--json"))
    assert code == 0, err
    assert json.loads(out)["eps"] == 2.0
    assert_one_line_error(*run_cli(capsys, *eval_args(root, paths["a"], "--norm", "l2", "--eps", "0"))[::2],
                          "--eps=0 must be > 0")
    assert_one_line_error(*run_cli(capsys, *eval_args(root, paths["a"], "--eps", "8"))[::2], "did you mean 8/255")


def test_cli_refuses_the_state_file_of_another_model(cli_setup, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FASTROBUST_CACHE", str(tmp_path / "cache"))
    root, paths = cli_setup
    state = tmp_path / "state.json"
    code, _, err = run_cli(capsys, *eval_args(root, paths["a"], "--state", state, "--json"))
    assert code == 0, err
    assert_one_line_error(*run_cli(capsys, *eval_args(root, paths["b"], "--state", state, "--json"))[::2],
                          "belongs to another evaluation", "different model weights")


def test_cli_counts_nan_logits_as_misclassified(cli_setup, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FASTROBUST_CACHE", str(tmp_path / "cache"))
    root, paths = cli_setup
    code, out, err = run_cli(capsys, *eval_args(root, paths["nan"], "--json"))
    assert code == 0, err
    record = json.loads(out)
    assert record["clean_acc"] == 0.0 and record["clean_non_finite"] == 20 and record["robust_acc"] == 0.0
    assert "NaN or inf logits on 20 of 20 clean points" in err


def test_cli_l2_sanity_checks_run_end_to_end(cli_setup, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FASTROBUST_CACHE", str(tmp_path / "cache"))
    import functools

    import fastrobust.evaluate.sanity

    root, paths = cli_setup
    cheap = functools.partial(fastrobust.evaluate.sanity.sanity_checks, square_queries=20, apgd_iter=5)
    monkeypatch.setattr(fastrobust.evaluate.sanity, "sanity_checks", cheap)
    code, out, err = run_cli(capsys, *eval_args(root, paths["a"], "--norm", "l2", "--eps", "0.5", "--sanity",
                                                "--json", "--queries", "20"))
    assert code == 0, err
    flags = {flag["name"]: flag for flag in json.loads(out)["sanity"]}
    assert "eps=4 " in flags["large_eps"]["detail"]  # 0.5 * sqrt(1 * 8 * 8)
