"""The fast AutoAttack engine: the shortcuts change how much is computed, never which points fall.

Each shortcut is pinned by an invariant on a small conv net trained for a second on synthetic 8x8 images:
points leave the batch once broken (fewer model rows, same flags), APGD-T/FAB-T targets batched together
(same flags whatever ``max_rows``), Square's per-iteration draws shared by the batch (a point's search does
not depend on the others), Newton's projection (equal to the sorted solution), bf16 (every flag an attack
acts on confirmed in fp32), channels_last (same flags, the model restored).
"""

from __future__ import annotations

import importlib
import threading

import pytest
import torch
from torch import nn

from fastrobust.attacks import apgd, apgd_t, autoattack, autoattack_official, fab_t, square
from fastrobust.attacks import fab as fab_module
from fastrobust.attacks import official as official_module
from fastrobust.attacks.apgd import checkpoints
from fastrobust.attacks.fab import _hyperplane_t_newton, _hyperplane_t_sorted, project_hyperplane_box
from fastrobust.attacks.square import p_selection
from fastrobust.errors import ConfigError, FastRobustError
from helpers import fit_and_keep_correct, synthetic_split

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:precision='bf16' on a CPU without")]  # bf16 on purpose here
C = 6


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, C))
        self.calls = 0
        self.rows = 0

    def forward(self, x):
        self.calls += 1
        self.rows += len(x)
        return self.body(x)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    train = synthetic_split(600, C, seed=0)
    test = synthetic_split(64, C, seed=1)
    return fit_and_keep_correct(ConvNet(), train.images.float() / 255, train.labels, test.images.float() / 255,
                                test.labels, epochs=6, min_accuracy=0.8)


def fooled(model, x_adv, y):
    with torch.no_grad():
        return model(x_adv).argmax(1) != y


def test_broken_points_leave_the_batch(net):
    model, x, y = net
    eps = 0.1  # large: most points fall within a few iterations
    model.rows = 0
    x_adv = apgd(model, x, y, eps=eps, n_iter=50, random_init=False)
    broken = fooled(model, x_adv, y)
    assert broken.float().mean() > 0.8
    assert (x_adv - x).abs().max() <= eps + 1e-6
    # the reference runs every point for 1 + 50 gradient passes; here the broken ones stop early
    assert model.rows < 0.5 * 51 * len(x), model.rows


@pytest.mark.parametrize("attack", ["apgd-t", "fab-t"])
def test_batched_targets_fool_the_same_points_as_one_target_at_a_time(net, attack):
    model, x, y = net
    eps = 0.04
    if attack == "apgd-t":
        run = lambda rows: apgd_t(model, x, y, eps=eps, n_iter=20, n_targets=4, random_init=False, max_rows=rows)
    else:
        run = lambda rows: fab_t(model, x, y, eps=eps, n_iter=20, n_targets=4, max_rows=rows)
    one_by_one, batched = run(len(x)), run(4 * len(x))
    flags = fooled(model, one_by_one, y)
    assert torch.equal(flags, fooled(model, batched, y))
    assert 0 < int(flags.sum()) < len(y)


def test_square_search_of_a_point_does_not_depend_on_the_batch(net):
    model, x, y = net
    kwargs = dict(eps=0.03, n_queries=300, return_queries=True, rescale_schedule=False)
    full, q_full = square(model, x, y, generator=torch.Generator().manual_seed(3), **kwargs)
    part, q_part = square(model, x[:5], y[:5], generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(full[:5], part) and torch.equal(q_full[:5], q_part)
    assert (full - x).abs().max() <= 0.03 + 1e-6 and full.min() >= 0 and full.max() <= 1
    broken = fooled(model, full, y)
    assert bool(broken.any())
    assert (q_full[~broken] == 300).all() and (q_full[broken] < 300).all()


def test_square_speculation_is_the_sequential_search(net, monkeypatch):
    """With few points left, Square evaluates each point's next iterations in one batch: same result."""
    model, x, y = net
    square_module = importlib.import_module("fastrobust.attacks.square")  # the package exports the function
    kwargs = dict(eps=0.03, n_queries=400, return_queries=True, rescale_schedule=False)
    ahead = square(model, x[:6], y[:6], generator=torch.Generator().manual_seed(5), **kwargs)
    assert square_module.speculation_depth(6, x.device) > 1
    monkeypatch.setitem(square_module.SPECULATE_BELOW, "cpu", 0)
    assert square_module.speculation_depth(6, x.device) == 1
    sequential = square(model, x[:6], y[:6], generator=torch.Generator().manual_seed(5), **kwargs)
    assert torch.equal(ahead[0], sequential[0]) and torch.equal(ahead[1], sequential[1])
    assert 0 < int(fooled(model, ahead[0], y[:6]).sum()) < 6


def test_square_schedule_rescaled_or_as_autoattack():
    # AutoAttack (5,000 queries, not rescaled): halvings after iterations 10, 50, 200, 500, 1000, 2000, 4000
    plain = [p_selection(0.8, i, 5000, rescale=False) for i in range(5000)]
    changes = [i for i in range(1, 5000) if plain[i] != plain[i - 1]]
    assert changes == [11, 51, 201, 501, 1001, 2001, 4001]
    assert plain[-1] == pytest.approx(0.8 / 128)
    # rescaled (standalone default): the 10,000-query schedule squeezed into 5,000
    assert p_selection(0.8, 15, 5000) == 0.4 and p_selection(0.8, 4999, 5000) == pytest.approx(0.8 / 512)


def test_apgd_checkpoints_follow_the_reference_integer_rule():
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(50) == [11, 21, 30, 38, 45]
    assert checkpoints(20) == [4, 7, 9] + list(range(10, 21))


def test_newton_projection_equals_the_sorted_solution():
    g = torch.Generator().manual_seed(0)
    # image-like rows: pixel values on the 1/255 grid (many equal breakpoints), zeros and ones included
    p = torch.randint(0, 256, (200, 3 * 8 * 8), generator=g).float() / 255
    w = torch.randn(200, 3 * 8 * 8, generator=g) * (torch.rand(200, 1, generator=g) < 0.9)
    c = torch.randn(200, generator=g) * torch.logspace(-3, 1, 200)
    for norm in ("linf", "l2"):
        d = project_hyperplane_box(p, w, c, norm)
        sign = torch.where(c < 0, -1.0, 1.0)[:, None]
        a, ws = w.abs(), w * sign
        cap = torch.where(ws > 0, 1 - p, p)
        brk = cap if norm == "linf" else torch.where(a > 0, cap / a.clamp_min(1e-30), torch.zeros_like(cap))
        slope = a if norm == "linf" else a * a
        t_sorted = _hyperplane_t_sorted(brk, slope, a * cap, c.abs())
        feasible = (a * cap).sum(1) >= c.abs()
        t_newton = _hyperplane_t_newton(brk, slope, a * cap, c.abs(), feasible)
        ok = feasible & ~torch.isnan(t_newton)
        assert ok.sum() > 150
        assert torch.allclose(t_newton[ok], t_sorted[ok], rtol=1e-5, atol=1e-7)
        assert torch.allclose((w * d).sum(1)[feasible], c[feasible], rtol=1e-4, atol=1e-5)


def test_projection_falls_back_to_sorting_when_newton_is_slow(monkeypatch):
    g = torch.Generator().manual_seed(1)
    p, w, c = torch.rand(50, 40, generator=g), torch.randn(50, 40, generator=g), torch.randn(50, generator=g)
    reference = project_hyperplane_box(p, w, c, "linf")
    monkeypatch.setattr(fab_module, "NEWTON_STEPS", 1)
    assert torch.allclose(project_hyperplane_box(p, w, c, "linf"), reference, atol=1e-6)
    # the CUDA way (no host sync: every row sorted, taken where Newton has not settled) gives the same answer
    for norm in ("linf", "l2"):
        assert torch.allclose(project_hyperplane_box(p, w, c, norm, sync_free=True),
                              project_hyperplane_box(p, w, c, norm, sync_free=False), atol=1e-6)


class LiesInBf16(nn.Module):
    """Under autocast it claims every point is of class (y + 1) % C; in fp32 it is the honest model."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        logits = self.inner(x)
        if torch.is_autocast_enabled(x.device.type):
            return torch.roll(logits, 1, dims=1) * 0 + nn.functional.one_hot(
                (logits.argmax(1) + 1) % C, C).to(logits.dtype) * 10
        return logits


def test_bf16_flags_are_confirmed_in_fp32(net):
    model, x, y = net
    liar = LiesInBf16(model).eval()
    options = {"apgd-ce": {"n_iter": 10}, "apgd-t": {"n_iter": 10, "n_targets": 2},
               "fab-t": {"n_iter": 10, "n_targets": 2}, "square": {"n_queries": 50}}
    result = autoattack(liar, x, y, eps=1e-3, options=options, precision="bf16", return_details=True,
                        generator=torch.Generator().manual_seed(0))
    # nothing is broken at so small an eps, although every bf16 forward says "misclassified"
    assert bool(result.robust.all()) and torch.equal(result.x_adv, x)
    honest = autoattack(model, x, y, eps=0.04, options=options, precision="bf16", return_details=True,
                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(honest.robust, ~fooled(model, honest.x_adv, y))
    assert 0 < int(honest.robust.sum()) < len(y)
    assert (honest.x_adv - x).abs().max() <= 0.04 + 1e-6
    with pytest.raises(ConfigError, match="precision"):
        autoattack(model, x, y, eps=0.04, precision="fp8")


def test_channels_last_gives_the_same_flags_and_restores_the_model(net):
    model, x, y = net
    options = {"apgd-ce": {"n_iter": 10}, "apgd-t": {"n_iter": 10, "n_targets": 2},
               "fab-t": {"n_iter": 10, "n_targets": 2}, "square": {"n_queries": 50}}
    runs = [autoattack(model, x, y, eps=0.04, options=options, channels_last=cl, return_details=True,
                       generator=torch.Generator().manual_seed(0)) for cl in (False, True)]
    assert torch.equal(runs[0].robust, runs[1].robust)
    assert all(p.is_contiguous() for p in model.parameters())


def test_without_the_official_package_it_says_how_to_install_it(net, monkeypatch):
    model, x, y = net
    monkeypatch.setattr(official_module, "official_package", lambda: None)
    assert not official_module.official_available() and official_module.official_version() is None
    with pytest.raises(FastRobustError, match="pip install pyautoattack"):
        autoattack_official(model, x, y, eps=0.03)
    from fastrobust.evaluate import evaluate

    with pytest.warns(UserWarning, match="autoattack-official"):
        record = evaluate(model, (x, y), ["clean", "autoattack-official"], eps=0.03, progress=False)
    assert "pip install pyautoattack" in record["skipped"]["autoattack-official"]


def test_the_autoattack_benchmark_runs_and_records(shared_data, tmp_path, monkeypatch, capsys):
    """benchmarks/autoattack.py end to end on a small random model (both versions when pyautoattack is
    installed), and fastrobust alone with a note when it is not."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "autoattack.py"
    spec = importlib.util.spec_from_file_location("autoattack_benchmark", path)  # not "autoattack": a package
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "aa.jsonl"
    args = ["--model", "tinycnn", "--dataset", "cifar10", "--data-root", str(shared_data), "--n-points", "12",
            "--repeats", "1", "--threads", "1", "--json-out", str(out)]
    record = bench.main(args)
    versions = {"fastrobust"} | ({"official"} if official_module.official_available() else set())
    assert set(record["runs"]) == versions
    assert record["config"]["n_points"] == 12 and record["config"]["timer"] == "process CPU seconds"
    assert out.read_text().count("\n") == 1
    table = capsys.readouterr().out
    assert "| fastrobust |" in table
    if "official" in versions:
        assert record["summary"]["disagreements"] == {"robust_only_official": [], "robust_only_fastrobust": []}
    monkeypatch.setattr(bench, "official_available", lambda: False)
    record = bench.main(args[:-2])
    assert set(record["runs"]) == {"fastrobust"} and "pyautoattack is not installed" in record["notes"][0]


def test_evaluate_passes_how_autoattack_runs(net):
    """attack_options["autoattack"] accepts precision and channels_last (recorded only when given)."""
    from fastrobust.evaluate import evaluate

    model, x, y = net
    cheap = {"apgd-ce": {"n_iter": 5}, "apgd-t": {"n_iter": 5, "n_targets": 2}, "fab-t": {"n_iter": 5, "n_targets": 2},
             "square": {"n_queries": 30}}
    plain = evaluate(model, (x, y), ["autoattack"], eps=0.04, batch_size=16, progress=False,
                     attack_options={"autoattack": cheap})
    assert "precision" not in plain["attacks"]["autoattack"]["settings"]
    assert plain["attacks"]["autoattack"]["settings"]["options"]["square"]["rescale_schedule"] is False
    fast = evaluate(model, (x, y), ["autoattack"], eps=0.04, batch_size=16, progress=False,
                    attack_options={"autoattack": {**cheap, "precision": "bf16", "channels_last": True}})
    assert fast["attacks"]["autoattack"]["settings"]["precision"] == "bf16"
    assert fast["attacks"]["autoattack"]["settings"]["channels_last"] is True
    assert plain["attacks"]["autoattack"]["broken"] > 0 and fast["attacks"]["autoattack"]["broken"] > 0
    with pytest.raises(ConfigError, match="precision"):
        evaluate(model, (x, y), ["autoattack"], eps=0.04, progress=False, attack_options={"autoattack": {"precision": "fp8"}})


class Branchy(nn.Module):
    """Python control flow on the data: a trace would freeze one branch, so no frozen copy may be used."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        logits = self.inner(x)
        return logits if float(x.detach().mean()) < 2 else -logits


def test_frozen_copies_on_the_cpu_and_the_model_when_it_cannot_be_traced(net):
    model, x, y = net
    model = model.body  # ConvNet's call counters (len(x)) would make tracing warn, hence refuse
    options = {"apgd-ce": {"n_iter": 10}, "apgd-t": {"n_iter": 10, "n_targets": 2},
               "fab-t": {"n_iter": 10, "n_targets": 2}, "square": {"n_queries": 50}}
    runs = {}
    for freeze in (False, None):
        runs[freeze] = autoattack(model, x, y, eps=0.04, options=options, freeze=freeze, return_details=True,
                                  generator=torch.Generator().manual_seed(0))
    assert any("frozen TorchScript" in n for n in runs[None].notes)
    assert not any("frozen" in n for n in runs[False].notes)
    assert torch.equal(runs[None].robust, ~fooled(model, runs[None].x_adv, y))
    assert abs(int(runs[None].robust.sum()) - int(runs[False].robust.sum())) <= 1  # rounding-level differences
    branchy = Branchy(model).eval()
    result = autoattack(branchy, x, y, eps=0.04, options=options, return_details=True,
                        generator=torch.Generator().manual_seed(0))
    assert any(n.startswith("not frozen: tracing failed") for n in result.notes)
    bf16 = autoattack(model, x, y, eps=0.04, options=options, precision="bf16", return_details=True,
                      generator=torch.Generator().manual_seed(0))
    assert not any("frozen" in n for n in bf16.notes)


def test_frozen_copies_choose_their_layouts_and_hand_back_contiguous_gradients(net):
    """The gradient copy runs channels-last but returns contiguous input gradients equal to the model's; the query
    copy is the fused oneDNN one for ReLU and the channels-last one for SiLU (which oneDNN cannot fuse)."""
    from fastrobust.attacks._frozen import frozen_copies

    model, x, y = net
    relu = model.body
    silu = nn.Sequential(*[nn.SiLU() if isinstance(m, nn.ReLU) else m for m in relu]).eval()
    for body, kind in ((relu, "fused oneDNN queries"), (silu, "channels-last queries")):
        copies = frozen_copies(body, x, y)
        assert kind in copies.note
        grads = []
        for net_ in (body, copies.grad_model):
            xr = x.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(net_(xr), y), xr)
            grads.append(grad)
        assert grads[1].is_contiguous()
        assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)
        with torch.no_grad():
            assert torch.allclose(copies.query_model(x), body(x), rtol=1e-4, atol=1e-5)
    for odd in (UncopyableReLU(relu).eval(), ViewsItsWeight(C).eval()):  # traced as they are, contiguous
        copies = frozen_copies(odd, x, y)
        assert "contiguous gradients" in copies.note and copies.grad_model is not None


def test_the_gradient_copy_slices_large_batches_by_its_largest_activation():
    """A conv of 8 channels at 32 x 32 in float32 writes 32 KiB per row: SLICE_BYTES (12 MiB) holds 384 rows. A call
    of 1,000 rows runs in slices of 384 and returns the unsliced logits and input gradients; the pass counter sees
    one call of 1,000 rows (a slice is not a pass of its own)."""
    from fastrobust.attacks._frozen import SLICE_BYTES, frozen_copies
    from fastrobust.core.passes import CountedModel

    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10)).eval()
    x, y = torch.rand(1000, 3, 32, 32), torch.randint(0, 10, (1000,))
    counted = CountedModel(body).eval()
    copies = frozen_copies(counted, x[:20], y[:20])
    assert copies.grad_model is not None
    inner = copies.grad_model
    while not hasattr(inner, "rows"):  # the counting wrapper around the sliced copy
        inner = next(inner.children())
    assert inner.rows == SLICE_BYTES // (8 * 32 * 32 * 4) == 384
    calls = []
    inner.inner = RowsSeen(inner.inner, calls)
    before = counted.count.forward
    grads, logits = [], []
    for net_ in (body, copies.grad_model):
        xr = x.clone().requires_grad_(True)
        out = net_(xr)
        (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(out, y, reduction="sum"), xr)
        logits.append(out.detach())
        grads.append(grad)
    assert calls == [384, 384, 232]
    assert counted.count.forward - before == 1000
    assert torch.allclose(logits[0], logits[1], rtol=1e-4, atol=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


class RowsSeen(nn.Module):
    """``inner``, noting the rows of every call in ``calls``."""

    def __init__(self, inner: nn.Module, calls: list[int]):
        super().__init__()
        self.inner, self.calls = inner, calls

    def forward(self, x):
        self.calls.append(len(x))
        return self.inner(x)


class ViewsItsWeight(nn.Module):
    """Reads its convolution weight with .view, which a channels-last weight refuses."""

    def __init__(self, classes: int):
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 3, padding=1)

    def forward(self, x):
        flat = self.conv.weight.view(self.conv.weight.shape[0], -1)
        return self.conv(x).mean((2, 3)) + flat.sum(1)


class UncopyableReLU(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.lock = threading.Lock()  # deepcopy cannot pickle a lock

    def forward(self, x):
        return self.inner(x)


def test_l2_square_stops_only_on_a_misclassification_fp32_confirms(net):
    """Every bf16 forward of the liar says "misclassified": l_inf Square confirmed that in fp32, l_2 Square did not
    and stopped each point after its first query."""
    model, x, y = net
    liar = LiesInBf16(model).eval()
    x_adv, queries = square(liar, x, y, eps=1e-3, norm="l2", n_queries=20, precision="bf16", return_queries=True,
                            generator=torch.Generator().manual_seed(0))
    assert not bool(fooled(model, x_adv, y).any())  # nothing is broken at so small a radius
    assert bool((queries == 20).all())              # every point searched to the end of its budget


def test_bf16_on_a_cpu_without_native_bf16_warns_that_it_is_slower(monkeypatch):
    from fastrobust.attacks import _engine

    model = nn.Linear(2, 3)
    monkeypatch.setattr(_engine, "cpu_has_fast_bf16", lambda: False)
    with pytest.warns(UserWarning, match="precision='bf16' on a CPU without AMX or avx512-bf16"):
        _engine.execution_for(model, "bf16", torch.device("cpu"))
    monkeypatch.setattr(_engine, "cpu_has_fast_bf16", lambda: True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _engine.execution_for(model, "bf16", torch.device("cpu"))
        _engine.execution_for(model, "auto", torch.device("cpu"))
