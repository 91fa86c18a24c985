"""What was run, in words: the setting of the runs, the extra evaluations and their cost, which weights each
run's ``best`` holds (weight averaging), and paths made portable (no machine's absolute path in a report)."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

from fastrobust.analysis.report.runs import Run, number, points_text
from fastrobust.analysis.report.text import key_text, plural
from fastrobust.data.datasets import resolve_root

JPEG_NOTE = ("The CIFAR-10 copy used offline here is a lossy JPEG re-encoding of the original (mean PSNR about "
             "30.5 dB, per-image RMSE about 7.9/255, the size of the attack budget): accuracies are comparable "
             "between the methods run here, not digit for digit with published CIFAR-10 tables.")


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


def data_roots(runs: list[Run]) -> list[str]:
    """Where the runs' datasets were looked for: each run's data_root, $FASTROBUST_DATA, the default root."""
    roots = [r.config.get("data_root") for r in runs] + [os.environ.get("FASTROBUST_DATA")]
    with contextlib.suppress(Exception):  # only a hint for shortening paths
        roots.append(str(resolve_root(None)))
    return [r for r in dict.fromkeys(roots) if r]


def _distinct(values: Any) -> str:
    seen = list(dict.fromkeys(str(v) for v in values if v is not None and v != ""))
    return ", ".join(seen) if seen else "-"


def _threads(text: str) -> str:
    """Device text of older records: "1 threads" -> "1 thread"."""
    return re.sub(r"\b1 threads\b", "1 thread", text)


def describe_runs(runs: list[Run]) -> tuple[list[str], bool]:
    """Bullet lines stating what was run, and whether a JPEG-re-encoded dataset was used."""
    def config(key: str) -> str:
        return _distinct(r.config.get(key) for r in runs)

    def data(r: Run) -> dict[str, Any]:
        return r.result.get("dataset", {})

    datasets = _distinct(f"{data(r).get('name', r.config.get('dataset'))} (train {data(r).get('train', '?')}, "
                         f"val {data(r).get('val', '?')}, test {data(r).get('test', '?')} images)" for r in runs)
    roots = data_roots(runs)
    sources = _distinct(portable_path(str(data(r).get("source")), roots) for r in runs if data(r).get("source"))
    env = [r.result.get("environment", {}) for r in runs]
    total_minutes = sum(float(r.result.get("train_seconds") or 0) for r in runs) / 60
    seeds = sorted({r.config.get("seed") for r in runs}, key=str)
    epochs = sorted({r.config.get("epochs") for r in runs if isinstance(r.config.get("epochs"), int)})
    epochs_text = plural(epochs[0], "epoch") if len(epochs) == 1 else f"{_distinct(epochs)} epochs"
    step = _distinct(key_text(r.result.get("test", {}).get("step_size", r.config.get("eval_step_size"))) for r in runs)
    lines = [
        (f"{plural(len(runs), 'run')} ({_distinct(r.method for r in runs)}); {'seed' if len(seeds) == 1 else 'seeds'} "
        f"{_distinct(seeds)}"),
        f"Dataset: {datasets}; source: {sources}",
        f"Model: {config('model')}; activation {config('activation')}",
        (f"Training: {epochs_text}, batch {config('batch_size')}, SGD lr {config('lr')} (momentum {config('momentum')}, "
        f"weight decay {config('weight_decay')}), schedule {config('schedule')}, eps {_distinct(key_text(r.eps) for r in runs)}"),
        (f"Validation: PGD-{config('val_pgd_steps')} on the validation split after each epoch "
        f"(best epoch by validation robust accuracy; the test split is never used for selection)"),
        (f"Test: clean and PGD-{config('test_pgd_steps')} (step {step}, no random start) of the best model, in "
        "result.json; extra attacks from the evaluations (eval.json of a sweep, evaluations/ of fastrobust eval)"),
        (f"Device: {_threads(_distinct(e.get('device') for e in env))}; torch {_distinct(e.get('torch') for e in env)}; "
        f"fastrobust {_distinct(e.get('fastrobust') for e in env)}; python {_distinct(e.get('python') for e in env)}"),
        f"Total training time: {total_minutes:.1f} min (sum of train_seconds, without validation and evaluation)",
    ]
    extra = eval_description(runs)
    if extra:
        lines.append(extra)
    jpeg = any("jpeg" in str(data(r).get("source", "")).lower() and
               "cifar" in str(data(r).get("name", r.config.get("dataset", ""))).lower() for r in runs)
    return lines, jpeg


def eval_description(runs: list[Run]) -> str:
    """One line on the extra evaluations: their point sets, each attack's settings and passes per point."""
    attacks: dict[str, Any] = {}
    ns: dict[str, None] = {}
    passes: dict[str, list[tuple[float, float]]] = {}  # per attack: (forward, backward) per point of each record
    for run in runs:
        for record in run.evaluations:
            ns[run.eval_points(record)] = None
            for name, entry in record.get("attacks", {}).items():
                attacks.setdefault(name, entry.get("settings"))
                cost = entry.get("cost") or {}
                if number(cost.get("forward_per_point")) is not None:
                    passes.setdefault(name, []).append((cost["forward_per_point"], cost["backward_per_point"]))
    if not attacks:
        return ""
    parts = []
    for name, settings in attacks.items():
        if name in ("autoattack", "autoattack-fast") and isinstance(settings, dict):
            comps = ", ".join(f"{c} ({', '.join(f'{k}={v}' for k, v in s.items())})"
                              for c, s in settings.get("options", {}).items())
            parts.append(f"{name}: {comps}{passes_text(passes.get(name))}")
        else:
            parts.append(f"{name}{passes_text(passes.get(name))}")
    return f"Extra evaluation on {points_text(list(ns))}: " + "; ".join(parts)


def passes_text(per_point: list[tuple[float, float]] | None) -> str:
    """The compute column of an attack in words: its mean forward and backward passes per point attacked (over
    the records that state them), or nothing for records written before evaluations counted them."""
    if not per_point:
        return ""
    forward = sum(f for f, _ in per_point) / len(per_point)
    backward = sum(b for _, b in per_point) / len(per_point)
    return f" [{forward:.4g} forward + {backward:.4g} backward passes per point]"


# ----------------------------------------------------------------------------------------- weight averaging
def averaged(run: Run) -> bool:
    """Whether the run averaged its weights (EMA/SWA: ``ema_decay`` > 0)."""
    return bool(number(run.config.get("ema_decay")))


def best_weights_text(run: Run) -> str:
    """Which weights the run's ``best`` holds, in words: averaged or trained, from which epoch, chosen how."""
    which = run.result.get("best_weights", "model")
    weights = "the averaged weights" if which == "averaged" else "the trained weights"
    value = number(run.result.get("best_val_value"))
    by = str(run.result.get("best_selected_by", "val_robust_acc"))
    what = {"val_robust_acc": "validation robust accuracy", "val_clean_acc": "validation clean accuracy"}.get(by, by)
    chosen = f" ({what} {value * 100:.2f} %)" if value is not None else ""
    return f"{weights} of epoch {run.result.get('best_epoch', '?')}{chosen}"


def averaging_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """One row per run with weight averaging: its settings and which weights ``best`` holds."""
    header = ["Run", "EMA decay", "Averaging from epoch", "best chosen among", "best holds"]
    rows = []
    for run in runs:
        if not averaged(run):
            continue
        select = {"averaged": "averaged weights", "model": "trained weights",
                  "either": "averaged and trained weights"}.get(str(run.config.get("ema_select", "averaged")), "?")
        rows.append([run.name, f"{float(run.config['ema_decay']):g}", str(run.config.get("ema_start_epoch", 0)),
                     select, best_weights_text(run)])
    return header, rows
