"""What a preset's run should give: the measured result a shipped preset declares under ``expected:``, and the
one line that compares a finished run with it.

A preset file may carry, besides its settings::

    expected:
      source: docs/results.md, "The CPU presets"
      seeds: 3
      test_points: 1000
      clean_acc: 32.27 +- 2.03      # mean +- standard deviation over the seeds, in %
      pgd20_acc: 19.53 +- 0.38

The band a run is compared with joins two noises: the spread over seeds and the sampling error of an accuracy
measured on n test points (binomial, ``sqrt(p (1 - p) / n)``; Wilson 1927 gives the intervals of the report). A
run more than two of those standard deviations away deserves a second look (docs/results.md says where to look).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from fastrobust.errors import ConfigError

METRIC_NAMES = {"clean_acc": "clean", "pgd20_acc": "PGD-20"}
SETTINGS_THAT_DO_NOT_CHANGE_THE_RESULT = frozenset({"out", "device", "data_root", "seed", "checkpoint_every",
                                                    "nan_check_every", "save_epoch_models"})
_MEAN_STD = re.compile(r"^\s*([0-9.]+)\s*(?:\+-|±)\s*([0-9.]+)\s*$")


@dataclass(frozen=True)
class Expected:
    """A preset's measured result: per test metric (``clean_acc``, ``pgd20_acc``) the mean and the standard
    deviation over ``seeds`` runs, in %, on ``test_points`` test points; ``source`` says where it is documented."""

    source: str
    seeds: int
    test_points: int
    metrics: dict[str, tuple[float, float]]

    @classmethod
    def parse(cls, data: Any, where: str) -> Expected:
        """``expected:`` of a preset file; ConfigError naming ``where`` when it is malformed."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected: must be a mapping (source, seeds, test_points, clean_acc, ...)")
        metrics = {}
        for key in METRIC_NAMES:
            if key in data:
                match = _MEAN_STD.match(str(data[key]))
                if not match:
                    raise ConfigError(f"{where}: expected.{key} must read 'MEAN +- STD' in %, got {data[key]!r}")
                metrics[key] = (float(match.group(1)), float(match.group(2)))
        try:
            return cls(str(data["source"]), int(data["seeds"]), int(data["test_points"]), metrics)
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"{where}: expected: needs source, seeds and test_points ({error})") from None

    def band(self, key: str, n: int) -> tuple[float, float]:
        """(mean, one standard deviation) in % that a run measured on ``n`` test points is compared with: the
        seeds' spread joined with the binomial sampling error at the mean."""
        mean, spread = self.metrics[key]
        p = mean / 100
        sampling = 100 * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))
        return mean, math.hypot(spread, sampling)


def changed_settings(run: dict[str, Any], preset: dict[str, Any]) -> list[str]:
    """The preset's settings that this run changed (those that change a result: not its folder or device)."""
    missing = object()
    return sorted(key for key, value in run.items()
                  if key not in SETTINGS_THAT_DO_NOT_CHANGE_THE_RESULT and preset.get(key, missing) != value)


def compare(test: dict[str, Any], expected: Expected, preset: str) -> str:
    """One line: each metric of the run's test record against the preset's expected band, and a flag on a
    metric more than two standard deviations away.

    Example: ``expected of preset quickstart (3 seeds, docs/results.md): clean 30.3 %, expected 32.3 +- 2.4;
    PGD-20 20.7 %, expected 19.5 +- 1.3``
    """
    n = int(test.get("n") or expected.test_points)
    parts, off = [], []
    for key, name in METRIC_NAMES.items():
        if key not in expected.metrics or not isinstance(test.get(key), (int, float)):
            continue
        mean, sd = expected.band(key, n)
        value = 100 * float(test[key])
        parts.append(f"{name} {value:.1f} %, expected {mean:.1f} +- {sd:.1f}")
        if abs(value - mean) > 2 * sd:
            off.append(name)
    seeds = f"{expected.seeds} seed{'s' if expected.seeds != 1 else ''}"
    line = f"expected of preset {preset} ({seeds}, {expected.source}): " + "; ".join(parts)
    if off:
        line += (f" -- {' and '.join(off)} more than two standard deviations away: check the torch build, the dataset "
                 "copy and the settings (docs/results.md)")
    return line
