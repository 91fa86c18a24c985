"""Robust evaluation of any classifier on [0,1] images.

A point counts as robust only if the model classifies the clean image correctly and no
attack's adversarial changes that: robust accuracy never exceeds clean accuracy. Every
adversarial an attack returns is checked against the model here; an attack's own claim of
success or failure is never trusted.

``evaluate(model, data, attacks=[...], eps=...)`` runs the named attacks and returns one JSON-able
record (see docs/evaluation.md); ``pgd_accuracy`` is the trainer's fast validation metric.
"""

from __future__ import annotations

import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm

from fastrobust.attacks import model_mode, pgd
from fastrobust.attacks.autoattack import OFFICIAL_MISSING, official_available
from fastrobust.core import distributed as dist_lib
from fastrobust.core.contract import (
    check_device,
    check_gradients_allowed,
    check_model_images,
    check_split,
    eps_size_note,
    finite_rows,
    parameter_dtype,
    predicts,
    prepare_model,
    split_arrays,
    validated,
)
from fastrobust.core.output_files import check_writable
from fastrobust.core.passes import CountedModel
from fastrobust.core.precision import determinism, deterministic_algorithms, float32_precision, no_tf32
from fastrobust.core.values import (
    check_eps,
    check_eps_fits,
    check_nonnegative_int,
    check_positive_int,
)
from fastrobust.errors import ConfigError
from fastrobust.evaluate.attack_table import (
    ATTACKS,
    GRADIENT_FREE,
    attack_settings,
    default_step,
    eot_samples_of,
    run_attack,
)
from fastrobust.evaluate.batching import (
    batch_count,
    batch_seed,
    indexed_batches,
    iterate_split,
    rank_batches,
    rounds,
    run_round,
)
from fastrobust.evaluate.invariance import evaluate_invariance
from fastrobust.evaluate.prechecks import (
    chance_warnings,
    check_ball,
    class_count_warnings,
    non_finite_warnings,
    output_warnings,
    plan_attacks,
    zero_gradient_warnings,
)
from fastrobust.evaluate.record import add_cost, build_record, cost_entry
from fastrobust.evaluate.state import EvaluationState, evaluation_fingerprint

Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]
__all__ = ["ATTACKS", "attack_settings", "clean_and_robust_counts", "default_step", "evaluate", "iterate_split",
           "pgd_accuracy"]


def clean_and_robust_counts(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    attack: Attack | None,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    distributed: bool = False,
) -> tuple[int, int, int]:
    """(clean correct, robust correct, total) of ``model`` on a split, with counts kept on the device.

    With ``distributed`` (an initialised process group, every rank calling with the same arguments) each
    rank evaluates its share of the batches and the integer counts are summed across ranks: the same counts
    as one process, as long as ``attack`` depends on its batch only.
    """
    images, labels, label_max = check_split(images, labels, where="clean_and_robust_counts")
    device = check_device(device, where="clean_and_robust_counts")
    if attack is not None:
        check_gradients_allowed("clean_and_robust_counts")
    check_model_images(model, tuple(images.shape[1:]), where="clean_and_robust_counts")
    checked = prepare_model(model, label_max, "clean_and_robust_counts")
    clean = torch.zeros((), dtype=torch.long, device=device)
    robust = torch.zeros((), dtype=torch.long, device=device)
    mine = rank_batches(len(labels), batch_size, dist_lib.context() if distributed else dist_lib.Context())
    with model_mode(model, training=False), validated():
        for _, x, y in indexed_batches(images, labels, batch_size, device, mine):
            with torch.no_grad():
                correct = predicts(checked(x), y)  # non-finite logits never count as correct
            clean += correct.sum()
            if attack is not None and correct.any():
                x_adv = attack(checked, x[correct], y[correct])
                with torch.no_grad():
                    robust += predicts(checked(x_adv), y[correct]).sum()
    total = len(labels)
    robust_count = int(robust) if attack is not None else int(clean)
    if distributed:
        clean_count, robust_count = dist_lib.sum_counts([int(clean), robust_count], device=device)
        return clean_count, robust_count, total
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
    distributed: bool = False,
) -> dict[str, float]:
    """Clean and PGD accuracy (in [0,1]) of ``model`` on a split: the trainer's validation metric.

    ``distributed``: shard the batches across the ranks of the process group (see clean_and_robust_counts).
    ``eps`` (l_inf, pixel units in [0, 1]; 0 gives the clean accuracy twice) is checked by ``check_eps``.
    ``step_size`` None: ``default_step`` (as ``evaluate``'s PGD: 2/255 at eps 8/255, larger for large eps, so
    the steps can reach the eps-ball's edge). A point counts as broken when any PGD iterate fools the model (``pgd(stop_at_fooled=True)``), as in
    ``evaluate``, so the trainer's PGD-20 and an evaluation's PGD-20 agree.
    """

    eps = check_eps(eps, allow_zero=True)
    step_size = step_size if step_size is not None else default_step(eps, max(steps, 1), "linf") if eps > 0 else 0.0

    def attack(model_: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return pgd(model_, x, y, eps=eps, steps=steps, step_size=step_size, random_init=random_init, loss=loss,
                   stop_at_fooled=True)

    clean, robust, total = clean_and_robust_counts(model, images, labels, attack if eps > 0 else None,
                                                   batch_size=batch_size, device=device,
                                                   distributed=distributed)
    return {"clean_acc": clean / max(total, 1), "robust_acc": robust / max(total, 1), "n": total, "step_size": step_size}


def as_split(data: Any, where: str = "evaluate") -> tuple[Tensor, Tensor, int]:
    """(images uint8 or float, labels int64, largest label) of an ImageSet, a Dataset's test split, an (images,
    labels) pair or a list of samples or batches (``core.contract.split_arrays`` reads it by the elements'
    shapes); checked by ``core.contract.check_split`` (one host sync)."""
    images, labels = split_arrays(data, where=where)
    return check_split(images, labels, where=where)


def evaluate(
    model: nn.Module,
    data: Any,
    attacks: Sequence[str] = ("pgd20",),
    *,
    eps: float,
    norm: str = "linf",
    batch_size: int = 256,
    device: str | torch.device | None = None,
    state_file: str | Path | None = None,
    progress: bool = True,
    seed: int = 0,
    attack_options: dict[str, dict[str, Any]] | None = None,
    distributed: bool = False,
    deterministic: bool = False,
) -> dict[str, Any]:
    """Robust accuracy of ``model`` on ``data`` under each attack in ``attacks``, as one JSON-able record.

    Each attack runs on every correctly classified point, so each has its own robust accuracy; ``robust_acc`` is
    the per-example worst case across them (AutoAttack's rule, Croce & Hein 2020). A point counts as robust only
    when the model classifies it correctly and no attack's adversarial changes that: every adversarial is checked
    here (inside the eps-ball and [0, 1], finite) and judged by the model, an attack's own claim is never trusted,
    and non-finite logits never count as correct or robust (``non_finite``).

    Args:
        model: any ``nn.Module`` mapping images in [0, 1] to logits ``[B, C]`` (normalisation inside the model).
            It runs in eval mode; its mode is restored afterwards. bf16/fp16 models run in their own dtype.
        data: an ``ImageSet`` (``.images``, ``.labels``), a ``Dataset`` (its test split) or ``(images, labels)``:
            images uint8, or float in [0, 1], ``[N, C, H, W]``; labels of any integer dtype in ``[0, C)``.
        attacks: names from ``ATTACKS`` (default ``("pgd20",)``): ``clean``, ``fgsm``, ``pgd20``, ``pgd100``,
            ``cw20``, ``apgd-ce``, ``apgd-t``, ``fab-t``, ``square``, ``autoattack``, ``autoattack-fast``,
            ``autoattack-plus``, ``autoattack-rand`` (randomized models), ``rays``,
            ``autoattack-official`` and the invariance evaluations ``gaussian-noise``, ``spatial``.
        eps: the budget in [0, 1] pixel units (l_inf: 8/255 is CIFAR-10's usual; l_2: 0.5); text such as
            ``"8/255"`` is parsed.
        norm: ``"linf"`` (default) or ``"l2"``.
        batch_size: points per batch (default 256); batch boundaries and per-batch seeds fix the results.
        device: where to run (default: the model's device; the model is moved there).
        state_file: a JSON file that saves the per-point results of every finished batch (atomically); a rerun
            with the same model (weights and architecture), data and settings resumes from it. Default None.
        progress: draw a progress bar per attack on a terminal (default True).
        seed: all randomness comes from it, one generator per attack and batch (default 0).
        attack_options: settings per attack, e.g. ``{"square": {"n_queries": 1000}}`` (default None).
        distributed: share the batches out across the ranks of an initialised process group (every rank calls
            with the same arguments); the record equals the one-process record, timings and device aside.
        deterministic: run with torch's deterministic kernels only (``core.precision.deterministic_algorithms``;
            default False). On the CPU the results repeat exactly either way; on CUDA they repeat bit for bit only
            with it (cuDNN picks nondeterministic kernels otherwise). Clean and final flags always run with TF32
            off, and the record states the float32 precision and determinism in force (``float32_precision``,
            ``determinism``).

    Returns:
        The record (docs/evaluation.md, "The record"): ``n``, ``clean_acc``, ``robust_acc`` (worst case),
        ``attacks`` (per attack: ``robust_acc``, ``robust``, ``broken``, ``non_finite``, the settings it ran with,
        seconds, its ``cost`` and what the attack adds), ``warnings``, ``versions``, ``device``, ``seed``, and
        ``cost``: the passes of the model (forward and backward rows, counted at its call for every attack, the
        clean pass and the pre-checks), wall and process seconds summed over the batches, device and precision
        (docs/evaluation.md, "What an evaluation cost").

    Raises:
        ConfigError: a bad value (eps, norm, an attack name or setting, the input contract, a model whose number
            of outputs differs from the data's ``num_classes``), in one line naming the fix.
        FastRobustError: a state file of another evaluation, or a model that fails on the data.

    Pre-checks, as the official AutoAttack's, warn (in ``record["warnings"]`` and on stderr) when the outputs look
    like probabilities, when two forward passes differ (a randomised model), when input gradients are all zero
    (gradient masking), when clean accuracy is at chance level, and for an l_2 ``eps`` below 0.1 on images of
    >= 100 values (an l_inf budget given with norm='l2').

    Example:
        >>> from fastrobust.data import load_dataset
        >>> from fastrobust.evaluate import evaluate
        >>> record = evaluate(model, load_dataset("cifar10", test_subset=1000).test, ["pgd20", "autoattack"],
        ...                   eps=8 / 255)
        >>> record["clean_acc"], record["robust_acc"]
    """

    eps = check_eps(eps, norm=norm)  # checks norm too
    batch_size = check_positive_int(batch_size, name="batch_size")
    seed = check_nonnegative_int(seed, name="seed")
    images, labels, label_max = as_split(data)
    if len(labels) == 0:
        raise ConfigError("evaluate: data holds no images: nothing to evaluate (check the split or the subset size)")
    check_eps_fits(eps, norm, images.shape[1:])
    check_model_images(model, tuple(images.shape[1:]), where="evaluate")
    eps_note = eps_size_note(eps, norm, tuple(images.shape[1:]))
    if eps_note is not None:  # said before the (long) attack; also kept in record["warnings"]
        warnings.warn(eps_note, UserWarning, stacklevel=2)
    names, settings, invariance = plan_attacks(attacks, attack_options, eps, norm)
    needs_gradients = any(name not in GRADIENT_FREE for name in names)
    if needs_gradients:
        check_gradients_allowed("evaluate")
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = check_device(device, where="evaluate")
    model.to(device)
    # casts inputs to a bf16/fp16 model's dtype; a failure of the model is one ModelError line
    checked = prepare_model(model, label_max, "evaluate", guard=True)
    # every pass of the model, whichever attack makes it, is counted at its call (record["cost"])
    counted = CountedModel(checked)
    skipped: dict[str, str] = {}
    if "autoattack-official" in names and not official_available():
        skipped["autoattack-official"] = OFFICIAL_MISSING
        warnings.warn(f"skipping attack 'autoattack-official': {OFFICIAL_MISSING}", stacklevel=2)
        print(f"fastrobust evaluate: skipping autoattack-official: {OFFICIAL_MISSING}", file=sys.stderr)

    ctx = dist_lib.context() if distributed else dist_lib.Context()
    n = len(labels)
    n_batches = batch_count(n, batch_size)
    with model_mode(model, training=False), validated():
        _, x_first, y_first = next(indexed_batches(images, labels, batch_size, device, [0]))
        before = counted.count.snapshot()
        eot = max([eot_samples_of(settings[name]) for name in names] + [1])
        warned, num_classes = output_warnings(counted, x_first, eot_samples=eot)
        if needs_gradients:
            warned += zero_gradient_warnings(counted, x_first, y_first)
        precheck_passes = counted.count.since(before)
    warned += class_count_warnings(num_classes, label_max, n, getattr(data, "num_classes", None))
    path = check_writable(state_file, what="state file", example="eval-state.json") if state_file is not None else None
    state = EvaluationState.shared(path, lambda: evaluation_fingerprint(images, labels, eps, norm, batch_size, seed,
                                                                        model), ctx)

    def batches_of(pending: list[int], compute: Callable[[int, Tensor, Tensor], Any]) -> Iterator[dict[int, Any]]:
        for group in rounds(pending, ctx):
            yield run_round(group, compute, images, labels, batch_size, device, ctx)

    started = time.perf_counter()
    with model_mode(model, training=False), validated(), deterministic_algorithms(deterministic):
        conditions = {"float32_precision": float32_precision(), "determinism": determinism()}
        for results in batches_of(state.pending_clean(n_batches), partial(_clean_batch, counted)):
            for b, (correct, non_finite, seconds, cost) in sorted(results.items()):
                state.clean[str(b)] = correct
                state.clean_non_finite[str(b)] = non_finite
                state.clean_seconds += seconds
                state.clean_cost[str(b)] = cost
            state.save()
        for name in names:
            if name == "clean" or name in skipped:
                continue
            done = state.attack_batches(name, settings[name])
            attack_batch = partial(_attack_batch, name, settings[name], counted, state, eps=eps, norm=norm,
                                   seed=seed, device=device)
            bar = tqdm(total=n_batches, desc=name, unit="batch",  # None: drawn only on a terminal, not in logs
                       disable=True if not progress or not ctx.is_main else None,
                       file=sys.stderr, initial=sum(1 for b in range(n_batches) if str(b) in done))
            try:
                for results in batches_of([b for b in range(n_batches) if str(b) not in done], attack_batch):
                    for b in sorted(results):
                        done[str(b)] = results[b]
                    state.save()
                    bar.update(len(results))
            finally:
                bar.close()
    record = build_record(model, state, names, settings, skipped, eps=eps, norm=norm, n=n, n_batches=n_batches,
                          batch_size=batch_size, seed=seed, device=device, seconds=time.perf_counter() - started,
                          num_classes=num_classes, dim=images[0].numel() if n else 0, prechecks=precheck_passes,
                          precision=str(parameter_dtype(model) or torch.float32).replace("torch.", ""),
                          conditions=conditions)
    if invariance:  # the prepared model: inputs cast to a half-precision model's dtype, logits in fp32
        clean = state.clean_flags(n_batches)
        for name, invariance_settings in invariance.items():
            before, t0, cpu0 = counted.count.snapshot(), time.perf_counter(), time.process_time()
            entries = evaluate_invariance(counted, images, labels, {name: invariance_settings}, clean=clean,
                                          batch_size=batch_size, device=device, seed=seed, distributed=ctx.active)
            passes = counted.count.since(before)
            if ctx.active:  # each rank scored its share of the batches
                passes = dict(zip(passes, dist_lib.sum_counts(list(passes.values()), device=device)))
            entries[name]["cost"] = cost_entry(passes, sum(state.clean_flags(n_batches)), time.perf_counter() - t0,
                                               time.process_time() - cpu0)
            record["attacks"].update(entries)
            add_cost(record["cost"], entries[name]["cost"])
    record["warnings"] = ([eps_note] if eps_note else []) + warned + non_finite_warnings(record) + \
        chance_warnings(record)
    if ctx.is_main:
        for text in record["warnings"]:
            if text != eps_note:  # that one was said before the attacks
                print(f"fastrobust evaluate: warning: {text}", file=sys.stderr)
    if ctx.active:
        record["world_size"] = ctx.world_size
    return record


def _clean_batch(model: CountedModel, _b: int, x: Tensor, y: Tensor
                 ) -> tuple[list[bool], list[bool], float, dict[str, Any]]:
    """Per-point (correct, non-finite logits) of a batch's clean pass, its seconds and its cost (passes of the
    model, process seconds)."""
    t0, cpu0, before = time.perf_counter(), time.process_time(), model.count.snapshot()
    with torch.no_grad(), no_tf32():  # the flags are fp32 on CUDA too, not TF32
        logits = model(x)
    correct, non_finite = predicts(logits, y).tolist(), (~finite_rows(logits)).tolist()
    cost = {**model.count.since(before), "process_seconds": time.process_time() - cpu0}
    return correct, non_finite, time.perf_counter() - t0, cost


def _attack_batch(name: str, settings: dict[str, Any], model: CountedModel, state: EvaluationState, b: int,
                  x: Tensor, y: Tensor, *, eps: float, norm: str, seed: int, device: torch.device) -> dict[str, Any]:
    """Attack ``name`` on the clean-correct points of batch ``b``: per-point robust and non-finite flags, the
    attack's per-point extras, the seconds and the passes of the model (the final check of the adversarials
    included). Every adversarial is checked (``check_ball``) and judged by the model here: an attack's own claim
    is never trusted, and non-finite logits are never robust."""
    t0, cpu0, before = time.perf_counter(), time.process_time(), model.count.snapshot()
    correct = torch.tensor(state.clean[str(b)], dtype=torch.bool, device=device)
    robust = correct.clone()
    non_finite = torch.zeros_like(correct)
    entry: dict[str, Any] = {}
    idx = correct.nonzero().squeeze(1)
    if len(idx):
        generator = torch.Generator(device=device).manual_seed(batch_seed(seed, name, b))
        x_adv, extras = run_attack(name, settings, model, x[idx], y[idx], eps=eps, norm=norm, generator=generator,
                                   seed=seed, max_rows=len(x))
        check_ball(x_adv, x[idx], eps, norm, name)
        with torch.no_grad(), no_tf32():  # the final flags are fp32 on CUDA too, not TF32
            logits = model(x_adv)
        robust[idx] = predicts(logits, y[idx])
        non_finite[idx] = ~finite_rows(logits)
        for key, values in extras.items():
            full: list[Any] = [None] * len(y)
            for i, v in zip(idx.tolist(), values):
                full[i] = v
            entry[key] = full
    entry["robust"] = robust.tolist()
    entry["non_finite"] = non_finite.tolist()
    entry["seconds"] = time.perf_counter() - t0
    entry.update(model.count.since(before), process_seconds=time.process_time() - cpu0)
    return entry
