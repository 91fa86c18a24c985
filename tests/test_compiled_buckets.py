"""The compiled copy of the attacks (attacks/_compiled.py): batches padded to a few fixed buckets change no result
and no pass count, and `compile` reaches autoattack from evaluate's attack options. torch.compile runs with its
"eager" backend here (dynamo's capture without inductor's C++ build), the path the GPU runs with inductor."""

from __future__ import annotations

import functools

import pytest
import torch

from fastrobust.attacks import autoattack
from fastrobust.attacks._compiled import BucketedModel, bucket_size, buckets_up_to, compiled_copy, padding_waste
from fastrobust.core.passes import CountedModel
from fastrobust.errors import ConfigError
from fastrobust.models import create

OPTIONS = {"apgd-ce": {"n_iter": 6}, "apgd-t": {"n_iter": 5, "n_targets": 2},
           "fab-t": {"n_iter": 5, "n_targets": 2}, "square": {"n_queries": 30}}


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create("tinycnn", width=4, num_classes=10).eval()
    x = torch.rand(11, 3, 32, 32)
    with torch.no_grad():
        y = model(x).argmax(1)  # every point correctly classified: every component has work
    return model, x, y


@pytest.fixture
def eager_compile(monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))


def test_bucket_sizes_are_few_and_waste_at_most_half():
    assert [bucket_size(r) for r in (0, 1, 8, 9, 12, 13, 16, 17, 25, 1000)] == [8, 8, 8, 12, 12, 16, 16, 24, 32, 1024]
    assert buckets_up_to(1000) == [8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    for rows in range(9, 3000):
        assert rows <= bucket_size(rows) <= 1.5 * rows
    assert padding_waste([9, 12]) == pytest.approx((12 + 12) / 21)


def test_padding_keeps_each_row_and_its_gradient(setup):
    model, x, y = setup
    padded = BucketedModel(model)
    for rows in (1, 5, 9, 11):
        xs = x[:rows].clone().requires_grad_(True)
        xp = x[:rows].clone().requires_grad_(True)
        out, out_padded = model(xs), padded(xp)
        assert out_padded.shape == out.shape
        torch.testing.assert_close(out_padded, out, rtol=1e-5, atol=1e-5)
        torch.nn.functional.cross_entropy(out, y[:rows]).backward()
        torch.nn.functional.cross_entropy(out_padded, y[:rows]).backward()
        torch.testing.assert_close(xp.grad, xs.grad, rtol=1e-4, atol=1e-7)


def test_passes_counted_are_the_real_rows(setup, eager_compile):
    model, x, y = setup
    counted = CountedModel(model)
    stand_in = compiled_copy(counted, "cpu")
    xs = x[:5].clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(stand_in(xs), y[:5]).backward()  # padded to 8 rows inside
    with torch.no_grad():
        stand_in(x[:9])  # padded to 12
    assert counted.count.snapshot() == (5 + 9, 5)


def test_autoattack_compiled_gives_the_eager_per_point_results_and_passes(setup, eager_compile):
    model, x, y = setup
    results = {}
    for compiled in (False, True):
        counted = CountedModel(model)
        result = autoattack(counted, x, y, eps=8 / 255, options=OPTIONS, freeze=False, compile=compiled,
                            generator=torch.Generator().manual_seed(0), return_details=True)
        results[compiled] = (result.broken_by, result.robust.tolist(), counted.count.snapshot(), result.notes)
    assert results[True][:3] == results[False][:3]
    assert any("torch.compile" in note for note in results[True][3])
    assert not any("torch.compile" in note for note in results[False][3])


def test_compile_reaches_autoattack_from_evaluate_options():
    from fastrobust.evaluate.attack_table import AUTOATTACK_EXECUTION

    assert "compile" in AUTOATTACK_EXECUTION


def test_compile_must_be_a_bool(setup):
    model, x, y = setup
    with pytest.raises(ConfigError, match="compile"):
        autoattack(model, x, y, eps=8 / 255, compile="yes")


def test_cuda_graph_mode_copies_outputs_and_gradients_out_of_the_padded_batch(setup):
    model, x, _ = setup
    padded = BucketedModel(model, cuda_graphs=False)
    padded.cuda_graphs = True  # the copies only (cudagraph_mark_step_begin is harmless without CUDA graphs)
    xs = x[:5].clone().requires_grad_(True)
    out = padded(xs)
    assert out._base is None  # not a view of the padded batch's logits
    (grad,) = torch.autograd.grad(out.sum(), [xs])
    assert grad._base is None and grad.shape == xs.shape


def test_the_compiled_copy_goes_through_the_compile_door(monkeypatch, eager_compile):
    """autoattack(compile=True) compiles through core.compiling.compile_model, so a damaged inductor cache is
    repaired before a compiled evaluation as before a compiled training run."""
    from fastrobust.core import compiling

    repaired = []
    monkeypatch.setattr(compiling, "repair_cache", lambda folder, log: repaired.append(folder))
    compiled_copy(torch.nn.Linear(4, 2).eval(), "cpu")
    assert repaired == [compiling.inductor_cache_dir()]
