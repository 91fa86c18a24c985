"""The report's figures (PNG, 100 dpi): robust accuracy against cost (the first figure), test accuracy by method,
stability over seeds, training curves, weight averaging, robust accuracy against eps and loss smoothness.

Every figure has one legend (below its panels, shared by them, in as many columns as fit the figure's width),
epochs on integer ticks, and accuracies with the interval of the tables as error bars (``intervals.error_bar``).
Every figure is at most ``FIGURE_WIDTH`` inches wide, whatever the runs' settings: when a group's label (method
and settings) is too long for a legend, the groups are numbered (``legend_labels``) and the caption gives each
number's full label (``legend_key``)."""

from __future__ import annotations

import statistics
import textwrap
from pathlib import Path
from typing import Any

from fastrobust.analysis.report.describe import averaged
from fastrobust.analysis.report.groups import Groups
from fastrobust.analysis.report.hessian import INIT_NAMES, Curves, Finals
from fastrobust.analysis.report.intervals import error_bar
from fastrobust.analysis.report.runs import Run, number
from fastrobust.analysis.report.tables import column_names, declared_passes, train_minutes, values

DPI = 100
FIGURE_WIDTH = 9.6  # inches: 960 px at DPI, within the page's 1100 px
LEGEND_CHARS = 32  # a group label longer than this is numbered in the figures
CHAR_PX = 6.0  # about the width of a character of the 8-point legend text at DPI
HANDLE_PX = 50.0  # a legend entry's marker and padding
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


def legend_labels(groups: Groups) -> dict[str, str]:
    """group label -> its text in the figures: the label itself when every label is short (``LEGEND_CHARS``),
    else the group's number and method (``"3 trades"``), the full labels then in the caption (``legend_key``)."""
    if all(len(label) <= LEGEND_CHARS for label, _ in groups):
        return {label: label for label, _ in groups}
    return {label: f"{i} {group[0].method if group else ''}".strip() for i, (label, group) in enumerate(groups, 1)}


def legend_key(groups: Groups) -> str:
    """The sentence a figure's caption ends with when ``legend_labels`` numbers the groups (``". Legend: 1 =
    trades (beta=6, lr=0.1); 2 = ..."``), else ``""``."""
    short = legend_labels(groups)
    if all(short[label] == label for label, _ in groups):
        return ""
    return ". Legend: " + "; ".join(f"{short[label].split(' ')[0]} = {label}" for label, _ in groups)


def _wrapped(label: str) -> str:
    """A label on lines of at most ``LEGEND_CHARS`` characters (the numbered labels fit on one)."""
    return "\n".join(textwrap.wrap(label, LEGEND_CHARS, break_long_words=False)) or label


def _legend_below(fig: Any, axes: list[Any], columns: int = 4) -> None:
    """One legend for the whole figure, below its panels: the labels of every panel, each once, in as many
    columns (at most ``columns``) as fit the figure's width."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        texts = [_wrapped(label) for label in seen]
        entry_px = HANDLE_PX + CHAR_PX * max(len(line) for text in texts for line in text.splitlines())
        fit = int(fig.get_figwidth() * DPI // entry_px)
        fig.legend(list(seen.values()), texts, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=max(1, min(columns, fit, len(seen))), fontsize=8, frameon=False)


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
    short = legend_labels(groups)
    same = len({metric for _, _, metric, _ in points}) == 1
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(FIGURE_WIDTH, 3.8))
    for i, (label, group, metric, (y, below, above)) in enumerate(points):
        style = {"marker": MARKERS[i % len(MARKERS)], "color": f"C{i % 10}", "capsize": 3, "linestyle": "none",
                 "markersize": 6, "label": short[label] if same else f"{short[label]} ({names[metric]})"}
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
    short = legend_labels(groups)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(min(FIGURE_WIDTH, max(5.0, 0.9 * len(groups) + 2)), 3.8))
    width = 0.8 / len(metrics)
    for i, metric in enumerate(metrics):
        bars = [error_bar(values(g, metric), _group_counts(g, metric)) or (0.0, 0.0, 0.0) for _, g in groups]
        ax.bar([j + i * width for j in range(len(groups))], [b[0] for b in bars], width, label=names[metric],
               yerr=[[b[1] for b in bars], [b[2] for b in bars]], capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_xticks([j + width * (len(metrics) - 1) / 2 for j in range(len(groups))],
                  [_wrapped(short[label]) for label, _ in groups], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)"), ax.grid(axis="y", alpha=0.3)
    _legend_below(fig, [ax])
    return _save(fig, out / "accuracy.png")


def figure_stability(groups: Groups, out: Path) -> Path | None:
    """Box plots of robust accuracy over seeds, every seed as a dot (paper Figs. 1, 2, 5)."""
    metrics = [m for m in ("pgd20", "pgd100", "autoattack") if any(len(values(g, m)) >= 2 for _, g in groups)]
    if not metrics:
        return None
    names = column_names([run for _, group in groups for run in group])
    short = legend_labels(groups)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(min(FIGURE_WIDTH, 3.6 * len(metrics)), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        data = [(_wrapped(short[label]), [v * 100 for v in values(g, metric)]) for label, g in groups
                if len(values(g, metric)) >= 2]
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
    short = legend_labels(groups)
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(FIGURE_WIDTH, 3.6))
    for i, (label, group) in enumerate(groups):
        style = {"marker": MARKERS[i % len(MARKERS)], "markersize": 3, "color": f"C{i % 10}", "label": short[label]}
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


def _panel_grid(plt, count: int):
    """A figure of ``count`` panels, at most 3 per row, 3.4 x 3.0 in each and at most FIGURE_WIDTH wide; the unused
    panels of the last row hidden. Returns ``(fig, axes)`` (a 2-d array)."""
    cols = min(3, count)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(min(FIGURE_WIDTH, 3.4 * cols), 3.0 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, axes


def figure_averaging(runs: list[Run], out: Path) -> Path | None:
    """Per run with weight averaging whose metrics.jsonl has both: the validation robust accuracy of the trained
    and of the averaged weights per epoch, the epoch and weights of ``best`` marked."""
    shown = [r for r in runs if averaged(r) and curve([r], "val_robust_acc")[0] and curve([r], "ema_val_robust_acc")[0]]
    if not shown:
        return None
    plt = _pyplot()
    fig, axes = _panel_grid(plt, len(shown))
    for ax, run in zip(axes.flat, shown):
        for key, label, style in (("val_robust_acc", "trained weights", "-o"),
                                  ("ema_val_robust_acc", "averaged weights", "--s")):
            epochs, accs = curve([run], key)
            ax.plot(epochs, [v * 100 for v in accs], style, markersize=4, label=label)
        best = run.result.get("best_epoch")
        if isinstance(best, int):
            ax.axvline(best, color="grey", linestyle=":", label="epoch of best")
        best = run.result.get("best_weights", "model").replace("model", "trained")
        ax.set_title(_wrapped(f"{run.name} (best: {best})"), fontsize=9)
        ax.set_xlabel("epoch"), ax.set_ylabel("validation robust acc. (%)"), ax.grid(alpha=0.3)
        _integer_epochs(ax)
    _legend_below(fig, list(axes.flat))
    return _save(fig, out / "weight_averaging.png")


NORM_ORDER = ("linf", "l2", "l1")
NORM_AXES = {"linf": "eps (x/255), l_inf", "l2": "eps, l2", "l1": "eps, l1"}  # l_inf in pixel levels, others raw
EpsCurve = tuple[str, str, int | None, list[float], list[float]]  # (group label, norm, n, eps, accuracies)


def eps_curves(groups: Groups) -> list[EpsCurve]:
    """Per group, threat model (norm) and point set evaluated at several eps: the mean worst-case robust accuracy
    of the best weights per eps (each run's latest record per eps). Evaluations of different norms or point sets
    are never joined: a line's points share the norm and the points (``Run.eval_points``)."""
    found = []
    for label, group in groups:
        per_set: dict[tuple[str, str], dict[float, list[float]]] = {}
        sizes: dict[tuple[str, str], int | None] = {}
        for run in group:
            latest: dict[tuple[str, str, float], float] = {}
            for record in run.evaluations:
                value = number(record.get("robust_acc"))
                if value is not None and record.get("weights", "best.safetensors") == "best.safetensors":
                    key = (str(record.get("norm", "linf")), run.eval_points(record))
                    sizes[key] = record.get("n") if isinstance(record.get("n"), int) else None
                    latest[(*key, round(float(record["eps"]), 9))] = value
            for (norm, points, eps), value in latest.items():
                per_set.setdefault((norm, points), {}).setdefault(eps, []).append(value)
        for (norm, points), per_eps in per_set.items():
            if len(per_eps) >= 2:
                eps = sorted(per_eps)
                found.append((label, norm, sizes[(norm, points)], eps, [statistics.fmean(per_eps[e]) for e in eps]))
    return found


def _norm_key(norm: str) -> tuple[int, str]:
    return (NORM_ORDER.index(norm), norm) if norm in NORM_ORDER else (len(NORM_ORDER), norm)


def figure_eps(curves: list[EpsCurve], out: Path, short: dict[str, str] | None = None) -> Path | None:
    """Robust accuracy against eps, one panel per threat model (x in its units: l_inf in x/255, l2 and l1 as
    given), one line per group and point set (``eps_curves``), a group's lines in one colour, labelled with
    their number of points where a group has several; ``short``: the groups' ``legend_labels``."""
    if not curves:
        return None
    norms = sorted({norm for _, norm, _, _, _ in curves}, key=_norm_key)
    colours = {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(label for label, *_ in curves))}
    several = {label for label, norm, n, _, _ in curves
               if any(lab == label and nm == norm and other != n for lab, nm, other, _, _ in curves)}
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(norms), figsize=(min(FIGURE_WIDTH, 6.0 if len(norms) == 1 else 3.4 * len(norms)),
                                                      3.8), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        sizes = list(dict.fromkeys(n for _, nm, n, _, _ in curves if nm == norm))
        for label, _, n, eps, accs in (c for c in curves if c[1] == norm):
            name = (short or {}).get(label, label) + (f" (n={n})" if label in several else "")
            scale = 255 if norm == "linf" else 1
            ax.plot([e * scale for e in eps], [v * 100 for v in accs], marker=MARKERS[sizes.index(n) % len(MARKERS)],
                    linestyle=("-", "--", ":", "-.")[sizes.index(n) % 4], color=colours[label], label=name)
        ax.set_xlabel(NORM_AXES.get(norm, f"eps, {norm}")), ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("robust accuracy (%, worst case of the attacks)")
    _legend_below(fig, list(axes[0]), columns=3)
    return _save(fig, out / "robust_vs_eps.png")


# ----------------------------------------------------------------------------------------- loss smoothness
def figure_hessian_final(finals: Finals, out: Path, short: dict[str, str] | None = None) -> Path | None:
    """The final model's top input-Hessian eigenvalue per method: bars per starting point (mean over seeds,
    error bar: ± one std, dots: the seeds); ``short``: the groups' ``legend_labels`` (default: the labels)."""
    if not finals:
        return None
    plt = _pyplot()
    inits = [i for i in INIT_NAMES if any(i in f for _, f in finals)]
    width = 0.8 / len(inits)
    fig, ax = plt.subplots(figsize=(min(FIGURE_WIDTH, max(5.0, 1.2 * len(finals) + 2)), 3.6))
    for k, init in enumerate(inits):
        xs = [g + (k - (len(inits) - 1) / 2) * width for g in range(len(finals))]
        found = [per_init.get(init, []) for _, per_init in finals]
        means = [statistics.fmean(v) if v else 0.0 for v in found]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in found]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=INIT_NAMES[init])
        for x, v in zip(xs, found):
            ax.plot([x] * len(v), v, "k.", markersize=3)
    ax.set_xticks(range(len(finals)), [_wrapped((short or {}).get(label, label)) for label, _ in finals], rotation=20,
                  ha="right", fontsize=8)
    ax.set_ylabel("top Hessian eigenvalue (input)"), ax.grid(axis="y", alpha=0.3)
    _legend_below(fig, [ax])
    return _save(fig, out / "hessian.png")


def figure_hessian(curves: Curves, out: Path, short: dict[str, str] | None = None) -> Path | None:
    """Paper Fig. 3: top input-Hessian eigenvalue against the epoch, random vs backward-smoothing start
    (one panel per method; line: mean over seeds, band: ± one std); ``short``: the groups' ``legend_labels``
    (default: the labels)."""
    if not curves:
        return None
    plt = _pyplot()
    fig, axes = _panel_grid(plt, len(curves))
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
        ax.set_title(_wrapped((short or {}).get(label, label)), fontsize=9), ax.set_xlabel("epoch"), ax.grid(alpha=0.3)
        ax.set_ylabel("top Hessian eigenvalue (input)")
        _integer_epochs(ax)
    _legend_below(fig, list(axes.flat))
    return _save(fig, out / "hessian.png")
