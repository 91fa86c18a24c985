"""The numeric precision of the attacks inside a training step, set apart from the training forward/backward;
and the process-wide float32 precision (TF32) and determinism settings, which every record carries
(:func:`float32_precision`, :func:`determinism`) and which ``deterministic`` runs set
(:func:`deterministic_algorithms`).

Under mixed precision (``amp``) a method's whole call runs in autocast, attack included. The attack's
input gradient is more fragile than the training gradient: TRADES' first step starts from x + 0.001*N(0,1),
where the KL and its gradient are tiny, so in bf16 its sign is rounding noise on about half of the pixels,
and in fp16 a third of those gradients underflow to exactly zero (docs/training.md, "Attack precision").
``attack_precision`` chooses the attack's precision on its own:

* ``fp32``: the attack's forwards and input gradients run without autocast (float32), whatever ``amp`` is;
* ``bf16`` / ``fp16``: the attack runs under autocast of that type (fp16 input gradients are loss-scaled,
  see :func:`attack_gradients`);
* ``auto``: the attack follows the training precision (``amp``), except that an fp16 attack is
  loss-scaled. This is the default; the measured study behind it is in docs/training.md.

The trainer sets the precision with :func:`attack_precision` around each method call; the attack code
(``fastrobust.attacks.toolkit.input_gradient``, the methods' own gradient passes) asks for it through
:func:`attack_autocast` and :func:`attack_gradients`. Outside such a block nothing changes: the attack
inherits whatever autocast is active, and gradients are plain ``torch.autograd.grad`` (through
:func:`fastrobust.core.gradients.grad_or_zeros`: zero for an input the loss does not depend on).
"""

from __future__ import annotations

import contextlib
import os
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from fastrobust.core.gradients import grad_or_zeros
from fastrobust.errors import ConfigError

ATTACK_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# the loss scale brings the largest logit gradient of the batch to this power of two: the size of a
# cross-entropy gradient, which fp16 attacks already handle without overflow
SCALE_TARGET_LOG2 = 0
MAX_SCALE_LOG2 = 64


@dataclass(frozen=True)
class AttackPrecision:
    """How the attacks of a training step compute: ``dtype`` None means float32 (autocast off)."""

    device_type: str
    dtype: torch.dtype | None

    @property
    def loss_scaling(self) -> bool:
        return self.dtype == torch.float16


_CURRENT: ContextVar[AttackPrecision | None] = ContextVar("fastrobust_attack_precision", default=None)


def check_attack_precision(mode: str) -> str:
    if mode not in ATTACK_PRECISIONS:
        raise ConfigError(f"attack_precision={mode!r} is not one of {', '.join(ATTACK_PRECISIONS)}")
    return mode


def resolve(mode: str, device_type: str, training_dtype: torch.dtype | None) -> AttackPrecision:
    """The attack precision for ``mode`` given the training autocast dtype (None: float32 training)."""
    mode = check_attack_precision(mode)
    dtype = training_dtype if mode == "auto" else _DTYPES[mode]
    return AttackPrecision(device_type, dtype)


@contextlib.contextmanager
def attack_precision(policy: AttackPrecision | None) -> Iterator[None]:
    """Run the attacks inside this block at ``policy`` (None: inherit the surrounding autocast)."""
    token = _CURRENT.set(policy)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def attack_autocast() -> contextlib.AbstractContextManager:
    """The autocast context an attack's forward runs in: the policy's, or the caller's when none is set."""
    policy = _CURRENT.get()
    if policy is None:
        return contextlib.nullcontext()
    if policy.dtype is None:
        return torch.autocast(policy.device_type, enabled=False)
    return torch.autocast(policy.device_type, dtype=policy.dtype)


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """float32 matrix products and convolutions in full float32 inside the block, restored afterwards (also when
    the block raises).

    torch lets cuDNN convolutions use TF32 (a 10-bit mantissa) for float32 by default on Ampere and later GPUs,
    and ``torch.set_float32_matmul_precision("high")`` does the same for matrix products; a forward that is to
    confirm a misclassification "in fp32" runs inside this block. The flags concern CUDA only: on the CPU the
    block changes nothing and costs two flag writes. torch's legacy flags (``allow_tf32``) are used where they
    can be read; when the caller has set TF32 per operator through torch's newer ``fp32_precision`` settings
    (reading the legacy flags then raises), those are set instead. Every setting is written back as it was.
    """
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    # the per-operator settings of torch >= 2.9: read without raising in any state, so saved first
    operators = [(matmul, "fp32_precision"), (cudnn.conv, "fp32_precision"), (cudnn.rnn, "fp32_precision")] \
        if hasattr(cudnn, "conv") else []
    saved = [getattr(owner, name) for owner, name in operators]
    try:
        legacy: tuple[str, bool] | None = (torch.get_float32_matmul_precision(), cudnn.allow_tf32)
    except RuntimeError:  # torch: "a mix of the legacy and new APIs" was used to set TF32
        legacy = None
    try:
        if legacy is not None:
            torch.set_float32_matmul_precision("highest")
            cudnn.allow_tf32 = False
        else:
            matmul.fp32_precision = "ieee"
            cudnn.conv.fp32_precision = "ieee"
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy[0])
            cudnn.allow_tf32 = legacy[1]
        for (owner, name), value in zip(operators, saved):
            setattr(owner, name, value)


def loss_scale(logit_grad: Tensor) -> Tensor:
    """A power of two (a 0-d float32 tensor, >= 1) that brings ``max |logit_grad|`` up to 2**SCALE_TARGET_LOG2.

    A power of two is undone exactly; the scale never shrinks a gradient, so it adds no overflow risk beyond
    that of a cross-entropy attack gradient. Computed on the device (no host synchronisation).
    """
    largest = logit_grad.detach().abs().amax().float()
    exponent = torch.floor(SCALE_TARGET_LOG2 - torch.log2(largest.clamp_min(torch.finfo(torch.float32).tiny)))
    return torch.exp2(exponent.clamp(0, MAX_SCALE_LOG2))


def attack_gradients(loss: Tensor, logits: Tensor, inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Gradients of the scalar ``loss`` with respect to ``inputs``, where ``loss`` is computed from ``logits``.

    ``logits`` must be the float32 tensor the loss was computed from (``upcast(model(x))``). Under an fp16
    attack precision the backward through the network is loss-scaled: the gradient at the logits is computed
    in float32, multiplied by :func:`loss_scale`, sent through the fp16 network, and the input gradients are
    divided by the same power of two (exact). Without it, small gradients (TRADES' first KL step) underflow
    to zero in fp16. Otherwise this is ``torch.autograd.grad(loss, inputs)``. An input the loss does not depend
    on (a model without an input gradient) gets zeros (:func:`fastrobust.core.gradients.grad_or_zeros`).
    """
    policy = _CURRENT.get()
    if policy is None:
        return grad_or_zeros(loss, inputs)
    # the backward runs outside autocast, as torch recommends (a CPU backward inside an active bf16 autocast
    # changes the fp32 gradient's rounding); its ops follow the precision of the recorded forward
    with torch.autocast(policy.device_type, enabled=False):
        if not policy.loss_scaling:
            return grad_or_zeros(loss, inputs)
        (logit_grad,) = grad_or_zeros(loss, [logits])
        scale = loss_scale(logit_grad)
        grads = grad_or_zeros(logits, inputs, grad_outputs=logit_grad * scale)
        return tuple(g.float() / scale for g in grads)


# ---------------------------------------------------------------------------------------------------------------
# float32 precision and determinism of the whole process (recorded in every record, fastrobust.core.records)

# cuBLAS needs a fixed workspace for deterministic matrix products on CUDA >= 10.2 (torch's reproducibility notes)
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def float32_precision() -> dict[str, Any]:
    """The float32 arithmetic in force: on CUDA, "float32" matrix products and convolutions run in TF32 (a
    10-bit mantissa) when these allow it (torch's default for convolutions: ``cudnn_allow_tf32`` True).

    Returns:
        ``{"cuda_matmul_allow_tf32": bool, "cudnn_allow_tf32": bool, "float32_matmul_precision": "highest" |
        "high" | "medium"}`` (``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``,
        ``torch.get_float32_matmul_precision()``).
    """
    return {"cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def determinism() -> dict[str, Any]:
    """Whether torch is held to deterministic kernels now.

    Returns:
        ``{"deterministic_algorithms": bool, "cudnn_deterministic": bool, "cudnn_benchmark": bool,
        "cublas_workspace_config": str | None}``.
    """
    return {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """Inside the block torch uses deterministic kernels only, as its reproducibility notes require:
    ``torch.use_deterministic_algorithms(True)`` (an operation without a deterministic kernel raises a
    RuntimeError naming it), ``torch.backends.cudnn.deterministic = True``, ``torch.backends.cudnn.benchmark =
    False`` and ``CUBLAS_WORKSPACE_CONFIG`` (set to ``:4096:8`` unless already set; cuBLAS reads it when CUDA
    first runs a matrix product, so it takes effect only if that happens inside the block). The previous
    settings come back at the end (the environment variable stays).

    Args:
        enabled: False makes the block change nothing (the settings in force stay).
    """
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2], previous[3]


__all__ = [
    "ATTACK_PRECISIONS", "CUBLAS_WORKSPACE_CONFIG", "AttackPrecision", "attack_autocast", "attack_gradients",
    "attack_precision", "check_attack_precision", "determinism", "deterministic_algorithms", "float32_precision",
    "loss_scale", "no_tf32", "resolve",
]
