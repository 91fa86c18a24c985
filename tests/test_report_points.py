"""Every accuracy of a report row comes from one point set, or the columns say which points they hold; an
eval.json made on a prefix of the class-sorted test split (before sweeps balanced it) is flagged."""

from __future__ import annotations

import json

from test_report import md_row, write_run

from fastrobust.analysis.report import build_report
from fastrobust.train.evaluations import save_evaluation


def with_eval(root, name, n, points, pgd100, aa):
    """Replace ``name``'s eval.json by one on ``n`` points (``points``: the stored point-set key, or None)."""
    record = {"eps": 8 / 255, "n": n, "clean_acc": 0.5, "robust_acc": aa,
              "attacks": {"pgd100": {"robust_acc": pgd100}, "autoattack": {"robust_acc": aa, "settings": {}}}}
    meta = {"model": "best.safetensors", "test_subset": n, "evaluations": [record]}
    if points is not None:
        meta["points"] = points
    (root / name / "eval.json").write_text(json.dumps(meta))


def test_columns_on_a_class_balanced_subset_are_labelled_with_their_points(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "natural", "natural", 0, 0.3640, 0.0340, 38.0)  # result.json: 10,000 test points
    with_eval(root, "natural", 300, {"split": "test", "selection": "balanced_head", "count": 300}, 0.0367, 0.0233)
    build_report(root, tmp_path / "r", html_page=False)
    md = (tmp_path / "r" / "report.md").read_text()
    assert md_row(md, "Method")[:5] == ["Method", "Clean (n=10000)", "PGD-20 (n=10000)", "PGD-100 (n=300)",
                                        "AutoAttack (n=300)"]
    assert md_row(md, "natural")[1:5] == ["36.40 [35.46, 37.35]", "3.40 [3.06, 3.77]", "3.67 [2.06, 6.45]",
                                          "2.33 [1.13, 4.73]"]  # Wilson intervals: n = 10,000 and 300
    assert md_row(md, "Run")[3:7] == ["Clean (n=10000)", "PGD-20 (n=10000)", "PGD-100 (n=300)", "AutoAttack (n=300)"]
    assert ("Clean and PGD-20 on 10000 test points; PGD-100 and AutoAttack on 300 of 10000, class-balanced test "
            "points") in md
    assert "Warning" not in md


def test_an_evaluation_on_a_class_sorted_prefix_is_flagged(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "trades", "trades", 0, 0.346, 0.194, 149.0)
    write_run(root, "fast_at", "fast_at", 0, 0.306, 0.194, 38.0, pgd100=0.17, aa=0.13)  # eval on all 10,000
    with_eval(root, "trades", 300, None, 0.1567, 0.13)  # no "points": the first 300 of a class-sorted split
    build_report(root, tmp_path / "r", html_page=False)
    md = (tmp_path / "r" / "report.md").read_text()
    assert md_row(md, "Method")[3:5] == ["PGD-100 (n=10000/300)", "AutoAttack (n=10000/300)"]
    assert "Warning: eval.json of trades was written on the first points of the class-sorted test split" in md
    assert "on 10000 / first 300 of 10000 test points" in md.split("## What was run")[1]


def test_one_point_set_keeps_the_plain_headers_and_says_so(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "trades", "trades", 0, 0.82, 0.53, 600.0, pgd100=0.525, aa=0.49)  # eval on the same 10,000
    build_report(root, tmp_path / "r", html_page=False)
    md = (tmp_path / "r" / "report.md").read_text()
    assert md_row(md, "Method")[1:5] == ["Clean", "PGD-20", "PGD-100", "AutoAttack"]
    assert "Every accuracy on the same 10000 test points." in md


def protocol_record(run, n: int, official: bool, points: dict) -> None:
    """A --protocol evaluation record in ``run``'s evaluations/ folder."""
    record = {"eps": 8 / 255, "norm": "linf", "n": n, "clean_acc": 0.5, "robust_acc": 0.3,
              "attacks": {"autoattack": {"robust_acc": 0.3, "settings": {}}},
              "protocol": {"name": "robustbench", "official_order": official}}
    save_evaluation(run, record, weights="best.safetensors", points=points)


def test_protocol_points_are_the_first_of_the_whole_test_split_in_the_order_recorded(tmp_path):
    root = tmp_path / "runs"
    for name in ("copy", "official", "old"):
        write_run(root, name, "trades", 0, 0.5, 0.3, 60.0)
        result = json.loads((root / name / "result.json").read_text())
        result["test"]["n"] = result["dataset"]["test"] = 1000  # the run's own test subset: 1,000 points
        (root / name / "result.json").write_text(json.dumps(result))
    protocol_record(root / "copy", 100, False, {"split": "test", "selection": "head", "count": 100, "of": 10000})
    protocol_record(root / "official", 1000, True,
                    {"split": "test", "selection": "official_head", "count": 1000, "of": 10000})
    # written before the selection said the order: official_head on a copy whose order is not the official
    protocol_record(root / "old", 100, False, {"split": "test", "selection": "official_head", "count": 100})
    build_report(root, tmp_path / "r", html_page=False)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "the first 100 of the 10,000 test images (this copy's order, not the official)" in md
    assert "the first 1000 of the 10,000 test images, official order" in md  # 1000 points, yet not the run's 1000
    assert "the first 100 of the test split (this copy's order, not the official)" in md
    assert "100 of 1000, official order" not in md and "Warning: eval.json" not in md
    assert md_row(md, "Method")[4] == "AutoAttack (n=1000/100)"
