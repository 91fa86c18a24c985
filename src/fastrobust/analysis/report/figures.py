"""The report's figures (PNG, 100 dpi): robust accuracy against cost (the first figure), test accuracy by method,
stability over seeds, training curves, weight averaging, robust accuracy against eps and loss smoothness.

Every figure has one legend (below its panels, shared by them), epochs on integer ticks, and accuracies with
the interval of the tables as error bars (``intervals.error_bar``)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from fastrobust.analysis.report.describe import averaged
from fastrobust.analysis.report.groups import Groups
from fastrobust.analysis.report.hessian import INIT_NAMES, Curves, Finals
from fastrobust.analysis.report.intervals import error_bar
from fastrobust.analysis.report.runs import Run, number
from fastrobust.analysis.report.tables import column_names, declared_passes, train_minutes, values

DPI = 100
ROBUST_ORDER = ("autoattack", "pgd100", "pgd20")  # AutoAttack where run, else the strongest attack run
MARKERS = "osD^v<>pXh*"


def _pyplot():
    import matplotlib  # optional: only a report draws; the backend is set before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional

    return plt


def _integer_epochs(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator  # optional

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend_below(fig: Any, axes: list[Any], columns: int = 4) -> None:
    """One legend for the whole figure, below its panels: the labels of every panel, each once."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=max(1, min(columns, len(seen))), fontsize=8, frameon=False)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _group_counts(group: list[Run], metric: str) -> list[int | None]:
    return [run.count(metric) for run in group if run.metric(metric) is not None]


def robust_metric(group: list[Run]) -> str | None:
    """The robust accuracy a group is drawn with: AutoAttack when its runs have it, else PGD-100, else PGD-20."""
    return next((m for m in ROBUST_ORDER if values(group, m)), None)


# ----------------------------------------------------------------------------------------- the first figure
def figure_cost(groups: Groups, out: Path) -> Path | None:
    """Robust accuracy against training time (left) and against the declared passes per training step (right),
    one point per group (several seeds: mean, error bars ± std; one run: its Wilson 95 % interval)."""
    points = []
    for label, group in groups:
        metric = robust_metric(group)
        bar = error_bar(values(group, metric), _group_counts(group, metric)) if metric else None
        if bar is not None:
            points.append((label, group, metric, bar))
    if not points:
        return None
    names = column_names([run for _, group in groups for run in group])
    same = len({metric for _, _, metric, _ in points}) == 1
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.8))
    for i, (label, group, metric, (y, below, above)) in enumerate(points):
        style = {"marker": MARKERS[i % len(MARKERS)], "color": f"C{i % 10}", "capsize": 3, "linestyle": "none",
                 "markersize": 6, "label": label if same else f"{label} ({names[metric]})"}
        minutes = train_minutes(group)
        if minutes:
            spread = statistics.stdev(minutes) if len(minutes) > 1 else 0.0
            left.errorbar([statistics.fmean(minutes)], [y], yerr=[[below], [above]], xerr=[spread], **style)
        passes = declared_passes(group)
        if passes:
            right.errorbar([statistics.fmean(passes)], [y], yerr=[[below], [above]], **style)
    what = f"{names[points[0][2]]} accuracy (%)" if same else "robust accuracy (%)"
    left.set_xlabel("training time (min)"), left.set_ylabel(what)
    right.set_xlabel("declared cost (forward+backward passes per step)"), right.set_ylabel(what)
    left.set_title("against training time", fontsize=10), right.set_title("against declared passes", fontsize=10)
    for ax in (left, right):  # from 0, with room right of the costliest point
        ax.grid(alpha=0.3)
        ax.set_xlim(0, max(ax.get_xlim()[1], 1.12 * max((line.get_xdata()[0] for line in ax.lines), default=0)))
        ax.set_ylim(bottom=-0.03 * ax.get_ylim()[1])  # a point at 0 % shows whole
    _legend_below(fig, [left, right])
    return _save(fig, out / "robust_vs_cost.png")


# ----------------------------------------------------------------------------------------- accuracies
def figure_table(groups: Groups, out: Path) -> Path | None:
    """Bar chart of the Table 2 numbers (clean and robust accuracies per method, with their intervals)."""
    metrics = [m for m in ("clean", "pgd20", "pgd100", "autoattack") if any(values(g, m) for _, g in groups)]
    if not metrics or not groups:
        return None
    names = column_names([run for _, group in groups for run in group])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(min(9.6, max(5.0, 0.9 * len(groups) + 2)), 3.8))
    width = 0.8 / len(metrics)
    for i, metric in enumerate(metrics):
        bars = [error_bar(values(g, metric), _group_counts(g, metric)) or (0.0, 0.0, 0.0) for _, g in groups]
        ax.bar([j + i * width for j in range(len(groups))], [b[0] for b in bars], width, label=names[metric],
               yerr=[[b[1] for b in bars], [b[2] for b in bars]], capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_xticks([j + width * (len(metrics) - 1) / 2 for j in range(len(groups))], [label for label, _ in groups],
                  rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)"), ax.grid(axis="y", alpha=0.3)
    _legend_below(fig, [ax])
    return _save(fig, out / "accuracy.png")


def figure_stability(groups: Groups, out: Path) -> Path | None:
    """Box plots of robust accuracy over seeds, every seed as a dot (paper Figs. 1, 2, 5)."""
    metrics = [m for m in ("pgd20", "pgd100", "autoattack") if any(len(values(g, m)) >= 2 for _, g in groups)]
    if not metrics:
        return None
    names = column_names([run for _, group in groups for run in group])
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(min(9.6, 3.6 * len(metrics)), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        data = [(label, [v * 100 for v in values(g, metric)]) for label, g in groups if len(values(g, metric)) >= 2]
        ax.boxplot([d for _, d in data], showmeans=True, showfliers=False)  # every seed is drawn as a point below
        for i, (_, seeds) in enumerate(data, start=1):
            offsets = [((j % 5) - 2) * 0.04 for j in range(len(seeds))]
            ax.scatter([i + o for o in offsets], seeds, s=12, color="black", alpha=0.6, zorder=3)
        ax.set_xticks(range(1, len(data) + 1), [label for label, _ in data], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"{names[metric]} accuracy (%)")
        ax.set_title(f"{names[metric]} over seeds", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, out / "stability.png")


# ----------------------------------------------------------------------------------------- curves
def curve(group: list[Run], key: str) -> tuple[list[int], list[float]]:
    """Per epoch, the mean over the group's runs of ``key`` in metrics.jsonl (a run's last line of an epoch)."""
    per_epoch: dict[int, list[float]] = {}
    for run in group:
        last: dict[int, float] = {}
        for record in run.metrics:
            if "epoch" in record and number(record.get(key)) is not None:
                last[int(record["epoch"])] = float(record[key])
        for epoch, value in last.items():
            per_epoch.setdefault(epoch, []).append(value)
    epochs = sorted(per_epoch)
    return epochs, [statistics.fmean(per_epoch[e]) for e in epochs]


def figure_curves(groups: Groups, out: Path) -> Path | None:
    """Validation robust accuracy and training loss per epoch, mean over seeds, one line per group."""
    if not any(run.metrics for _, g in groups for run in g):
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.6))
    for i, (label, group) in enumerate(groups):
        style = {"marker": MARKERS[i % len(MARKERS)], "markersize": 3, "color": f"C{i % 10}", "label": label}
        epochs, accs = curve(group, "val_robust_acc")
        if epochs:
            left.plot(epochs, [v * 100 for v in accs], **style)
        epochs, losses = curve(group, "train_loss")
        if epochs:
            right.plot(epochs, losses, **style)
    left.set_ylabel("validation robust accuracy (%, PGD)"), right.set_ylabel("training loss")
    left.set_title("Validation robust accuracy", fontsize=10), right.set_title("Training loss", fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("epoch"), ax.grid(alpha=0.3)
        _integer_epochs(ax)
    _legend_below(fig, [left, right])
    return _save(fig, out / "training_curves.png")


def figure_averaging(runs: list[Run], out: Path) -> Path | None:
    """Per run with weight averaging whose metrics.jsonl has both: the validation robust accuracy of the trained
    and of the averaged weights per epoch, the epoch and weights of ``best`` marked."""
    shown = [r for r in runs if averaged(r) and curve([r], "val_robust_acc")[0] and curve([r], "ema_val_robust_acc")[0]]
    if not shown:
        return None
    plt = _pyplot()
    cols = min(3, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(min(9.6, 3.4 * cols), 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    for ax, run in zip(axes.flat, shown):
        for key, label, style in (("val_robust_acc", "trained weights", "-o"),
                                  ("ema_val_robust_acc", "averaged weights", "--s")):
            epochs, accs = curve([run], key)
            ax.plot(epochs, [v * 100 for v in accs], style, markersize=4, label=label)
        best = run.result.get("best_epoch")
        if isinstance(best, int):
            ax.axvline(best, color="grey", linestyle=":", label="epoch of best")
        ax.set_title(f"{run.name} (best: {run.result.get('best_weights', 'model').replace('model', 'trained')})",
                     fontsize=9)
        ax.set_xlabel("epoch"), ax.set_ylabel("validation robust acc. (%)"), ax.grid(alpha=0.3)
        _integer_epochs(ax)
    _legend_below(fig, list(axes.flat))
    return _save(fig, out / "weight_averaging.png")


def eps_curves(groups: Groups) -> list[tuple[str, list[float], list[float]]]:
    """Per group evaluated at several eps: the mean worst-case robust accuracy of the best weights per eps."""
    found = []
    for label, group in groups:
        per_eps: dict[float, list[float]] = {}
        for run in group:
            latest: dict[float, float] = {}
            for record in run.evaluations:
                value = number(record.get("robust_acc"))
                if value is not None and record.get("weights", "best.safetensors") == "best.safetensors":
                    latest[round(float(record["eps"]), 9)] = value
            for eps, value in latest.items():
                per_eps.setdefault(eps, []).append(value)
        if len(per_eps) >= 2:
            eps = sorted(per_eps)
            found.append((label, eps, [statistics.fmean(per_eps[e]) for e in eps]))
    return found


def figure_eps(curves: list[tuple[str, list[float], list[float]]], out: Path) -> Path | None:
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, eps, accs in curves:
        ax.plot([e * 255 for e in eps], [v * 100 for v in accs], marker="o", label=label)
    ax.set_xlabel("eps (x/255)"), ax.set_ylabel("robust accuracy (%, worst case of the attacks)")
    ax.grid(alpha=0.3)
    _legend_below(fig, [ax], columns=3)
    return _save(fig, out / "robust_vs_eps.png")


# ----------------------------------------------------------------------------------------- loss smoothness
def figure_hessian_final(finals: Finals, out: Path) -> Path | None:
    """The final model's top input-Hessian eigenvalue per method: bars per starting point (mean over seeds,
    error bar: ± one std, dots: the seeds)."""
    if not finals:
        return None
    plt = _pyplot()
    inits = [i for i in INIT_NAMES if any(i in f for _, f in finals)]
    width = 0.8 / len(inits)
    fig, ax = plt.subplots(figsize=(min(9.6, max(5.0, 1.2 * len(finals) + 2)), 3.6))
    for k, init in enumerate(inits):
        xs = [g + (k - (len(inits) - 1) / 2) * width for g in range(len(finals))]
        found = [per_init.get(init, []) for _, per_init in finals]
        means = [statistics.fmean(v) if v else 0.0 for v in found]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in found]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=INIT_NAMES[init])
        for x, v in zip(xs, found):
            ax.plot([x] * len(v), v, "k.", markersize=3)
    ax.set_xticks(range(len(finals)), [label for label, _ in finals], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("top Hessian eigenvalue (input)"), ax.grid(axis="y", alpha=0.3)
    _legend_below(fig, [ax])
    return _save(fig, out / "hessian.png")


def figure_hessian(curves: Curves, out: Path) -> Path | None:
    """Paper Fig. 3: top input-Hessian eigenvalue against the epoch, random vs backward-smoothing start
    (one panel per method; line: mean over seeds, band: ± one std)."""
    if not curves:
        return None
    plt = _pyplot()
    cols = min(3, len(curves))
    rows = -(-len(curves) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(min(9.6, 3.4 * cols), 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(curves):]:
        ax.set_visible(False)
    for ax, (label, per_init) in zip(axes.flat, curves):
        for init, style in (("random", "-o"), ("backward_smoothing", "--s"), ("clean", ":^")):
            if init not in per_init:
                continue
            epochs = sorted(per_init[init])
            means = [statistics.fmean(per_init[init][e]) for e in epochs]
            ax.plot(epochs, means, style, markersize=4, label=INIT_NAMES[init])
            if any(len(per_init[init][e]) > 1 for e in epochs):
                stds = [statistics.stdev(per_init[init][e]) if len(per_init[init][e]) > 1 else 0.0 for e in epochs]
                ax.fill_between(epochs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                                alpha=0.15)
        ax.set_title(label, fontsize=9), ax.set_xlabel("epoch"), ax.grid(alpha=0.3)
        ax.set_ylabel("top Hessian eigenvalue (input)")
        _integer_epochs(ax)
    _legend_below(fig, list(axes.flat))
    return _save(fig, out / "hessian.png")
