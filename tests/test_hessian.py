"""Top Hessian eigenvalue by power iteration on Hessian-vector products (double backward)."""

from __future__ import annotations

import json

import torch

from fastrobust.analysis.hessian import input_hessian_eigenvalues, top_eigenvalue
from fastrobust.models.checkpoint import save_model
from fastrobust.cli import main
from fastrobust.models import create


def spd_matrix(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def test_quadratic_top_eigenvalue_matches_known_matrix():
    eigenvalues = [7.5, 4.0, 2.0, 1.0, 0.5, 0.1]
    a = spd_matrix(eigenvalues)
    x = torch.randn(6, dtype=torch.float64)
    value = top_eigenvalue(lambda v: 0.5 * v @ a @ v, x, iterations=50, tol=1e-10,
                           generator=torch.Generator().manual_seed(1))
    assert abs(value - 7.5) / 7.5 < 1e-3
    assert abs(value - torch.linalg.eigvalsh(a).max().item()) / 7.5 < 1e-3


def test_quadratic_default_iterations_and_shape_independence():
    a = spd_matrix([3.0, 1.0, 0.2, 0.1], seed=3)
    x = torch.randn(2, 2, dtype=torch.float64)  # any shape: the vector is x flattened
    value = top_eigenvalue(lambda v: 0.5 * v.flatten() @ a @ v.flatten(), x, generator=torch.Generator().manual_seed(0))
    assert abs(value - 3.0) / 3.0 < 1e-3


def test_per_example_eigenvalues_of_a_block_diagonal_hessian():
    blocks = [spd_matrix([5.0, 1.0, 0.5], seed=1), spd_matrix([2.0, 1.5, 0.1], seed=2)]
    x = torch.randn(2, 3, dtype=torch.float64)

    def loss(v):
        return sum(0.5 * v[i] @ blocks[i] @ v[i] for i in range(2))

    values = top_eigenvalue(loss, x, iterations=100, tol=1e-12, per_example=True, generator=torch.Generator().manual_seed(0))
    assert values.shape == (2,)
    assert torch.allclose(values, torch.tensor([5.0, 2.0], dtype=torch.float64), rtol=1e-3)


def test_model_inner_loss_eigenvalues_leave_the_model_as_found():
    torch.manual_seed(0)
    model = create("tinycnn", num_classes=4, image_size=8, activation="softplus")
    x = torch.rand(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    grads_before = [p.grad for p in model.parameters()]
    for init in ("random", "backward_smoothing"):
        values = input_hessian_eigenvalues(model, x, y, eps=8 / 255, init=init, iterations=5,
                                           generator=torch.Generator().manual_seed(0))
        assert values.shape == (4,) and torch.isfinite(values).all()
    assert [p.grad for p in model.parameters()] == grads_before and model.training


def test_analyze_cli_on_a_model_file_and_on_saved_checkpoints(tmp_path, monkeypatch, capsys):
    import fastrobust.data

    from helpers import synthetic_dataset

    monkeypatch.setattr(fastrobust.data, "load_dataset", lambda *a, **k: synthetic_dataset(train=8, val=8, test=8))
    torch.manual_seed(0)
    model = create("tinycnn", num_classes=4, image_size=8)
    run = tmp_path / "run"
    save_model(model, run / "best.safetensors", {"epoch": 2})
    for step, epoch in ((4, 1), (8, 2)):
        folder = run / "checkpoints" / f"step-{step:09d}"
        save_model(model, folder / "model.safetensors")
        (folder / "state.json").write_text(json.dumps({"epoch": epoch}))
    args = ["analyze", "hessian", "--dataset", "synthetic", "--n", "6", "--iterations", "3", "--json"]
    assert main(args + ["--checkpoint", str(run)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["n"] == 6 and set(record) >= {"random", "backward_smoothing"}
    assert all(isinstance(record[i][k], float) for i in ("random", "backward_smoothing") for k in ("mean", "median", "max"))
    assert main(args + ["--checkpoint", str(run), "--all-epochs", "--loss", "ce", "--init", "random"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in records] == ["epoch 1 (step 4)", "epoch 2 (step 8)"]
    assert main(args + ["--checkpoint", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _run_folder(tmp_path, *, dataset: str, eps: float, in_channels: int = 3):
    torch.manual_seed(0)
    model = create("tinycnn", num_classes=4, image_size=8, in_channels=in_channels)
    run = tmp_path / "run"
    save_model(model, run / "best.safetensors", {"epoch": 1})
    (run / "config.json").write_text(json.dumps({"dataset": dataset, "eps": eps}))
    return run


def test_analyze_cli_defaults_to_the_runs_dataset_and_eps(tmp_path, monkeypatch, capsys):
    import fastrobust.data

    from helpers import synthetic_dataset

    asked = []
    monkeypatch.setattr(fastrobust.data, "load_dataset",
                        lambda name, *a, **k: asked.append(name) or synthetic_dataset(train=8, val=8, test=8))
    run = _run_folder(tmp_path, dataset="synthetic", eps=0.1)
    args = ["analyze", "hessian", "--checkpoint", str(run), "--n", "4", "--iterations", "2", "--init", "random",
            "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert asked == ["synthetic"] and json.loads(captured.out)["eps"] == 0.1
    assert f"--dataset synthetic (the dataset of run {run})" in captured.err
    assert f"--eps 0.1 (the eps run {run} was trained and tested at" in captured.err
    assert main(args + ["--eps", "8/255"]) == 0  # an explicit --eps wins, silently
    captured = capsys.readouterr()
    assert json.loads(captured.out)["eps"] == 8 / 255 and "--eps" not in captured.err


def test_analyze_cli_names_a_model_that_does_not_fit_the_data_in_one_line(tmp_path, monkeypatch, capsys):
    import fastrobust.data

    from helpers import synthetic_dataset

    monkeypatch.setattr(fastrobust.data, "load_dataset", lambda *a, **k: synthetic_dataset(train=8, val=8, test=8))
    run = _run_folder(tmp_path, dataset="mnist", eps=0.1, in_channels=1)  # an MNIST run analysed on RGB images
    assert main(["analyze", "hessian", "--checkpoint", str(run), "--dataset", "synthetic", "--n", "4",
                 "--iterations", "2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "RuntimeError" not in err
    assert f"run {run} was trained on mnist, analysed here on synthetic" in err
    assert "takes in_channels=1, dataset 'synthetic' has 3-channel images" in err and "(--dataset mnist)" in err
    outside = tmp_path / "model.safetensors"  # outside a run, --dataset is asked for
    save_model(create("tinycnn", num_classes=4, image_size=8), outside, {})
    assert main(["analyze", "hessian", "--checkpoint", str(outside)]) == 2
    assert "--dataset is needed" in capsys.readouterr().err


def test_analyze_help_says_where_all_epochs_reads(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["analyze", "hessian", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "RUN/epochs/epoch-NNN.safetensors" in text and "copy them aside" not in text
