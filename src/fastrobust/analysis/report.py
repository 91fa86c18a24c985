"""Reports: tables and figures from the result records of runs (result.json, metrics.jsonl, eval.json).

``build_report(runs_dir, out_dir)`` finds every run folder under ``runs_dir`` (a folder holding a
``result.json``), groups runs that differ only by seed, and writes ``report.md`` with PNG figures beside
it and ``report.html`` (the same content, figures embedded as base64, self-contained):

- the Backward Smoothing paper's Table 2 layout: method, clean, PGD-20, PGD-100, AutoAttack, training
  time and time relative to TRADES (mean over seeds, "± std" with several; "-" where there is no data);
- stability over seeds (paper Figs. 1, 2, 5): box plots with mean, and mean / std / median / best;
- sensitivity tables for gamma, step size, beta (and eps) when a method was run with several values;
- training curves: validation robust accuracy and training loss per epoch;
- robust accuracy against eps when eval.json holds evaluations at several eps;
- loss smoothness (paper Fig. 3): the top input-Hessian eigenvalue at the random and the backward-smoothing
  starting points against the training epoch, from each run's hessian.json (``evaluate.hessian`` of a sweep),
  or, with ``per_epoch: false``, of the final (best) model only;

Every number comes from the records, and every number of a table row from the same test points: when the
extra attacks of eval.json ran on fewer points than result.json's clean and PGD-20, the columns are labelled
with their number of points (``PGD-100 (n=300)``) and the caption says which points; an eval.json written
before sweeps took class-balanced points (no ``points`` key, fewer points than the test split: a prefix of a
class-sorted split) is flagged. The report states what was run (dataset and its source, model,
epochs, schedule, device, torch version) and warns when the CIFAR-10 copy is a JPEG re-encoding. Paths in
the report are relative to the data root (``<data root>/...``) or to the project, never a machine's absolute
path.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fastrobust.core.records import read_jsonl
from fastrobust.core.values import parse_number, pixel_text
from fastrobust.data.datasets import resolve_root
from fastrobust.errors import FastRobustError
from fastrobust.methods import method_class

METHOD_ORDER = ("natural", "pgd_at", "trades", "fast_at", "fast_at_2step", "fast_trades", "fast_at_plus",
                "backward_smoothing", "backward_smoothing_at", "sprout", "slat")
IGNORED_KEYS = {"seed", "out", "data_root", "device", "method"}
SENSITIVITY_KEYS = ("method.gamma", "method.step_size", "method.beta", "eps", "ema_decay")
JPEG_NOTE = ("The CIFAR-10 copy used offline here is a lossy JPEG re-encoding of the original (mean PSNR about "
             "30.5 dB, per-image RMSE about 7.9/255, the size of the attack budget): accuracies are comparable "
             "between the methods run here, not digit for digit with published CIFAR-10 tables.")


@dataclass
class Run:
    name: str
    path: Path
    config: dict[str, Any]
    result: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    eval_meta: dict[str, Any] = field(default_factory=dict)
    hessian: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.config.get("method", "?"))

    @property
    def eps(self) -> float:
        test = self.result.get("test", {})
        if "eps" in test:
            return float(test["eps"])
        return float(self.config.get("eps") or 8 / 255)

    def flat(self) -> dict[str, Any]:
        """The run's settings as one mapping (``method.X``, ``model.X``) with the values the run used where a
        setting was left at its default: eps (the attacks' eps), every method parameter (result.json's
        ``method_config``; older records: the method's defaults under the given ones), and the image counts of
        ``result.json["dataset"]`` for ``train_subset``/``val_size``/``test_subset`` (a sweep's
        ``dataset_loader`` may give other counts than the config says)."""
        flat = {k: v for k, v in self.config.items() if k not in ("method_params", "model_params")}
        flat["eps"] = self.eps
        for key, value in self.method_settings().items():
            if key != "eps":  # the run's eps above
                flat[f"method.{key}"] = _as_number(value)
        counts = self.result.get("dataset") or {}
        for key, split in (("train_subset", "train"), ("val_size", "val"), ("test_subset", "test")):
            if isinstance(counts.get(split), int):
                flat[key] = counts[split]
        for key, value in (self.config.get("model_params") or {}).items():
            flat[f"model.{key}"] = value
        return flat

    def method_settings(self) -> dict[str, Any]:
        """The method's parameters as the run used them: result.json's ``method_config`` when recorded, else
        the given ``method_params`` over the method's defaults (when the method is known here)."""
        recorded = self.result.get("method_config")
        if isinstance(recorded, dict):
            return dict(recorded)
        given = dict(self.config.get("method_params") or {})
        try:

            defaults = {f.name: f.default for f in fields(method_class(self.method).Config)}
        except Exception:  # noqa: BLE001 - a method unknown here: the given parameters only
            defaults = {}
        return {**defaults, **given}

    def eval_at(self, eps: float | None = None) -> dict[str, Any] | None:
        eps = self.eps if eps is None else eps
        for record in reversed(self.evaluations):
            if abs(float(record.get("eps", -1)) - eps) < 1e-9:
                return record
        return None

    def metric(self, name: str) -> float | None:
        """clean, pgd20, pgd100, autoattack (standard, else the fast version) in [0, 1]; None when absent."""
        test = self.result.get("test", {})
        if name == "clean":
            return _number(test.get("clean_acc"))
        if name == "pgd20":
            value = _number(test.get("pgd20_acc"))
            if value is None:
                record = self.eval_at()
                value = _attack_acc(record, "pgd20")
            return value
        record = self.eval_at()
        if name == "pgd100":
            return _attack_acc(record, "pgd100")
        if name == "autoattack":
            for attack in ("autoattack", "autoattack-official", "autoattack-fast"):
                value = _attack_acc(record, attack)
                if value is not None:
                    return value
            return None
        raise KeyError(name)

    def points(self, metric: str) -> str | None:
        """The test points ``metric`` was measured on: ``"N"`` (all N points of the run's test split, those of
        result.json), ``"N of M, class-balanced"`` (eval.json on a class-balanced subset) or ``"first N of M"``
        (eval.json on a prefix of the class-sorted split, written before sweeps balanced it); None without a value."""
        if self.metric(metric) is None:
            return None
        test = self.result.get("test", {})
        test_n = test.get("n")
        if metric == "clean" or (metric == "pgd20" and _number(test.get("pgd20_acc")) is not None):
            return f"{test_n}"
        return self.eval_points(self.eval_at() or {})

    def eval_points(self, record: dict[str, Any]) -> str:
        """The point set of one eval.json record (see ``points``)."""
        n, test_n = record.get("n"), self.result.get("test", {}).get("n")
        if test_n is None or n == test_n:
            return f"{n}"
        if (self.eval_meta.get("points") or {}).get("selection") == "balanced_head":
            return f"{n} of {test_n}, class-balanced"
        return f"first {n} of {test_n}"

    def autoattack_version(self) -> str | None:
        record = self.eval_at()
        for attack in ("autoattack", "autoattack-official", "autoattack-fast"):
            if _attack_acc(record, attack) is not None:
                return attack
        return None


def _as_number(value: Any) -> Any:
    """A method parameter as given in YAML ("8/255") as a number, for sorting and display."""
    if isinstance(value, str):
        try:
            return parse_number(value)
        except Exception:  # noqa: BLE001 - not a number: keep the text
            return value
    return value


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _attack_acc(record: dict[str, Any] | None, attack: str) -> float | None:
    if not record:
        return None
    return _number(record.get("attacks", {}).get(attack, {}).get("robust_acc"))


# ----------------------------------------------------------------------------------------- collecting
def collect_runs(runs_dir: str | Path) -> tuple[list[Run], list[dict[str, Any]]]:
    """Every run under ``runs_dir`` with a result.json, and the run folders without one (name, reason)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FastRobustError(f"{runs_dir} is not a folder: give a sweep folder or a folder of run folders")
    runs: list[Run] = []
    missing: list[dict[str, Any]] = []
    for result_file in sorted(runs_dir.rglob("result.json")):
        run_dir = result_file.parent
        try:
            result = json.loads(result_file.read_text())
        except (OSError, json.JSONDecodeError) as error:
            missing.append({"name": _rel(run_dir, runs_dir), "reason": f"result.json unreadable ({error})"})
            continue
        metrics = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
        evaluations: list[dict[str, Any]] = []
        meta: dict[str, Any] = {}
        eval_file = run_dir / "eval.json"
        if eval_file.is_file():
            try:
                meta = json.loads(eval_file.read_text())
                evaluations = list(meta.get("evaluations", []))
            except json.JSONDecodeError:
                missing.append({"name": _rel(run_dir, runs_dir), "reason": "eval.json unreadable"})
        hessian: dict[str, Any] = {}
        if (run_dir / "hessian.json").is_file():
            try:
                hessian = json.loads((run_dir / "hessian.json").read_text())
            except json.JSONDecodeError:
                missing.append({"name": _rel(run_dir, runs_dir), "reason": "hessian.json unreadable"})
        runs.append(Run(_rel(run_dir, runs_dir), run_dir, result.get("config", {}), result, metrics, evaluations, meta,
                        hessian))
    done = {run.path for run in runs}
    for config_file in sorted(runs_dir.rglob("config.json")):
        if config_file.parent not in done:
            missing.append({"name": _rel(config_file.parent, runs_dir), "reason": "no result.json (unfinished or failed)"})
    sweep_file = runs_dir / "sweep.json"
    if sweep_file.is_file():
        try:
            for entry in json.loads(sweep_file.read_text()).get("runs", []):
                if entry.get("status") == "failed" and not any(m["name"] == entry["name"] for m in missing):
                    missing.append({"name": entry["name"], "reason": f"failed: {entry.get('error')}"})
        except (json.JSONDecodeError, AttributeError):
            pass
    return runs, missing


def _rel(path: Path, root: Path) -> str:
    rel = path.relative_to(root)
    return str(rel) if str(rel) != "." else path.name


# ----------------------------------------------------------------------------------------- grouping
def _key_text(value: Any) -> str:
    return pixel_text(value) if isinstance(value, float) else str(value)


def group_runs(runs: list[Run]) -> list[tuple[str, list[Run]]]:
    """Runs grouped by method and every setting that varies within that method except the seed."""
    by_method: dict[str, list[Run]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    order = [m for m in METHOD_ORDER if m in by_method] + sorted(m for m in by_method if m not in METHOD_ORDER)
    groups: list[tuple[str, list[Run]]] = []
    for method in order:
        members = by_method[method]
        keys = varied_keys(members)
        buckets: dict[str, list[Run]] = {}
        for run in members:
            flat = run.flat()
            label = method + (" (" + ", ".join(f"{_short(k)}={_key_text(flat.get(k))}" for k in keys) + ")" if keys else "")
            buckets.setdefault(label, []).append(run)
        for label in sorted(buckets, key=lambda lab: _sort_key(buckets[lab][0], keys)):
            groups.append((label, sorted(buckets[label], key=lambda r: r.config.get("seed", 0))))
    return groups


def varied_keys(runs: list[Run]) -> list[str]:
    values: dict[str, set[str]] = {}
    for run in runs:
        for key, value in run.flat().items():
            values.setdefault(key, set()).add(json.dumps(value, sort_keys=True))
    keys = [k for k, v in values.items() if k not in IGNORED_KEYS and (len(v) > 1 or any(k not in r.flat() for r in runs))]
    return sorted(keys)


def _short(key: str) -> str:
    return key.split(".", 1)[1] if key.startswith(("method.", "model.")) else key


def _sort_key(run: Run, keys: list[str]) -> tuple:
    flat = run.flat()
    return tuple((0, flat[k], "") if isinstance(flat.get(k), (int, float)) else (1, 0, str(flat.get(k))) for k in keys)


# ----------------------------------------------------------------------------------------- point sets
ACCURACY_METRICS = ("clean", "pgd20", "pgd100", "autoattack")


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
        return dict(_METRIC_NAMES)
    names = {}
    for metric, labels in sets.items():
        counts = sorted({re.sub(r"^first ", "", label).split(" ")[0] for label in labels},
                        key=lambda n: (-int(n), n) if n.isdigit() else (0, n))
        names[metric] = f"{_METRIC_NAMES[metric]} (n={'/'.join(counts)})" if counts else _METRIC_NAMES[metric]
    return names


def points_caption(runs: list[Run]) -> str:
    """One sentence saying which test points each accuracy column comes from, and a warning for prefixes."""
    sets = point_sets(runs)
    used = {m: labels for m, labels in sets.items() if labels}
    if not used:
        return ""
    every = {label for labels in used.values() for label in labels}
    if len(every) == 1:
        return f" Every accuracy on the same {every.pop()} test points."
    by_set: dict[str, list[str]] = {}
    for metric, labels in used.items():
        by_set.setdefault(", ".join(labels), []).append(_METRIC_NAMES[metric])
    parts = [f"{' and '.join(names)} on {where} test points" for where, names in by_set.items()]
    text = (" Columns on different test points (" + "; ".join(parts) + "): compare accuracies within a point set "
            "only (n = the number of points).")
    if any(label.startswith("first ") for label in every):
        prefix = sorted(run.name for run in runs if any((run.points(m) or "").startswith("first ") for m in ACCURACY_METRICS))
        who = "every run" if len(prefix) == len(runs) else ", ".join(prefix)
        text += (f" Warning: eval.json of {who} was written on the first points of the class-sorted "
                 "test split, i.e. a few classes only; run the same fastrobust sweep command again to re-evaluate "
                 "on class-balanced points.")
    return text


# ----------------------------------------------------------------------------------------- statistics
def _values(group: list[Run], metric: str) -> list[float]:
    return [v for v in (run.metric(metric) for run in group) if v is not None]


def _mean_cell(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    if len(values) > 1:
        return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"
    return f"{mean:.{digits}f}"


def _train_minutes(group: list[Run]) -> list[float]:
    return [float(r.result["train_seconds"]) / 60 for r in group if _number(r.result.get("train_seconds")) is not None]


def _context(run: Run) -> tuple:
    c = run.flat()
    return (c.get("dataset"), c.get("model"), c.get("epochs"), c.get("train_subset"), c.get("batch_size"))


def table2(groups: list[tuple[str, list[Run]]]) -> tuple[list[str], list[list[str]]]:
    """The paper's Table 2 layout: one row per method group; numbers in percent, time in minutes."""
    names = column_names([run for _, group in groups for run in group])
    header = ["Method", *(names[m] for m in ACCURACY_METRICS), "Time (min)", "Time / TRADES", "Runs",
              "Declared passes"]
    trades_time: dict[tuple, list[float]] = {}
    for _, group in groups:
        for run in group:
            if run.method == "trades" and _number(run.result.get("train_seconds")) is not None:
                trades_time.setdefault(_context(run), []).append(float(run.result["train_seconds"]) / 60)
    rows = []
    for label, group in groups:
        minutes = _train_minutes(group)
        reference = trades_time.get(_context(group[0]))
        relative = "-"
        if minutes and reference:
            ratio = statistics.fmean(minutes) / statistics.fmean(reference)
            relative = f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.3f}x"
        aa_version = {r.autoattack_version() for r in group} - {None}
        aa = _mean_cell(_values(group, "autoattack"))
        if aa != "-" and aa_version and aa_version <= {"autoattack-fast"}:
            aa += " †"
        rows.append([label, _mean_cell(_values(group, "clean")), _mean_cell(_values(group, "pgd20")),
                     _mean_cell(_values(group, "pgd100")), aa, _mean_cell(minutes, scale=1.0, digits=1 if statistics.fmean(minutes) >= 1 else 2) if minutes else "-",
                     relative, str(len(group)), _passes(group)])
    return header, rows


def _passes(group: list[Run]) -> str:
    """The method's declared cost per training step (result.json method_cost_passes), a load-free reference."""
    values = {round(float(r.result["method_cost_passes"]), 2) for r in group if _number(r.result.get("method_cost_passes")) is not None}
    return "/".join(f"{v:g}" for v in sorted(values)) if values else "-"


def stability(groups: list[tuple[str, list[Run]]], metric: str) -> tuple[list[str], list[list[str]]]:
    header = ["Method", "Seeds", "Mean", "Std", "Median", "Best", "Worst"]
    rows = []
    for label, group in groups:
        values = _values(group, metric)
        if len(values) < 2:
            continue
        pct = [v * 100 for v in values]
        rows.append([label, str(len(values)), f"{statistics.fmean(pct):.2f}", f"{statistics.stdev(pct):.2f}",
                     f"{statistics.median(pct):.2f}", f"{max(pct):.2f}", f"{min(pct):.2f}"])
    return header, rows


def sensitivity(runs: list[Run]) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(method, key, header, rows) for every sensitivity key that takes several values within a method."""
    tables = []
    by_method: dict[str, list[Run]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    for method in [m for m in METHOD_ORDER if m in by_method] + sorted(set(by_method) - set(METHOD_ORDER)):
        members = by_method[method]
        for key in SENSITIVITY_KEYS:
            values = {json.dumps(r.flat().get(key)) for r in members if key in r.flat()}
            if len(values) < 2:
                continue
            others = [k for k in varied_keys(members) if k != key]
            buckets: dict[tuple, list[Run]] = {}
            for run in members:
                flat = run.flat()
                buckets.setdefault((flat.get(key),) + tuple(_key_text(flat.get(k)) for k in others), []).append(run)
            names = column_names(members)
            header = [_short(key)] + [_short(k) for k in others] + ["Runs", *(names[m] for m in ACCURACY_METRICS)]
            rows = []
            for bucket_key in sorted(buckets, key=lambda k: (k[0] is None, k[0] if isinstance(k[0], (int, float)) else 0, str(k))):
                group = buckets[bucket_key]
                rows.append([_key_text(bucket_key[0]), *bucket_key[1:], str(len(group)),
                             *(_mean_cell(_values(group, m)) for m in ACCURACY_METRICS)])
            tables.append((method, key, header, rows))
    return tables


# ----------------------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib  # backend: pyplot must be imported after use("Agg"), and only by a report

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # backend

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def figure_stability(groups: list[tuple[str, list[Run]]], out: Path) -> Path | None:
    metrics = [m for m in ("pgd20", "pgd100", "autoattack") if any(len(_values(g, m)) >= 2 for _, g in groups)]
    if not metrics:
        return None
    names = column_names([run for _, group in groups for run in group])
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        data = [(label, [v * 100 for v in _values(g, metric)]) for label, g in groups if len(_values(g, metric)) >= 2]
        ax.boxplot([d for _, d in data], showmeans=True, showfliers=False)  # every seed is drawn as a point below
        for i, (_, values) in enumerate(data, start=1):  # every seed as a point (strip plot over the box)
            offsets = [((j % 5) - 2) * 0.04 for j in range(len(values))]
            ax.scatter([i + o for o in offsets], values, s=12, color="black", alpha=0.6, zorder=3)
        ax.set_xticks(range(1, len(data) + 1), [label for label, _ in data], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"{names[metric]} accuracy (%)")
        ax.set_title(f"{names[metric]} over seeds")
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, out / "stability.png")


_METRIC_NAMES = {"clean": "Clean", "pgd20": "PGD-20", "pgd100": "PGD-100", "autoattack": "AutoAttack"}
_INIT_NAMES = {"random": "random start", "backward_smoothing": "backward-smoothing start", "clean": "clean point"}


def hessian_curves(groups: list[tuple[str, list[Run]]]) -> list[tuple[str, dict[str, dict[int, list[float]]]]]:
    """Per group: init -> epoch -> the mean eigenvalue of each run (from hessian.json records with an epoch)."""
    curves = []
    for label, group in groups:
        per_init: dict[str, dict[int, list[float]]] = {}
        for run in group:
            for record in run.hessian.get("records", []):
                if record.get("epoch") is None:
                    continue
                for init, summary in record.items():
                    if isinstance(summary, dict) and _number(summary.get("mean")) is not None:
                        per_init.setdefault(init, {}).setdefault(int(record["epoch"]), []).append(float(summary["mean"]))
        if per_init:
            curves.append((label, per_init))
    return curves


def hessian_table(curves: list[tuple[str, dict[str, dict[int, list[float]]]]]) -> tuple[list[str], list[list[str]]]:
    """First and last epoch's mean eigenvalue per init, and last-epoch random / backward-smoothing ratio."""
    inits = [i for i in _INIT_NAMES if any(i in c for _, c in curves)]
    header = ["Method", "Runs", "Epochs"] + [f"{_INIT_NAMES[i]} (first → last epoch)" for i in inits]
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


def hessian_final(groups: list[tuple[str, list[Run]]]) -> list[tuple[str, dict[str, list[float]]]]:
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
                    if isinstance(summary, dict) and _number(summary.get("mean")) is not None:
                        per_init.setdefault(init, []).append(float(summary["mean"]))
        if per_init:
            finals.append((label, per_init))
    return finals


def hessian_final_table(finals: list[tuple[str, dict[str, list[float]]]]) -> tuple[list[str], list[list[str]]]:
    """The final model's mean eigenvalue per init (± std over seeds), and the random / backward-smoothing ratio."""
    inits = [i for i in _INIT_NAMES if any(i in f for _, f in finals)]
    header = ["Method", "Runs"] + [_INIT_NAMES[i] for i in inits]
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


def figure_hessian_final(finals: list[tuple[str, dict[str, list[float]]]], out: Path) -> Path | None:
    """The final model's top input-Hessian eigenvalue per method: bars per starting point (mean over seeds,
    error bar: ± one std, dots: the seeds)."""
    if not finals:
        return None
    plt = _pyplot()
    inits = [i for i in _INIT_NAMES if any(i in f for _, f in finals)]
    width = 0.8 / len(inits)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(finals) + 2), 3.6))
    for k, init in enumerate(inits):
        xs = [g + (k - (len(inits) - 1) / 2) * width for g in range(len(finals))]
        values = [per_init.get(init, []) for _, per_init in finals]
        means = [statistics.fmean(v) if v else 0.0 for v in values]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=_INIT_NAMES[init])
        for x, v in zip(xs, values):
            ax.plot([x] * len(v), v, "k.", markersize=3)
    ax.set_xticks(range(len(finals)), [label for label, _ in finals], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("top Hessian eigenvalue (input)"), ax.grid(axis="y", alpha=0.3), ax.legend(fontsize=7)
    return _save(fig, out / "hessian.png")


def figure_hessian(curves: list[tuple[str, dict[str, dict[int, list[float]]]]], out: Path) -> Path | None:
    """Paper Fig. 3: top input-Hessian eigenvalue against the epoch, random vs backward-smoothing start
    (one panel per method; line: mean over seeds, band: ± one std)."""
    if not curves:
        return None
    plt = _pyplot()
    cols = min(4, len(curves))
    rows = -(-len(curves) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(curves):]:
        ax.set_visible(False)
    for ax, (label, per_init) in zip(axes.flat, curves):
        for init, style in (("random", "-o"), ("backward_smoothing", "--s"), ("clean", ":^")):
            if init not in per_init:
                continue
            epochs = sorted(per_init[init])
            means = [statistics.fmean(per_init[init][e]) for e in epochs]
            ax.plot(epochs, means, style, markersize=4, label=_INIT_NAMES[init])
            if any(len(per_init[init][e]) > 1 for e in epochs):
                stds = [statistics.stdev(per_init[init][e]) if len(per_init[init][e]) > 1 else 0.0 for e in epochs]
                ax.fill_between(epochs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.15)
        ax.set_title(label, fontsize=9), ax.set_xlabel("epoch"), ax.grid(alpha=0.3)
        ax.set_ylabel("top Hessian eigenvalue (input)")
        ax.legend(fontsize=7)
    return _save(fig, out / "hessian.png")


def portable_path(text: str, data_roots: list[str | Path] | None = None, project: str | Path | None = None) -> str:
    """``text`` with every absolute path made relative: ``<data root>/...`` under a data root, the path relative
    to ``project`` (default: the working folder) under it, else only its last two parts (``.../parent/name``)."""
    roots = [Path(r).expanduser().resolve() for r in (data_roots or []) if r]
    base = Path(project).resolve() if project is not None else Path.cwd().resolve()

    def shorten(match: re.Match) -> str:
        path = Path(match.group(0)).resolve()
        for root in roots:
            if path == root or root in path.parents:
                return "<data root>/" + path.relative_to(root).as_posix()
        if base in path.parents:
            return path.relative_to(base).as_posix()
        return ".../" + "/".join(path.parts[-2:])

    return re.sub(r"(?:^|(?<=[\s(\[='\"]))/[^\s()\[\],;'\"]+", shorten, text)


def _data_roots(runs: list[Run]) -> list[str]:
    """Where the runs' datasets were looked for: each run's data_root, $FASTROBUST_DATA, the default root."""

    roots = [r.config.get("data_root") for r in runs] + [os.environ.get("FASTROBUST_DATA")]
    try:
        roots.append(str(resolve_root(None)))
    except Exception:  # noqa: BLE001 - only a hint for shortening paths
        pass
    return [r for r in dict.fromkeys(roots) if r]


def _curve(group: list[Run], key: str) -> tuple[list[int], list[float]]:
    per_epoch: dict[int, list[float]] = {}
    for run in group:
        last: dict[int, float] = {}
        for record in run.metrics:
            if "epoch" in record and _number(record.get(key)) is not None:
                last[int(record["epoch"])] = float(record[key])
        for epoch, value in last.items():
            per_epoch.setdefault(epoch, []).append(value)
    epochs = sorted(per_epoch)
    return epochs, [statistics.fmean(per_epoch[e]) for e in epochs]


def figure_curves(groups: list[tuple[str, list[Run]]], out: Path) -> Path | None:
    if not any(run.metrics for _, g in groups for run in g):
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, group in groups:
        epochs, values = _curve(group, "val_robust_acc")
        if epochs:
            left.plot(epochs, [v * 100 for v in values], marker="o", markersize=3, label=label)
        epochs, values = _curve(group, "train_loss")
        if epochs:
            right.plot(epochs, values, marker="o", markersize=3, label=label)
    left.set_xlabel("epoch"), left.set_ylabel("validation robust accuracy (%, PGD)"), left.grid(alpha=0.3)
    right.set_xlabel("epoch"), right.set_ylabel("training loss"), right.grid(alpha=0.3)
    left.set_title("Validation robust accuracy"), right.set_title("Training loss")
    right.legend(fontsize=7, loc="best")
    return _save(fig, out / "training_curves.png")


def eps_curves(groups: list[tuple[str, list[Run]]]) -> list[tuple[str, list[float], list[float]]]:
    curves = []
    for label, group in groups:
        per_eps: dict[float, list[float]] = {}
        for run in group:
            for record in run.evaluations:
                value = _number(record.get("robust_acc"))
                if value is not None:
                    per_eps.setdefault(round(float(record["eps"]), 9), []).append(value)
        if len(per_eps) >= 2:
            eps = sorted(per_eps)
            curves.append((label, eps, [statistics.fmean(per_eps[e]) for e in eps]))
    return curves


def figure_eps(curves: list[tuple[str, list[float], list[float]]], out: Path) -> Path | None:
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, eps, values in curves:
        ax.plot([e * 255 for e in eps], [v * 100 for v in values], marker="o", label=label)
    ax.set_xlabel("eps (x/255)"), ax.set_ylabel("robust accuracy (%, worst case of the attacks)")
    ax.set_title("Robust accuracy against eps"), ax.grid(alpha=0.3), ax.legend(fontsize=7)
    return _save(fig, out / "robust_vs_eps.png")


def figure_table(groups: list[tuple[str, list[Run]]], out: Path) -> Path | None:
    """Bar chart of the Table 2 numbers (clean and robust accuracies per method)."""
    metrics = [m for m in ("clean", "pgd20", "pgd100", "autoattack") if any(_values(g, m) for _, g in groups)]
    if not metrics or not groups:
        return None
    names = column_names([run for _, group in groups for run in group])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 2), 4.2))
    width = 0.8 / len(metrics)
    for i, metric in enumerate(metrics):
        heights = [statistics.fmean(_values(g, metric)) * 100 if _values(g, metric) else 0 for _, g in groups]
        ax.bar([j + i * width for j in range(len(groups))], heights, width, label=names[metric])
    ax.set_xticks([j + width * (len(metrics) - 1) / 2 for j in range(len(groups))], [label for label, _ in groups],
                  rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)"), ax.legend(fontsize=8), ax.grid(axis="y", alpha=0.3)
    ax.set_title("Test accuracy by method")
    return _save(fig, out / "accuracy.png")


# ----------------------------------------------------------------------------------------- what was run
def describe_runs(runs: list[Run]) -> tuple[list[str], bool]:
    """Bullet lines stating what was run, and whether a JPEG-re-encoded dataset was used."""
    def distinct(values: Any) -> str:
        seen = list(dict.fromkeys(str(v) for v in values if v is not None and v != ""))
        return ", ".join(seen) if seen else "-"

    datasets = distinct(f"{r.result.get('dataset', {}).get('name', r.config.get('dataset'))} "
                        f"(train {r.result.get('dataset', {}).get('train', '?')}, val {r.result.get('dataset', {}).get('val', '?')}, "
                        f"test {r.result.get('dataset', {}).get('test', '?')} images)" for r in runs)
    roots = _data_roots(runs)
    sources = distinct(portable_path(str(r.result.get("dataset", {}).get("source")), roots)
                       for r in runs if r.result.get("dataset", {}).get("source"))
    env = [r.result.get("environment", {}) for r in runs]
    total_minutes = sum(float(r.result.get("train_seconds") or 0) for r in runs) / 60
    lines = [
        f"Runs: {len(runs)} ({distinct(r.method for r in runs)}); seeds {distinct(sorted({r.config.get('seed') for r in runs}, key=str))}",
        f"Dataset: {datasets}; source: {sources}",
        f"Model: {distinct(r.config.get('model') for r in runs)}; activation {distinct(r.config.get('activation') for r in runs)}",
        f"Training: {distinct(r.config.get('epochs') for r in runs)} epochs, batch {distinct(r.config.get('batch_size') for r in runs)}, "
        f"SGD lr {distinct(r.config.get('lr') for r in runs)} (momentum {distinct(r.config.get('momentum') for r in runs)}, "
        f"weight decay {distinct(r.config.get('weight_decay') for r in runs)}), schedule {distinct(r.config.get('schedule') for r in runs)}, "
        f"eps {distinct(_key_text(r.eps) for r in runs)}",
        f"Validation: PGD-{distinct(r.config.get('val_pgd_steps') for r in runs)} on the validation split after each epoch "
        f"(best epoch by validation robust accuracy; the test split is never used for selection)",
        f"Test: clean and PGD-{distinct(r.config.get('test_pgd_steps') for r in runs)} (step {distinct(_key_text(r.result.get('test', {}).get('step_size', r.config.get('eval_step_size'))) for r in runs)}, "
        f"no random start) of the best model, in result.json; extra attacks from eval.json",
        f"Device: {distinct(e.get('device') for e in env)}; torch {distinct(e.get('torch') for e in env)}; "
        f"fastrobust {distinct(e.get('fastrobust') for e in env)}; python {distinct(e.get('python') for e in env)}",
        f"Total training time: {total_minutes:.1f} min (sum of train_seconds, without validation and evaluation)",
    ]
    extra = _eval_description(runs)
    if extra:
        lines.append(extra)
    jpeg = any("jpeg" in str(r.result.get("dataset", {}).get("source", "")).lower() and
               "cifar" in str(r.result.get("dataset", {}).get("name", r.config.get("dataset", ""))).lower() for r in runs)
    return lines, jpeg


def _eval_description(runs: list[Run]) -> str:
    attacks: dict[str, Any] = {}
    ns: dict[str, None] = {}
    passes: dict[str, list[tuple[float, float]]] = {}  # per attack: (forward, backward) per point of each record
    for run in runs:
        for record in run.evaluations:
            ns[run.eval_points(record)] = None
            for name, entry in record.get("attacks", {}).items():
                attacks.setdefault(name, entry.get("settings"))
                cost = entry.get("cost") or {}
                if _number(cost.get("forward_per_point")) is not None:
                    passes.setdefault(name, []).append((cost["forward_per_point"], cost["backward_per_point"]))
    if not attacks:
        return ""
    parts = []
    for name, settings in attacks.items():
        if name in ("autoattack", "autoattack-fast") and isinstance(settings, dict):
            comps = ", ".join(f"{c} ({', '.join(f'{k}={v}' for k, v in s.items())})" for c, s in settings.get("options", {}).items())
            parts.append(f"{name}: {comps}{_passes_text(passes.get(name))}")
        else:
            parts.append(f"{name}{_passes_text(passes.get(name))}")
    return f"Extra evaluation (eval.json) on {' / '.join(ns)} test points: " + "; ".join(parts)


def _passes_text(per_point: list[tuple[float, float]] | None) -> str:
    """The compute column of an attack in words: its mean forward and backward passes per point attacked (over
    the records that state them), or nothing for records written before evaluations counted them."""
    if not per_point:
        return ""
    forward = sum(f for f, _ in per_point) / len(per_point)
    backward = sum(b for _, b in per_point) / len(per_point)
    return f" [{forward:.4g} forward + {backward:.4g} backward passes per point]"


# ----------------------------------------------------------------------------------------- writing
def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def build_report(runs_dir: str | Path, out_dir: str | Path | None = None, *, title: str | None = None,
                 notes: list[str] | None = None, html_page: bool = True) -> dict[str, Any]:
    """Write ``report.md`` (+ PNGs) and ``report.html`` for the runs under ``runs_dir``; returns what was written."""
    runs_dir = Path(runs_dir)
    runs, missing = collect_runs(runs_dir)
    if not runs:
        raise FastRobustError(f"no run with a result.json under {runs_dir}: nothing to report (is the sweep finished?)")
    out = Path(out_dir) if out_dir is not None else runs_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    title = title or f"fastrobust report: {runs_dir.name}"
    described, jpeg = describe_runs(runs)
    roots = _data_roots(runs)
    notes = [portable_path(note, roots) for note in notes or []]
    missing = [dict(m, reason=portable_path(str(m["reason"]), roots)) for m in missing]

    # each section: (heading, markdown text, html text)
    sections: list[tuple[str, str, str]] = []
    intro_md = "\n".join(f"- {line}" for line in described + list(notes or []))
    intro_html = "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in described + list(notes or [])) + "</ul>"
    if jpeg:
        intro_md += f"\n\n**Note.** {JPEG_NOTE}"
        intro_html += f"<p><b>Note.</b> {html.escape(JPEG_NOTE)}</p>"
    sections.append(("What was run", intro_md, intro_html))

    header, rows = table2(groups)
    caption = ("Mean over seeds (± std with several), accuracies in % on the test points; time = training time "
               "(train_seconds: training steps only, without validation); Time / TRADES relative to TRADES runs of the "
               "same dataset, model and epochs; Declared passes = the method's cost per step in forward+backward passes "
               "(a forward alone counts 1/3), the load-independent reference. \"-\": no record.")
    caption += points_caption(runs)
    if any("†" in row[4] for row in rows):
        caption += (" †: AutoAttack-fast (APGD-CE + APGD-T only, see the settings above), an upper bound of the "
                    "standard AutoAttack accuracy.")
    figures: list[tuple[str, Path]] = []
    bar = figure_table(groups, out)
    sections.append(("Table 2 layout: accuracy and training time", _md_table(header, rows) + "\n\n" + caption,
                     _html_table(header, rows) + f"<p>{html.escape(caption)}</p>"))
    if bar:
        figures.append(("Test accuracy by method", bar))

    stab_md, stab_html = [], []
    names = column_names(runs)
    for metric in ("pgd20", "pgd100", "autoattack"):
        header, rows = stability(groups, metric)
        if rows:
            stab_md.append(f"{names[metric]} accuracy (%) over seeds:\n\n" + _md_table(header, rows))
            stab_html.append(f"<p>{html.escape(names[metric])} accuracy (%) over seeds:</p>" + _html_table(header, rows))
    stab_fig = figure_stability(groups, out)
    if stab_md:
        sections.append(("Stability over seeds (paper Figs. 1, 2, 5)", "\n\n".join(stab_md), "".join(stab_html)))
    if stab_fig:
        figures.append(("Robust accuracy over seeds (box: quartiles, line: median, triangle: mean)", stab_fig))

    hess, finals = hessian_curves(groups), hessian_final(groups)
    if hess or finals:
        settings = next(r.hessian for r in runs if r.hessian)
        hs = settings.get("settings", {})
        balanced = all((r.hessian.get("points") or {}).get("selection") == "balanced_head" for r in runs if r.hessian)
        where = (f"{settings.get('n', '?')} class-balanced test points" if balanced else
                 f"the first {settings.get('n', '?')} points of the class-sorted test split (a few classes only: "
                 "hessian.json written before sweeps balanced the points; run the sweep command again to redo it)")
        caption = (f"Top eigenvalue of the Hessian of the {str(hs.get('loss', 'kl')).upper()} inner-maximisation loss "
                   f"with respect to the input, at the attack's starting point, mean over {where} "
                   f"({hs.get('iterations', '?')} power iterations; hessian.json "
                   "of each run); mean over seeds. A smaller value is a smoother loss: the paper's Fig. 3 shows the "
                   "backward-smoothing start below the random one throughout training.")
        md, ht = [], []
        if hess:
            header, rows = hessian_table(hess)
            md.append(_md_table(header, rows))
            ht.append(_html_table(header, rows))
        if finals:
            header, rows = hessian_final_table(finals)
            intro = ("Final (best) model only (evaluate.hessian.per_epoch: false), mean ± std over seeds:")
            md.append(intro + "\n\n" + _md_table(header, rows))
            ht.append(f"<p>{html.escape(intro)}</p>" + _html_table(header, rows))
        sections.append(("Loss smoothness (paper Fig. 3)", "\n\n".join(md) + "\n\n" + caption,
                         "".join(ht) + f"<p>{html.escape(caption)}</p>"))
        if hess:
            hess_fig = figure_hessian(hess, out)
            title = "Top input-Hessian eigenvalue against the epoch: random vs backward-smoothing start"
        else:
            hess_fig = figure_hessian_final(finals, out)
            title = "Top input-Hessian eigenvalue of the final (best) model: random vs backward-smoothing start"
        if hess_fig:
            figures.append((title, hess_fig))

    sens = sensitivity(runs)
    if sens:
        md = "\n\n".join(f"{method}, {_short(key)}:\n\n" + _md_table(h, r) for method, key, h, r in sens)
        ht = "".join(f"<p>{html.escape(method)}, {html.escape(_short(key))}:</p>" + _html_table(h, r) for method, key, h, r in sens)
        sections.append(("Sensitivity", md, ht))

    curves = figure_curves(groups, out)
    if curves:
        figures.append(("Training curves (mean over seeds; each method's own training loss: CE or the TRADES objective, so compare shapes, not levels)", curves))
    eps_fig = figure_eps(eps_curves(groups), out)
    if eps_fig:
        figures.append(("Robust accuracy against eps", eps_fig))

    run_rows = []
    for label, group in groups:
        for run in group:
            pct = lambda v: "-" if v is None else f"{v * 100:.2f}"  # noqa: E731
            run_rows.append([run.name, label, str(run.config.get("seed")), pct(run.metric("clean")), pct(run.metric("pgd20")),
                             pct(run.metric("pgd100")), pct(run.metric("autoattack")), str(run.result.get("best_epoch")),
                             f"{float(run.result.get('train_seconds') or 0):.0f}"])
    run_header = ["Run", "Group", "Seed", *(names[m] for m in ACCURACY_METRICS), "Best epoch", "Train s"]
    runs_md = _md_table(run_header, run_rows)
    runs_html = _html_table(run_header, run_rows)
    if missing:
        runs_md += "\n\nWithout a result:\n\n" + "\n".join(f"- {m['name']}: {m['reason']}" for m in missing)
        runs_html += "<p>Without a result:</p><ul>" + "".join(
            f"<li>{html.escape(m['name'])}: {html.escape(m['reason'])}</li>" for m in missing) + "</ul>"
    sections.append(("Every run", runs_md, runs_html))

    md = [f"# {title}", ""]
    for heading, text, _ in sections:
        md += [f"## {heading}", "", text, ""]
    if figures:
        md += ["## Figures", ""]
        for caption_text, path in figures:
            md += [f"### {caption_text}", "", f"![{caption_text}]({path.name})", ""]
    (out / "report.md").write_text("\n".join(md))
    written = {"markdown": str(out / "report.md"), "figures": [str(p) for _, p in figures], "runs": len(runs),
               "missing": missing}
    if html_page:
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
                 "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
                 "td:first-child,th:first-child{text-align:left}img{max-width:100%}</style></head><body>",
                 f"<h1>{html.escape(title)}</h1>"]
        for heading, _, text in sections:
            parts += [f"<h2>{html.escape(heading)}</h2>", text]
        if figures:
            parts.append("<h2>Figures</h2>")
            for caption_text, path in figures:
                data = base64.b64encode(path.read_bytes()).decode()
                parts += [f"<h3>{html.escape(caption_text)}</h3>", f"<img alt='{html.escape(caption_text)}' src='data:image/png;base64,{data}'>"]
        parts.append("</body></html>")
        (out / "report.html").write_text("\n".join(parts))
        written["html"] = str(out / "report.html")
    return written
