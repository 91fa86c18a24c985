"""Loss smoothness from each run's hessian.json (paper Fig. 3): the top input-Hessian eigenvalue at the random
and the backward-smoothing starting points, per epoch or of the final model, and its tables."""

from __future__ import annotations

import statistics

from fastrobust.analysis.report.groups import Groups
from fastrobust.analysis.report.runs import number

INIT_NAMES = {"random": "random start", "backward_smoothing": "backward-smoothing start", "clean": "clean point"}

Curves = list[tuple[str, dict[str, dict[int, list[float]]]]]  # per group: init -> epoch -> run means
Finals = list[tuple[str, dict[str, list[float]]]]  # per group: init -> run means of the final model


def hessian_curves(groups: Groups) -> Curves:
    """Per group: init -> epoch -> the mean eigenvalue of each run (from hessian.json records with an epoch)."""
    curves = []
    for label, group in groups:
        per_init: dict[str, dict[int, list[float]]] = {}
        for run in group:
            for record in run.hessian.get("records", []):
                if record.get("epoch") is None:
                    continue
                for init, summary in record.items():
                    if isinstance(summary, dict) and number(summary.get("mean")) is not None:
                        per_init.setdefault(init, {}).setdefault(int(record["epoch"]), []).append(float(summary["mean"]))
        if per_init:
            curves.append((label, per_init))
    return curves


def hessian_table(curves: Curves) -> tuple[list[str], list[list[str]]]:
    """First and last epoch's mean eigenvalue per init, and last-epoch random / backward-smoothing ratio."""
    inits = [i for i in INIT_NAMES if any(i in c for _, c in curves)]
    header = ["Method", "Runs", "Epochs"] + [f"{INIT_NAMES[i]} (first → last epoch)" for i in inits]
    if {"random", "backward_smoothing"} <= set(inits):
        header += ["random / backward-smoothing (last epoch)", "epochs with the backward-smoothing start lower"]
    rows = []
    for label, per_init in curves:
        epochs = sorted({e for values in per_init.values() for e in values})
        runs = max(len(v) for values in per_init.values() for v in values.values())
        row = [label, str(runs), f"{epochs[0]}-{epochs[-1]}"]
        for init in inits:
            values = per_init.get(init, {})
            row.append(f"{statistics.fmean(values[epochs[0]]):.4g} → {statistics.fmean(values[epochs[-1]]):.4g}"
                       if epochs[0] in values and epochs[-1] in values else "-")
        if len(header) > len(row):
            last = epochs[-1]
            rnd, bs = per_init.get("random", {}).get(last), per_init.get("backward_smoothing", {}).get(last)
            row.append(f"{statistics.fmean(rnd) / statistics.fmean(bs):.2f}" if rnd and bs and statistics.fmean(bs) else "-")
            both = [e for e in epochs if e in per_init.get("random", {}) and e in per_init.get("backward_smoothing", {})]
            lower = sum(statistics.fmean(per_init["backward_smoothing"][e]) < statistics.fmean(per_init["random"][e]) for e in both)
            row.append(f"{lower} of {len(both)}")
        rows.append(row)
    return header, rows


def hessian_final(groups: Groups) -> Finals:
    """Per group: init -> the mean eigenvalue of each run's final model (hessian.json records without an epoch:
    ``evaluate.hessian.per_epoch: false`` analyses the best model only)."""
    finals = []
    for label, group in groups:
        per_init: dict[str, list[float]] = {}
        for run in group:
            for record in run.hessian.get("records", []):
                if record.get("epoch") is not None:
                    continue
                for init, summary in record.items():
                    if isinstance(summary, dict) and number(summary.get("mean")) is not None:
                        per_init.setdefault(init, []).append(float(summary["mean"]))
        if per_init:
            finals.append((label, per_init))
    return finals


def hessian_final_table(finals: Finals) -> tuple[list[str], list[list[str]]]:
    """The final model's mean eigenvalue per init (± std over seeds), and the random / backward-smoothing ratio."""
    inits = [i for i in INIT_NAMES if any(i in f for _, f in finals)]
    header = ["Method", "Runs"] + [INIT_NAMES[i] for i in inits]
    both = {"random", "backward_smoothing"} <= set(inits)
    if both:
        header.append("random / backward-smoothing")
    rows = []
    for label, per_init in finals:
        row = [label, str(max(len(v) for v in per_init.values()))]
        for init in inits:
            values = per_init.get(init, [])
            row.append("-" if not values else f"{statistics.fmean(values):.4g}"
                       + (f" ± {statistics.stdev(values):.2g}" if len(values) > 1 else ""))
        if both:
            rnd, bs = per_init.get("random"), per_init.get("backward_smoothing")
            row.append(f"{statistics.fmean(rnd) / statistics.fmean(bs):.2f}" if rnd and bs and statistics.fmean(bs) else "-")
        rows.append(row)
    return header, rows
