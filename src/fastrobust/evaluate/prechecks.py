"""Pre-checks of an evaluation and the warnings of its record: what would make a robust accuracy wrong or
meaningless, said before (or beside) the number.

Modelled on the official AutoAttack's checks (``checks.py``: every check a function, called in a row): outputs that
look like probabilities, a randomised model, gradient masking (all-zero input gradients), a model built for another
number of classes, clean accuracy at chance level, non-finite logits; and ``check_ball``, which refuses an attack's
adversarial outside the eps-ball, outside [0, 1] or non-finite (a bug in the attack, never a robust point).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fastrobust.attacks.autoattack import EOT_SAMPLES
from fastrobust.attacks.toolkit import margin_gradient
from fastrobust.errors import ConfigError
from fastrobust.evaluate.attack_table import TABLE, attack_settings
from fastrobust.evaluate.invariance import EVALUATIONS as INVARIANCE


def plan_attacks(attacks: Any, attack_options: dict[str, dict[str, Any]] | None, eps: float,
                 norm: str) -> tuple[list[str], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The attacks an evaluation runs, checked before any work: ``(names, settings, invariance)`` -- the eps-ball
    attacks in the order given (repeats dropped), each one's checked settings, and the invariance evaluations'.

    Raises:
        ConfigError: no attack, a name that is not one, options for an attack not asked for, a bad setting, or an
            l_inf-only attack with ``norm='l2'``, or an attack without an l_1 version with ``norm='l1'``.
    """
    names = [attacks] if isinstance(attacks, str) else list(attacks)  # one name alone: "pgd20"
    names = list(dict.fromkeys(names))  # keep order, drop repeats
    if not names:
        raise ConfigError("attacks is empty: name at least one attack, e.g. ['pgd20']")
    if any(not isinstance(name, str) for name in names):
        raise ConfigError(f"attacks={attacks!r} must be attack names, e.g. ['pgd20', 'autoattack']")
    attack_options = dict(attack_options or {})
    for key in attack_options:
        if key not in names:
            raise ConfigError(f"attack_options names {key!r}, which is not among the attacks {names}")
    settings = {name: attack_settings(name, eps, norm, attack_options.get(name)) for name in names}
    invariance = {name: settings.pop(name) for name in names if name in INVARIANCE}
    names = [name for name in names if name not in invariance]
    for name in names:
        if TABLE[name].linf_only and norm != "linf":
            raise ConfigError(f"attack {name!r} is l_inf only but norm={norm!r}: drop {name} or use --norm linf")
        if norm == "l1" and not TABLE[name].l1 and name != "clean":
            l1_names = [key for key, entry in TABLE.items() if entry.l1]
            raise ConfigError(f"attack {name!r} has no l1 version: with norm='l1' use {', '.join(l1_names)}")
    return names, settings, invariance


def check_ball(x_adv: Tensor, x: Tensor, eps: float, norm: str, name: str) -> None:
    """RuntimeError (a bug in the attack) unless every adversarial is finite, in [0, 1] and in the eps-ball.
    Written so that NaN fails it: every comparison with NaN is False, so each test asks for the good case."""
    flat, delta = x_adv.flatten(1), (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.abs().sum(1) if norm == "l1" else delta.norm(dim=1)
    good = (torch.isfinite(flat).all(1) & (size <= eps * (1 + 1e-4) + 1e-6)
            & (flat.amin(1) >= 0) & (flat.amax(1) <= 1))
    if not bool(good.all()):
        i = int((~good).nonzero()[0, 0])
        raise RuntimeError(f"attack {name!r} returned an adversarial outside the {norm} eps-ball, outside [0, 1] or "
                           f"non-finite (point {i} of the batch, distance {float(size[i]):.6g}, eps {eps:g}): a bug")


def output_warnings(model: nn.Module, x: Tensor, eot_samples: int = 1) -> tuple[list[str], int]:
    """The official AutoAttack's pre-checks on the first batch: outputs that look like probabilities (every row
    non-negative and summing to 1) and a randomised model (two forward passes of the same input differ by more
    than 1e-4, relative). Unlike the official, the randomness check also runs for the EOT attacks
    (``autoattack-rand``): the warning then says how many gradients they averaged, and a model whose outputs do
    not vary is said to gain nothing from them.

    Args:
        model: the model (in the mode the evaluation runs it); x: the first batch.
        eot_samples: the most gradients per step any planned attack averages (``eot_samples_of``; 1: no EOT).
    Returns:
        (warnings, number of outputs).
    """
    with torch.no_grad():
        first, second = model(x).float(), model(x).float()
    found = []
    finite = torch.isfinite(first).all() & torch.isfinite(second).all()
    if len(x) and bool(finite & (first >= 0).all() & ((first.sum(1) - 1).abs() <= 1e-3).all()):
        found.append("the model's outputs look like probabilities (every row is non-negative and sums to 1): "
                     "attacks need logits; remove the final softmax (the official AutoAttack warns the same)")
    same_pattern = torch.equal(torch.isfinite(first), torch.isfinite(second))
    both = torch.isfinite(first) & torch.isfinite(second)
    scale = first[both].abs().max().clamp_min(1.0) if bool(both.any()) else torch.tensor(1.0)
    diff = float(((first - second).abs()[both].max() / scale)) if bool(both.any()) else 0.0
    randomised = not same_pattern or diff > 1e-4
    if randomised and eot_samples > 1:
        found.append(f"two forward passes of the same input differ (by {diff:.3g}, relative): the model is "
                     f"randomised; autoattack-rand averaged {eot_samples} gradients per step (EOT), the other "
                     "attacks one, so theirs underestimate its vulnerability")
    elif randomised:
        found.append(f"two forward passes of the same input differ (by {diff:.3g}, relative): the model is "
                     "randomised, so these attacks underestimate its vulnerability; use --attack autoattack-rand "
                     f"(APGD with {EOT_SAMPLES} gradients per step, EOT: the official AutoAttack's version='rand')")
    elif eot_samples > 1:
        found.append(f"the model's outputs do not vary between identical passes: autoattack-rand's {eot_samples} "
                     "gradients per step (EOT) cost that many times more and find nothing more; use autoattack")
    return found, first.shape[1] if first.dim() == 2 else 0


ZERO_GRADIENT_SHARE = 0.01  # as sanity_checks' gradient_share


def zero_gradient_warnings(model: nn.Module, x: Tensor, y: Tensor) -> list[str]:
    """A warning when more than 1% of the first batch's points have an all-zero input gradient of the CW margin
    (one forward and backward): the gradient attacks then cannot move those points and report them robust (a
    detach, bit-depth reduction or a no_grad transform in the model: gradient masking). The official AutoAttack
    warns the same way; the margin, unlike the cross-entropy, does not vanish on confident points."""

    if not len(x):
        return []
    zero = int((margin_gradient(model, x, y).flatten(1) == 0).all(1).sum())
    if zero <= ZERO_GRADIENT_SHARE * len(x):
        return []
    return [f"{zero} of the first {len(x)} points have an all-zero input gradient: gradient attacks cannot move "
            "them and count them robust (gradient masking, e.g. a detach or bit-depth reduction in the model); "
            "add square or rays, or run the sanity checks (--sanity)"]


def class_count_warnings(width: int, label_max: int, n: int, data_classes: int | None) -> list[str]:
    """The model's number of outputs ``width`` against the data: a ConfigError when the data says its class count
    (the ``num_classes`` of a Dataset or of one of its ImageSets) and it differs, as the CLI refuses it; without a
    class count (a tuple, or an ImageSet built by hand) a warning when ``width`` is at least 10 times the label range seen (``label_max + 1``): a model built
    for another dataset (1000 ImageNet logits on CIFAR-10's 10 classes)."""
    if data_classes is not None and width and width != data_classes:
        raise ConfigError(f"evaluate: the model returns {width} logits per image but the data has {data_classes} "
                          "classes: build it for that many classes (or use the dataset it was trained for)")
    if data_classes is None and label_max >= 0 and width >= 10 * (label_max + 1) and n >= 10:
        return [f"the model returns {width} logits per image but the {n} labels are in 0..{label_max}: if the "
                f"data has {label_max + 1} classes the model was built for another dataset (pass the Dataset, "
                "or an ImageSet with num_classes, to have its class count checked)"]
    return []


CHANCE_MIN_POINTS = 50  # below this a chance-level clean accuracy is too likely by luck to be worth a word


def chance_warnings(record: dict[str, Any]) -> list[str]:
    """A warning when clean accuracy is at or below chance (at most 1.5/C on at least 50 points): the model most
    likely sees input on another scale than it expects (0..255, [-1, 1], normalised), and robust accuracy then
    measures nothing."""
    classes, n = record.get("num_classes") or 0, record["n"]
    if classes < 2 or n < CHANCE_MIN_POINTS or record["clean_acc"] > 1.5 / classes:
        return []
    return [f"clean accuracy {100 * record['clean_acc']:.1f}% is at chance level for {classes} classes: check the "
            "model's expected input range/normalisation (a model for [-1,1] takes --normalization 0.5,0.5, in Python "
            "normalization=(0.5, 0.5) of fastrobust.models.thirdparty.load_model; one for 0..255 takes --normalization "
            "0,1/255, normalization=(0.0, 1 / 255)), or whether it is trained at all"]


def non_finite_warnings(record: dict[str, Any]) -> list[str]:
    out = []
    if record["clean_non_finite"]:
        out.append(f"the model returns NaN or inf logits on {record['clean_non_finite']} of {record['n']} clean "
                   "points: counted as misclassified (check the model's numerics, e.g. its precision)")
    for name, entry in record["attacks"].items():
        if name != "clean" and entry.get("non_finite"):  # the clean pass: said above
            out.append(f"the model returns NaN or inf logits on {entry['non_finite']} adversarial examples of "
                       f"{name!r}: counted as broken (not robust)")
    return out
