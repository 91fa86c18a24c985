"""The working batch of the fast attack engines: rows that leave once their point is decided, and how the
model is evaluated (precision, stand-ins).

An attack here runs many *rows* at once (an example, or an (example, target class) pair), each with its own
trajectory that depends on that row alone. A row leaves the working batch as soon as its point is decided
(misclassified), so the remaining iterations cost only what is still undecided. ``group`` ties the rows of one
point together: when any of them fools the point, all of them leave.

How often the batch is checked follows the device: every iteration on the CPU (reading a flag costs
nothing there), every ``CUDA_CHECK_EVERY`` iterations on CUDA (each check is a host synchronisation; rows
that are already decided are frozen in between and only cost their wasted compute).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from fastrobust.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "auto")
CUDA_CHECK_EVERY = 5


@dataclass(frozen=True)
class Execution:
    """How an attack evaluates the model: autocast dtype, and optionally faster stand-ins for the model.

    ``model`` is the reference: every misclassification that ends a point's search is confirmed with it in
    fp32 whenever anything else computed it (``approximate``). ``grad_model`` (input gradients) and
    ``query_model`` (gradient-free queries) default to ``model``; autoattack may put a frozen copy there
    (``_frozen.py``).
    """

    model: nn.Module
    dtype: torch.dtype | None
    device_type: str
    grad_model: nn.Module | None = None
    query_model: nn.Module | None = None

    @property
    def approximate(self) -> bool:
        return self.dtype is not None or self.grad_model is not None or self.query_model is not None

    @property
    def for_gradients(self) -> nn.Module:
        return self.grad_model if self.grad_model is not None else self.model

    @property
    def for_queries(self) -> nn.Module:
        return self.query_model if self.query_model is not None else self.model


def check_precision(name: str) -> str:
    if name not in PRECISIONS:
        raise ConfigError(f"precision={name!r} is not supported: choose one of {', '.join(PRECISIONS)}")
    return name


def execution_for(model: nn.Module, precision: "str | Execution", device: torch.device) -> Execution:
    """``fp32``: no autocast; ``bf16``: bf16 autocast for the attack's forwards and gradients (every
    misclassification an attack acts on is confirmed by an fp32 forward); ``auto``: bf16 on CUDA, fp32
    elsewhere (on the CPU bf16 is only faster with AMX/avx512-bf16 hardware). An Execution passes through."""
    if isinstance(precision, Execution):
        return precision
    name = check_precision(precision)
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    if name == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        warnings.warn("precision='bf16' on a CPU without AMX or avx512-bf16: bf16 autocast runs slower than fp32 "
                      "there (about 2x measured) with the same results; precision='auto' picks fp32 on the CPU",
                      stacklevel=3)
    return Execution(model, torch.bfloat16 if name == "bf16" else None, device.type)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX tiles or avx512-bf16), per torch's private probes."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(probe()) for probe in probes if callable(probe))


def forward_context(execution: Execution) -> contextlib.AbstractContextManager:
    if execution.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(execution.device_type, dtype=execution.dtype)


def predicted(execution: Execution, x: Tensor) -> Tensor:
    """The predicted class (argmax) by the attack's query model and precision (no gradient)."""
    with torch.no_grad(), forward_context(execution):
        return execution.for_queries(x).argmax(1)


def confirm(execution: Execution, x: Tensor, y: Tensor, flags: Tensor, target: Tensor | None = None) -> Tensor:
    """``flags`` (as the attack computed them: misclassified, or with ``target`` classified as the target) kept
    only where the model itself in fp32 agrees; returned as they are when the attack computed them with the model
    in fp32. A targeted row is done only once its target is reached, so its flag is confirmed against the target,
    not against the label."""
    if not execution.approximate or not bool(flags.any()):
        return flags
    idx = flags.nonzero().squeeze(1)
    with torch.no_grad():
        pred = execution.model(x[idx]).argmax(1)
    out = flags.clone()
    out[idx] = pred != y[idx] if target is None else pred == target[idx]
    return out


class Rows:
    """Bookkeeping of the active rows: their positions in the full set and, optionally, their point (group)."""

    def __init__(self, n: int, device: torch.device, *, group: Tensor | None = None, n_groups: int = 0):
        self.positions = torch.arange(n, device=device)
        self.group = group
        self.n_groups = n_groups if group is not None else 0
        self.check_every = CUDA_CHECK_EVERY if device.type == "cuda" else 1

    @property
    def empty(self) -> bool:
        return len(self.positions) == 0

    def check_now(self, iteration: int) -> bool:
        return (iteration + 1) % self.check_every == 0

    def finished(self, fooled: Tensor) -> Tensor:
        """The active rows that are done: fooled, or (with groups) another row of their point is fooled."""
        if self.group is None:
            return fooled
        point_fooled = torch.zeros(self.n_groups, dtype=torch.bool, device=fooled.device)
        point_fooled[self.group[fooled]] = True
        return point_fooled[self.group]

    def keep(self, mask: Tensor, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Drop the rows outside ``mask`` from the bookkeeping and from every tensor of ``state``."""
        self.positions = self.positions[mask]
        if self.group is not None:
            self.group = self.group[mask]
        return {key: value[mask] for key, value in state.items()}


def target_rows(points: Tensor, targets: Tensor, first: int, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """The rows of a wave, target-major (every point with target ``first``, then ``first + 1``, ...): each row's
    point index, target class and group (the point's position in ``points``)."""
    rows_point = points.repeat(count)
    rows_target = targets[points, first:first + count].t().reshape(-1)
    rows_group = torch.arange(len(points), device=points.device).repeat(count)
    return rows_point, rows_target, rows_group


def target_waves(undecided: Tensor, n_targets: int, max_rows: int,
                 run: Callable[[Tensor, int, int], Tensor]) -> None:
    """Attack the undecided points target by target, several targets in one batch of at most ``max_rows`` rows.

    ``run(points, first, count)`` attacks ``points`` with the targets ``first .. first + count - 1`` (rank
    order) and returns which of them it fooled; ``undecided`` (bool, per point) is updated in place. As points
    fall, later waves take more targets at once. With ``max_rows`` at most the number of points this is the
    reference order: one target after the other, each on the points the earlier ones left.
    """
    first = 0
    while first < n_targets:
        points = undecided.nonzero().squeeze(1)
        if len(points) == 0:
            break
        count = min(max(1, max_rows // len(points)), n_targets - first)
        fooled = run(points, first, count)
        undecided[points[fooled]] = False
        first += count
