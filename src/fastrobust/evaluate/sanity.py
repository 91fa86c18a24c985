"""Sanity checks that catch evaluations a gradient attack alone would get wrong (Carlini et al. 2019,
Athalye et al. 2018; ALGORITHMS.md, "Known traps").

``sanity_checks(model, data, eps=...)`` runs a small evaluation on (a subset of) ``data`` and returns a list
of flags ``{"name", "passed", "detail"}``:

- ``attack_order``: robust accuracy non-increasing FGSM -> PGD-20 -> AutoAttack-fast (stronger attacks
  must not do worse);
- ``more_steps``: PGD-100 not more accurate than PGD-20;
- ``large_eps``: at a large eps PGD-20 drives accuracy near 0 (default 0.5 for l_inf and ``0.5 * sqrt(C*H*W)``
  for l_2: the smallest balls that reach the uniform mid-grey image from every image);
- ``black_box``: Square and RayS (which use no gradients) not clearly stronger than the white-box attacks,
  a sign of gradient masking;
- ``gradients``: no share of points with an all-zero or NaN input gradient;
- ``deterministic``: two identical forward passes give the same logits (no hidden randomness).

sanity is a client of ``evaluate`` (it imports evaluate, never the other way): ``record["sanity"] =
sanity_checks(...)`` adds the flags to an evaluation record, as ``fastrobust eval --sanity`` does.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from fastrobust.attacks.toolkit import (
    input_gradient,
    margin_gradient,
    model_mode,
    per_example_loss,
)
from fastrobust.core.contract import (
    check_device,
    check_gradients_allowed,
    check_module,
    prepare_model,
    validated,
)
from fastrobust.core.values import check_eps, check_eps_fits
from fastrobust.data import balanced_head
from fastrobust.errors import ConfigError
from fastrobust.evaluate.batching import iterate_split
from fastrobust.evaluate.evaluation import as_split, evaluate


def _flag(name: str, passed: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "passed": bool(passed), "detail": detail}


def _checked_model(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int,
                   device: torch.device | None) -> nn.Module:
    """The model as the checks run it (``prepare_model``: bf16/fp16 inputs in its dtype, a failure of the model one
    line), its first output on the first batch checked in sanity_checks' own name -- logits ``[B, C]`` (a tuple,
    dict or ``.logits`` output gets the wrapper to write) with every label below C -- before ``evaluate`` runs.
    The model is moved to ``device`` (default: where its parameters are), as ``evaluate`` moves it."""
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.to(device)
    checked = prepare_model(model, int(labels.max()), "sanity_checks", guard=True)
    with model_mode(model, training=False), validated(), torch.no_grad():
        x, _ = next(iterate_split(images, labels, batch_size, device))
        checked(x)
    return checked


def sanity_checks(
    model: nn.Module,
    data: Any,
    *,
    eps: float,
    norm: str = "linf",
    n: int = 256,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    seed: int = 0,
    large_eps: float | None = None,
    square_queries: int = 1000,
    rays_queries: int = 2000,
    apgd_iter: int = 100,
    tolerance: float = 0.01,
    black_box_margin: float = 0.03,
    large_eps_max_acc: float = 0.1,
    gradient_share: float = 0.01,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Gradient-masking checks (Athalye et al. 2018; Carlini et al. 2019, "On Evaluating Adversarial
    Robustness"): whether a robust accuracy can be believed. See the module docstring for each check.

    The checks run on the first ``n`` points of ``data`` taken round-robin over its classes
    (``fastrobust.data.balanced_head``: a plain prefix of a split in a class-sorted order would be one class).

    Args:
        model: as for ``evaluate`` (same input contract).
        data: as for ``evaluate``.
        eps: the budget the robust accuracy is claimed at, in the units of ``norm`` (text such as ``"8/255"``).
        norm: ``"linf"`` (default) or ``"l2"``.
        n: points checked (default 256), class-balanced.
        batch_size, device, seed, progress: as for ``evaluate`` (defaults 256, the model's, 0, False).
        large_eps: a budget at which accuracy must fall near zero (default 0.5 for l_inf, half the image box's
            diameter for l_2).
        square_queries, rays_queries: query budgets of the black-box attacks (defaults 1000, 2000).
        apgd_iter: APGD iterations in AutoAttack-fast (default 100).
        tolerance: accuracy slack allowed in the ordering checks (default 0.01: one point in a hundred).
        black_box_margin: how far below the white-box accuracy a black-box accuracy may fall before the check
            fails (default 0.03).
        large_eps_max_acc: the most accuracy allowed at ``large_eps`` (default 0.1).
        gradient_share: the largest share of points allowed a zero or NaN input gradient (default 0.01).

    Returns:
        One dict per check: ``name``, ``passed`` (bool) and a ``detail`` line with the numbers it compared.

    Raises:
        ConfigError: a bad value or input, in one line (``sanity_checks: ...``).

    Example:
        >>> from fastrobust.evaluate import sanity_checks
        >>> failed = [c["name"] for c in sanity_checks(model, data, eps=8 / 255) if not c["passed"]]
    """
    check_module(model, where="sanity_checks")
    check_gradients_allowed("sanity_checks")
    if device is not None:
        device = check_device(device, where="sanity_checks")
    eps = check_eps(eps, norm=norm)  # checks norm too
    images, labels, _ = as_split(data, where="sanity_checks")
    if len(labels) == 0:
        raise ConfigError("sanity_checks: data holds no images: nothing to check")
    images, labels = balanced_head(images, labels, n)
    check_eps_fits(eps, norm, images.shape[1:])
    if large_eps is None:
        large_eps = 0.5 if norm == "linf" else 0.5 * math.sqrt(images[0].numel())
    large_eps = check_eps(large_eps, norm=norm, name="large_eps")
    check_eps_fits(large_eps, norm, images.shape[1:], name="large_eps")
    checked = _checked_model(model, images, labels, batch_size, device)
    common = dict(batch_size=batch_size, device=device, seed=seed, progress=progress)
    attacks = ["fgsm", "pgd20", "pgd100", "autoattack-fast", "square"] + (["rays"] if norm == "linf" else [])
    options = {
        "autoattack-fast": {"apgd-ce": {"n_iter": apgd_iter}, "apgd-t": {"n_iter": apgd_iter}},
        "square": {"n_queries": square_queries},
    }
    if norm == "linf":
        options["rays"] = {"n_queries": rays_queries}
    record = evaluate(model, (images, labels), attacks, eps=eps, norm=norm, attack_options=options, **common)
    acc = {name: entry["robust_acc"] for name, entry in record["attacks"].items()}
    flags = []

    order_ok = acc["fgsm"] + tolerance >= acc["pgd20"] and acc["pgd20"] + tolerance >= acc["autoattack-fast"]
    flags.append(_flag("attack_order", order_ok,
                       f"FGSM {acc['fgsm']:.4f} >= PGD-20 {acc['pgd20']:.4f} >= AutoAttack-fast "
                       f"{acc['autoattack-fast']:.4f} expected (slack {tolerance})"))
    flags.append(_flag("more_steps", acc["pgd100"] <= acc["pgd20"] + tolerance,
                       f"PGD-100 {acc['pgd100']:.4f} <= PGD-20 {acc['pgd20']:.4f} expected (slack {tolerance})"))

    if large_eps > eps:
        with warnings.catch_warnings():  # this eps is large on purpose: evaluate's "is large for" note is not news
            warnings.filterwarnings("ignore", message=r"l[12] radius .* is large for", category=UserWarning)
            big = evaluate(model, (images, labels), ["pgd20"], eps=large_eps, norm=norm, **common)
        big_acc = big["attacks"]["pgd20"]["robust_acc"]
        flags.append(_flag("large_eps", big_acc <= large_eps_max_acc,
                           f"PGD-20 accuracy at eps={large_eps:g} is {big_acc:.4f} (expected <= {large_eps_max_acc})"))

    white = min(acc["pgd20"], acc["pgd100"], acc["autoattack-fast"])
    black = {name: acc[name] for name in ("square", "rays") if name in acc}
    worst_black = min(black.values())
    detail = ", ".join(f"{k} {v:.4f}" for k, v in black.items())
    compared = (f"black-box/hard-label accuracy ({detail}) vs the lowest white-box accuracy {white:.4f} (of PGD-20, "
                f"PGD-100, AutoAttack-fast)")
    if worst_black >= white - black_box_margin:
        flags.append(_flag("black_box", True, f"{compared}: not lower by more than {black_box_margin}, no sign of "
                           "gradient masking"))
    else:
        flags.append(_flag("black_box", False, f"{compared}: more than {black_box_margin} lower, so attacks without "
                           "gradients do better and the gradients mislead the white-box attacks (gradient masking)"))

    dev = torch.device(record["device"].split(" ")[0])
    zero = nan = total = 0
    max_diff = 0.0
    with model_mode(model, training=False), validated():
        for x, y in iterate_split(images, labels, batch_size, dev):
            grad = margin_gradient(checked, x, y)
            grad_ce, _, _ = input_gradient(checked, x, y, per_example_loss("ce"))
            flat, flat_ce = grad.flatten(1), grad_ce.flatten(1)
            zero += int(((flat == 0).all(1)).sum())
            nan += int((~torch.isfinite(flat).all(1) | ~torch.isfinite(flat_ce).all(1)).sum())
            total += len(y)
            with torch.no_grad():
                a, b = checked(x).float(), checked(x).float()
            scale = a.abs().max().clamp_min(1.0)
            max_diff = max(max_diff, float(((a - b).abs().max() / scale)))
    share_zero, share_nan = zero / max(total, 1), nan / max(total, 1)
    flags.append(_flag("gradients", share_zero <= gradient_share and share_nan <= gradient_share,
                       f"{share_zero:.2%} of points have an all-zero and {share_nan:.2%} a NaN/inf input gradient "
                       f"(allowed {gradient_share:.0%})"))
    flags.append(_flag("deterministic", max_diff <= 1e-4,
                       f"two identical forward passes differ by {max_diff:.3g} (relative): "
                       "a randomised model needs EOT attacks"))
    return flags
