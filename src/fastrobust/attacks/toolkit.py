"""Pieces every attack shares: mode handling, projections, losses and input gradients.

Attacks differentiate with ``torch.autograd.grad`` with respect to the input only, so
no gradient is ever accumulated on a parameter.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastrobust.core.precision import attack_autocast, attack_gradients
from fastrobust.errors import ConfigError


def upcast(tensor: Tensor) -> Tensor:
    """Losses are computed in at least float32, also under bf16/fp16 autocast."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


@contextmanager
def model_mode(model: nn.Module, *, training: bool = False) -> Iterator[nn.Module]:
    """Put every module of ``model`` in the given mode and restore each module's own flag afterwards.

    Restoring per module (not ``model.train(was_training)``) keeps a mixed state intact, such as
    frozen BatchNorm layers inside a model in train mode.
    """
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.train(training)
    except NotImplementedError:  # torch.export's .module(): its mode was fixed at export (see check_module)
        for module, _ in flags:
            module.training = training
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def project(x_adv: Tensor, x: Tensor, eps: float, norm: str = "linf") -> Tensor:
    """Project onto the eps-ball around ``x`` (l_inf or l_2), then clamp to [0, 1]; for l_1 the Euclidean
    projection onto the l_1 ball intersected with [0, 1] (``project_l1_box``). Non-finite entries of ``x_adv``
    become the entries of ``x`` (a NaN or Inf never leaves a projection)."""
    x_adv = torch.where(torch.isfinite(x_adv), x_adv, x)
    if norm == "l1":
        return (x + project_l1_box(x_adv - x, x, eps)).clamp(0.0, 1.0)
    if norm == "linf":
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
    else:
        delta = x_adv - x
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        delta = delta * torch.clamp(eps / norms, max=1.0)
        x_adv = x + delta
    return x_adv.clamp(0.0, 1.0)


def project_l1_box(delta: Tensor, x: Tensor, eps: float) -> Tensor:
    """The Euclidean projection of the perturbation ``delta`` onto ``{d : ||d||_1 <= eps, 0 <= x + d <= 1}``.

    The constraints are separable but for the l_1 sum, so the projection is
    ``d_i = sign(delta_i) * clamp(|delta_i| - lam, 0, room_i)`` with ``room_i`` the way to the box in the direction
    of ``delta_i`` (``1 - x_i`` up, ``x_i`` down) and ``lam >= 0`` the smallest value with ``sum_i d_i <= eps``:
    ``lam = 0`` when the box clamp alone is within the ball, else the root of the piecewise-linear, decreasing
    ``h(lam) = sum_i clamp(|delta_i| - lam, 0, room_i)``, found exactly from its sorted breakpoints
    (``|delta_i| - room_i``, where coordinate i starts to shrink, and ``|delta_i|``, where it reaches 0)."""
    shape, dtype = delta.shape, delta.dtype
    d = delta.flatten(1).double()  # the breakpoint sums in float64: exact to float32 rounding of the result
    x = x.flatten(1).double()
    sign = d.sign()
    room = torch.where(d >= 0, 1 - x, x).clamp(min=0)
    a = d.abs()
    boxed = torch.minimum(a, room)
    over = boxed.sum(1) > eps
    # breakpoints and the slope change of -h at each: +1 where a coordinate starts to shrink, -1 where it stops
    points = torch.cat([a - room, a], dim=1)
    change = torch.cat([torch.ones_like(a), -torch.ones_like(a)], dim=1)
    points, order = points.sort(dim=1)
    active = change.gather(1, order).cumsum(1)  # coordinates shrinking just right of each breakpoint
    gaps = torch.diff(points, dim=1, append=points[:, -1:])
    # h at each breakpoint: what the shrinking coordinates still hold to the right of it
    h = (gaps * active).flip(1).cumsum(1).flip(1)
    k = (h > eps).sum(1).clamp(min=1) - 1  # h decreases: the last breakpoint where h still exceeds eps
    lam = points.gather(1, k[:, None]) + (h.gather(1, k[:, None]) - eps) / active.gather(1, k[:, None]).clamp(min=1)
    lam = torch.where(over[:, None], lam.clamp(min=0), torch.zeros_like(lam))
    return (sign * torch.clamp(a - lam, min=0).minimum(room)).to(dtype).view(shape)


def ascent_direction(grad: Tensor, norm: str) -> Tensor:
    """The steepest-ascent unit step for the norm: sign for l_inf, normalised gradient for l_2. Always finite.

    Non-finite gradient entries (a model with an infinite input derivative somewhere, e.g. ``sqrt`` at a black
    pixel) get the limit of the finite case: NaN entries count 0; for l_2, a row with +-inf entries steps
    along the signs of those entries only (the normalised gradient's limit as they grow), and every row is
    scaled by its largest entry before the norm is taken, so the norm never overflows. No host sync.
    """
    grad = torch.nan_to_num(grad, nan=0.0)  # +-inf become +-max float: the sign is kept
    if norm == "linf":
        return grad.sign()
    shape = (-1,) + (1,) * (grad.dim() - 1)
    infinite = grad.abs() == torch.finfo(grad.dtype).max
    has_infinite = infinite.flatten(1).any(1).view(shape)
    grad = torch.where(has_infinite, grad.sign() * infinite, grad)
    scale = grad.flatten(1).abs().amax(1).clamp_min(1e-30).view(shape)
    grad = grad / scale
    return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)


def draw(sample: Callable[..., Tensor], *args, generator: torch.Generator | None, device: torch.device,
         **kwargs) -> Tensor:
    """``sample(*args, **kwargs)`` (``torch.rand``, ``torch.randn``, ``torch.randint``) from ``generator``, on
    ``device``.

    torch draws only on the generator's own device (a CPU ``torch.Generator()`` with ``device="cuda"`` raises),
    so the numbers are drawn there and moved to ``device``: the same numbers as on the generator's device, a
    host-to-device copy per draw when the two differ (a generator on the inputs' device avoids it). Without a
    generator torch's default generator of ``device`` draws, as before.

    Args:
        sample: the torch sampling function.
        generator: the caller's generator, or None.
        device: where the numbers are used (the inputs' device).

    Returns:
        The drawn tensor on ``device``.
    """
    source = device if generator is None else generator.device
    return sample(*args, generator=generator, device=source, **kwargs).to(device)


def random_start(x: Tensor, eps: float, norm: str, generator: torch.Generator | None = None) -> Tensor:
    """A uniform point of the eps-ball around ``x`` (for l_2: uniform direction, uniform radius; for l_1 the
    authors' APGD start: a standard normal perturbation projected onto the l_1 ball within [0, 1])."""
    if norm == "l1":
        noise = draw(torch.randn, x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return project(x + noise, x, eps, norm)
    if norm == "linf":
        noise = draw(torch.rand, x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        return project(x + eps * noise, x, eps, norm)
    direction = draw(torch.randn, x.shape, generator=generator, device=x.device, dtype=x.dtype)
    direction = ascent_direction(direction, "l2")
    radius = draw(torch.rand, (x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=x.device,
                  dtype=x.dtype)
    return project(x + eps * radius * direction, x, eps, norm)


def cw_margin(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example CW margin ``max_{j != y} z_j - z_y``: positive exactly when the example is misclassified."""
    true_logit = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return others.amax(dim=1) - true_logit


def kl_to(reference_logits: Tensor, logits: Tensor) -> Tensor:
    """Per-example ``KL(s(reference) || s(logits))`` (the TRADES robust term before reduction)."""
    reference_log_probs = F.log_softmax(upcast(reference_logits), dim=1)
    return (reference_log_probs.exp() * (reference_log_probs - F.log_softmax(upcast(logits), dim=1))).sum(dim=1)


LossFn = Callable[[Tensor, Tensor], Tensor]


def per_example_loss(name: str, reference_logits: Tensor | None = None) -> LossFn:
    """A per-example loss ``(logits, y) -> [B]`` that an attack maximises."""
    if name == "ce":
        return lambda logits, y: F.cross_entropy(upcast(logits), y, reduction="none")
    if name == "cw":
        return lambda logits, y: cw_margin(upcast(logits), y)
    if name == "kl":
        if reference_logits is None:
            raise ConfigError("loss='kl' needs reference_logits (the clean logits the attack moves away from)")
        reference = reference_logits.detach()
        return lambda logits, y: kl_to(reference, logits)
    raise ConfigError(f"loss={name!r} is not supported: choose one of ce, cw, kl")


def input_gradient(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor,
                   loss_fn: LossFn) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient of ``sum(loss_fn(model(x), y))`` with respect to ``x`` only.

    ``model`` is the module, or a function that calls it (e.g. under autocast: the backward then runs outside
    it, as torch recommends). Returns (gradient, per-example loss, logits), all detached.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        with attack_autocast():  # the training step's attack precision (fastrobust.core.precision), if one is set
            logits = upcast(model(x))
        losses = loss_fn(logits, y)
        (grad,) = attack_gradients(losses.sum(), logits, [x])
    return grad.detach(), losses.detach(), logits.detach()


def margin_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The input gradient of the CW margin: zero for a whole row only where the model's logits do not move with
    the input there (the cross-entropy's also vanishes on merely confident points). What the gradient-masking
    checks of ``evaluate`` and ``sanity_checks`` count."""
    grad, _, _ = input_gradient(model, x, y, lambda logits, t: cw_margin(logits.float(), t))
    return grad
