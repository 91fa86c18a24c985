"""Projected gradient descent (Madry et al.) for l_inf and l_2, with CE, CW-margin and KL losses.

FGSM is its one-step case. With several restarts the per-example worst case is kept:
an adversarial that fools the model wins, otherwise the one with the higher loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastrobust.attacks.toolkit import (
    ascent_direction,
    input_gradient,
    model_mode,
    per_example_loss,
    project,
    random_start,
)
from fastrobust.core.contract import check_labels, entry_point
from fastrobust.errors import ConfigError


@entry_point("pgd")
def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    norm: str = "linf",
    loss: str = "ce",
    random_init: bool = True,
    restarts: int = 1,
    start: Tensor | None = None,
    reference_logits: Tensor | None = None,
    target: Tensor | None = None,
    eval_mode: bool = True,
    generator: torch.Generator | None = None,
    stop_at_fooled: bool = False,
) -> Tensor:
    """Return adversarial examples for ``(x, y)``: ``steps`` projected signed (l_inf) or normalised (l_2) ascent steps.

    Projected gradient descent (Madry et al. 2018). ``start`` gives an explicit starting point (e.g. TRADES' small
    Gaussian start); otherwise a uniform point of the ball when ``random_init``, else ``x``. ``target`` turns the
    attack into a targeted one (descent of the loss towards ``target``). ``reference_logits`` are the clean logits
    for ``loss="kl"``. The model runs in eval mode (unless ``eval_mode=False``) and is restored to the mode it was in.
    ``stop_at_fooled`` keeps each point at the first iterate whose (finite) logits are misclassified (hit
    the target, when targeted) instead of the last iterate: the last iterate can step back out of a
    misclassified region, so without it PGD-100 can report more robust points than PGD-20 on the same
    trajectory. Training keeps the last iterate (Madry et al.); ``evaluate`` stops at the fooled one.
    With ``restarts > 1`` the per-example worst case is kept: an adversarial that fools the model wins, otherwise
    the one with the higher loss.

    Args:
        model: the classifier, images in [0, 1] -> logits ``[B, C]``.
        x: images ``[B, ...]`` (e.g. ``[B, C, H, W]``), float in [0, 1] (pixel units).
        y: true labels ``[B]``, any integer dtype, in [0, C).
        eps: the l_inf or l_2 budget in [0, 1] pixel units (l_inf in (0, 1]; l_2 a positive radius); text such as
            ``"8/255"`` is parsed. Required.
        steps: ascent steps (default 10); 0 returns the start point itself.
        step_size: size of each step in pixel units; default ``2.5 * eps / steps`` (at most 1 in l_inf, where a
            longer step reaches the same corner).
        norm: the threat model, ``"linf"`` (default) or ``"l2"``.
        loss: the per-example loss maximised: ``"ce"`` (default, cross-entropy), ``"cw"`` (CW margin) or ``"kl"``
            (KL to ``reference_logits``).
        random_init: start at a uniform point of the eps-ball (default True); ignored when ``start`` is given.
        restarts: independent runs, the per-example worst case kept (default 1).
        start: an explicit starting point ``[B, C, H, W]``, projected onto the ball (default None).
        reference_logits: the clean logits ``[B, C]`` that ``loss="kl"`` moves away from (default None).
        target: target labels ``[B]`` for a targeted attack (default None: untargeted).
        eval_mode: run the model in eval mode (default True); its previous mode is restored.
        generator: the ``torch.Generator`` of the random start (default None: the global RNG).
        stop_at_fooled: keep each point at its first fooled iterate (default False: the last iterate).
    Returns:
        The adversarial examples, a tensor shaped like ``x`` within ``eps`` of it and in [0, 1].
    Raises:
        ConfigError: from the ``entry_point`` input contract (``core/contract.py``): images not float in [0, 1],
            labels not in [0, C), a bad ``norm``, ``eps`` or setting (checked once by
            ``core/attack_options.check_options``), or a call inside ``torch.inference_mode()``; also an unknown
            ``loss``, or ``loss="kl"`` without ``reference_logits``; each message names the value and the fix.
    Example:
        >>> x_adv = pgd(model, x, y, eps=8 / 255, steps=20)
    """
    if steps < 0:
        raise ConfigError(f"steps={steps} must be zero or positive")
    if restarts < 1:
        raise ConfigError(f"restarts={restarts} must be at least 1")
    if step_size is None:  # 2.5 eps / steps (at most 1 in l_inf: a longer step reaches the same corner)
        step_size = 2.5 * eps / max(steps, 1) if norm == "l2" else min(2.5 * eps / max(steps, 1), 1.0)
    if step_size <= 0:
        raise ConfigError(f"step_size={step_size} must be positive")
    x = x.detach()
    if target is not None:
        target = check_labels(target, len(x), where="pgd", name="target")
    loss_fn = per_example_loss(loss, reference_logits)
    labels = y if target is None else target
    sign = 1.0 if target is None else -1.0

    def objective(logits: Tensor, labels_: Tensor) -> Tensor:
        return sign * loss_fn(logits, labels_)

    best_adv = x.clone()
    best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
    best_fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    with model_mode(model, training=not eval_mode):
        for _ in range(restarts):
            if start is not None:
                x_adv = project(start.detach(), x, eps, norm)
            elif random_init:
                x_adv = random_start(x, eps, norm, generator)
            else:
                x_adv = x.clone()
            frozen = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            for _ in range(steps):
                grad, _, logits = input_gradient(model, x_adv, labels, objective)
                stepped = project(x_adv + step_size * ascent_direction(grad, norm), x, eps, norm)
                if stop_at_fooled:  # no host sync: rows that were fooled keep their point
                    predicted = logits.argmax(1)
                    fooled_now = (predicted != y) if target is None else (predicted == target)
                    frozen |= fooled_now & torch.isfinite(logits).all(1)
                    stepped = torch.where(frozen.view(-1, *([1] * (x.dim() - 1))), x_adv, stepped)
                x_adv = stepped
            if restarts == 1:
                return x_adv
            with torch.no_grad():
                logits = model(x_adv)
                losses = objective(logits, labels).float()
                fooled = logits.argmax(1) != y if target is None else logits.argmax(1) == target
            better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (losses > best_loss))
            best_adv[better] = x_adv[better]
            best_loss = torch.where(better, losses, best_loss)
            best_fooled |= fooled
    return best_adv


@entry_point("fgsm")
def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float | None = None,
    norm: str = "linf",
    random_init: bool = False,
    eval_mode: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One signed gradient step (Goodfellow et al. 2015); with ``random_init`` it is FGSM-RS (Wong et al. 2020).

    Runs ``pgd`` with ``steps=1`` and the cross-entropy loss.

    Args:
        model: the classifier, images in [0, 1] -> logits ``[B, C]``.
        x: images ``[B, ...]`` (e.g. ``[B, C, H, W]``), float in [0, 1] (pixel units).
        y: true labels ``[B]``, any integer dtype, in [0, C).
        eps: the l_inf or l_2 budget in [0, 1] pixel units; text such as ``"8/255"`` is parsed. Required.
        step_size: the step in pixel units (default None: ``eps``).
        norm: the threat model, ``"linf"`` (default) or ``"l2"``.
        random_init: start at a uniform point of the eps-ball (FGSM-RS; default False: start at ``x``).
        eval_mode: run the model in eval mode (default True); its previous mode is restored.
        generator: the ``torch.Generator`` of the random start (default None: the global RNG).
    Returns:
        The adversarial examples, a tensor shaped like ``x`` within ``eps`` of it and in [0, 1].
    Raises:
        ConfigError: from the ``entry_point`` input contract (``core/contract.py``): images not float in [0, 1],
            labels not in [0, C), a bad ``norm``, ``eps`` or setting (checked once by
            ``core/attack_options.check_options``), or a call inside ``torch.inference_mode()``; each message names
            the value and the fix.
    Example:
        >>> x_adv = fgsm(model, x, y, eps=8 / 255, random_init=True, step_size=10 / 255)
    """
    return pgd(
        model,
        x,
        y,
        eps=eps,
        steps=1,
        step_size=eps if step_size is None else step_size,
        norm=norm,
        random_init=random_init,
        eval_mode=eval_mode,
        generator=generator,
    )


def default_step(eps: float, steps: int, norm: str) -> float:
    """The PGD step size of evaluations (``evaluate``'s pgd20/pgd100/cw20, the trainer's validation and test).

    l_inf: the Backward Smoothing paper's 2/255 (eps/4 below 2/255, and large enough to reach eps in ``steps / 2.5``
    steps for large eps, at most 1: a longer l_inf step only reaches the same corner); l_2: ``2.5 * eps / steps``
    (a step that can cross the ball). ``pgd`` itself, called with ``step_size=None``, keeps its own
    ``2.5 * eps / steps`` for both norms.
    """
    if norm == "l2":
        return 2.5 * eps / steps
    return min(max(min(2 / 255, eps / 4), 2.5 * eps / steps), 1.0)
