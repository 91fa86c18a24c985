"""The report as the front page of a result: evaluations kept in the run folder and shown, every accuracy with its
95 % interval, robust accuracy against cost as the first figure, weight averaging, sensitivity over one setting
only, readable figures (integer epochs, one legend) and plurals."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
from test_report import PNG_MAGIC, md_row, write_run

from fastrobust.analysis.report import build_report, figures, wilson_interval
from fastrobust.cli import main
from fastrobust.train.evaluations import save_evaluation


def section(markdown: str, heading: str) -> str:
    return markdown.split(f"## {heading}")[1].split("\n## ")[0]


# ----------------------------------------------------------------------------------------- 1. every evaluation
def test_the_latest_evaluation_on_the_largest_point_set_is_the_one_shown(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "run", "trades", 0, 0.82, 0.53, 60.0)
    run = root / "run"
    t0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)

    def evaluation(minutes: int, n: int, acc: float) -> None:
        record = {"eps": 8 / 255, "n": n, "norm": "linf", "clean_acc": 0.8, "robust_acc": acc,
                  "attacks": {"autoattack": {"robust_acc": acc, "settings": {}}}}
        points = {"split": "test", "selection": "balanced_head", "count": n}
        save_evaluation(run, record, weights="best.safetensors", points=points, now=t0 + datetime.timedelta(minutes=minutes))

    evaluation(0, 1000, 0.40)
    evaluation(1, 1000, 0.45)   # the same points later: replaces 0.40
    evaluation(2, 200, 0.30)    # fewer points: listed, not in the table
    save_evaluation(run, {"eps": 8 / 255, "n": 1000, "attacks": {"autoattack": {"robust_acc": 0.1}}},
                    weights="last.safetensors", points={}, now=t0 + datetime.timedelta(minutes=3))  # other weights
    assert len(list((run / "evaluations").glob("*.json"))) == 4
    build_report(root, tmp_path / "r", html_page=False)
    md = (tmp_path / "r" / "report.md").read_text()
    assert md_row(md, "trades")[4].startswith("45.00 [")
    listed = section(md, "Every run").split("Every evaluation:")[1]
    assert md_row(listed, "run")[:6] == ["run", "best.safetensors", "autoattack", "8/255", "1000 of 10000, class-balanced",
                                         "45.00 [41.94, 48.10]"]
    assert "200 of 10000, class-balanced" in listed and "last.safetensors" in listed
    assert "1 older evaluation of the same attack and points left out" in listed


# ----------------------------------------------------------------------------------------- 2. intervals
@pytest.mark.parametrize("accuracy, n", [(0.82, 10000), (0.195, 1000), (0.0, 1000), (1.0, 50), (2 / 7, 7)])
def test_wilson_interval_matches_scipy(accuracy, n):
    stats = pytest.importorskip("scipy.stats", reason="scipy is in the [test] extra: pip install -e '.[test]'")
    expected = stats.binomtest(round(accuracy * n), n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(accuracy, n) == pytest.approx((expected.low, expected.high), abs=1e-12)


def test_wilson_interval_by_hand():
    # p = 0.5, n = 100, z = 1.959964: centre 0.5, half = z * sqrt(0.25/100 + z^2/40000) / (1 + z^2/100)
    assert wilson_interval(0.5, 100) == pytest.approx((0.40383153, 0.59616847), abs=1e-8)
    with pytest.raises(ValueError):
        wilson_interval(0.5, 0)


def test_seed_groups_show_mean_and_std_and_the_caption_says_which(tmp_path):
    root = tmp_path / "runs"
    for seed, acc in ((0, 0.40), (1, 0.44)):
        write_run(root, f"s{seed}", "fast_at", seed, 0.8, acc, 60.0)
    write_run(root, "trades", "trades", 0, 0.8, 0.5, 60.0)
    build_report(root, tmp_path / "r", html_page=False)
    md = (tmp_path / "r" / "report.md").read_text()
    assert md_row(md, "fast_at")[2] == "42.00 ± 2.83" and md_row(md, "fast_at")[7] == "2"
    assert md_row(md, "trades")[2] == "50.00 [49.02, 50.98]"
    assert "95 % Wilson score interval" in md and "mean ± std over the seeds" in md


# ----------------------------------------------------------------------------------------- 3, 6. figures
@pytest.fixture
def drawn(monkeypatch):
    """Every figure drawn: name -> (x tick labels of each visible panel, legends on panels, figure legends)."""
    seen: dict[str, tuple] = {}
    real = figures._save

    def keep(fig, path):
        fig.canvas.draw()
        panels = [ax for ax in fig.axes if ax.get_visible()]
        seen[Path(path).name] = ([[t.get_text() for t in ax.get_xticklabels()] for ax in panels],
                                 sum(ax.get_legend() is not None for ax in panels), len(fig.legends))
        return real(fig, path)

    monkeypatch.setattr(figures, "_save", keep)
    return seen


def test_cost_figure_comes_first_and_epochs_are_whole_and_each_figure_has_one_legend(tmp_path, drawn):
    root = tmp_path / "runs"
    write_run(root, "trades", "trades", 0, 0.82, 0.53, 600.0, aa=0.49)
    write_run(root, "fast_at", "fast_at", 0, 0.86, 0.44, 100.0)
    written = build_report(root, tmp_path / "r")
    assert Path(written["figures"][0]).name == "robust_vs_cost.png"
    assert Path(written["figures"][0]).read_bytes()[:8] == PNG_MAGIC
    ticks, _, _ = drawn["training_curves.png"]
    for labels in ticks:  # a 3-epoch run: 1, 2, 3, never 1.25
        numbers = [float(t.replace("−", "-")) for t in labels if t]
        assert numbers and all(x == int(x) for x in numbers), labels
    for name, (_, on_panels, on_figure) in drawn.items():
        if name != "stability.png":
            assert (on_panels, on_figure) == (0, 1), name
    md = (tmp_path / "r" / "report.md").read_text()
    assert "AutoAttack, else PGD-20" in md  # trades drawn with AutoAttack, fast_at with its strongest attack


def test_a_report_of_one_run_folder_reads_in_the_singular(tmp_path, capsys):
    write_run(tmp_path, "only", "trades", 0, 0.82, 0.53, 600.0)
    assert main(["report", str(tmp_path / "only"), "--out", str(tmp_path / "r")]) == 0
    said = capsys.readouterr().out
    assert said.startswith("report of 1 run: ") and "1 runs" not in said
    md = (tmp_path / "r" / "report.md").read_text()
    assert "- 1 run (trades); seed 0" in md and "1 runs" not in md and "1 seeds" not in md
    assert "(robust_vs_cost.png)" in md  # the cost figure with a single point


# ----------------------------------------------------------------------------------------- 4. weight averaging
def test_weight_averaging_says_which_weights_best_holds_and_draws_both_curves(tmp_path, drawn):
    root = tmp_path / "runs"
    write_run(root, "speedrun", "fast_at", 0, 0.5, 0.3, 60.0)
    run = root / "speedrun"
    result = json.loads((run / "result.json").read_text())
    result["config"].update(ema_decay=0.999, ema_start_epoch=1, ema_select="either")
    result.update(best_weights="averaged", best_epoch=2, best_selected_by="val_robust_acc", best_val_value=0.31)
    (run / "result.json").write_text(json.dumps(result))
    lines = [{"epoch": e, "train_loss": 2.0 - 0.2 * e, "val_robust_acc": 0.2 + 0.03 * e,
              **({"ema_val_robust_acc": 0.25 + 0.03 * e} if e >= 2 else {})} for e in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    written = build_report(root, tmp_path / "r", html_page=False)
    md = (tmp_path / "r" / "report.md").read_text()
    row = md_row(section(md, "Weight averaging"), "speedrun")
    assert row == ["speedrun", "0.999", "1", "averaged and trained weights",
                   "the averaged weights of epoch 2 (validation robust accuracy 31.00 %)"]
    assert "weight_averaging.png" in {Path(p).name for p in written["figures"]}
    assert drawn["weight_averaging.png"][1:] == (0, 1)


# ----------------------------------------------------------------------------------------- 5. sensitivity
def test_sensitivity_only_over_runs_that_differ_in_that_one_setting(tmp_path):
    root = tmp_path / "two"
    write_run(root, "a", "backward_smoothing", 0, 0.8, 0.5, 60.0, method_params={"gamma": 0.5, "beta": 6})
    write_run(root, "b", "backward_smoothing", 0, 0.8, 0.52, 60.0, method_params={"gamma": 1.0, "beta": 10})
    build_report(root, tmp_path / "r2", html_page=False)
    assert "## Sensitivity" not in (tmp_path / "r2" / "report.md").read_text()

    root = tmp_path / "one"
    for name, gamma, acc in (("a", 0.5, 0.5), ("b", 1.0, 0.52), ("c", 1.0, 0.54)):
        write_run(root, name, "backward_smoothing", {"a": 0, "b": 0, "c": 1}[name], 0.8, acc, 60.0,
                  method_params={"gamma": gamma, "beta": 6})
    build_report(root, tmp_path / "r1", html_page=False)
    sens = section((tmp_path / "r1" / "report.md").read_text(), "Sensitivity")
    assert "backward_smoothing, gamma:" in sens and "beta:" not in sens
    assert md_row(sens, "0.5")[:3] == ["0.5", "1", "80.00 [79.20, 80.77]"]
    assert md_row(sens, "1")[:4] == ["1", "2", "80.00 ± 0.00", "53.00 ± 1.41"]
