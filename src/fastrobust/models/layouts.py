"""Public state-dict layouts and how their keys map onto fastrobust's models (an explicit, tested table).

The layouts are those of the CIFAR robustness code most checkpoints come from:

- ``resnet``: ResNet-18/34/50 as in kuangliu/pytorch-cifar and the AutoAttack, TRADES, MART and
  robust_overfitting repositories: ``conv1`` (3x3, stride 1, no bias), ``bn1``, ``layer1..4`` of
  BasicBlocks (``conv1 bn1 conv2 bn2``) or Bottlenecks (``+ conv3 bn3``, stride on the 3x3 conv), shortcut
  ``shortcut.0`` (1x1 conv) + ``shortcut.1`` (BN) where the shape changes, ReLU after the addition,
  ``F.avg_pool2d(out, 4)``, head ``linear`` (or ``fc``). fastrobust's ResNet is the same function; only the
  head is renamed.
- ``preactresnet``: PreActResNet-18 as in robust_overfitting / fast_adversarial: ``conv1``, PreActBlocks
  ``bn1 conv1 bn2 conv2`` with the 1x1 shortcut ``shortcut.0`` taking the pre-activated input, a final ``bn``
  + ReLU before ``F.avg_pool2d(out, 4)``, head ``linear``. The pytorch-cifar variant has no final ``bn``: its
  logits differ from fastrobust's PreActResNet (which applies BN-ReLU before pooling), so it is refused.
- ``wideresnet``: WideResNet-depth-k as in TRADES / MART / robust_overfitting: ``conv1``,
  ``block1..3.layer.N.{bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``, ``fc``, ``F.avg_pool2d(out, 8)``; the
  unused ``sub_block1`` of the TRADES code is dropped (it never enters the forward pass).

What must agree for identical logits, and how it is ensured: ReLU placement and shortcut form are those of
fastrobust's classes (the layouts above were chosen because they compute the same function); biases and
extra modules show up as keys and make the load fail with the keys named; ``avg_pool2d(out, 4 or 8)`` equals
fastrobust's global average pooling only for 32x32 inputs, so third-party layouts are refused for other sizes;
BatchNorm ``eps`` is not stored in a state dict: all these repositories use PyTorch's default (1e-5), as
fastrobust does (``momentum`` does not matter in evaluation). fastrobust's own key names are accepted too (every
zoo model; TinyCNN and SmallCNN are recognised by their key names). torchvision's ResNet layout (``downsample.0/1``
shortcuts) is refused with a pointer to ``--model-factory``: its stem max-pooling leaves no key, so the weights
cannot say whether it computes fastrobust's function.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from fastrobust.errors import FastRobustError

BUILD_IT_YOURSELF = ("build the network with your own code, --model-factory FILE.py:FUNCTION "
                     "(docs/evaluation.md, models trained elsewhere)")
PREFIXES = ("module.", "model.", "_orig_mod.")  # DataParallel / DDP, wrappers holding the network as .model, torch.compile


@dataclass(frozen=True)
class Layout:
    """One public key layout: how to recognise it and how its keys become fastrobust's."""

    name: str
    family: str  # resnet | preactresnet | wideresnet
    source: str
    rules: tuple[tuple[str, str], ...] = ()  # (regex, replacement) applied to every key, in order
    drop: tuple[str, ...] = ()  # regexes of keys that never enter the forward pass
    input_size: int | None = 32  # the only image side its fixed-size pooling agrees with global pooling


LAYOUTS: dict[str, Layout] = {
    "resnet": Layout(
        "resnet", "resnet", "kuangliu/pytorch-cifar, AutoAttack, TRADES, MART, robust_overfitting ResNet",
        rules=((r"^linear\.", "fc."),)),
    "preactresnet": Layout(
        "preactresnet", "preactresnet", "robust_overfitting / fast_adversarial PreActResNet-18",
        rules=((r"^(layer\d\.\d+)\.shortcut\.0\.", r"\1.shortcut."), (r"^linear\.", "fc."))),
    "wideresnet": Layout(
        "wideresnet", "wideresnet", "TRADES / MART / robust_overfitting WideResNet",
        rules=((r"^block(\d)\.layer\.(\d+)\.", r"block\1.\2."), (r"\.convShortcut\.", ".shortcut.")),
        drop=(r"^sub_block1\.",)),
    "fastrobust": Layout("fastrobust", "any", "fastrobust's own key names", input_size=None),
}


@dataclass(frozen=True)
class Match:
    """What a state dict holds: the fastrobust model that computes the same function, and its shape."""

    layout: Layout
    model: str  # fastrobust model name
    options: dict = field(default_factory=dict)  # model keywords (wideresnet depth / widen_factor)
    num_classes: int = 0
    in_channels: int = 0
    description: str = ""  # e.g. "ResNet-34 (BasicBlock 3-4-6-3, head linear)"


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``module.`` / ``model.`` / ``_orig_mod.`` while every key carries it (DataParallel, DDP, wrapper
    modules, torch.compile), in any nesting."""
    while state:
        prefix = next((p for p in PREFIXES if all(key.startswith(p) for key in state)), None)
        if prefix is None:
            return state
        state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def _stage_counts(keys: set[str], pattern: str, stages: int) -> tuple[int, ...]:
    counts = []
    for stage in range(1, stages + 1):
        indices = {int(m.group(1)) for key in keys if (m := re.match(pattern.format(stage=stage), key))}
        counts.append(max(indices) + 1 if indices else 0)
    return tuple(counts)


_RESNETS = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
            ("bottleneck", (3, 4, 6, 3)): "resnet50"}


def identify(state: dict[str, torch.Tensor]) -> Match | None:
    """The layout and fastrobust model of a state dict (prefixes already stripped), None when unknown.

    Raises FastRobustError for a recognised layout whose function fastrobust cannot reproduce."""
    keys = set(state)
    own_cnn = _own_cnn(state)
    if own_cnn is not None:
        return own_cnn
    head = "linear" if "linear.weight" in keys else "fc" if "fc.weight" in keys else None
    if head is None or "conv1.weight" not in keys:
        return None
    conv1 = state["conv1.weight"]
    num_classes, in_channels = int(state[f"{head}.weight"].shape[0]), int(conv1.shape[1])
    if conv1.dim() == 4 and tuple(conv1.shape[2:]) != (3, 3):
        raise FastRobustError(f"conv1 is {conv1.shape[2]}x{conv1.shape[3]} (an ImageNet stem); fastrobust's networks "
                              f"have the 3x3 CIFAR stem: {BUILD_IT_YOURSELF}")
    if any(re.match(r"^layer\d\.\d+\.downsample\.", key) for key in keys):
        raise FastRobustError("its blocks have `downsample.0/1` shortcuts (torchvision's ResNet layout): whether its "
                              "stem max-pools (torchvision's does, CIFAR variants often remove it) is not stored in the "
                              "weights, so fastrobust cannot tell which function it computes and does not map it onto "
                              f"its resnet (`shortcut.0/1`): {BUILD_IT_YOURSELF}")
    if any(key.startswith("block1.layer.") for key in keys):
        counts = _stage_counts(keys, r"^block{stage}\.layer\.(\d+)\.", 3)
        return _wideresnet(state, LAYOUTS["wideresnet"], counts, num_classes, in_channels, "block1.layer.0.conv1.weight")
    if any(re.match(r"^block1\.\d+\.", key) for key in keys):
        counts = _stage_counts(keys, r"^block{stage}\.(\d+)\.", 3)
        return _wideresnet(state, LAYOUTS["fastrobust"], counts, num_classes, in_channels, "block1.0.conv1.weight")
    if not any(re.match(r"^layer1\.\d+\.", key) for key in keys):  # residual stages of numbered blocks
        return None
    counts = _stage_counts(keys, r"^layer{stage}\.(\d+)\.", 4)
    own = "mean" in keys or any(re.match(r"^layer\d\.\d+\.shortcut\.weight$", key) for key in keys)
    if "bn1.weight" in keys:  # post-activation ResNet: BN right after conv1
        block = "bottleneck" if "layer1.0.conv3.weight" in keys else "basic"
        name = _RESNETS.get((block, counts))
        if name is None:
            raise FastRobustError(f"a ResNet with {block} blocks {'-'.join(map(str, counts))} per stage is not in "
                                  "fastrobust's zoo (ResNet-18 2-2-2-2, ResNet-34 3-4-6-3, ResNet-50 bottleneck 3-4-6-3)")
        label = {"resnet18": "ResNet-18", "resnet34": "ResNet-34", "resnet50": "ResNet-50"}[name]
        return Match(LAYOUTS["fastrobust" if own else "resnet"], name, {}, num_classes, in_channels,
                     f"{label} ({block} blocks {'-'.join(map(str, counts))}, head {head})")
    layout = LAYOUTS["fastrobust" if own else "preactresnet"]
    if counts != (2, 2, 2, 2):
        raise FastRobustError(f"a PreActResNet with {'-'.join(map(str, counts))} blocks per stage is not in "
                              "fastrobust's zoo (PreActResNet-18: 2-2-2-2)")
    if "bn.weight" not in keys:
        raise FastRobustError("this PreActResNet-18 has no final BatchNorm `bn` (the pytorch-cifar variant): "
                              "fastrobust's preactresnet18 applies BN-ReLU before pooling, so its logits would "
                              f"differ: {BUILD_IT_YOURSELF}")
    return Match(layout, "preactresnet18", {}, num_classes, in_channels, f"PreActResNet-18 (head {head})")


def _own_cnn(state: dict[str, torch.Tensor]) -> Match | None:
    """fastrobust's TinyCNN / SmallCNN under their own key names (with the ``mean``/``std`` buffers every
    fastrobust model has); None for anything else. The strict load that follows checks every other key."""
    keys = set(state)
    if not {"mean", "std", "conv1.weight"} <= keys:
        return None
    in_channels = int(state["conv1.weight"].shape[1])
    if {"layer1.conv.weight", "layer3.conv.weight", "fc.weight"} <= keys:
        width = int(state["conv1.weight"].shape[0])
        return Match(LAYOUTS["fastrobust"], "tinycnn", {} if width == 16 else {"width": width},
                     int(state["fc.weight"].shape[0]), in_channels, f"TinyCNN (width {width})")
    if {"layer2.conv2.weight", "fc1.weight", "fc3.weight"} <= keys:
        return Match(LAYOUTS["fastrobust"], "smallcnn", {}, int(state["fc3.weight"].shape[0]), in_channels, "SmallCNN")
    return None


def _wideresnet(state, layout: Layout, counts, num_classes: int, in_channels: int, first_conv: str) -> Match:
    if len(set(counts)) != 1 or counts[0] == 0:
        raise FastRobustError(f"a WideResNet with {'-'.join(map(str, counts))} blocks per group is not a "
                              "WRN-depth-k (equal groups)")
    depth = 6 * counts[0] + 4
    width = int(state[first_conv].shape[0])
    if width % 16:
        raise FastRobustError(f"a WideResNet whose first group has {width} channels is not a WRN-depth-k (16k channels)")
    widen = width // 16
    name = {(28, 10): "wrn28_10", (34, 10): "wrn34_10"}.get((depth, widen), "wideresnet")
    options = {} if name != "wideresnet" else {"depth": depth, "widen_factor": widen}
    return Match(layout, name, options, num_classes, in_channels, f"WideResNet-{depth}-{widen}")


def convert(state: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """The state dict with ``layout``'s keys renamed to fastrobust's (dropped keys removed)."""
    out = {}
    for key, value in state.items():
        if any(re.search(pattern, key) for pattern in layout.drop):
            continue
        for pattern, replacement in layout.rules:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out
