"""Loss smoothness: the largest eigenvalue of the Hessian of a loss with respect to the input.

``top_eigenvalue(loss_fn, x)`` runs power iteration on Hessian-vector products computed by double
backward (``H v = d/dx <grad_x L(x), v>``), never forming the Hessian. With ``per_example=True`` the
batch is treated as independent problems (the loss must be a sum of per-example terms and the model in
eval mode, so that the Hessian is block-diagonal): each example gets its own vector, normalised
separately, and its own Rayleigh quotient, which is what the Backward Smoothing paper averages (Fig. 3).

Power iteration converges to the eigenvalue of largest *magnitude*; the value returned is its Rayleigh
quotient ``v^T H v`` (signed). For the inner-maximisation losses here that is the top curvature.

``input_hessian_eigenvalues(model, x, y, eps=..., init=...)`` builds the inner-maximisation loss of a
trained model at the attack's starting point (a random point of the eps-ball, or the Backward Smoothing
initialisation) and returns one eigenvalue per example.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastrobust.core.gradients import grad_or_zeros
from fastrobust.errors import ConfigError
from fastrobust.evaluate import iterate_split
from fastrobust.methods.backward_smoothing import backward_smoothing_points

INITS = ("random", "backward_smoothing", "clean")
LOSSES = ("kl", "ce")


def _normalise(v: Tensor, per_example: bool) -> Tensor:
    if per_example:
        norms = v.flatten(1).norm(dim=1).clamp_min(1e-30)
        return v / norms.view(-1, *([1] * (v.dim() - 1)))
    return v / v.norm().clamp_min(1e-30)


def hessian_vector_product(loss_fn: Callable[[Tensor], Tensor], x: Tensor, v: Tensor) -> Tensor:
    """H v for the Hessian of the scalar ``loss_fn(x)`` w.r.t. ``x`` (double backward); zero where the loss or its
    gradient does not depend on ``x`` through autograd (a model without an input gradient, a linear loss)."""
    x = x.detach().requires_grad_(True)
    loss = loss_fn(x)
    (grad,) = grad_or_zeros(loss, [x], create_graph=True)
    (hv,) = grad_or_zeros(grad, [x], grad_outputs=v)
    return hv.detach()


def top_eigenvalue(
    loss_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    iterations: int = 20,
    tol: float = 1e-4,
    *,
    per_example: bool = False,
    generator: torch.Generator | None = None,
) -> float | Tensor:
    """Largest-magnitude eigenvalue of the Hessian of scalar ``loss_fn(x)`` w.r.t. ``x`` by power iteration.

    Stops after ``iterations`` products or when every estimate changes by less than ``tol`` (relative).
    Returns a float, or with ``per_example`` a tensor ``[B]`` of one eigenvalue per example (first dim).
    """
    if iterations < 1:
        raise ConfigError(f"iterations={iterations} must be at least 1")
    x = x.detach()
    v = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu" if generator is None else generator.device)
    v = _normalise(v.to(x.device), per_example)
    estimate: Tensor | None = None
    for _ in range(iterations):
        hv = hessian_vector_product(loss_fn, x, v)
        if per_example:
            new = (hv * v).flatten(1).sum(1)
        else:
            new = (hv * v).sum()
        converged = estimate is not None and bool(
            ((new - estimate).abs() <= tol * new.abs().clamp_min(1e-12)).all()
        )
        estimate = new
        if converged:
            break
        v = _normalise(hv, per_example)
        if per_example:  # an example whose Hessian-vector product vanished keeps a fresh direction
            zero = hv.flatten(1).norm(dim=1) == 0
            if zero.any():
                v[zero] = _normalise(torch.randn_like(v[zero]), True)
    assert estimate is not None
    return estimate.detach() if per_example else float(estimate)


# ----------------------------------------------------------------------------------------- inner-max loss of a model
def starting_points(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, init: str,
                    step_size: float | None = None, gamma: float = 1.0,
                    generator: torch.Generator | None = None) -> Tensor:
    """The attack's starting point: ``random`` (U(-eps, eps), Fast AT), ``backward_smoothing`` (the
    backward step x1 of Algorithm 1) or ``clean`` (x itself)."""
    if init == "clean":
        return x.detach().clone()
    if init == "random":
        noise = torch.rand(x.shape, generator=generator, device="cpu" if generator is None else generator.device)
        return (x + (noise.to(x.device) * 2 - 1) * eps).clamp(0, 1).detach()
    if init == "backward_smoothing":
        _, x1, _ = backward_smoothing_points(model, x, y, eps=eps, step_size=step_size if step_size is not None else eps,
                                             gamma=gamma, attack_steps=0)
        return x1.detach()
    raise ConfigError(f"init={init!r} is not one of {', '.join(INITS)}")


def inner_loss(model: nn.Module, x: Tensor, y: Tensor, loss: str) -> Callable[[Tensor], Tensor]:
    """The inner maximisation's loss as a function of the perturbed input, summed over the batch:
    ``kl``: KL(s(f(x)) || s(f(x'))) (TRADES, Backward Smoothing); ``ce``: CE(f(x'), y) (PGD-AT, Fast AT)."""
    if loss == "kl":
        with torch.no_grad():
            clean = F.softmax(model(x).float(), dim=1)

        def kl(x_adv: Tensor) -> Tensor:
            return F.kl_div(F.log_softmax(model(x_adv).float(), dim=1), clean, reduction="sum")

        return kl
    if loss == "ce":
        return lambda x_adv: F.cross_entropy(model(x_adv).float(), y, reduction="sum")
    raise ConfigError(f"loss={loss!r} is not one of {', '.join(LOSSES)}")


def input_hessian_eigenvalues(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, init: str = "random",
                              loss: str = "kl", iterations: int = 20, tol: float = 1e-4,
                              step_size: float | None = None, gamma: float = 1.0,
                              generator: torch.Generator | None = None) -> Tensor:
    """One top Hessian eigenvalue per example of the inner-max loss at the attack's starting point."""
    was_training = model.training
    model.eval()
    try:
        start = starting_points(model, x, y, eps=eps, init=init, step_size=step_size, gamma=gamma, generator=generator)
        values = top_eigenvalue(inner_loss(model, x, y, loss), start, iterations, tol, per_example=True,
                                generator=generator)
    finally:
        model.train(was_training)
    return values  # torch.autograd.grad w.r.t. the input leaves every p.grad untouched


# ----------------------------------------------------------------------------------------- models over training
def summarise(values: Tensor) -> dict[str, float]:
    """mean, std, median and max of per-example eigenvalues."""
    values = values.detach().double().cpu()
    return {"mean": float(values.mean()), "std": float(values.std()) if len(values) > 1 else 0.0,
            "median": float(values.median()), "max": float(values.max())}


def model_eigenvalues(model: nn.Module, images: Tensor, labels: Tensor, *, eps: float,
                      inits: tuple[str, ...] | list[str] = ("random", "backward_smoothing"), loss: str = "kl",
                      iterations: int = 20, gamma: float = 1.0, batch_size: int = 128, seed: int = 0,
                      device: str | torch.device = "cpu") -> dict[str, dict[str, float]]:
    """Per init, the summary (mean/std/median/max over the images) of the top input-Hessian eigenvalue of the
    inner-max loss at that starting point. ``images`` uint8 or float [N, C, H, W] in [0, 1] pixel units."""

    out: dict[str, dict[str, float]] = {}
    for init in inits:
        generator = torch.Generator(device=device).manual_seed(seed)
        values = [input_hessian_eigenvalues(model, x, y, eps=eps, init=init, loss=loss, iterations=iterations,
                                            gamma=gamma, generator=generator).cpu()
                  for x, y in iterate_split(images, labels, batch_size, device)]
        out[init] = summarise(torch.cat(values))
    return out


def epoch_model_files(run_dir: Path) -> list[tuple[str, int | None, Path]]:
    """(label, epoch, file) of every per-epoch model of a run: ``epochs/epoch-NNN.safetensors`` (the trainer's
    ``save_epoch_models``), else the kept checkpoints ``checkpoints/step-*/model.safetensors``; oldest first."""

    files: list[tuple[str, int | None, Path]] = []
    for file in sorted(run_dir.glob("epochs/epoch-*.safetensors")):
        epoch = int(re.sub(r"\D", "", file.stem) or 0)
        files.append((f"epoch {epoch}", epoch, file))
    if files:
        return files
    for folder in sorted(run_dir.glob("checkpoints/step-*")):
        state, model = folder / "state.json", folder / "model.safetensors"
        if not (state.is_file() and model.is_file()):
            continue
        try:
            epoch = json.loads(state.read_text()).get("epoch")
        except json.JSONDecodeError:
            continue
        step = int(re.sub(r"\D", "", folder.name) or 0)
        files.append((f"epoch {epoch} (step {step})", epoch, model))
    return files
