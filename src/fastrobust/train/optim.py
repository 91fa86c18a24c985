"""The trainer's optimiser parameter groups: which parameters receive weight decay.

Weight decay is a prior on the network's weights. It does not belong on an activation function's own
parameters: SmoothReLU's learnable b (SAT) would decay from 400 to about 5 within 11 CIFAR epochs and turn the
near-ReLU into a soft curve, while the loss gradient barely moves it (the SAT authors decay only weights:
``weight_decay_pattern = '.*/W'``). So activation parameters never get weight decay. BatchNorm (and other
normalisation) parameters and biases get it by default, as in the Backward Smoothing, TRADES and Wong et al.
code (``SGD(model.parameters(), weight_decay=5e-4)``); ``decay_norm_and_bias=False`` exempts them too.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fastrobust.models import activations

# normalisation layers whose affine parameters ``decay_norm_and_bias=False`` exempts
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _is_activation(module: nn.Module) -> bool:
    """An activation function: a module defined in fastrobust.models.activations, or torch's PReLU/RReLU."""
    return type(module).__module__ == activations.__name__ or isinstance(module, (nn.PReLU, nn.RReLU))


def parameter_groups(model: nn.Module, weight_decay: float, *, decay_norm_and_bias: bool = True) -> list[dict[str, Any]]:
    """SGD parameter groups: ``{"params": [...], "weight_decay": weight_decay}`` for the weights and, when there
    are any, a second group with ``weight_decay`` 0 for activation parameters (and, with
    ``decay_norm_and_bias=False``, normalisation parameters and biases). With nothing to exempt this is a
    single group, as ``SGD(model.parameters())`` makes (so older checkpoints load unchanged).

    Only parameters with ``requires_grad`` are included; each appears in exactly one group.
    """
    exempt: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if _is_activation(module) or (not decay_norm_and_bias and isinstance(module, _NORMS)):
            for param in module.parameters(recurse=False):
                exempt[id(param)] = param
    if not decay_norm_and_bias:
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                exempt[id(param)] = param
    decayed = [p for p in model.parameters() if p.requires_grad and id(p) not in exempt]
    free = [p for p in model.parameters() if p.requires_grad and id(p) in exempt]
    groups: list[dict[str, Any]] = [{"params": decayed, "weight_decay": weight_decay}]
    if free:
        groups.append({"params": free, "weight_decay": 0.0})
    return groups


__all__ = ["parameter_groups"]
