"""The report's Loss smoothness section for hessian.json of the final model only (evaluate.hessian.per_epoch:
false), as well as per epoch."""

from __future__ import annotations

import json

from fastrobust.analysis.report import build_report

from test_report import PNG_MAGIC, md_row, write_run


def _hessian(run, per_epoch: bool, random: float, backward: float) -> None:
    epochs = [(f"epoch {e}", e) for e in (1, 2)] if per_epoch else [("best", None)]
    records = [{"label": label, "epoch": epoch, "model": "best.safetensors",
                "random": {"mean": random * (epoch or 1), "std": 0.1, "median": random, "max": random},
                "backward_smoothing": {"mean": backward * (epoch or 1), "std": 0.1, "median": backward, "max": backward}}
               for label, epoch in epochs]
    (run / "hessian.json").write_text(json.dumps({
        "settings": {"n": 8, "loss": "kl", "iterations": 5, "per_epoch": per_epoch},
        "points": {"count": 8, "selection": "balanced_head"}, "n": 8, "eps": 8 / 255, "records": records}))


def _smoothness(text: str) -> str:
    """The Loss smoothness section of report.md."""
    start = text.index("## Loss smoothness")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_final_model_hessian_gets_the_loss_smoothness_section(tmp_path):
    root = tmp_path / "sweep"
    for seed, (random, backward) in enumerate(((0.4, 0.2), (0.6, 0.4))):
        write_run(root, f"bs_seed-{seed}", "backward_smoothing", seed, 0.8, 0.5, 100.0)
        _hessian(root / f"bs_seed-{seed}", False, random, backward)
    write_run(root, "fast_at", "fast_at", 0, 0.8, 0.4, 50.0)
    _hessian(root / "fast_at", False, 1.0, 0.8)
    build_report(root, tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Loss smoothness (paper Fig. 3)" in text and "Final (best) model only" in text
    row = md_row(_smoothness(text), "backward_smoothing")
    assert row[1:] == ["2", "0.5 ± 0.14", "0.3 ± 0.14", "1.67"]  # (0.4+0.6)/2, (0.2+0.4)/2, 0.5/0.3
    assert md_row(_smoothness(text), "fast_at")[1:] == ["1", "1", "0.8", "1.25"]
    assert (tmp_path / "report" / "hessian.png").read_bytes()[:8] == PNG_MAGIC
    assert "Top input-Hessian eigenvalue of the final (best) model" in text
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Final (best) model only" in html


def test_per_epoch_and_final_model_groups_share_the_section(tmp_path):
    root = tmp_path / "sweep"
    write_run(root, "trades", "trades", 0, 0.8, 0.5, 100.0)
    _hessian(root / "trades", True, 0.5, 0.25)
    write_run(root, "fast_at", "fast_at", 0, 0.8, 0.4, 50.0)
    _hessian(root / "fast_at", False, 1.0, 0.5)
    build_report(root, tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert text.count("## Loss smoothness") == 1
    assert md_row(_smoothness(text), "trades")[3:5] == ["0.5 → 1", "0.25 → 0.5"]  # the per-epoch table: first → last epoch
    assert md_row(_smoothness(text), "fast_at")[1:] == ["1", "1", "0.5", "2.00"]
    assert "Top input-Hessian eigenvalue against the epoch" in text
