"""Invariance evaluations: accuracy under natural transformations, not eps-ball attacks (SPROUT's second claim).

Two named evaluations, run by ``fastrobust.evaluate.evaluate`` (and ``fastrobust eval --attack``) next to the
attacks and reported in the same record format (``record["attacks"][name]``: ``robust_acc``, ``robust``,
``broken``, ``settings``, ``seconds``). They are not eps-ball attacks, so they do not enter the record's
``robust_acc`` (the per-example worst case of the attacks). As for the attacks, a point counts only if the
model classifies the clean image correctly.

* ``gaussian-noise``: x + std * N(0, 1), clamped to [0, 1], for each std of ``stds`` (default 0.02 ... 0.1 in
  pixel units), ``draws`` (10) independent draws per image, seeded per batch (the same numbers for any batch
  order or number of ranks). Per std: the fraction of (image, draw) pairs classified correctly, over all
  images; ``robust_acc`` is the value at the largest std, ``by_std`` gives the curve. Its ``robust`` and
  ``broken`` count (image, draw) pairs at the largest std, out of ``pairs`` = n * draws (whole numbers).
* ``spatial``: the worst case over a grid of rotations and translations (Engstrom et al., "Exploring the
  Landscape of Spatial Robustness", ICML 2019: +-30 degrees and +-3 pixels on CIFAR-10; grid of 31 rotations x
  5 x 5 translations = 775 transformations). Each image is rotated about its centre, then translated, with
  bilinear interpolation and zero (black) padding. A point is robust only if every transformed copy is
  classified correctly (the identity is in the grid).

Pure torch (``affine_grid`` / ``grid_sample``); the model runs in eval mode.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastrobust.attacks import model_mode
from fastrobust.attacks.toolkit import draw
from fastrobust.core import distributed as dist_lib
from fastrobust.core.contract import predicts
from fastrobust.core.values import parse_number
from fastrobust.errors import ConfigError
from fastrobust.evaluate.batching import batch_seed, indexed_batches

# ---- transformations ----------------------------------------------------------------------------------------------


def add_gaussian_noise(x: Tensor, std: float, generator: torch.Generator | None = None) -> Tensor:
    """x + std * N(0, 1), clamped to [0, 1] (images stay images); ``std`` in pixel units. The noise is drawn on
    ``generator``'s device (any device) and moved to ``x``'s."""
    noise = draw(torch.randn, x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + std * noise).clamp(0.0, 1.0)


def rotate_translate(x: Tensor, angle: float, dx: float = 0.0, dy: float = 0.0) -> Tensor:
    """Rotate ``x`` [B, C, H, W] by ``angle`` degrees about the image centre (positive: counter-clockwise as
    displayed, the direction of ``torch.rot90(x, 1, dims=(-2, -1))``), then translate by ``dx`` pixels to the
    right and ``dy`` pixels down. Bilinear interpolation; pixels from outside the image are 0 (black)."""
    _, _, height, width = x.shape
    theta_rad = math.radians(angle)
    cos, sin = math.cos(theta_rad), math.sin(theta_rad)
    # output pixel p (pixel units from the centre, y down) samples the input at R^-1 (p - t), where R rotates
    # counter-clockwise on screen: with y pointing down that is [[cos, sin], [-sin, cos]]; R^-1 is its transpose
    inverse = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64)
    to_pixels = torch.diag(torch.tensor([width / 2, height / 2], dtype=torch.float64))
    matrix = torch.linalg.inv(to_pixels) @ inverse @ to_pixels  # in affine_grid's normalised coordinates
    shift = torch.tensor([2 * dx / width, 2 * dy / height], dtype=torch.float64)
    theta = torch.cat([matrix, (-(matrix @ shift)).unsqueeze(1)], dim=1).to(x.dtype).to(x.device)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def spatial_grid(max_rotation: float = 30.0, rotations: int = 31, max_translation: float = 3.0,
                 translations: int = 5) -> list[tuple[float, float, float]]:
    """(angle, dx, dy) for every point of the grid: ``rotations`` angles evenly in [-max_rotation, max_rotation]
    and ``translations`` shifts evenly in [-max_translation, max_translation] on each axis (Engstrom et al.'s
    CIFAR grid: 31 x 5 x 5). The identity comes first (a misclassified clean point is dropped at once)."""
    def points(limit: float, count: int) -> list[float]:
        return [0.0] if count == 1 else [-limit + 2 * limit * i / (count - 1) for i in range(count)]

    grid = [(a, dx, dy) for a in points(max_rotation, rotations) for dx in points(max_translation, translations)
            for dy in points(max_translation, translations)]
    grid.sort(key=lambda t: (t != (0.0, 0.0, 0.0)))
    if grid[0] != (0.0, 0.0, 0.0):
        grid.insert(0, (0.0, 0.0, 0.0))
    return grid


# ---- per-batch scores ---------------------------------------------------------------------------------------------
def noise_correct_counts(model: nn.Module, x: Tensor, y: Tensor, stds: Sequence[float], draws: int,
                         generator: torch.Generator | None = None) -> Tensor:
    """[len(stds), B] int64: for each std, on how many of ``draws`` noisy copies each image is classified
    correctly (the model in the mode it is in; no gradient)."""
    counts = torch.zeros(len(stds), x.shape[0], dtype=torch.long, device=x.device)
    with torch.no_grad():
        for draw in range(draws):
            for i, std in enumerate(stds):
                counts[i] += predicts(model(add_gaussian_noise(x, std, generator)), y)
    return counts


def spatial_robust(model: nn.Module, x: Tensor, y: Tensor, grid: Sequence[tuple[float, float, float]]) -> Tensor:
    """[B] bool: whether every transformation of the grid leaves the image correctly classified. Only images
    not yet broken are transformed again (the answer is the same, the work smaller)."""
    robust = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    with torch.no_grad():
        for angle, dx, dy in grid:
            idx = robust.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            correct = predicts(model(rotate_translate(x[idx], angle, dx, dy)), y[idx])
            robust[idx] = correct
    return robust


# ---- named evaluations ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Evaluation:
    """A named invariance evaluation: its default settings and how one batch is scored."""

    name: str
    defaults: dict[str, Any]
    check: Callable[[dict[str, Any]], dict[str, Any]]

    def settings(self, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """The settings it runs with: the defaults updated by ``options`` (unknown keys and bad values refused)."""
        options = dict(options or {})
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise ConfigError(f"evaluation {self.name!r} has no setting(s) {sorted(unknown)}: its settings are "
                              f"{sorted(self.defaults)}")
        return self.check({**self.defaults, **options})


def _positive_int(value: Any, name: str) -> int:
    """A whole number >= 1; numpy ints and text ("5") as the attack settings take them (attack_options)."""
    number = _number(value, name, "a whole number >= 1")
    if number != int(number) or number < 1:
        raise ConfigError(f"{name}={value!r} must be a whole number >= 1")
    return int(number)


def _nonnegative(value: Any, name: str) -> float:
    """A number >= 0; numpy numbers and text ("2/255") accepted."""
    number = _number(value, name, "a number >= 0")
    if number < 0:
        raise ConfigError(f"{name}={value!r} must be a number >= 0")
    return number


def _number(value: Any, name: str, expected: str) -> float:
    try:
        return parse_number(value, name=name)
    except ConfigError:
        raise ConfigError(f"{name}={value!r} must be {expected}") from None


def _check_noise(s: dict[str, Any]) -> dict[str, Any]:
    stds = s["stds"]
    if not isinstance(stds, (list, tuple)) or not stds:
        raise ConfigError(f"gaussian-noise stds={stds!r} must be a non-empty list of standard deviations (pixel units)")
    return {"stds": [_nonnegative(v, "gaussian-noise std") for v in stds],
            "draws": _positive_int(s["draws"], "gaussian-noise draws")}


def _check_spatial(s: dict[str, Any]) -> dict[str, Any]:
    return {"max_rotation": _nonnegative(s["max_rotation"], "spatial max_rotation"),
            "rotations": _positive_int(s["rotations"], "spatial rotations"),
            "max_translation": _nonnegative(s["max_translation"], "spatial max_translation"),
            "translations": _positive_int(s["translations"], "spatial translations")}


EVALUATIONS: dict[str, Evaluation] = {
    "gaussian-noise": Evaluation("gaussian-noise", {"stds": [0.02, 0.04, 0.06, 0.08, 0.1], "draws": 10}, _check_noise),
    "spatial": Evaluation("spatial", {"max_rotation": 30.0, "rotations": 31, "max_translation": 3.0,
                                      "translations": 5}, _check_spatial),
}


def evaluate_invariance(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    evaluations: dict[str, dict[str, Any]],
    *,
    clean: Sequence[bool] | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    seed: int = 0,
    distributed: bool = False,
) -> dict[str, dict[str, Any]]:
    """One record entry per named evaluation (``{name: settings}``, settings from ``EVALUATIONS[name].settings``).

    ``images`` [N, C, H, W] (uint8, or float in [0, 1]) and ``labels`` [N]; ``clean`` the per-point clean
    correctness (computed here when None). With ``distributed`` every rank of the process group calls this with
    the same arguments; batch ``b`` is scored by rank ``b % world_size`` with the same seed as in one process,
    and the integer counts are summed: the entries equal the one-process entries (timings aside).
    """

    device = torch.device(device)
    n = len(labels)
    count = (n + batch_size - 1) // batch_size
    ctx = dist_lib.context() if distributed else dist_lib.Context()
    mine = dist_lib.shard_indices(count, ctx) if ctx.active else list(range(count))
    out: dict[str, dict[str, Any]] = {}
    with model_mode(model, training=False):
        if clean is None:
            correct = torch.zeros(n, dtype=torch.long)
            with torch.no_grad():
                for b, x, y in indexed_batches(images, labels, batch_size, device, mine):
                    correct[b * batch_size:b * batch_size + len(y)] = predicts(model(x), y).long().cpu()
            if ctx.active:
                correct = torch.tensor(dist_lib.sum_counts(correct.tolist()), dtype=torch.long)
            clean = correct.bool().tolist()
        clean_t = torch.tensor(list(clean), dtype=torch.bool)
        clean_correct = int(clean_t.sum())
        for name, settings in evaluations.items():
            if name not in EVALUATIONS:
                raise ConfigError(f"unknown invariance evaluation {name!r}: choose from {', '.join(EVALUATIONS)}")
            start = time.perf_counter()
            if name == "gaussian-noise":
                totals = torch.zeros(len(settings["stds"]), dtype=torch.long)
                for b, x, y in indexed_batches(images, labels, batch_size, device, mine):
                    keep = clean_t[b * batch_size:b * batch_size + len(y)].to(device)
                    generator = torch.Generator(device=device).manual_seed(batch_seed(seed, name, b))
                    counts = noise_correct_counts(model, x, y, settings["stds"], settings["draws"], generator)
                    totals += (counts * keep).sum(1).cpu()
                if ctx.active:
                    totals = torch.tensor(dist_lib.sum_counts(totals.tolist(), device=device), dtype=torch.long)
                draws = settings["draws"]
                accs = [int(t) / max(n * draws, 1) for t in totals]
                robust = int(totals[-1])  # counts of (image, draw) pairs, out of n * draws
                out[name] = {"robust_acc": accs[-1], "robust": robust, "broken": clean_correct * draws - robust,
                             "pairs": n * draws, "by_std": {f"{std:g}": acc for std, acc in zip(settings["stds"], accs)}}
            else:
                grid = spatial_grid(settings["max_rotation"], settings["rotations"], settings["max_translation"],
                                    settings["translations"])
                robust_count = 0
                for b, x, y in indexed_batches(images, labels, batch_size, device, mine):
                    keep = clean_t[b * batch_size:b * batch_size + len(y)].to(device)
                    if keep.any():
                        robust_count += int(spatial_robust(model, x[keep], y[keep], grid).sum())
                if ctx.active:
                    (robust_count,) = dist_lib.sum_counts([robust_count], device=device)
                out[name] = {"robust_acc": robust_count / max(n, 1), "robust": robust_count,
                             "broken": clean_correct - robust_count, "transformations": len(grid)}
            out[name].update(settings=settings, seconds=time.perf_counter() - start, invariance=True)
    return out


__all__ = ["EVALUATIONS", "Evaluation", "add_gaussian_noise", "evaluate_invariance", "noise_correct_counts",
           "rotate_translate", "spatial_grid", "spatial_robust"]
