"""Robust evaluation of any classifier on [0,1] images.

A point counts as robust only if the model classifies the clean image correctly and no
attack's adversarial changes that: robust accuracy never exceeds clean accuracy. Every
adversarial an attack returns is checked against the model here; an attack's own claim of
success or failure is never trusted.

``evaluate(model, data, attacks=[...], eps=...)`` runs the named attacks and returns one JSON-able
record (see docs/evaluation.md); ``pgd_accuracy`` is the trainer's fast validation metric.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy
import torch
from torch import Tensor, nn
from tqdm import tqdm

from fastrobust.attacks import (
    apgd_ce,
    apgd_t,
    autoattack,
    autoattack_official,
    fab_t,
    fgsm,
    model_mode,
    pgd,
    rays,
    square,
)
from fastrobust.attacks.apgd import targeted_settings_used
from fastrobust.attacks.autoattack import DEFAULTS, OFFICIAL_MISSING, VERSIONS, official_available
from fastrobust.attacks.official import OFFICIAL_VERSIONS, official_plan
from fastrobust.attacks.rays import official_tol
from fastrobust.attacks.toolkit import check_norm, margin_gradient
from fastrobust.core import distributed as dist_lib
from fastrobust.core.attack_options import check_options
from fastrobust.core.contract import (
    check_device,
    check_gradients_allowed,
    check_model_images,
    check_split,
    finite_rows,
    predicts,
    prepare_model,
    small_l2_eps_note,
    split_arrays,
    validated,
)
from fastrobust.core.filekind import checkpoint_format, looks_like
from fastrobust.core.files import atomic_write_json
from fastrobust.core.output_files import check_writable
from fastrobust.core.records import code_version
from fastrobust.core.values import check_eps, check_eps_fits, check_nonnegative_int, check_positive_int
from fastrobust.errors import ConfigError, FastRobustError
from fastrobust.evaluate.batching import batch_seed, indexed_batches
from fastrobust.evaluate.invariance import EVALUATIONS as INVARIANCE
from fastrobust.evaluate.invariance import evaluate_invariance

Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]


def iterate_split(images: Tensor, labels: Tensor, batch_size: int, device: str | torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of (float [0,1] images, labels) on ``device``, in order; uint8 or float input."""
    for start in range(0, len(labels), batch_size):
        x = images[start : start + batch_size].to(device, non_blocking=True)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        yield x, labels[start : start + batch_size].to(device, non_blocking=True)


def _rank_batches(n: int, batch_size: int, distributed: bool) -> list[int]:
    """The batch indices this process evaluates: all of them, or its share (b % world_size == rank)."""

    count = (n + batch_size - 1) // batch_size
    if not distributed:
        return list(range(count))
    return dist_lib.shard_indices(count, dist_lib.context())


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
    mine = _rank_batches(len(labels), batch_size, distributed)
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


# --------------------------------------------------------------------------------------------------
# Full evaluation: named attacks, per-example worst case, resumable state, one record.
# --------------------------------------------------------------------------------------------------

ATTACKS = (
    "clean", "fgsm", "pgd20", "pgd100", "cw20", "apgd-ce", "apgd-t", "fab-t", "square",
    "autoattack", "autoattack-fast", "rays", "autoattack-official",
)
# named invariance evaluations (fastrobust.evaluate.invariance): same record format, not eps-ball attacks, so not part of
# the worst case and not kept in the state file
ATTACKS += tuple(INVARIANCE)
GRADIENT_FREE = ("clean", "square", "rays") + tuple(INVARIANCE)  # run inside torch.inference_mode() too
STATE_VERSION = 2  # 2: model in the fingerprint, non-finite flags per point
AUTOATTACK_EXECUTION = ("precision", "channels_last")  # accepted in attack_options["autoattack"]


def default_step(eps: float, steps: int, norm: str) -> float:
    """PGD step size: the paper's 2/255 for l_inf (eps/4 below 2/255, and large enough to reach eps in
    ``steps / 2.5`` steps for large eps, at most 1: a longer l_inf step only reaches the same corner);
    ``2.5 * eps / steps`` for l_2."""
    if norm == "l2":
        return 2.5 * eps / steps
    return min(max(min(2 / 255, eps / 4), 2.5 * eps / steps), 1.0)


def attack_settings(name: str, eps: float, norm: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings an attack runs with in ``evaluate`` (defaults, updated by ``options``)."""

    if name not in ATTACKS:
        raise ConfigError(f"attack {name!r} is unknown: choose from {', '.join(ATTACKS)}")
    if name in INVARIANCE:
        return INVARIANCE[name].settings(options)
    if name == "clean":
        base: dict[str, Any] = {}
    elif name == "fgsm":
        base = {"step_size": eps, "random_init": False}
    elif name in ("pgd20", "pgd100", "cw20"):
        steps = 100 if name == "pgd100" else 20
        base = {"steps": steps, "step_size": None, "random_init": False,  # None: default_step for the steps run
                "loss": "cw" if name == "cw20" else "ce", "restarts": 1, "stop_at_fooled": True}
    elif name in ("apgd-ce", "apgd-t", "fab-t", "square"):
        base = dict(DEFAULTS[name])
    elif name in ("autoattack", "autoattack-fast"):
        version = "fast" if name == "autoattack-fast" else "standard"
        base = {"version": version, "options": {k: dict(DEFAULTS[k]) for k in VERSIONS[version]}}
    elif name == "rays":
        base = {"n_queries": 10000, "tol": None, "early_stop": False}  # tol None: the authors' 1e-3/sqrt(d)
    else:  # autoattack-official
        base = {"version": "standard"}
    options = dict(options or {})
    if name in ("autoattack", "autoattack-fast") and options:
        merged = {k: dict(v) for k, v in base["options"].items()}
        nested = options.pop("options", None) or {}
        if not isinstance(nested, dict) or not all(isinstance(v, dict) for v in nested.values()):
            raise ConfigError(f"attack {name!r}: options={nested!r} must map components to dicts of settings, e.g. "
                              "{'square': {'n_queries': 1000}}")
        for key, value in nested.items():
            merged.setdefault(key, {}).update(value)
        for key in list(options):  # component options given directly: {"square": {...}}
            if isinstance(options[key], dict):
                merged.setdefault(key, {}).update(options.pop(key))
        base["options"] = merged
    unknown = set(options) - set(base) - ({"n_queries", "tol", "early_stop"} if name == "rays" else set())
    if name in ("autoattack", "autoattack-fast"):
        unknown -= set(AUTOATTACK_EXECUTION)  # how it runs (precision, channels_last): recorded only when given
    if unknown and name != "clean":
        raise ConfigError(f"attack {name!r} has no setting(s) {sorted(unknown)}: its settings are {sorted(base)}")
    base.update(options)
    return _checked(name, base, eps, norm)


def _checked(name: str, settings: dict[str, Any], eps: float, norm: str) -> dict[str, Any]:
    """The settings with every value checked and normalised before any work (``attack_options``), so that the
    record shows what runs; an attack named for its steps (pgd20, cw20) must take at least one, and its step size
    defaults (also when given as None) to ``default_step`` for the number of steps it runs."""
    where = f"attack {name!r}"
    # with no step a PGD attack's robust accuracy would be the clean accuracy, under the attack's name
    settings = check_options(where, settings, norm=norm, minimums={"steps": 1})
    if name in ("pgd20", "pgd100", "cw20") and settings.get("step_size") is None:
        settings["step_size"] = default_step(eps, settings["steps"], norm)
    elif name == "fgsm" and settings.get("step_size") is None:
        settings["step_size"] = eps
    if isinstance(settings.get("options"), dict):  # AutoAttack's components
        settings["options"] = {key: check_options(f"{where} ({key})", value, norm=norm)
                               for key, value in settings["options"].items()}
    return settings


def _run_attack(name: str, settings: dict[str, Any], model: nn.Module, x: Tensor, y: Tensor, *, eps: float,
                norm: str, generator: torch.Generator | None, seed: int,
                max_rows: int | None = None) -> tuple[Tensor, dict[str, list]]:
    """Adversarials for the batch (all correctly classified) and per-example extras. ``max_rows``: the
    evaluation's batch size, the most rows AutoAttack's components attack at once."""

    extras: dict[str, list] = {}
    s = settings
    if name == "fgsm":
        x_adv = fgsm(model, x, y, eps=eps, norm=norm, generator=generator, **s)
    elif name in ("pgd20", "pgd100", "cw20"):
        x_adv = pgd(model, x, y, eps=eps, norm=norm, generator=generator, **s)
    elif name == "apgd-ce":
        x_adv = apgd_ce(model, x, y, eps=eps, norm=norm, generator=generator, **s)
    elif name == "apgd-t":
        x_adv = apgd_t(model, x, y, eps=eps, norm=norm, generator=generator, **s)
    elif name == "fab-t":
        x_adv = fab_t(model, x, y, eps=eps, norm=norm, generator=generator, **s)
    elif name == "square":
        x_adv, queries = square(model, x, y, eps=eps, norm=norm, generator=generator, return_queries=True, **s)
        extras["queries"] = queries.tolist()
    elif name in ("autoattack", "autoattack-fast"):
        result = autoattack(model, x, y, eps=eps, norm=norm, version=s["version"], options=s["options"],
                            generator=generator, return_details=True, max_rows=max_rows,
                            **{k: s[k] for k in AUTOATTACK_EXECUTION if k in s})
        x_adv = result.x_adv
        extras["broken_by"] = result.broken_by
    elif name == "rays":
        result = rays(model, x, y, eps=eps, norm=norm, **s)
        x_adv = result.within(x, eps)
        extras["distance"] = [None if d == float("inf") else d for d in result.distance.tolist()]
        extras["distance_official"] = result.official_distance(x).tolist()
        extras["queries"] = result.queries.tolist()
    elif name == "autoattack-official":
        x_adv = autoattack_official(model, x, y, eps=eps, norm=norm, seed=seed, **s)
    else:  # pragma: no cover - guarded by attack_settings
        raise ConfigError(f"attack {name!r} is unknown")
    return x_adv.detach(), extras


def _as_split(data: Any, where: str = "evaluate") -> tuple[Tensor, Tensor, int]:
    """(images uint8 or float, labels int64, largest label) of an ImageSet, a Dataset's test split, an (images,
    labels) pair or a list of samples or batches (``inputs.split_arrays`` reads it by the elements' shapes);
    checked by ``inputs.check_split`` (one host sync)."""
    images, labels = split_arrays(data, where=where)
    return check_split(images, labels, where=where)


def model_fingerprint(model: nn.Module) -> dict[str, str]:
    """What identifies a model for a state file: its class, an architecture hash (class, ``fastrobust_config``
    and the module tree as ``repr`` prints it) and a hash of every state_dict tensor (parameters and buffers:
    names, dtypes, shapes and bytes)."""
    cls = type(model)
    config = getattr(model, "fastrobust_config", None)
    architecture = hashlib.sha256(
        f"{cls.__module__}.{cls.__qualname__}\n{json.dumps(config, sort_keys=True, default=str)}\n{model!r}".encode()
    )
    weights = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        weights.update(name.encode())
        if isinstance(tensor, Tensor):
            tensor = tensor.detach().cpu().contiguous()
            weights.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            weights.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            weights.update(repr(tensor).encode())
    return {"model_class": f"{cls.__module__}.{cls.__qualname__}", "model_architecture": architecture.hexdigest(),
            "model_weights": weights.hexdigest()}


def _fingerprint(images: Tensor, labels: Tensor, eps: float, norm: str, batch_size: int, seed: int,
                 model: nn.Module) -> dict[str, Any]:
    digest = hashlib.sha256()
    digest.update(images.detach().cpu().contiguous().numpy().tobytes())
    digest.update(labels.detach().cpu().contiguous().numpy().tobytes())
    return {"data_sha256": digest.hexdigest(), "n": len(labels), "eps": eps, "norm": norm,
            "batch_size": batch_size, "seed": seed, **model_fingerprint(model)}


_FINGERPRINT_NAMES = {"data_sha256": "data", "n": "number of points", "model_class": "model class",
                      "model_architecture": "model architecture", "model_weights": "model weights"}


def _fresh_state(fingerprint: dict[str, Any] | None) -> dict[str, Any]:
    return {"version": STATE_VERSION, "fingerprint": fingerprint, "clean": {}, "clean_non_finite": {}, "attacks": {}}


STATE_FIELDS = ("version", "fingerprint", "clean", "attacks")


def read_state_file(path: str | Path) -> dict[str, Any] | None:
    """The evaluation state saved at ``path`` (None when there is none yet: no file, or an empty one).

    Raises FastRobustError when ``path`` is not an evaluation state file -- a folder, a model, a run's config,
    any other file -- saying so and asking for another path (such a file is never overwritten), or when it is a
    state file of another format version (which may then be deleted)."""
    path = Path(path)
    other = "choose another --state path (a new state file is created there)"
    if path.is_dir():
        raise FastRobustError(f"state file {path} is a folder, not an evaluation state file: {other}, e.g. "
                              f"{path / 'eval-state.json'}")
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        kind = checkpoint_format(path)
        what = f"a model file ({kind})" if kind else (looks_like(path) or "not JSON")
        raise FastRobustError(f"state file {path} is not an evaluation state file (it looks like {what}): {other}") from None
    except OSError as error:
        raise FastRobustError(f"state file {path} cannot be read ({error.strerror or error}): {other}") from None
    if not isinstance(state, dict) or not all(key in state for key in STATE_FIELDS):
        raise FastRobustError(f"state file {path} is not an evaluation state file (a JSON file without the fields "
                              f"{', '.join(STATE_FIELDS)}): {other}")
    if state["version"] != STATE_VERSION:
        raise FastRobustError(f"state file {path} was written by another version of evaluate (state version "
                              f"{state['version']}, this one reads {STATE_VERSION}): delete that state file to start "
                              f"over, or {other}")
    return state


def _load_state(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    state = read_state_file(path)
    if state is None:
        return _fresh_state(fingerprint)
    if state.get("fingerprint") != fingerprint:
        old = state.get("fingerprint") or {}
        diff = [_FINGERPRINT_NAMES.get(k, k) for k in fingerprint if old.get(k) != fingerprint.get(k)]
        raise FastRobustError(
            f"state file {path} belongs to another evaluation (different {', '.join(diff)}): "
            "use the same model, data and settings to resume, or another --state file"
        )
    return state


def _check_ball(x_adv: Tensor, x: Tensor, eps: float, norm: str, name: str) -> None:
    """RuntimeError (a bug in the attack) unless every adversarial is finite, in [0, 1] and in the eps-ball.
    Written so that NaN fails it: every comparison with NaN is False, so each test asks for the good case."""
    flat, delta = x_adv.flatten(1), (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    good = (torch.isfinite(flat).all(1) & (size <= eps * (1 + 1e-4) + 1e-6)
            & (flat.amin(1) >= 0) & (flat.amax(1) <= 1))
    if not bool(good.all()):
        i = int((~good).nonzero()[0, 0])
        raise RuntimeError(f"attack {name!r} returned an adversarial outside the {norm} eps-ball, outside [0, 1] or "
                           f"non-finite (point {i} of the batch, distance {float(size[i]):.6g}, eps {eps:g}): a bug")


def _versions() -> dict[str, str]:



    return {"fastrobust": code_version(), "torch": torch.__version__, "numpy": numpy.__version__,  # as training's
            "python": platform.python_version()}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


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
) -> dict[str, Any]:
    """Evaluate ``model`` on ``data`` under each attack in ``attacks``; returns a JSON-able record.

    Each attack runs on every correctly classified point (so each has its own robust accuracy);
    ``robust_acc`` is the per-example worst case across them. ``attack_options`` overrides settings per
    attack (``{"square": {"n_queries": 1000}}``). With ``state_file`` the per-example status of every
    finished batch is saved (atomically) and a rerun resumes from it; the state is bound to the data, the
    settings and the model (weights and architecture). ``device`` defaults to the model's; the model is
    moved there. Randomness comes from ``seed`` only (one generator per attack and batch).

    ``data``: images uint8, or float in [0, 1], ``[N, C, H, W]``; labels of any integer dtype in ``[0, C)``
    (docs/evaluation.md, "Input contract"); a violation is a ConfigError. Non-finite logits never count as
    correct or robust (counted as ``non_finite``). Models with bf16/fp16 weights run in their own dtype.
    Pre-checks as the official AutoAttack's warn (in ``record["warnings"]`` and on stderr) when the outputs
    look like probabilities or two forward passes differ (a randomised model); it also warns when clean accuracy
    is at chance level (:func:`chance_warnings`). A Dataset, or an ImageSet from ``load_dataset``, whose
    ``num_classes`` differs from the model's number of outputs is a ConfigError (:func:`class_count_warnings`). A model that is no ``nn.Module``
    or returns fewer than 2 logits per image is a ConfigError; an l2 ``eps`` below 0.1 on images of >= 100
    values (an l_inf budget such as 8/255 given with norm='l2') is a ``warnings.warn`` (and in the record).

    With ``distributed`` (every rank of an initialised process group calling with the same arguments) the
    batches are shared out across ranks in rounds of ``world_size``; each batch is computed exactly as in
    one process (same batch size, same per-batch seed), the per-example results are gathered on every
    rank after each round and rank 0 alone writes ``state_file``: the record equals the one-process record
    (timings and device aside).
    """

    norm = check_norm(norm)
    eps = check_eps(eps, norm=norm)
    batch_size = check_positive_int(batch_size, name="batch_size")
    seed = check_nonnegative_int(seed, name="seed")
    images, labels, label_max = _as_split(data)
    if len(labels) == 0:
        raise ConfigError("evaluate: data holds no images: nothing to evaluate (check the split or the subset size)")
    check_eps_fits(eps, norm, images.shape[1:])
    check_model_images(model, tuple(images.shape[1:]), where="evaluate")
    small_eps = small_l2_eps_note(eps, norm, tuple(images.shape[1:]))
    if small_eps is not None:  # said before the (long) attack; also kept in record["warnings"]
        warnings.warn(small_eps, UserWarning, stacklevel=2)
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
    if "rays" in names and norm != "linf":
        raise ConfigError(f"attack 'rays' is l_inf only but norm={norm!r}: drop rays or use --norm linf")
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
    skipped: dict[str, str] = {}
    if "autoattack-official" in names and not official_available():
        skipped["autoattack-official"] = OFFICIAL_MISSING
        warnings.warn(f"skipping attack 'autoattack-official': {OFFICIAL_MISSING}", stacklevel=2)
        print(f"fastrobust evaluate: skipping autoattack-official: {OFFICIAL_MISSING}", file=sys.stderr)

    ctx = dist_lib.context() if distributed else dist_lib.Context()
    n = len(labels)
    n_batches = (n + batch_size - 1) // batch_size
    with model_mode(model, training=False), validated():
        _, x_first, y_first = next(indexed_batches(images, labels, batch_size, device, [0]))
        warned, num_classes = _prechecks(checked, x_first)
        if needs_gradients:
            warned += zero_gradient_warnings(checked, x_first, y_first)
    warned += class_count_warnings(num_classes, label_max, n, getattr(data, "num_classes", None))
    path = check_writable(state_file, what="state file", example="eval-state.json") if state_file is not None else None
    loaded: Any = None
    if ctx.is_main:  # only rank 0 reads the state file (other machines need not see it)
        try:
            loaded = _fresh_state(None) if path is None else _load_state(
                path, _fingerprint(images, labels, eps, norm, batch_size, seed, model))
        except FastRobustError as error:
            loaded = error
    loaded = dist_lib.broadcast_object(loaded) if ctx.active else loaded
    if isinstance(loaded, FastRobustError):
        raise loaded
    state = loaded

    def save() -> None:
        if path is not None and ctx.is_main:
            atomic_write_json(path, state)

    def rounds(pending: list[int]) -> Iterator[list[int]]:
        """Groups of up to world_size pending batches; this rank computes the one at its rank's position."""
        for first in range(0, len(pending), ctx.world_size):
            yield pending[first:first + ctx.world_size]

    def run_round(group: list[int], compute: Callable[[int, Tensor, Tensor], Any]) -> dict[int, Any]:
        mine = group[ctx.rank:ctx.rank + 1] if ctx.active else group
        results = {b: compute(b, x, y) for b, x, y in indexed_batches(images, labels, batch_size, device, mine)}
        if ctx.active:
            merged: dict[int, Any] = {}
            for part in dist_lib.gather_objects(results):
                merged.update(part)
            return merged
        return results

    started = time.perf_counter()
    with model_mode(model, training=False), validated():
        # clean predictions, one pass
        clean_seconds = state.get("clean_seconds", 0.0)

        def clean_batch(_b: int, x: Tensor, y: Tensor) -> tuple[list[bool], list[bool], float]:
            t0 = time.perf_counter()
            with torch.no_grad():
                logits = checked(x)
            correct, non_finite = predicts(logits, y).tolist(), (~finite_rows(logits)).tolist()
            return correct, non_finite, time.perf_counter() - t0

        pending = [b for b in range(n_batches) if str(b) not in state["clean"]]
        for group in rounds(pending) if ctx.active else ([b] for b in pending):
            for b, (correct, non_finite, seconds) in sorted(run_round(group, clean_batch).items()):
                state["clean"][str(b)] = correct
                state["clean_non_finite"][str(b)] = non_finite
                clean_seconds += seconds
            state["clean_seconds"] = clean_seconds
            save()
        for name in names:
            if name == "clean" or name in skipped:
                continue
            stored = state["attacks"].setdefault(name, {"settings": _jsonable(settings[name]), "batches": {}})
            if stored["settings"] != _jsonable(settings[name]):
                raise FastRobustError(
                    f"state file {path} holds results of {name!r} with other settings ({stored['settings']}): "
                    "use the same attack settings to resume, or another state file"
                )
            done = stored["batches"]

            def attack_batch(b: int, x: Tensor, y: Tensor, name: str = name) -> dict[str, Any]:
                t0 = time.perf_counter()
                correct = torch.tensor(state["clean"][str(b)], dtype=torch.bool, device=device)
                robust = correct.clone()
                non_finite = torch.zeros_like(correct)
                entry: dict[str, Any] = {}
                idx = correct.nonzero().squeeze(1)
                if len(idx):
                    generator = torch.Generator(device=device).manual_seed(batch_seed(seed, name, b))
                    x_adv, extras = _run_attack(name, settings[name], checked, x[idx], y[idx], eps=eps,
                                                norm=norm, generator=generator, seed=seed, max_rows=len(x))
                    _check_ball(x_adv, x[idx], eps, norm, name)
                    with torch.no_grad():
                        logits = checked(x_adv)
                    robust[idx] = predicts(logits, y[idx])  # non-finite logits are never robust
                    non_finite[idx] = ~finite_rows(logits)
                    for key, values in extras.items():
                        full: list[Any] = [None] * len(y)
                        for i, v in zip(idx.tolist(), values):
                            full[i] = v
                        entry[key] = full
                entry["robust"] = robust.tolist()
                entry["non_finite"] = non_finite.tolist()
                entry["seconds"] = time.perf_counter() - t0
                return entry

            bar = tqdm(total=n_batches, desc=name, unit="batch",  # None: drawn only on a terminal, not in logs
                       disable=True if not progress or not ctx.is_main else None,
                       file=sys.stderr, initial=sum(1 for b in range(n_batches) if str(b) in done))
            try:
                pending = [b for b in range(n_batches) if str(b) not in done]
                for group in rounds(pending) if ctx.active else ([b] for b in pending):
                    results = run_round(group, attack_batch)
                    for b in sorted(results):
                        done[str(b)] = results[b]
                    save()
                    bar.update(len(results))
            finally:
                bar.close()
    record = _record(model, state, names, settings, skipped, eps, norm, n, n_batches, batch_size, seed, device,
                     time.perf_counter() - started, num_classes, images[0].numel() if n else 0)
    if invariance:  # the prepared model: inputs cast to a half-precision model's dtype, logits in fp32
        clean = [v for b in range(n_batches) for v in state["clean"][str(b)]]
        record["attacks"].update(evaluate_invariance(checked, images, labels, invariance, clean=clean,
                                                     batch_size=batch_size, device=device, seed=seed,
                                                     distributed=ctx.active))
    record["warnings"] = ([small_eps] if small_eps else []) + warned + _non_finite_warnings(record) + \
        chance_warnings(record)
    if ctx.is_main:
        for text in record["warnings"]:
            if text != small_eps:  # that one was said before the attacks
                print(f"fastrobust evaluate: warning: {text}", file=sys.stderr)
    if ctx.active:
        record["world_size"] = ctx.world_size
    return record


def _prechecks(model: nn.Module, x: Tensor) -> tuple[list[str], int]:
    """The official AutoAttack's pre-checks on the first batch: outputs that look like probabilities (every row
    non-negative and summing to 1) and a randomised model (two forward passes of the same input differ by more
    than 1e-4, relative). Returns (warnings, number of outputs)."""
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
    if not same_pattern or diff > 1e-4:
        found.append(f"two forward passes of the same input differ (by {diff:.3g}, relative): the model is "
                     "randomised, so these attacks underestimate its vulnerability; use EOT attacks "
                     "(the official AutoAttack's version='rand')")
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


def _non_finite_warnings(record: dict[str, Any]) -> list[str]:
    out = []
    if record["clean_non_finite"]:
        out.append(f"the model returns NaN or inf logits on {record['clean_non_finite']} of {record['n']} clean "
                   "points: counted as misclassified (check the model's numerics, e.g. its precision)")
    for name, entry in record["attacks"].items():
        if name != "clean" and entry.get("non_finite"):  # the clean pass: said above
            out.append(f"the model returns NaN or inf logits on {entry['non_finite']} adversarial examples of "
                       f"{name!r}: counted as broken (not robust)")
    return out


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def settings_used(name: str, settings: dict[str, Any], num_classes: int, dim: int) -> dict[str, Any]:
    """The settings an attack actually ran with on a model of ``num_classes`` outputs and images of ``dim``
    values: targeted attacks use at most C - 1 targets, APGD-T's DLR loss needs 4 classes, RayS's default
    tolerance is the authors' 1e-3/sqrt(d); the official AutoAttack runs with at most C - 1 targets and without
    the components its code cannot run on C classes (``official_plan``)."""

    used = json.loads(json.dumps(settings))
    if name in ("apgd-t", "fab-t"):
        used = targeted_settings_used(name, used, num_classes)
    elif name in ("autoattack", "autoattack-fast"):
        used["options"] = {key: settings_used(key, value, num_classes, dim) for key, value in used["options"].items()}
    elif name == "rays" and used.get("tol") is None:
        used["tol"] = official_tol(dim)
    elif name == "autoattack-official":
        used.update(official_plan(list(OFFICIAL_VERSIONS.get(used.get("version"), ())), num_classes))
    return used


def _clipped(requested: Any, used: Any) -> bool:
    """Whether a requested setting ran with another value (a default left as None does not count), or the run
    needed a setting that was not requested (the official AutoAttack's targets on a model of few classes)."""
    if isinstance(requested, dict):
        added = isinstance(used, dict) and any(key not in requested for key in used)
        return added or any(value is not None and _clipped(value, used.get(key)) for key, value in requested.items())
    return requested != used


def _record(model, state, names, settings, skipped, eps, norm, n, n_batches, batch_size, seed, device, seconds,
            num_classes, dim) -> dict[str, Any]:
    def per_point(values: dict[str, Any], key: str | None = None) -> list[Any]:
        """Per-batch lists joined in point order (None for the points of a batch that has no ``key``)."""
        out: list[Any] = []
        for b in range(n_batches):
            batch = values[str(b)]
            out.extend(batch if key is None else batch.get(key) or [None] * len(state["clean"][str(b)]))
        return out

    clean = per_point(state["clean"])
    clean_correct = sum(clean)
    clean_non_finite = sum(per_point(state["clean_non_finite"]))
    worst = list(clean)
    per_attack: dict[str, Any] = {}
    for name in names:
        if name == "clean":
            per_attack[name] = {"robust_acc": clean_correct / max(n, 1), "robust": clean_correct, "broken": 0,
                                "non_finite": clean_non_finite, "settings": {},
                                "seconds": state.get("clean_seconds", 0.0)}
            continue
        if name in skipped:
            continue
        batches = state["attacks"][name]["batches"]
        robust = per_point(batches, "robust")
        worst = [w and r for w, r in zip(worst, robust)]
        used = settings_used(name, settings[name], num_classes, dim)
        entry: dict[str, Any] = {
            "robust_acc": sum(robust) / max(n, 1),
            "robust": sum(robust),
            "broken": clean_correct - sum(robust),
            "non_finite": sum(per_point(batches, "non_finite")),
            "settings": used,
            "seconds": sum(batches[str(b)]["seconds"] for b in range(n_batches)),
        }
        if _clipped(_jsonable(settings[name]), used):
            entry["settings_requested"] = settings[name]
        if name == "rays":
            dists = [d for d, c in zip(per_point(batches, "distance"), clean) if c]
            official = [d for d, c in zip(per_point(batches, "distance_official"), clean) if c]
            queries = [q for q in per_point(batches, "queries") if q is not None]
            found = [d for d in dists if d is not None]
            entry["adbd"] = sum(official) / n if n else None  # the RayS leaderboard's: over all n points
            entry["adbd_correct_only"] = sum(found) / len(found) if found else None
            entry["no_boundary_found"] = len(dists) - len(found)
            entry["queries_mean"] = sum(queries) / len(queries) if queries else 0.0
            entry["queries_median"] = float(sorted(queries)[len(queries) // 2]) if queries else 0.0
        if name == "square":
            queries = [q for q in per_point(batches, "queries") if q is not None]
            entry["queries_mean"] = sum(queries) / len(queries) if queries else 0.0
        if name in ("autoattack", "autoattack-fast"):
            counts: dict[str, int] = {}
            for who in per_point(batches, "broken_by"):
                if who is not None and who != "clean":
                    counts[who] = counts.get(who, 0) + 1
            order = [who for who in settings[name]["options"] if who in counts]  # the order the components ran
            entry["broken_by"] = {who: counts[who] for who in order + sorted(set(counts) - set(order))}
        per_attack[name] = entry
    adversarial = [a for a in names if a != "clean" and a not in skipped]
    return {
        "n": n,
        "eps": eps,
        "norm": norm,
        "clean_acc": clean_correct / max(n, 1),
        "clean_correct": clean_correct,
        "clean_non_finite": clean_non_finite,
        "robust_acc": sum(worst) / max(n, 1) if adversarial else None,
        "robust": sum(worst) if adversarial else None,
        "attacks": per_attack,
        "skipped": skipped,
        "batch_size": batch_size,
        "seed": seed,
        "seconds": seconds,
        "model": type(model).__name__,
        "num_classes": num_classes,
        "device": _device_name(device),
        "versions": _versions(),
    }
