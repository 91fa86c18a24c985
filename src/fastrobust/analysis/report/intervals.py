"""95 % intervals of accuracies: the Wilson score interval of one run's accuracy on n points, and the spread
over seeds of a group of runs.

Wilson, E. B. (1927). *Probable inference, the law of succession, and statistical inference*. Journal of the
American Statistical Association 22(158), 209-212. Unlike the normal ("Wald") interval p ± z sqrt(p(1-p)/n), it
stays inside [0, 1] and does not shrink to nothing at an accuracy of 0 or 1, which robust accuracies reach.
"""

from __future__ import annotations

import math
import statistics

Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal: a two-sided 95 % interval


def wilson_interval(accuracy: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion.

    Args:
        accuracy: the observed proportion in [0, 1] (correct points / n).
        n: the number of points (positive).
        z: the normal quantile (default 1.96: a 95 % interval).

    Returns:
        (low, high) in [0, 1].

    Raises:
        ValueError: n is not positive or accuracy is outside [0, 1].
    """
    if n <= 0 or not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"wilson_interval needs n > 0 and an accuracy in [0, 1], got n={n}, accuracy={accuracy}")
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (accuracy + z2 / (2 * n)) / denominator
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z2 / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_cell(values: list[float], counts: list[int | None]) -> str:
    """A table cell of accuracies (in [0, 1], shown in %): one run ``"82.00 [81.25, 82.73]"`` (its Wilson 95 %
    interval from its number of points; the bare value when that number is unknown), several seeds
    ``"86.00 ± 2.00"`` (mean ± sample std over the seeds), ``"-"`` for none."""
    if not values:
        return "-"
    if len(values) > 1:
        return f"{statistics.fmean(values) * 100:.2f} ± {statistics.stdev(values) * 100:.2f}"
    value, n = values[0], counts[0] if counts else None
    if not n:
        return f"{value * 100:.2f}"
    low, high = wilson_interval(value, n)
    return f"{value * 100:.2f} [{low * 100:.2f}, {high * 100:.2f}]"


def error_bar(values: list[float], counts: list[int | None]) -> tuple[float, float, float] | None:
    """(value, below, above) in %: the mean and the distances to the ends of the interval ``accuracy_cell``
    states (Wilson for one run, ± std for several seeds, none without a point count); None for no value."""
    if not values:
        return None
    mean = statistics.fmean(values) * 100
    if len(values) > 1:
        spread = statistics.stdev(values) * 100
        return mean, spread, spread
    n = counts[0] if counts else None
    if not n:
        return mean, 0.0, 0.0
    low, high = wilson_interval(values[0], n)
    return mean, max(0.0, mean - low * 100), max(0.0, high * 100 - mean)  # rounding at 0 or 1: never below 0


INTERVAL_CAPTION = ("Intervals: a single run's accuracy is followed by its 95 % Wilson score interval [low, high] "
                    "from its number of test points (Wilson 1927); a group of several seeds shows mean ± std over "
                    "the seeds (sample std; the Seeds column gives their number).")
