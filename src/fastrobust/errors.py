"""One exception type for every user-facing problem.

The CLI prints a FastRobustError as a single line (no traceback) and exits non-zero,
so every message must name the bad value, what was expected and what to do.
"""


class FastRobustError(Exception):
    """A problem the user can fix: bad input, a missing file, an incompatible checkpoint."""


class DataError(FastRobustError):
    """A dataset that cannot be found, read or trusted."""


class ConfigError(FastRobustError, ValueError):
    """A configuration value that is out of range or malformed."""


class TrainingStopped(FastRobustError):
    """Training ended early on purpose (signal, NaN, collapse); the message says how to continue."""
