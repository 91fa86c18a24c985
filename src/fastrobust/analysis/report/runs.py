"""Collecting the records of runs: result.json, metrics.jsonl, the evaluations (a sweep's eval.json and the
``evaluations/`` records of ``fastrobust eval``) and hessian.json, and reading numbers out of them."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fastrobust.core.records import read_jsonl
from fastrobust.core.values import parse_number
from fastrobust.errors import FastRobustError
from fastrobust.methods import method_class
from fastrobust.train.evaluations import read_evaluations

BEST_WEIGHTS = "best.safetensors"
AUTOATTACK_NAMES = ("autoattack", "autoattack-official", "autoattack-fast")  # standard first: the one preferred
ACCURACY_METRICS = ("clean", "pgd20", "pgd100", "autoattack")


def number(value: Any) -> float | None:
    """``value`` as a finite float, None for anything else (missing, text, bool, NaN)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def as_number(value: Any) -> Any:
    """A method parameter as given in YAML ("8/255") as a number, for sorting and display."""
    if isinstance(value, str):
        try:
            return parse_number(value)
        except Exception:  # noqa: BLE001 - not a number: keep the text
            return value
    return value


def attack_acc(record: dict[str, Any] | None, attack: str) -> float | None:
    """The robust accuracy of ``attack`` in one evaluation record, None when the record lacks it."""
    if not record:
        return None
    return number(record.get("attacks", {}).get(attack, {}).get("robust_acc"))


@dataclass
class Run:
    """One run folder's records. ``evaluations`` holds every evaluation record, oldest first (eval.json's, then
    those of ``evaluations/``), each with ``points`` (the point-set key, None for eval.json written before sweeps
    stored it), ``weights`` (the evaluated file) and ``file`` (where the record lies)."""

    name: str
    path: Path
    config: dict[str, Any]
    result: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
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

    @property
    def test_n(self) -> int | None:
        n = self.result.get("test", {}).get("n")
        return n if isinstance(n, int) else None

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
                flat[f"method.{key}"] = as_number(value)
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

    # ------------------------------------------------------------------------------------- evaluations
    def best_evaluations(self, eps: float | None = None) -> list[dict[str, Any]]:
        """The evaluation records of the ``best`` weights (those the table reports) at ``eps`` (default: the
        run's), oldest first."""
        eps = self.eps if eps is None else eps
        return [r for r in self.evaluations if r.get("weights", BEST_WEIGHTS) == BEST_WEIGHTS
                and number(r.get("eps")) is not None and abs(float(r["eps"]) - eps) < 1e-9]

    def latest(self, attack: str, eps: float | None = None) -> dict[str, Any] | None:
        """The record that gives ``attack``'s accuracy of the best weights at ``eps``: of the point sets it ran
        on, the largest (most points), and on it the latest evaluation; None when never run."""
        found = [r for r in self.best_evaluations(eps) if attack_acc(r, attack) is not None]
        if not found:
            return None
        most = max(int(r.get("n") or 0) for r in found)
        return [r for r in found if int(r.get("n") or 0) == most][-1]

    def autoattack_version(self) -> str | None:
        """Which AutoAttack the table's column holds: the standard version when run, else the fast one."""
        for attack in AUTOATTACK_NAMES:
            if self.latest(attack) is not None:
                return attack
        return None

    def source(self, metric: str) -> tuple[float, int | None, dict[str, Any] | None] | None:
        """(value in [0, 1], number of points, the evaluation record or None for result.json) of ``metric``
        (clean, pgd20, pgd100, autoattack: standard, else the fast version); None when absent."""
        test = self.result.get("test", {})
        if metric == "clean" and number(test.get("clean_acc")) is not None:
            return float(test["clean_acc"]), self.test_n, None
        if metric == "pgd20" and number(test.get("pgd20_acc")) is not None:
            return float(test["pgd20_acc"]), self.test_n, None
        if metric not in ACCURACY_METRICS:
            raise KeyError(metric)
        attack = self.autoattack_version() if metric == "autoattack" else metric
        record = self.latest(attack) if attack and metric != "clean" else None
        if record is None:
            return None
        n = record.get("n")
        return float(attack_acc(record, attack)), (n if isinstance(n, int) else None), record

    def metric(self, name: str) -> float | None:
        """clean, pgd20, pgd100, autoattack (standard, else the fast version) in [0, 1]; None when absent."""
        found = self.source(name)
        return None if found is None else found[0]

    def count(self, name: str) -> int | None:
        """The number of test points ``metric`` was measured on (None when absent or not recorded)."""
        found = self.source(name)
        return None if found is None else found[1]

    def points(self, metric: str) -> str | None:
        """The test points ``metric`` was measured on: ``"N"`` (all N points of the run's test split, those of
        result.json), ``"N of M, class-balanced"`` (an evaluation on a class-balanced subset), ``"the first N of
        the M test images, official order"`` (a leaderboard protocol's first N of the whole test split; ``"(this
        copy's order, not the official)"`` when the split was in another order) or ``"first N of M"`` (eval.json
        on a prefix of the class-sorted split, written before sweeps balanced it); None without a value."""
        found = self.source(metric)
        if found is None:
            return None
        return f"{found[1]}" if found[2] is None else self.eval_points(found[2])

    def eval_points(self, record: dict[str, Any]) -> str:
        """The point set of one evaluation record (see ``points``)."""
        n, test_n = record.get("n"), self.test_n
        points = record.get("points") or {}
        if record.get("protocol") or points.get("selection") in PROTOCOL_SELECTIONS:
            return protocol_points(record)
        if test_n is None or n is None or n >= test_n:
            return f"{n}"
        if points.get("selection") == "balanced_head":
            return f"{n} of {test_n}, class-balanced"
        return f"first {n} of {test_n}"


PROTOCOL_SELECTIONS = ("official_head", "head")  # a leaderboard protocol's first N points of the test split


def protocol_points(record: dict[str, Any]) -> str:
    """The points of a leaderboard-protocol record: the first n of the whole test split (not of the run's test
    subset), in the official order only when the record says so (``protocol.official_order``; a record without
    it: when ``points.selection`` is ``official_head``)."""
    points, protocol = record.get("points") or {}, record.get("protocol") or {}
    n, total = record.get("n"), points.get("of") or protocol.get("test_images")
    official = protocol.get("official_order", points.get("selection") == "official_head") is True
    of = f"the {total:,} test images" if isinstance(total, int) else "the test split"
    return f"the first {n} of {of}" + (", official order" if official else " (this copy's order, not the official)")


def points_text(labels: list[str]) -> str:
    """Point-set labels (``Run.points``) joined into words: ``"300 of 10000, class-balanced test points"``, a
    protocol's label (which names its test images) as it is."""
    if not any("test images" in label or "test split" in label for label in labels):
        return " / ".join(labels) + " test points"
    return " / ".join(label if "test images" in label or "test split" in label else f"{label} test points"
                      for label in labels)


# ----------------------------------------------------------------------------------------- collecting
def _read_json(path: Path, missing: list[dict[str, Any]], name: str) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        missing.append({"name": name, "reason": f"{path.name} unreadable"})
        return {}
    return data if isinstance(data, dict) else {}


def _evaluations(run_dir: Path, missing: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """eval.json's records (a sweep's, of best.safetensors) then those of ``evaluations/``, oldest first."""
    meta = _read_json(run_dir / "eval.json", missing, name)
    records = [{**r, "points": meta.get("points"), "weights": meta.get("model", BEST_WEIGHTS), "file": "eval.json"}
               for r in meta.get("evaluations", []) if isinstance(r, dict)]
    saved, unreadable = read_evaluations(run_dir)
    for file in unreadable:
        missing.append({"name": name, "reason": f"evaluations/{file} unreadable (left out)"})
    return records + saved


def collect_runs(runs_dir: str | Path) -> tuple[list[Run], list[dict[str, Any]]]:
    """Every run under ``runs_dir`` with a result.json (``runs_dir`` may be a run folder itself), and the
    run folders without one or with an unreadable record (name, reason).

    Raises:
        FastRobustError: ``runs_dir`` is not a folder.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FastRobustError(f"{runs_dir} is not a folder: give a run folder, a sweep folder or a folder of run "
                              "folders")
    runs: list[Run] = []
    missing: list[dict[str, Any]] = []
    for result_file in sorted(runs_dir.rglob("result.json")):
        run_dir = result_file.parent
        name = relative_name(run_dir, runs_dir)
        try:
            result = json.loads(result_file.read_text())
        except (OSError, json.JSONDecodeError) as error:
            missing.append({"name": name, "reason": f"result.json unreadable ({error})"})
            continue
        metrics = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
        runs.append(Run(name, run_dir, result.get("config", {}), result, metrics,
                        _evaluations(run_dir, missing, name), _read_json(run_dir / "hessian.json", missing, name)))
    done = {run.path for run in runs}
    for config_file in sorted(runs_dir.rglob("config.json")):
        if config_file.parent not in done and config_file.parent.parent.name != "checkpoints":
            missing.append({"name": relative_name(config_file.parent, runs_dir),
                            "reason": "no result.json (unfinished or failed)"})
    for entry in _read_json(runs_dir / "sweep.json", missing, "sweep.json").get("runs", []):
        if not isinstance(entry, dict) or "name" not in entry:
            continue
        if entry.get("status") == "failed" and not any(m["name"] == entry["name"] for m in missing):
            missing.append({"name": entry["name"], "reason": f"failed: {entry.get('error')}"})
    return runs, missing


def relative_name(path: Path, root: Path) -> str:
    """A run's name: its folder relative to the report's folder (the folder's own name for the folder itself)."""
    rel = path.relative_to(root)
    return str(rel) if str(rel) != "." else path.name
