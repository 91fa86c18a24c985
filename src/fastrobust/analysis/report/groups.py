"""Grouping runs: by method and every setting that varies within it except the seed (a group = one setting run
with several seeds), and the sets of runs that differ in exactly one setting (the sensitivity tables)."""

from __future__ import annotations

import json
from typing import Any

from fastrobust.analysis.report.runs import Run
from fastrobust.analysis.report.text import key_text, short_key

METHOD_ORDER = ("natural", "pgd_at", "trades", "fast_at", "fast_at_2step", "fast_trades", "fast_at_plus",
                "backward_smoothing", "backward_smoothing_at", "sprout", "slat")
IGNORED_KEYS = {"seed", "out", "data_root", "device", "method"}

Groups = list[tuple[str, list[Run]]]


def method_order(methods: set[str] | list[str]) -> list[str]:
    """The methods in the paper's order, others after them alphabetically."""
    methods = set(methods)
    return [m for m in METHOD_ORDER if m in methods] + sorted(methods - set(METHOD_ORDER))


def by_method(runs: list[Run]) -> dict[str, list[Run]]:
    """method -> its runs, in ``method_order``."""
    found: dict[str, list[Run]] = {}
    for run in runs:
        found.setdefault(run.method, []).append(run)
    return {method: found[method] for method in method_order(found)}


def _value(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def varied_keys(runs: list[Run]) -> list[str]:
    """The settings (``Run.flat`` keys, seed and paths aside) that take several values over ``runs``."""
    values: dict[str, set[str]] = {}
    for run in runs:
        for key, value in run.flat().items():
            values.setdefault(key, set()).add(_value(value))
    flats = [run.flat() for run in runs]
    return sorted(k for k, v in values.items()
                  if k not in IGNORED_KEYS and (len(v) > 1 or any(k not in flat for flat in flats)))


def sort_key(run: Run, keys: list[str]) -> tuple:
    """Orders runs by the settings ``keys``: numbers by value first, then text."""
    flat = run.flat()
    return tuple((0, flat[k], "") if isinstance(flat.get(k), (int, float)) else (1, 0, str(flat.get(k))) for k in keys)


def group_runs(runs: list[Run]) -> Groups:
    """Runs grouped by method and every setting that varies within that method except the seed; each group's
    label is the method and those settings (``backward_smoothing (gamma=0.5)``), its runs sorted by seed."""
    groups: Groups = []
    for method, members in by_method(runs).items():
        keys = varied_keys(members)
        buckets: dict[str, list[Run]] = {}
        for run in members:
            flat = run.flat()
            settings = ", ".join(f"{short_key(k)}={key_text(flat.get(k))}" for k in keys)
            buckets.setdefault(method + (f" ({settings})" if keys else ""), []).append(run)
        for label in sorted(buckets, key=lambda lab: sort_key(buckets[lab][0], keys)):
            groups.append((label, sorted(buckets[label], key=lambda r: r.config.get("seed", 0))))
    return groups


def one_setting_sets(runs: list[Run], key: str) -> list[list[Run]]:
    """The sets of ``runs`` that differ in ``key`` and in nothing else (seeds aside): runs are bucketed by every
    other setting, and a bucket counts when ``key`` takes at least two values in it. Runs that differ in two
    settings never share a set, so a table over a set shows the effect of ``key`` alone."""
    buckets: dict[str, list[Run]] = {}
    for run in runs:
        flat = run.flat()
        if key not in flat:
            continue
        others = {k: v for k, v in flat.items() if k != key and k not in IGNORED_KEYS}
        buckets.setdefault(_value(others), []).append(run)
    return [members for members in buckets.values() if len({_value(r.flat()[key]) for r in members}) >= 2]
