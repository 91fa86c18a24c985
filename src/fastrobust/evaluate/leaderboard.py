"""A leaderboard-ready evaluation: RobustBench's protocol (Croce et al. 2021) in one call.

The first N points of the official test order (all of them by default), standard AutoAttack at the dataset's
standard eps, the clean accuracy on the same points, optionally the official AutoAttack on a random subset for a
per-point cross-check, and the numbers in the field names of RobustBench's ``model_info`` JSON files, with the
compute column (passes of the model, seconds, device) beside them.

"The first N points" are only the leaderboard's points when the data is in the official order: the official files
(CIFAR's python batches, SVHN's .mat, MNIST's IDX) keep it; a class-sorted copy (the CIFAR-10 JPEG mirror, an
image folder) does not, and is refused unless the caller accepts another order.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastrobust.attacks import autoattack_official, model_mode
from fastrobust.attacks.autoattack import DEFAULTS, VERSIONS
from fastrobust.attacks.official import OFFICIAL_MISSING, official_available
from fastrobust.core import distributed as dist_lib
from fastrobust.core.contract import predicts
from fastrobust.core.passes import CountedModel
from fastrobust.core.values import check_eps, check_nonnegative_int, check_positive_int, pixel_text
from fastrobust.data import Dataset, ImageSet
from fastrobust.errors import ConfigError
from fastrobust.evaluate.batching import iterate_split
from fastrobust.evaluate.evaluation import evaluate
from fastrobust.evaluate.record import cost_entry
from fastrobust.evaluate.state import read_state_file

PROTOCOLS = ("robustbench",)
# RobustBench's leaderboards: CIFAR-10 l_inf 8/255 and l_2 0.5, CIFAR-100 l_inf 8/255 (ImageNet's 4/255 needs its
# own preprocessing, which fastrobust does not reproduce). Other datasets have no leaderboard eps: give one.
STANDARD_EPS = {("cifar10", "linf"): 8 / 255, ("cifar10", "l2"): 0.5, ("cifar100", "linf"): 8 / 255}
THREAT_MODELS = {"linf": "Linf", "l2": "L2"}  # RobustBench's names (its model_info/<dataset>/<threat_model>/ folders)


def standard_eps(dataset: str, norm: str, eps: Any = None) -> float:
    """``eps`` when given (checked), else the leaderboard's eps for ``dataset`` and ``norm`` (``STANDARD_EPS``).

    Raises:
        ConfigError: no eps given and no leaderboard eps known for that dataset and norm.
    """
    if eps is not None:
        return check_eps(eps, name="--eps", norm=norm)
    if (dataset, norm) not in STANDARD_EPS:
        known = ", ".join(f"{d} {n} {pixel_text(e)}" for (d, n), e in STANDARD_EPS.items())
        raise ConfigError(f"the robustbench protocol has no standard {norm} eps for dataset {dataset!r} (known: "
                          f"{known}): give --eps")
    return STANDARD_EPS[(dataset, norm)]


def check_official_order(dataset: Dataset, allow_other_order: bool = False) -> None:
    """ConfigError (one line) when ``dataset``'s test split is not in the official order (a class-sorted copy),
    unless ``allow_other_order``: its first N points would not be the leaderboard's."""
    if dataset.official_order or allow_other_order:
        return
    raise ConfigError(f"dataset {dataset.name!r} was read from {dataset.source}, whose test order is not the "
                      "official one (a class-sorted copy), so its first N points are not the leaderboard's: use the "
                      "official files (e.g. CIFAR's python batches), or pass --allow-other-order to proceed anyway")


def first_points(test: ImageSet, n: int | None) -> ImageSet:
    """The first ``n`` points of ``test`` in its order (all of them for None).

    Raises:
        ConfigError: ``n`` is not a positive int or exceeds the split."""
    if n is None:
        return test
    n = check_positive_int(n, name="--test-subset")
    if n > len(test):
        raise ConfigError(f"--test-subset {n} is larger than the {len(test)} test images: give at most {len(test)}")
    return ImageSet(test.images[:n], test.labels[:n], num_classes=test.num_classes)


def robustbench_evaluation(
    model: nn.Module,
    dataset: Dataset,
    *,
    n: int | None = None,
    eps: Any = None,
    norm: str = "linf",
    cross_check: int = 0,
    allow_other_order: bool = False,
    architecture: str | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    state_file: str | Path | None = None,
    progress: bool = True,
    seed: int = 0,
    attack_options: dict[str, Any] | None = None,
    distributed: bool = False,
) -> dict[str, Any]:
    """RobustBench's protocol on ``model``: the evaluation record of ``["clean", "autoattack"]`` on the first
    ``n`` points of ``dataset``'s test split, with ``protocol``, ``model_info`` (the leaderboard's fields) and,
    with ``cross_check``, the per-point agreement with the official AutoAttack.

    Args:
        model: the classifier (images in [0, 1] to logits).
        dataset: a ``Dataset`` read from its official files (``dataset.official_order``).
        n: the first ``n`` test points (default None: all, RobustBench's 10,000 on CIFAR).
        eps: the budget (default: ``STANDARD_EPS`` of the dataset and norm).
        norm: ``"linf"`` (default) or ``"l2"``.
        cross_check: run the official AutoAttack on this many points drawn at random (seeded by ``seed``) among
            the ``n`` and compare per point (default 0: none; needs ``pip install pyautoattack``).
        allow_other_order: evaluate a split in another order anyway (its first ``n`` points are not the
            leaderboard's; the record says so).
        architecture: the ``architecture`` field of ``model_info`` (default: the model's class name).
        batch_size, device, state_file, progress, seed, distributed: as ``evaluate``'s.
        attack_options: AutoAttack's settings (default None: standard AutoAttack, as the leaderboard runs it; any
            other makes ``model_info["autoattack_version"]`` "custom").

    Returns:
        ``evaluate``'s record with ``protocol``, ``model_info`` and (with ``cross_check``) ``cross_check``.

    Raises:
        ConfigError: a split not in the official order (unless ``allow_other_order``), no standard eps, a bad
            ``n`` or ``cross_check``, or a cross-check without the official package.
    """
    check_official_order(dataset, allow_other_order)
    eps = standard_eps(dataset.name, norm, eps)
    points = first_points(dataset.test, n)
    cross_check = check_nonnegative_int(cross_check, name="--cross-check")
    if cross_check > len(points):
        raise ConfigError(f"--cross-check {cross_check} is more than the {len(points)} points evaluated: give at "
                          f"most {len(points)}")
    if cross_check and not official_available():
        raise ConfigError(f"--cross-check needs the official AutoAttack: {OFFICIAL_MISSING}")
    options = {"autoattack": attack_options} if attack_options else None
    with tempfile.TemporaryDirectory() as scratch:  # the per-point flags are read from the state file
        state = Path(state_file) if state_file is not None else Path(scratch) / "state.json"
        record = evaluate(model, points, ["clean", "autoattack"], eps=eps, norm=norm, batch_size=batch_size,
                          device=device, state_file=state, progress=progress, seed=seed, attack_options=options,
                          distributed=distributed)
        # the official run on the main process only (under torchrun every rank evaluates its share above)
        main = not distributed or dist_lib.context().is_main
        saved = read_state_file(state) if cross_check and main else None
    record["protocol"] = {"name": "robustbench", "points": f"the first {len(points)} of the test split",
                          "official_order": dataset.official_order, "test_images": len(dataset.test),
                          "source": dataset.source}
    if saved is not None:
        clean = _joined(saved["clean"])
        robust = _joined({b: batch["robust"] for b, batch in saved["attacks"]["autoattack"]["batches"].items()})
        first = next(iter(model.parameters()), None)
        record["cross_check"] = official_agreement(model, points, clean, robust, cross_check, eps=eps, norm=norm,
                                                   seed=seed, batch_size=batch_size,
                                                   device=first.device if first is not None else "cpu")
    record["model_info"] = model_info(record, dataset.name, architecture or type(model).__name__,
                                      standard=not attack_options)
    return record


def _joined(per_batch: dict[str, list]) -> list:
    """Per-batch lists (keys "0", "1", ...) joined in point order."""
    return [v for b in sorted(per_batch, key=int) for v in per_batch[b]]


def official_agreement(model: nn.Module, points: ImageSet, clean: list[bool], robust: list[bool], k: int, *,
                       eps: float, norm: str, seed: int, batch_size: int,
                       device: str | torch.device) -> dict[str, Any]:
    """The official AutoAttack (standard) on ``k`` of ``points`` drawn at random (seeded by ``seed``), compared
    per point with fastrobust's ``robust`` flags: a point is robust for the official when it is clean-correct and
    the official's adversarial does not fool the model. Returns the indices, the counts, the points that differ
    and the official run's cost (passes of the model, seconds)."""
    picked = sorted(torch.randperm(len(points), generator=torch.Generator().manual_seed(seed))[:k].tolist())
    counted = CountedModel(model)
    official: list[bool] = []
    started, cpu = _clocks()
    index = torch.tensor(picked, dtype=torch.long)
    for x, y in iterate_split(points.images[index], points.labels[index], batch_size, device):
        x_adv = autoattack_official(counted, x, y, eps=eps, norm=norm, version="standard", seed=seed)
        with torch.no_grad(), model_mode(model, training=False):
            official.extend(predicts(counted(x_adv), y).tolist())
    seconds, process_seconds = _clocks(started, cpu)
    official = [o and clean[i] for o, i in zip(official, picked)]
    mine = [robust[i] for i in picked]
    differ = [i for i, o, m in zip(picked, official, mine) if o != m]
    return {"points": k, "indices": picked, "agree": k - len(differ), "differ": differ,
            "fastrobust_robust": sum(mine), "official_robust": sum(official), "seed": seed,
            "cost": cost_entry({"forward": counted.count.forward, "backward": counted.count.backward},
                               sum(clean[i] for i in picked), seconds, process_seconds)}


def _clocks(wall: float | None = None, cpu: float | None = None) -> tuple[float, float]:
    """(wall, process) seconds now, or since ``(wall, cpu)``."""
    if wall is None or cpu is None:
        return time.perf_counter(), time.process_time()
    return time.perf_counter() - wall, time.process_time() - cpu


def model_info(record: dict[str, Any], dataset: str, architecture: str, *, standard: bool = True) -> dict[str, Any]:
    """The record in the fields of RobustBench's ``model_info`` JSON files, as its README ("Claim") shows them for
    ``model_info/cifar10/Linf/Rice2020Overfitting.json``: ``link``, ``name``, ``authors``, ``additional_data``,
    ``number_forward_passes``, ``dataset``, ``venue``, ``architecture``, ``eps``, ``clean_acc``, ``reported``,
    ``autoattack_acc`` -- accuracies as percent strings with two decimals, eps as ``"8/255"``. The paper's fields
    (link, name, authors, venue, reported, additional_data) are left for the author to fill in, as RobustBench's own
    ``benchmark(..., to_disk=True)`` does; ``number_forward_passes`` is 1 (a deterministic model: one forward pass
    per prediction). Added: ``threat_model`` (RobustBench's folder name), ``n_examples``, ``autoattack_version``
    ("standard", or "custom" when its settings were changed) and ``cost`` (the record's compute column)."""
    autoattack = record["attacks"]["autoattack"]
    return {
        "link": "",
        "name": "",
        "authors": "",
        "additional_data": None,
        "number_forward_passes": 1,
        "dataset": dataset,
        "venue": "",
        "architecture": architecture,
        "eps": pixel_text(record["eps"]),
        "clean_acc": f"{100 * record['clean_acc']:.2f}",
        "reported": "",
        "autoattack_acc": f"{100 * autoattack['robust_acc']:.2f}",
        "threat_model": THREAT_MODELS[record["norm"]],
        "n_examples": record["n"],
        "autoattack_version": "standard" if standard and _standard(autoattack["settings"]) else "custom",
        "cost": {**record["cost"], "autoattack": autoattack["cost"]},
    }


def _standard(settings: dict[str, Any]) -> bool:
    """Whether AutoAttack ran as its standard version: its components with their default settings."""
    options = settings.get("options", {})
    return (settings.get("version") == "standard" and list(options) == list(VERSIONS["standard"])
            and all(all(options[k].get(key) == value for key, value in DEFAULTS[k].items()) for k in options))


__all__ = ["PROTOCOLS", "STANDARD_EPS", "check_official_order", "first_points", "model_info", "official_agreement",
           "robustbench_evaluation", "standard_eps"]
