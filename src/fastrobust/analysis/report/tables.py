"""The report's tables: the paper's Table 2 layout, stability over seeds, sensitivity to one setting, every run
and every evaluation. Each accuracy carries its interval (``intervals``) and each column names its test points
when the columns do not all come from the same points."""

from __future__ import annotations

import re
import statistics

from fastrobust.analysis.report.groups import Groups, by_method, group_runs, one_setting_sets, sort_key
from fastrobust.analysis.report.intervals import accuracy_cell
from fastrobust.analysis.report.runs import ACCURACY_METRICS, Run, attack_acc, number, points_text
from fastrobust.analysis.report.text import key_text, plural, short_key

METRIC_NAMES = {"clean": "Clean", "pgd20": "PGD-20", "pgd100": "PGD-100", "autoattack": "AutoAttack"}
SENSITIVITY_KEYS = ("method.gamma", "method.step_size", "method.beta", "eps", "ema_decay")

Table = tuple[list[str], list[list[str]]]


# ----------------------------------------------------------------------------------------- point sets
def point_sets(runs: list[Run]) -> dict[str, list[str]]:
    """metric -> the distinct point sets (``Run.points``) its values come from, over ``runs``."""
    found: dict[str, list[str]] = {}
    for metric in ACCURACY_METRICS:
        labels = [label for label in (run.points(metric) for run in runs) if label is not None]
        found[metric] = list(dict.fromkeys(labels))
    return found


def column_names(runs: list[Run]) -> dict[str, str]:
    """The accuracy columns' headers: the plain names when every value comes from the same points, else each
    with its number of points (``PGD-100 (n=300)``) so that no row silently mixes point sets."""
    sets = point_sets(runs)
    if len({label for labels in sets.values() for label in labels}) <= 1:
        return dict(METRIC_NAMES)
    names = {}
    for metric, labels in sets.items():
        counts = sorted({re.sub(r"^(the )?first ", "", label).split(" ")[0] for label in labels},
                        key=lambda n: (-int(n), n) if n.isdigit() else (0, n))
        names[metric] = f"{METRIC_NAMES[metric]} (n={'/'.join(counts)})" if counts else METRIC_NAMES[metric]
    return names


def points_caption(runs: list[Run]) -> str:
    """One sentence saying which test points each accuracy column comes from, and a warning for prefixes."""
    used = {m: labels for m, labels in point_sets(runs).items() if labels}
    if not used:
        return ""
    every = {label for labels in used.values() for label in labels}
    if len(every) == 1:
        return f" Every accuracy on the same {points_text([every.pop()])}."
    by_set: dict[tuple[str, ...], list[str]] = {}
    for metric, labels in used.items():
        by_set.setdefault(tuple(labels), []).append(METRIC_NAMES[metric])
    parts = [f"{' and '.join(names)} on {points_text(list(where)).replace(' / ', ', ')}"
             for where, names in by_set.items()]
    text = (" Columns on different test points (" + "; ".join(parts) + "): compare accuracies within a point set "
            "only (n = the number of points).")
    if any(label.startswith("first ") for label in every):
        prefix = sorted(run.name for run in runs
                        if any((run.points(m) or "").startswith("first ") for m in ACCURACY_METRICS))
        who = "every run" if len(prefix) == len(runs) else ", ".join(prefix)
        text += (f" Warning: eval.json of {who} was written on the first points of the class-sorted "
                 "test split, i.e. a few classes only; run the same fastrobust sweep command again to re-evaluate "
                 "on class-balanced points.")
    return text


# ----------------------------------------------------------------------------------------- cells
def values(group: list[Run], metric: str) -> list[float]:
    """The metric's values over a group's runs (runs without it left out)."""
    return [v for v in (run.metric(metric) for run in group) if v is not None]


def cell(group: list[Run], metric: str) -> str:
    """The metric of a group as a table cell with its interval (``intervals.accuracy_cell``)."""
    found = [run.source(metric) for run in group]
    found = [f for f in found if f is not None]
    return accuracy_cell([f[0] for f in found], [f[1] for f in found])


def train_minutes(group: list[Run]) -> list[float]:
    return [float(r.result["train_seconds"]) / 60 for r in group if number(r.result.get("train_seconds")) is not None]


def declared_passes(group: list[Run]) -> list[float]:
    """The method's declared cost per training step (result.json ``method_cost_passes``) of each run."""
    return [float(r.result["method_cost_passes"]) for r in group if number(r.result.get("method_cost_passes")) is not None]


def _passes_cell(group: list[Run]) -> str:
    found = sorted({round(v, 2) for v in declared_passes(group)})
    return "/".join(f"{v:g}" for v in found) if found else "-"


def _minutes_cell(minutes: list[float]) -> str:
    if not minutes:
        return "-"
    digits = 1 if statistics.fmean(minutes) >= 1 else 2
    text = f"{statistics.fmean(minutes):.{digits}f}"
    return text + (f" ± {statistics.stdev(minutes):.{digits}f}" if len(minutes) > 1 else "")


def _context(run: Run) -> tuple:
    c = run.flat()
    return (c.get("dataset"), c.get("model"), c.get("epochs"), c.get("train_subset"), c.get("batch_size"))


# ----------------------------------------------------------------------------------------- tables
def table2(groups: Groups) -> Table:
    """The paper's Table 2 layout: one row per method group; accuracies in percent with their interval, time in
    minutes, the number of seeds and the declared cost."""
    names = column_names([run for _, group in groups for run in group])
    header = ["Method", *(names[m] for m in ACCURACY_METRICS), "Time (min)", "Time / TRADES", "Seeds",
              "Declared passes"]
    trades_time: dict[tuple, list[float]] = {}
    for _, group in groups:
        for run in group:
            if run.method == "trades":
                trades_time.setdefault(_context(run), []).extend(train_minutes([run]))
    rows = []
    for label, group in groups:
        minutes = train_minutes(group)
        reference = trades_time.get(_context(group[0]))
        relative = "-"
        if minutes and reference:
            ratio = statistics.fmean(minutes) / statistics.fmean(reference)
            relative = f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.3f}x"
        aa = cell(group, "autoattack")
        if aa != "-" and {r.autoattack_version() for r in group} - {None} <= {"autoattack-fast"}:
            aa += " †"
        rows.append([label, cell(group, "clean"), cell(group, "pgd20"), cell(group, "pgd100"), aa,
                     _minutes_cell(minutes), relative, str(len(group)), _passes_cell(group)])
    return header, rows


def stability(groups: Groups, metric: str) -> Table:
    """Over the seeds of each group with several: mean, std, median, best and worst accuracy (%)."""
    header = ["Method", "Seeds", "Mean", "Std", "Median", "Best", "Worst"]
    rows = []
    for label, group in groups:
        pct = [v * 100 for v in values(group, metric)]
        if len(pct) < 2:
            continue
        rows.append([label, str(len(pct)), f"{statistics.fmean(pct):.2f}", f"{statistics.stdev(pct):.2f}",
                     f"{statistics.median(pct):.2f}", f"{max(pct):.2f}", f"{min(pct):.2f}"])
    return header, rows


def sensitivity(runs: list[Run]) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(method, key, header, rows) for every sensitivity key and every set of a method's runs that differ in
    that key alone (``groups.one_setting_sets``): one row per value of the key, seeds pooled."""
    tables = []
    for method, members in by_method(runs).items():
        for key in SENSITIVITY_KEYS:
            for subset in one_setting_sets(members, key):
                names = column_names(subset)
                header = [short_key(key), "Seeds", *(names[m] for m in ACCURACY_METRICS)]
                buckets: dict[str, list[Run]] = {}
                for run in sorted(subset, key=lambda r: sort_key(r, [key])):
                    buckets.setdefault(key_text(run.flat()[key]), []).append(run)
                rows = [[value, str(len(group)), *(cell(group, m) for m in ACCURACY_METRICS)]
                        for value, group in buckets.items()]
                tables.append((method, key, header, rows))
    return tables


def every_run(runs: list[Run]) -> Table:
    """One row per run: its group, seed, accuracies with their Wilson intervals, best epoch and training time."""
    names = column_names(runs)
    header = ["Run", "Group", "Seed", *(names[m] for m in ACCURACY_METRICS), "Best epoch", "Train s"]
    rows = []
    for label, group in group_runs(runs):
        for run in group:
            rows.append([run.name, label, str(run.config.get("seed")), *(cell([run], m) for m in ACCURACY_METRICS),
                         str(run.result.get("best_epoch")), f"{float(run.result.get('train_seconds') or 0):.0f}"])
    return header, rows


def _in_tables(run: Run) -> set[tuple[int, str]]:
    """(record id, attack) of the evaluations the run's table cells come from."""
    shown = set()
    for metric in ACCURACY_METRICS:
        found = run.source(metric)
        if found is not None and found[2] is not None:
            shown.add((id(found[2]), run.autoattack_version() if metric == "autoattack" else metric))
    return shown


def every_evaluation(runs: list[Run]) -> tuple[Table, int, bool]:
    """Every evaluation the run folders hold: per run, evaluated weights, attack, eps and point set, the latest
    record (accuracy with its Wilson interval, when written, which file); how many older records of the same
    (weights, attack, eps, points) were superseded; and whether the table shows more than the tables above (other
    weights, eps or point sets, or superseded records)."""
    header = ["Run", "Weights", "Attack", "eps", "Points", "Accuracy (%)", "Written", "Record"]
    rows, superseded, more = [], 0, False
    for run in runs:
        latest: dict[tuple, tuple[dict, str]] = {}
        for record in run.evaluations:
            for attack in record.get("attacks", {}):
                if attack_acc(record, attack) is None:
                    continue
                key = (record.get("weights"), attack, round(float(record.get("eps", 0)), 9), run.eval_points(record))
                superseded += key in latest
                latest[key] = (record, attack)
        shown = _in_tables(run)
        for (weights, attack, eps, points), (record, _) in latest.items():
            n = record.get("n")
            more = more or (id(record), attack) not in shown
            rows.append([run.name, str(weights), attack, key_text(eps) if record.get("norm", "linf") == "linf"
                         else f"{eps:g} ({record.get('norm')})", points,
                         accuracy_cell([attack_acc(record, attack)], [n if isinstance(n, int) else None]),
                         str(record.get("written", "-"))[:19].replace("T", " "), str(record.get("file", "-"))])
    return (header, rows), superseded, more or superseded > 0


def every_evaluation_caption(superseded: int) -> str:
    """The caption of ``every_evaluation``'s table."""
    text = ("For each run, evaluated weights, attack, eps and set of test points: the latest evaluation (a sweep's "
            "eval.json, or a record of `fastrobust eval` in the run's evaluations/ folder; written in UTC), with its "
            "95 % Wilson interval. The tables above take the best weights' evaluations at the run's eps, on the "
            "largest point set evaluated.")
    if superseded:
        text += f" {plural(superseded, 'older evaluation')} of the same attack and points left out (superseded)."
    return text
