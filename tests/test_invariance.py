"""Invariance evaluations (fastrobust.evaluate.invariance): the transformations, the scores, and their place in evaluate()."""

from __future__ import annotations

import json
import pytest
import torch

from fastrobust.errors import ConfigError
from fastrobust.evaluate import evaluate
from fastrobust.evaluate.invariance import (
    EVALUATIONS, add_gaussian_noise, evaluate_invariance, noise_correct_counts, rotate_translate, spatial_grid,
    spatial_robust,
)
from fastrobust.models import create as create_model

from helpers import synthetic_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def images(n: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_identity_and_integer_translations_are_exact_shifts_with_black_padding():
    x = images()
    assert torch.allclose(rotate_translate(x, 0.0), x, atol=1e-6)
    right = rotate_translate(x, 0.0, dx=2)
    assert torch.allclose(right[..., :, 2:], x[..., :, :-2], atol=1e-6) and right[..., :, :2].abs().max() < 1e-6
    up = rotate_translate(x, 0.0, dy=-1)
    assert torch.allclose(up[..., :-1, :], x[..., 1:, :], atol=1e-6) and up[..., -1, :].abs().max() < 1e-6


def test_rotations_turn_counter_clockwise_about_the_centre():
    x = images(size=9)  # odd and even sizes both rotate about the image centre
    assert torch.allclose(rotate_translate(x, 90.0), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5)
    assert torch.allclose(rotate_translate(x, -90.0), torch.rot90(x, -1, dims=(-2, -1)), atol=1e-5)
    y = images(size=8)
    assert torch.allclose(rotate_translate(y, 180.0), torch.flip(y, dims=(-2, -1)), atol=1e-5)
    # a small rotation keeps the centre's neighbourhood and blackens the corners
    z = torch.ones(1, 1, 32, 32)
    turned = rotate_translate(z, 30.0)
    assert turned[0, 0, 16, 16] == pytest.approx(1.0) and turned[0, 0, 0, 0] == 0


def test_spatial_grid_is_engstroms_and_starts_with_the_identity():
    grid = spatial_grid()
    assert len(grid) == 31 * 5 * 5 == len(set(grid)) and grid[0] == (0.0, 0.0, 0.0)
    assert {a for a, _, _ in grid} == {float(a) for a in range(-30, 31, 2)}
    assert {dx for _, dx, _ in grid} == {-3.0, -1.5, 0.0, 1.5, 3.0} == {dy for _, _, dy in grid}
    assert spatial_grid(10.0, 2, 0.0, 1)[0] == (0.0, 0.0, 0.0)  # added when the grid lacks it


def test_scores_equal_brute_force():
    torch.manual_seed(0)
    model = create_model("tinycnn", num_classes=4, image_size=8).eval()
    x, y = images(12), torch.arange(12) % 4
    grid = spatial_grid(20.0, 3, 2.0, 3)
    with torch.no_grad():
        brute = torch.stack([model(rotate_translate(x, *t)).argmax(1) == y for t in grid]).all(0)
        clean = model(x).argmax(1) == y
    assert torch.equal(spatial_robust(model, x, y, grid), brute)
    assert not (brute & ~clean).any()

    stds, draws = [0.0, 0.05, 0.3], 4
    counts = noise_correct_counts(model, x, y, stds, draws, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    expected = torch.zeros(3, 12, dtype=torch.long)
    with torch.no_grad():
        for _ in range(draws):
            for i, std in enumerate(stds):
                expected[i] += model(add_gaussian_noise(x, std, g)).argmax(1) == y
    assert torch.equal(counts, expected)
    assert torch.equal(counts[0], clean.long() * draws)  # std 0: the clean prediction on every draw
    noisy = add_gaussian_noise(x, 1.0, torch.Generator().manual_seed(0))
    assert noisy.min() >= 0 and noisy.max() <= 1


def test_evaluate_reports_invariance_in_the_record_format_outside_the_worst_case(tmp_path):
    torch.manual_seed(0)
    model = create_model("tinycnn", num_classes=4, image_size=8).eval()
    data = synthetic_dataset(test=30)
    options = {"spatial": {"rotations": 3, "translations": 3}, "gaussian-noise": {"stds": [0.05, 0.5], "draws": 3}}
    record = evaluate(model, data.test, ["pgd20", "gaussian-noise", "spatial"], eps=8 / 255, batch_size=8,
                      progress=False, seed=1, attack_options={"pgd20": {"steps": 2}, **options})
    noise, spatial = record["attacks"]["gaussian-noise"], record["attacks"]["spatial"]
    for entry in (noise, spatial):
        assert {"robust_acc", "robust", "broken", "settings", "seconds"} <= set(entry) and entry["invariance"]
        assert 0 <= entry["robust_acc"] <= record["clean_acc"]
    assert record["robust_acc"] == record["attacks"]["pgd20"]["robust_acc"]  # the worst case is the attacks'
    assert noise["settings"] == {"stds": [0.05, 0.5], "draws": 3} and set(noise["by_std"]) == {"0.05", "0.5"}
    assert noise["robust_acc"] == noise["by_std"]["0.5"]
    assert spatial["transformations"] == 27 and spatial["broken"] == record["clean_correct"] - spatial["robust"]
    # seeded: the same record again; the same entries from the module's own function
    again = evaluate(model, data.test, ["gaussian-noise", "spatial"], eps=8 / 255, batch_size=8, progress=False,
                     seed=1, attack_options=options)
    direct = evaluate_invariance(model, data.test.images, data.test.labels,
                                 {k: EVALUATIONS[k].settings(v) for k, v in options.items()}, batch_size=8, seed=1)
    for name in ("gaussian-noise", "spatial"):
        for key in ("robust_acc", "robust", "broken"):
            assert again["attacks"][name][key] == record["attacks"][name][key] == direct[name][key], (name, key)
    assert again["robust_acc"] is None  # no eps-ball attack was run

    with pytest.raises(ConfigError, match="has no setting"):
        evaluate(model, data.test, ["spatial"], eps=8 / 255, attack_options={"spatial": {"angles": 3}})
    with pytest.raises(ConfigError, match="draws"):
        evaluate(model, data.test, ["gaussian-noise"], eps=8 / 255, attack_options={"gaussian-noise": {"draws": 0}})


def test_cli_eval_runs_the_invariance_evaluations(tmp_path, capsys):
    from PIL import Image

    from fastrobust.models.checkpoint import save_model
    from fastrobust.cli import main

    for i in range(10):  # 8 test images, 2 training images (the folder format wants both splits)
        folder = tmp_path / "data" / ("test" if i < 8 else "train") / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((images(1, seed=i)[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy()).save(folder / f"{i}.png")
    torch.manual_seed(0)
    save_model(create_model("tinycnn", num_classes=2, image_size=8), tmp_path / "m.safetensors")
    argv = ["eval", "--checkpoint", str(tmp_path / "m.safetensors"), "--dataset", "imagefolder", "--data-root",
            str(tmp_path / "data"), "--device", "cpu", "--attack", "gaussian-noise", "spatial", "--quiet"]
    assert main(argv + ["--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record["attacks"]) == {"gaussian-noise", "spatial"} and record["attacks"]["spatial"]["transformations"] == 775
    assert record["n"] == 8 and record["robust_acc"] is None
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "noise std 0.02" in table and "all of 775 rotations/translations" in table, table


def test_the_documented_snippet_runs():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    section = text[text.index("## Invariance evaluations"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    namespace: dict = {}
    exec(compile(code, "docs/evaluation.md", "exec"), namespace)
    record = namespace["record"]
    assert set(record["attacks"]) == {"pgd20", "gaussian-noise", "spatial"}
    assert record["attacks"]["spatial"]["transformations"] == 7 * 3 * 3
