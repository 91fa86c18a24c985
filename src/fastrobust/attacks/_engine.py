"""The working batch of the fast attack engines: rows that leave once their point is decided, and how the
model is evaluated (precision, stand-ins).

An attack here runs many *rows* at once (an example, or an (example, target class) pair), each with its own
trajectory that depends on that row alone. A row leaves the working batch as soon as its point is decided
(misclassified), so the remaining iterations cost only what is still undecided. ``group`` ties the rows of one
point together: when any of them fools the point, all of them leave.

How often the batch is checked follows the device the attack runs on (``Execution.device_type``): every
iteration on the CPU (reading a flag costs nothing there), every ``CUDA_CHECK_EVERY`` iterations on CUDA. A
check is one host synchronisation (``Rows.split``), whatever the number of rows that leave and of state tensors
they leave from; with an approximate execution (any on CUDA) it is the confirmation's look-up instead when no
row is to be confirmed, and three when rows leave. Rows that are already decided are frozen in between and
only cost their wasted compute.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from fastrobust.core.precision import no_tf32
from fastrobust.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "auto")
CUDA_CHECK_EVERY = 5


@dataclass(frozen=True)
class Execution:
    """How an attack evaluates the model: autocast dtype, and optionally faster stand-ins for the model.

    ``model`` is the reference: every misclassification that ends a point's search is confirmed with it in
    fp32 (TF32 off) whenever anything else computed it (``approximate``). ``grad_model`` (input gradients) and
    ``query_model`` (gradient-free queries) default to ``model``; autoattack may put a frozen copy there
    (``_frozen.py``). ``device_type`` decides how the engines run (``check_every``, ``sync_free``).
    """

    model: nn.Module
    dtype: torch.dtype | None
    device_type: str
    grad_model: nn.Module | None = None
    query_model: nn.Module | None = None

    @property
    def approximate(self) -> bool:
        """Whether anything but the model in full fp32 computes the attack's flags: a lower precision, a stand-in
        model, or CUDA (whose fp32 convolutions are TF32 by torch's default)."""
        return (self.dtype is not None or self.grad_model is not None or self.query_model is not None
                or self.device_type == "cuda")

    @property
    def check_every(self) -> int:
        """Iterations between two checks of the working batch (each a host synchronisation)."""
        return check_every(self.device_type)

    @property
    def sync_free(self) -> bool:
        """Whether per-iteration choices are computed for every row instead of asking the host which rows need
        them (on CUDA, where asking stalls the device; on the CPU asking costs nothing)."""
        return self.device_type == "cuda"

    @property
    def for_gradients(self) -> nn.Module:
        return self.grad_model if self.grad_model is not None else self.model

    @property
    def for_queries(self) -> nn.Module:
        return self.query_model if self.query_model is not None else self.model


def check_every(device_type: str) -> int:
    """How many iterations (or queries) an engine runs between two checks of its batch on ``device_type``:
    every one on the CPU, ``CUDA_CHECK_EVERY`` on CUDA."""
    return CUDA_CHECK_EVERY if device_type == "cuda" else 1


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


def autocast_forward(execution: Execution, model: nn.Module) -> Callable[[Tensor], Tensor]:
    """``model``'s forward under the execution's autocast only, so that a backward through its output runs
    outside autocast (as torch recommends); ``model`` itself when there is no autocast."""
    if execution.dtype is None:
        return model

    def forward(x: Tensor) -> Tensor:
        with forward_context(execution):
            return model(x)

    return forward


def predicted(execution: Execution, x: Tensor) -> Tensor:
    """The predicted class (argmax) by the attack's query model and precision (no gradient)."""
    with torch.no_grad(), forward_context(execution):
        return execution.for_queries(x).argmax(1)


def confirm(execution: Execution, x: Tensor, y: Tensor, flags: Tensor, target: Tensor | None = None) -> Tensor:
    """``flags`` (as the attack computed them: misclassified, or with ``target`` classified as the target) kept
    only where the model itself in fp32 (TF32 off) agrees; returned as they are when the attack computed them with
    the model in fp32 on the CPU. A targeted row is done only once its target is reached, so its flag is confirmed
    against the target, not against the label. One host synchronisation when approximate (which rows to confirm),
    none otherwise."""
    return confirm_any(execution, x, y, flags, target)[0]


def confirm_any(execution: Execution, x: Tensor, y: Tensor, flags: Tensor,
                target: Tensor | None = None) -> tuple[Tensor, bool]:
    """``confirm``, and whether any flag may be set afterwards: False only when the attack set none (which the
    confirmation's own host synchronisation tells), so that a check with nothing to confirm needs no other."""
    if not execution.approximate:
        return flags, True
    idx = flags.nonzero().squeeze(1)
    if len(idx) == 0:
        return flags, False
    with torch.no_grad(), no_tf32():
        pred = execution.model(x[idx]).argmax(1)
    out = flags.clone()
    out[idx] = pred != y[idx] if target is None else pred == target[idx]
    return out, True


class Rows:
    """Bookkeeping of the active rows: their positions in the full set and, optionally, their point (group)."""

    def __init__(self, n: int, device: torch.device, *, group: Tensor | None = None, n_groups: int = 0,
                 check_every: int = 1):
        self.positions = torch.arange(n, device=device)
        self.group = group
        self.n_groups = n_groups if group is not None else 0
        self.check_every = check_every

    @property
    def empty(self) -> bool:
        return len(self.positions) == 0

    def check_now(self, iteration: int) -> bool:
        return (iteration + 1) % self.check_every == 0

    def finished(self, fooled: Tensor) -> Tensor:
        """The active rows that are done: fooled, or (with groups) another row of their point is fooled. No
        host synchronisation."""
        if self.group is None:
            return fooled
        return any_per_point(fooled, self.group, self.n_groups)[self.group]

    @staticmethod
    def split(done: Tensor) -> tuple[Tensor, Tensor]:
        """The indices of the ``done`` rows and of the others, both ascending: the check's one host
        synchronisation (how many are done), whatever the number of state tensors they are taken from."""
        n_done = int(done.sum())
        order = torch.argsort(done.to(torch.uint8), stable=True)  # the rows that stay first, each part in order
        return order[len(done) - n_done:], order[:len(done) - n_done]

    def keep(self, kept: Tensor, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Keep only the rows ``kept`` (indices, ascending) in the bookkeeping and in every tensor of ``state``."""
        self.positions = self.positions.index_select(0, kept)
        if self.group is not None:
            self.group = self.group.index_select(0, kept)
        return {key: value.index_select(0, kept) for key, value in state.items()}


def any_per_point(flags: Tensor, points: Tensor, n_points: int) -> Tensor:
    """[n_points] bool: whether any row of each point has its flag set (rows' points in ``points``). The same
    on every device whatever the order of the rows, and no host synchronisation."""
    hits = torch.zeros(n_points, dtype=torch.long, device=flags.device)
    return hits.scatter_reduce(0, points, flags.long(), reduce="amax").bool()


def write_per_point(result: Tensor, points: Tensor, values: Tensor, rank: Tensor) -> None:
    """``result[points] = values`` (in place) with one row per point: where several rows share a point, the row
    of the highest ``rank`` wins, and among those the last one; rows of rank -1 write nothing.

    A plain ``result[points] = values`` with a repeated point keeps whichever row the device writes last: the
    last one on the CPU, any one on CUDA. Here every row of a point writes the winning row's values, so the
    outcome is the same on every device. No host synchronisation.

    Args:
        result: the tensor written, rows indexed by point.
        points: [m] the point of each row (repeats allowed).
        values: [m, ...] the rows' values.
        rank: [m] integer rank of each row in -1, 0, 1.
    """
    m = len(points)
    if m == 0:
        return
    order = torch.arange(m, device=points.device)
    key = (rank.long() + 1) * m + order  # rank first, then row order
    best = torch.full((len(result),), -1, dtype=torch.long, device=points.device)
    best = best.scatter_reduce(0, points, key, reduce="amax")[points]  # the winning key of each row's point
    writes = (best >= m).view((-1,) + (1,) * (values.dim() - 1))
    result[points] = torch.where(writes, values[best % m], result[points])


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
        undecided[points] = undecided[points] & ~fooled  # points are distinct: no host synchronisation
        first += count
