"""Robust evaluation of any classifier on [0,1] images.

A point counts as robust only if the model classifies the clean image correctly and no
attack's adversarial changes that: robust accuracy never exceeds clean accuracy.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .attacks import model_mode, pgd

Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]


def iterate_split(images: Tensor, labels: Tensor, batch_size: int, device: str | torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of (float [0,1] images, labels) on ``device``, in order; uint8 or float input."""
    for start in range(0, len(labels), batch_size):
        x = images[start : start + batch_size].to(device, non_blocking=True)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        yield x, labels[start : start + batch_size].to(device, non_blocking=True)


def clean_and_robust_counts(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    attack: Attack | None,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> tuple[int, int, int]:
    """(clean correct, robust correct, total) of ``model`` on a split, with counts kept on the device."""
    clean = torch.zeros((), dtype=torch.long, device=device)
    robust = torch.zeros((), dtype=torch.long, device=device)
    with model_mode(model, training=False):
        for x, y in iterate_split(images, labels, batch_size, device):
            with torch.no_grad():
                correct = model(x).argmax(1) == y
            clean += correct.sum()
            if attack is not None and correct.any():
                x_adv = attack(model, x[correct], y[correct])
                with torch.no_grad():
                    robust += (model(x_adv).argmax(1) == y[correct]).sum()
    total = len(labels)
    robust_count = int(robust) if attack is not None else int(clean)
    return int(clean), robust_count, total


def pgd_accuracy(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    random_init: bool = False,
    loss: str = "ce",
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Clean and PGD accuracy (in [0,1]) of ``model`` on a split: the trainer's validation metric."""
    step_size = step_size if step_size is not None else 2 / 255 if eps >= 2 / 255 else eps / 4

    def attack(model_: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return pgd(model_, x, y, eps=eps, steps=steps, step_size=step_size, random_init=random_init, loss=loss)

    clean, robust, total = clean_and_robust_counts(model, images, labels, attack, batch_size=batch_size, device=device)
    return {"clean_acc": clean / max(total, 1), "robust_acc": robust / max(total, 1), "n": total}
