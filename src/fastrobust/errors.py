"""One exception type for every user-facing problem.

The CLI prints a FastRobustError as a single line (no traceback) and exits non-zero,
so every message must name the bad value, what was expected and what to do.
"""

import signal
import subprocess

_KILLED_BY_INTERRUPT = (-signal.SIGINT, -signal.SIGTERM)  # subprocess return codes of a child killed by them


class FastRobustError(Exception):
    """A problem the user can fix: bad input, a missing file, an incompatible checkpoint."""


class DataError(FastRobustError):
    """A dataset that cannot be found, read or trusted."""


class ConfigError(FastRobustError, ValueError):
    """A configuration value that is out of range or malformed."""


class TrainingStopped(FastRobustError):
    """Training ended early on purpose (signal, NaN, collapse); the message says how to continue."""


class StopRequested(TrainingStopped):
    """Training stopped because the user (or a scheduler) asked for it (SIGINT, SIGTERM): a checkpoint is saved and
    the message says how to resume. The CLI prints it as ``stopped:``, not as an error."""


def is_interrupt(error: BaseException) -> bool:
    """Whether ``error`` is, or was caused by, an interrupt (Ctrl-C, SIGTERM), however it was wrapped.

    torch.compile wraps what goes wrong while it builds: a KeyboardInterrupt raised in its build can come back
    as a ``BackendCompilerFailed`` (with the interrupt as its cause or context), and a Ctrl-C at a terminal also
    reaches the C++ compiler it runs, whose death by SIGINT comes back as a compile error caused by a
    ``CalledProcessError`` with a negative return code.

    Args:
        error: the exception caught.

    Returns:
        True when a KeyboardInterrupt, or a child process killed by SIGINT or SIGTERM, is anywhere in the chain
        of ``__cause__`` / ``__context__`` (and torch's ``inner_exception``) from ``error``.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, KeyboardInterrupt):
            return True
        if isinstance(current, subprocess.CalledProcessError) and current.returncode in _KILLED_BY_INTERRUPT:
            return True
        inner = getattr(current, "inner_exception", None)  # torch._dynamo's BackendCompilerFailed
        pending += [current.__cause__, current.__context__, inner if isinstance(inner, BaseException) else None]
    return False
