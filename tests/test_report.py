"""Reports from a fixture of run records: the Table 2 numbers, stability and sensitivity tables, valid PNGs, HTML."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fastrobust.analysis.report import build_report
from fastrobust.cli import main
from fastrobust.errors import FastRobustError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SOURCE = "/data/cifar10-jpeg/cifar10-jpeg.tar.gz (JPEG mirror CIFAR-10-images/{train,test}/<class>/*.jpg)"


def write_run(root: Path, name: str, method: str, seed: int, clean: float, pgd20: float, seconds: float, *,
              method_params: dict | None = None, pgd100: float | None = None, aa: float | None = None,
              eps_curve: dict[float, float] | None = None, aa_name: str = "autoattack") -> None:
    run = root / name
    run.mkdir(parents=True)
    config = {"method": method, "method_params": method_params or {}, "model": "resnet18", "model_params": {},
              "dataset": "cifar10", "epochs": 3, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
              "schedule": "piecewise", "seed": seed, "eps": 8 / 255, "device": "cpu", "activation": "relu",
              "val_pgd_steps": 10, "test_pgd_steps": 20, "eval_step_size": 2 / 255, "out": str(run)}
    result = {"config": config, "seed": seed, "train_seconds": seconds, "best_epoch": 3,
              **({"method_cost_passes": 12.333333} if method == "trades" else {}),
              "environment": {"torch": "2.13.0", "device": "cpu (x86_64, 2 threads)", "fastrobust": "0.1", "python": "3.12"},
              "dataset": {"name": "cifar10", "source": SOURCE, "train": 49000, "val": 1000, "test": 10000},
              "test": {"clean_acc": clean, "pgd20_acc": pgd20, "n": 10000, "eps": 8 / 255, "step_size": 2 / 255}}
    (run / "result.json").write_text(json.dumps(result))
    (run / "config.json").write_text(json.dumps(config))
    lines = [{"epoch": e, "train_loss": 2.0 - 0.3 * e, "val_robust_acc": pgd20 * e / 3, "val_clean_acc": clean, "lr": 0.1}
             for e in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    evaluations = []
    if pgd100 is not None or aa is not None:
        attacks = {}
        if pgd100 is not None:
            attacks["pgd100"] = {"robust_acc": pgd100, "settings": {"steps": 100}}
        if aa is not None:
            attacks[aa_name] = {"robust_acc": aa, "settings": {"version": "standard", "options": {}}}
        worst = min(v["robust_acc"] for v in attacks.values())
        evaluations.append({"eps": 8 / 255, "n": 10000, "clean_acc": clean, "robust_acc": worst, "attacks": attacks})
    for eps, acc in (eps_curve or {}).items():
        evaluations.append({"eps": eps, "n": 10000, "clean_acc": clean, "robust_acc": acc,
                            "attacks": {"pgd20": {"robust_acc": acc}}})
    if evaluations:
        (run / "eval.json").write_text(json.dumps({"model": "best.safetensors", "evaluations": evaluations}))


@pytest.fixture
def records(tmp_path):
    root = tmp_path / "sweep"
    write_run(root, "trades", "trades", 0, 0.8200, 0.5300, 600.0, method_params={"beta": 6}, pgd100=0.5250, aa=0.4900)
    write_run(root, "natural", "natural", 0, 0.9500, 0.0000, 60.0)
    write_run(root, "fast_at_seed-0", "fast_at", 0, 0.8600, 0.4400, 100.0)
    write_run(root, "fast_at_seed-1", "fast_at", 1, 0.8400, 0.4600, 110.0)
    write_run(root, "fast_at_seed-2", "fast_at", 2, 0.8800, 0.0300, 90.0)  # a collapsed seed
    for gamma, acc, seconds in ((0.5, 0.5000, 190.0), (1.0, 0.5200, 210.0)):
        write_run(root, f"bs_gamma-{gamma}", "backward_smoothing", 0, 0.8000, acc, seconds,
                  method_params={"gamma": gamma, "step_size": "8/255"}, pgd100=acc - 0.01,
                  eps_curve={2 / 255: 0.75, 4 / 255: 0.65})
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{}")
    return root


def md_row(markdown: str, label: str) -> list[str]:
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in:\n{markdown}")


def test_table2_numbers(records, tmp_path):
    out = tmp_path / "report"
    written = build_report(records, out)
    md = (out / "report.md").read_text()
    header = md_row(md, "Method")
    assert header == ["Method", "Clean", "PGD-20", "PGD-100", "AutoAttack", "Time (min)", "Time / TRADES", "Seeds",
                      "Declared passes"]
    # one run: each accuracy with its 95 % Wilson interval on its 10,000 points (scipy's binomtest(...).
    # proportion_ci(method="wilson") gives the same bounds)
    assert md_row(md, "trades") == ["trades", "82.00 [81.23, 82.74]", "53.00 [52.02, 53.98]", "52.50 [51.52, 53.48]",
                                    "49.00 [48.02, 49.98]", "10.0", "1.00x", "1", "12.33"]
    assert md_row(md, "natural") == ["natural", "95.00 [94.56, 95.41]", "0.00 [0.00, 0.04]", "-", "-", "1.0", "0.10x",
                                     "1", "-"]
    # three seeds: mean ± sample std; 100, 110, 90 s -> 1.67 min, 1.67/10 = 0.17x
    assert md_row(md, "fast_at") == ["fast_at", "86.00 ± 2.00", "31.00 ± 24.27", "-", "-", "1.7 ± 0.2", "0.17x", "3", "-"]
    assert md_row(md, "backward_smoothing (gamma=0.5)")[1:4] == ["80.00 [79.20, 80.77]", "50.00 [49.02, 50.98]",
                                                                 "49.00 [48.02, 49.98]"]
    assert md_row(md, "backward_smoothing (gamma=1)")[5:7] == ["3.5", "0.35x"]
    # table rows in the paper's method order
    order = [line.split("|")[1].strip() for line in md.splitlines() if re.match(r"\| (natural|trades|fast_at|backward)", line)]
    assert order[:4] == ["natural", "trades", "fast_at", "backward_smoothing (gamma=0.5)"]
    assert written["runs"] == 7 and any(m["name"] == "broken" for m in written["missing"])


def test_stability_sensitivity_and_provenance(records, tmp_path):
    out = tmp_path / "report"
    build_report(records, out)
    md = (out / "report.md").read_text()
    # fast_at over 3 seeds: 44, 46, 3 -> mean 31.00, std 24.27, median 44.00, best 46.00, worst 3.00
    assert md_row(md, "fast_at")[:7] == ["fast_at", "86.00 ± 2.00", "31.00 ± 24.27", "-", "-", "1.7 ± 0.2", "0.17x"]
    stab = md.split("## Stability")[1].split("## ")[0]
    assert md_row(stab, "fast_at") == ["fast_at", "3", "31.00", "24.27", "44.00", "46.00", "3.00"]
    sens = md.split("## Sensitivity")[1].split("## ")[0]
    assert "backward_smoothing, gamma" in sens
    assert md_row(sens, "0.5") == ["0.5", "1", "80.00 [79.20, 80.77]", "50.00 [49.02, 50.98]", "49.00 [48.02, 49.98]",
                                   "-"]
    assert md_row(sens, "1") == ["1", "1", "80.00 [79.20, 80.77]", "52.00 [51.02, 52.98]", "51.00 [50.02, 51.98]", "-"]
    intro = md.split("## What was run")[1].split("## ")[0]
    for text in ("cifar10", "resnet18", "3 epochs", "piecewise", "cpu (x86_64, 2 threads)", "torch 2.13.0", "JPEG re-encoding"):
        assert text in intro, text


def test_figures_are_valid_pngs_and_html_is_self_contained(records, tmp_path):
    out = tmp_path / "report"
    written = build_report(records, out)
    names = {Path(p).name for p in written["figures"]}
    assert {"robust_vs_cost.png", "accuracy.png", "stability.png", "training_curves.png", "robust_vs_eps.png"} <= names
    assert Path(written["figures"][0]).name == "robust_vs_cost.png"  # the first figure of the report
    for path in written["figures"]:
        data = Path(path).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000
        assert f"]({Path(path).name})" in (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(written["figures"])
    assert "<table>" in page and "src='http" not in page


def test_missing_columns_show_dash_and_fast_autoattack_is_marked(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "bs", "backward_smoothing", 0, 0.7, 0.4, 30.0, aa=0.35, aa_name="autoattack-fast")
    build_report(root, tmp_path / "r", html_page=False)
    md = (tmp_path / "r" / "report.md").read_text()
    assert md_row(md, "backward_smoothing") == ["backward_smoothing", "70.00 [69.09, 70.89]", "40.00 [39.04, 40.96]",
                                                "-", "35.00 [34.07, 35.94] †", "0.50", "-", "1", "-"]
    assert "AutoAttack-fast" in md and not (tmp_path / "r" / "report.html").exists()


def test_report_cli_and_empty_folder(records, tmp_path, capsys):
    assert main(["report", str(records), "--out", str(tmp_path / "cli"), "--note", "no GPU was available"]) == 0
    assert "no GPU was available" in (tmp_path / "cli" / "report.md").read_text()
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no run with a result.json" in capsys.readouterr().err
    with pytest.raises(FastRobustError):
        build_report(tmp_path / "nope")
