"""Top Hessian eigenvalue by power iteration on Hessian-vector products (double backward)."""

from __future__ import annotations

import json

import torch

from fastrobust.analysis.hessian import input_hessian_eigenvalues, top_eigenvalue
from fastrobust.checkpoint import save_model
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
