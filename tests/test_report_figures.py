"""Figures a reader can read with many runs: a fixed width whatever the settings labels (long labels numbered,
their full text in the caption), no matplotlib warning while drawing, and robust accuracy against eps drawn per
threat model, each in its own units, a line joining evaluations of one point set only."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import pytest
from test_report import PNG_MAGIC, write_run

from fastrobust.analysis.report import build_report, figures
from fastrobust.train.evaluations import save_evaluation

MAX_WIDTH = 1100  # px: the page is 1100 px wide, a wider PNG shrinks to a thumbnail
MAX_HEIGHT = 1000


def png_size(path: str | Path) -> tuple[int, int]:
    """(width, height) in pixels from the PNG's IHDR chunk (bytes 16-24)."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC
    return struct.unpack(">II", data[16:24])


def long_settings_runs(root: Path) -> None:
    """8 runs (2 methods x 4 settings) whose groups differ in several settings: labels of about 170 characters."""
    i = 0
    for method in ("backward_smoothing", "trades"):
        for beta in (3.0, 6.0):
            for lr in (0.05, 0.1):
                name = f"{method}_beta-{beta}_lr-{lr}"
                write_run(root, name, method, 0, 0.80, 0.40 + 0.02 * i, 100.0 + 30 * i,
                          method_params={"beta": beta, "step_size": "2/255" if lr < 0.08 else "1/255"},
                          pgd100=0.39 + 0.02 * i, aa=0.35 + 0.02 * i, eps_curve={2 / 255: 0.7, 4 / 255: 0.6})
                path = root / name / "result.json"
                result = json.loads(path.read_text())
                result["config"].update(lr=lr, batch_size=64 if i % 2 else 128, ema_decay=0.999 if i % 3 else 0.0,
                                        schedule="cosine" if beta < 4 else "piecewise",
                                        weight_decay=5e-4 if i < 4 else 2e-4, momentum=0.9 if i % 4 else 0.8,
                                        val_pgd_steps=10 if i % 2 else 5, test_pgd_steps=20 if i < 6 else 10,
                                        model_params={"width": 4 if i % 3 else 8, "dropout": 0.1 * (i % 2)})
                path.write_text(json.dumps(result))
                i += 1


def test_figures_keep_a_fixed_width_with_long_settings_labels(tmp_path):
    root = tmp_path / "runs"
    long_settings_runs(root)
    written = build_report(root, tmp_path / "r")
    names = {Path(f).name for f in written["figures"]}
    assert {"robust_vs_cost.png", "accuracy.png", "training_curves.png", "robust_vs_eps.png"} <= names
    for figure in written["figures"]:
        width, height = png_size(figure)
        assert width <= MAX_WIDTH and 200 <= height <= MAX_HEIGHT, (Path(figure).name, width, height)
    md = (tmp_path / "r" / "report.md").read_text()
    # the legend numbers the groups; the caption gives each number's full label
    assert "Legend: 1 = trades (" in md and "8 = backward_smoothing (" in md  # the paper's method order


def test_short_labels_stay_as_they_are():
    groups = [("trades", []), ("fast_at", [])]
    assert figures.legend_labels(groups) == {"trades": "trades", "fast_at": "fast_at"}
    assert figures.legend_key(groups) == ""


def test_a_report_of_many_runs_draws_without_a_warning(tmp_path):
    root = tmp_path / "runs"
    long_settings_runs(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_report(root, tmp_path / "r")
    assert [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught] == []


@pytest.fixture
def eps_lines(monkeypatch):
    """The panels of robust_vs_eps.png as drawn: [(x label, [(legend label, x data, y data)])]."""
    seen: list = []
    real = figures._save

    def keep(fig, path):
        if Path(path).name == "robust_vs_eps.png":
            for ax in fig.axes:
                if ax.get_visible():
                    seen.append((ax.get_xlabel(), [(line.get_label(), list(line.get_xdata()), list(line.get_ydata()))
                                                   for line in ax.lines]))
        return real(fig, path)

    monkeypatch.setattr(figures, "_save", keep)
    return seen


def test_robust_accuracy_against_eps_is_drawn_per_threat_model(tmp_path, eps_lines):
    root = tmp_path / "runs"
    write_run(root, "trades", "trades", 0, 0.82, 0.53, 600.0)
    run = root / "trades"

    def evaluation(eps: float, norm: str, n: int, acc: float) -> None:
        record = {"eps": eps, "norm": norm, "n": n, "clean_acc": 0.8, "robust_acc": acc,
                  "attacks": {"autoattack": {"robust_acc": acc, "settings": {}}}}
        save_evaluation(run, record, weights="best.safetensors",
                        points={"split": "test", "selection": "balanced_head", "count": n})

    for eps, acc in ((2 / 255, 0.70), (4 / 255, 0.60), (8 / 255, 0.45)):
        evaluation(eps, "linf", 1000, acc)
    evaluation(16 / 255, "linf", 200, 0.20)  # other points: not joined to the 1000-point line
    evaluation(0.25, "l2", 1000, 0.65)
    evaluation(0.5, "l2", 1000, 0.55)
    evaluation(6.0, "l1", 1000, 0.50)
    evaluation(12.0, "l1", 1000, 0.40)
    build_report(root, tmp_path / "r", html_page=False)
    panels = dict(eps_lines)
    assert set(panels) == {"eps (x/255), l_inf", "eps, l2", "eps, l1"}
    linf = panels["eps (x/255), l_inf"]
    xs = sorted(tuple(round(x, 6) for x in line[1]) for line in linf)
    assert xs == [(2.0, 4.0, 8.0)]  # the 200-point evaluation alone is a single eps: no line
    assert [round(x, 6) for x in panels["eps, l2"][0][1]] == [0.25, 0.5]  # raw units, not 127.5
    assert [round(x, 6) for x in panels["eps, l1"][0][1]] == [6.0, 12.0]
    assert [round(y, 6) for y in panels["eps, l1"][0][2]] == [50.0, 40.0]


def test_eps_lines_on_two_point_sets_are_two_lines_labelled_with_n(tmp_path, eps_lines):
    root = tmp_path / "runs"
    write_run(root, "trades", "trades", 0, 0.82, 0.53, 600.0)
    for n, accs in ((1000, (0.70, 0.60)), (200, (0.72, 0.58))):
        for eps, acc in zip((2 / 255, 4 / 255), accs):
            record = {"eps": eps, "norm": "linf", "n": n, "clean_acc": 0.8, "robust_acc": acc,
                      "attacks": {"autoattack": {"robust_acc": acc, "settings": {}}}}
            save_evaluation(root / "trades", record, weights="best.safetensors",
                            points={"split": "test", "selection": "balanced_head", "count": n})
    build_report(root, tmp_path / "r", html_page=False)
    (_, lines), = eps_lines
    assert sorted((label, [round(y, 6) for y in ys]) for label, _, ys in lines) == [
        ("trades (n=1000)", [70.0, 60.0]), ("trades (n=200)", [72.0, 58.0])]
