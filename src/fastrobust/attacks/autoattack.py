"""AutoAttack (Croce & Hein, ICML 2020): a parameter-free ensemble reporting the per-example worst case.

``standard``: APGD-CE (100 iterations), APGD-T (9 targets, 100 iterations each), FAB-T (9 targets,
100 iterations each), Square (5,000 queries, the p schedule not rescaled, as the authors' AutoAttack), each
run only on the points every earlier attack left correctly classified. ``fast``: APGD-CE and APGD-T.
The official's other versions, as its ``set_version`` defines them: ``plus``: APGD-CE and APGD-DLR (5 restarts
each), untargeted FAB (5 restarts), Square (5,000 queries), APGD-T (9 targets) and FAB-T (9 targets, 1 restart);
``rand`` (for randomized defenses): APGD-CE and APGD-DLR, 1 restart each, every step's gradient averaged over
20 passes (expectation over transformations, ``eot_iter``). ``norm="l1"``: ``standard`` is the official standard
l_1 AutoAttack: APGD-CE with 5 restarts and APGD-T with 5 targets, both from the large-eps start (see apgd.py), then
FAB-T (9 targets) and Square (5,000 queries) in their l_1 versions (fab.py, square.py); ``fast`` runs its two APGD
components; ``rand`` as for the other norms. The official defines ``plus`` for l_inf and l_2 only (it warns on
l_1), so ``plus`` refuses l_1 before any work.
``autoattack_official`` runs the authors' package (``pip install pyautoattack``, or the GitHub package
``autoattack``) when it is importable.

Speed: every component keeps the reference's per-point outcome while doing less work (points leave the
working batch once broken; APGD-T and FAB-T attack several targets of the still-robust points in one batch
of at most ``max_rows`` rows; FAB's projection solves for its radius instead of sorting; Square edits its
window in place). ``precision="bf16"`` (or ``"auto"`` on CUDA) runs the attacks' forwards under bf16
autocast; every misclassification an attack acts on is confirmed in fp32, and the final flags come from an
fp32 forward (full fp32 on CUDA too: TF32 off, ``fastrobust.core.precision.no_tf32``). ``channels_last=True``
hands the model channels-last inputs (it pays with cuDNN/oneDNN convolutions; results are the same up to float
rounding).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from fastrobust.attacks._compiled import compiled_copy
from fastrobust.attacks._engine import check_precision, execution_for
from fastrobust.attacks._frozen import frozen_copies
from fastrobust.attacks.apgd import apgd_ce, apgd_dlr, apgd_t, targeted_settings_used
from fastrobust.attacks.fab import fab_t, fab_untargeted
from fastrobust.attacks.official import OFFICIAL_MISSING, official_available, run_official  # noqa: F401 (re-exported)
from fastrobust.attacks.square import square
from fastrobust.attacks.toolkit import model_mode
from fastrobust.core.attack_options import check_options
from fastrobust.core.contract import entry_point, predicts
from fastrobust.core.precision import no_tf32
from fastrobust.core.values import NORMS
from fastrobust.errors import ConfigError

VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "fast": ("apgd-ce", "apgd-t"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),  # the official's order
    "rand": ("apgd-ce", "apgd-dlr"),
}
DEFAULTS: dict[str, dict[str, Any]] = {  # each component's settings in the standard version
    "apgd-ce": {"n_iter": 100, "n_restarts": 1},
    "apgd-dlr": {"n_iter": 100, "n_restarts": 1},
    "apgd-t": {"n_iter": 100, "n_targets": 9, "n_restarts": 1},
    "fab": {"n_iter": 100, "n_restarts": 1},
    "fab-t": {"n_iter": 100, "n_targets": 9, "n_restarts": 1},
    "square": {"n_queries": 5000, "p_init": 0.8, "rescale_schedule": False},
}
EOT_SAMPLES = 20  # the rand version's gradients per step (the official's eot_iter)
# what each version changes (the official's set_version)
VERSION_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "plus": {"apgd-ce": {"n_restarts": 5}, "apgd-dlr": {"n_restarts": 5}, "fab": {"n_restarts": 5}},
    "rand": {"apgd-ce": {"eot_iter": EOT_SAMPLES}, "apgd-dlr": {"eot_iter": EOT_SAMPLES}},
}
# the official standard version's l_1 APGD: 5 restarts, 5 targets, the large-eps start (fast: the same APGD)
L1_SETTINGS = {"apgd-ce": {"n_restarts": 5, "large_eps": True}, "apgd-t": {"n_targets": 5, "large_eps": True}}
L1_VERSIONS = ("standard", "fast", "rand")  # the versions defined for l_1 (the official's plus is not)
# how each component is run, besides its settings: (point, target) rows per batch, forward precision
_EXECUTION = {"apgd-ce": ("precision",), "apgd-dlr": ("precision",), "apgd-t": ("max_rows", "precision"),
              "fab": ("precision",), "fab-t": ("max_rows", "precision"), "square": ("precision",)}
_FUNCTIONS: dict[str, Callable[..., Tensor]] = {"apgd-ce": apgd_ce, "apgd-dlr": apgd_dlr, "apgd-t": apgd_t,
                                               "fab": fab_untargeted, "fab-t": fab_t, "square": square}
DLR_MIN_CLASSES = 3  # the untargeted DLR reads the 3rd-highest logit


def version_settings(version: str, name: str, norm: str = "linf") -> dict[str, Any]:
    """Component ``name``'s settings in AutoAttack ``version`` for the threat model ``norm`` (the standard ones where
    the version changes none; l_1 standard and fast: ``L1_SETTINGS``); ``autoattack`` checks the names (KeyError
    here for an unknown component)."""
    settings = {**DEFAULTS[name], **VERSION_SETTINGS.get(version, {}).get(name, {})}
    if norm == "l1" and version in ("standard", "fast"):
        settings.update(L1_SETTINGS.get(name, {}))
    return settings


@dataclass
class AutoAttackResult:
    x_adv: Tensor                 # per-example worst case (the first adversarial found, else x)
    robust: Tensor                # bool [B]: correctly classified at x_adv
    broken_by: list[str | None]   # per example: "clean" (misclassified already), an attack name, or None
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # as they ran (targets at most C - 1)
    notes: list[str] = field(default_factory=list)  # how it ran: precision, frozen copies or why not

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name in self.broken_by:
            if name is not None:
                out[name] = out.get(name, 0) + 1
        return out


@entry_point("autoattack", norms=NORMS)
def autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    version: str = "standard",
    attacks: tuple[str, ...] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    return_details: bool = False,
    eval_mode: bool = True,
    generator: torch.Generator | None = None,
    max_rows: int | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
    freeze: bool | None = None,
    compile: bool = False,
) -> Tensor | AutoAttackResult:
    """AutoAttack (Croce & Hein 2020): the parameter-free ensemble, keeping the per-example worst case.

    Runs the components of ``version`` in turn, each only on the points every earlier one left correctly
    classified (see the module docstring). ``attacks`` overrides the version's list, ``options`` the settings of
    each component (e.g. ``{"square": {"n_queries": 1000}}``). Returns ``x_adv``, or an AutoAttackResult
    with ``return_details=True``.

    How it runs (the attacks stay the same): ``max_rows`` (default ``len(x)``) caps the rows (points, or
    (point, target) pairs for APGD-T/FAB-T) attacked in one batch, i.e. the working memory; ``precision``
    ``fp32`` (default), ``bf16`` or ``auto`` (bf16 on CUDA) for the attacks' forwards, every
    misclassification confirmed in fp32; ``channels_last`` runs the model on channels-last tensors (the
    model's parameters are converted for the call and converted back); ``freeze`` (default: on the CPU, in
    fp32 only) lets the components after APGD-CE evaluate a frozen TorchScript copy of the model (BatchNorm folded
    into the convolutions; the same function up to float rounding, checked on the batch; the model itself is used
    when it cannot be traced), every misclassification they act on confirmed by the model (see _frozen.py); never
    in the ``rand`` version, whose model is random. ``compile=True`` evaluates a ``torch.compile`` copy instead
    (every component, batches padded to a few fixed sizes so that a run compiles a few shapes, not one per row
    count; CUDA graphs on CUDA; the same confirmations, see _compiled.py); meant for GPUs: on a CPU it is slower
    than the frozen copies at every length (docs/performance.md, "AutoAttack against its limit"). ``version``: ``standard`` (default), ``fast``, ``plus`` or
    ``rand`` (see the module's docstring). On a model of fewer than 3 classes APGD-DLR is left out (a note says
    so), as the official does.

    Args:
        model: the classifier, images in [0, 1] -> logits ``[B, C]``.
        x: images ``[B, ...]`` (e.g. ``[B, C, H, W]``), float in [0, 1] (pixel units).
        y: true labels ``[B]``, any integer dtype, in [0, C).
        eps: the budget in [0, 1] pixel units (l_inf in (0, 1], l_2 / l_1 a positive radius); text such as
            ``"8/255"`` is parsed. Required.
        norm: ``"linf"`` (default), ``"l2"`` or ``"l1"`` (l_1: every version but ``plus``).
        version: ``"standard"`` (default), ``"fast"``, ``"plus"`` or ``"rand"``.
        attacks: component names to run instead of the version's (``apgd-ce``, ``apgd-dlr``, ``apgd-t``, ``fab``,
            ``fab-t``, ``square``; default None).
        options: per component, settings over the version's (default None).
        return_details: return an ``AutoAttackResult`` instead of ``x_adv`` (default False).
        eval_mode: run the model in eval mode (default True); its previous mode is restored.
        generator: the ``torch.Generator`` of the components' random draws (default None: the global RNG).
        max_rows: rows per batch, the working memory (default None: ``len(x)``).
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"auto"``.
        channels_last: run the model on channels-last tensors (default False).
        freeze: use a frozen TorchScript copy after APGD-CE (default None: on the CPU, fp32, not ``rand``).
        compile: evaluate a ``torch.compile`` copy on padded fixed-size batches in every component (default
            False; replaces the frozen copy).
    Returns:
        ``x_adv`` shaped like ``x`` (per example the first adversarial found, else ``x``), or with
        ``return_details`` an ``AutoAttackResult`` (``x_adv``, ``robust``, ``broken_by``, ``settings``, ``notes``).
    Raises:
        ConfigError: from the ``entry_point`` input contract (``core/contract.py``): images not float in
            [0, 1], labels not in [0, C), a bad ``norm``, ``eps`` or setting (checked once by
            ``core/attack_options.check_options``), or a call inside ``torch.inference_mode()``;
            also an unknown ``version`` or component, ``options`` values that are not dicts, ``version="plus"``
            with ``norm="l1"`` or a bad ``precision``, all before any work (every component takes every norm);
            each message names the value and the fix.
    Example:
        >>> x_adv = autoattack(model, x, y, eps=8 / 255, version="standard")
    """
    if version not in VERSIONS:
        raise ConfigError(f"version={version!r} is not an AutoAttack version: choose one of {', '.join(VERSIONS)}")
    if norm == "l1" and version not in L1_VERSIONS:
        raise ConfigError(f"autoattack: version={version!r} has no l1 definition (the authors define it for linf and "
                          f"l2 only): with norm='l1' use version {', '.join(map(repr, L1_VERSIONS))}")
    names = tuple(attacks) if attacks is not None else VERSIONS[version]
    options = options or {}
    for name in list(names) + list(options):
        if name not in _FUNCTIONS:
            raise ConfigError(f"{name!r} is not an AutoAttack component: choose from {', '.join(_FUNCTIONS)}")
    for name, value in options.items():
        if not isinstance(value, dict):
            raise ConfigError(f"autoattack: options[{name!r}] must be a dict of settings, got {value!r}")
    settings = {name: check_options(f"autoattack ({name})", {**version_settings(version, name, norm),
                                                             **options.get(name, {})}, norm=norm)
                for name in names}
    check_precision(precision)  # validated before any work
    rows = max(int(max_rows or len(x)), 1)
    want_frozen = (x.device.type == "cpu" and version != "rand") if freeze is None else bool(freeze)
    want_frozen = want_frozen and not compile
    x = x.detach()
    notes: list[str] = [f"precision {precision}"]
    with model_mode(model, training=not eval_mode), _memory_format(model, channels_last):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), no_tf32():  # the flags in full fp32 (TF32 off), as every confirmation
            logits = model(x)
        robust = predicts(logits, y)
        settings = {name: targeted_settings_used(name, s, logits.shape[1]) for name, s in settings.items()}
        if "apgd-dlr" in names and logits.shape[1] < DLR_MIN_CLASSES:
            names = tuple(name for name in names if name != "apgd-dlr")
            settings.pop("apgd-dlr", None)
            notes.append(f"apgd-dlr left out: its DLR loss needs {DLR_MIN_CLASSES} classes, the model has "
                         f"{logits.shape[1]}")
        broken_by: list[str | None] = [None if r else "clean" for r in robust.tolist()]
        x_adv = x.clone()
        execution = execution_for(model, precision, x.device)
        if compile and eval_mode:  # a stand-in needs the eval-mode model (no batch statistics across rows)
            stand_in = compiled_copy(model, x.device.type)
            execution = dataclasses.replace(execution, grad_model=stand_in, query_model=stand_in)
            notes.append("torch.compile copy (fixed padded batch buckets)")
        for name in names:
            todo = robust.nonzero().squeeze(1)
            if len(todo) == 0:
                break
            if want_frozen and name != "apgd-ce" and eval_mode and execution.dtype is None:  # once points remain
                copies = frozen_copies(model, x[todo], y[todo])
                execution = dataclasses.replace(execution, grad_model=copies.grad_model,
                                                query_model=copies.query_model)
                notes.append(copies.note)
                want_frozen = False
            how = {"max_rows": rows, "precision": execution}
            how = {key: how[key] for key in _EXECUTION[name]}
            adv = _FUNCTIONS[name](model, x[todo], y[todo], eps=eps, norm=norm, eval_mode=eval_mode,
                                   generator=generator, **settings[name], **how)
            with torch.no_grad(), no_tf32():
                fooled = ~predicts(model(adv), y[todo])
            hit = todo[fooled]
            x_adv[hit] = adv[fooled]
            robust[hit] = False
            for i in hit.tolist():
                broken_by[i] = name
    x_adv = x_adv.contiguous()
    if return_details:
        return AutoAttackResult(x_adv=x_adv, robust=robust, broken_by=broken_by, settings=settings, notes=notes)
    return x_adv


@contextlib.contextmanager
def _memory_format(model: nn.Module, channels_last: bool) -> Iterator[None]:
    """The model's 4-d parameters and buffers in channels-last layout for the block, restored afterwards."""
    if not channels_last:
        yield
        return
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.dim() == 4]
    before = [t.data for t in tensors]
    for t in tensors:
        t.data = t.data.contiguous(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for t, data in zip(tensors, before):
            t.data = data


@entry_point("autoattack_official", norms=NORMS)
def autoattack_official(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    version: str = "standard",
    seed: int = 0,
    eval_mode: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The authors' AutoAttack (``pyautoattack`` or ``autoattack``, Croce & Hein 2020) on this batch.

    ``generator`` is unused (the official code seeds the global RNG from ``seed``).
    On a model of C < 10 classes it runs as ``autoattack`` does: at most C - 1 targets, and below 4 classes
    without APGD-T, whose official code knows only the targeted DLR loss (``official.official_plan``; an
    evaluation records both in its settings).

    Args:
        model: the classifier, images in [0, 1] -> logits ``[B, C]``.
        x: images ``[B, ...]`` (e.g. ``[B, C, H, W]``), float in [0, 1] (pixel units).
        y: true labels ``[B]``, any integer dtype, in [0, C).
        eps: the budget in [0, 1] pixel units (l_inf in (0, 1], l_2 / l_1 a positive radius); text such as
            ``"8/255"`` is parsed. Required.
        norm: ``"linf"`` (default), ``"l2"`` or ``"l1"``.
        version: the official version, ``"standard"`` by default.
        seed: the seed of the official code's global RNG (default 0).
        eval_mode: run the model in eval mode (default True); its previous mode is restored.
        generator: unused (default None).
    Returns:
        The official AutoAttack's adversarial examples, shaped like ``x`` (per example the first attack's
        adversarial, else ``x``).
    Raises:
        FastRobustError: neither ``pyautoattack`` nor ``autoattack`` is installed (``pip install pyautoattack``).
        ConfigError: from the ``entry_point`` input contract (``core/contract.py``): images not float in
            [0, 1], labels not in [0, C), a bad ``norm``, ``eps`` or setting (checked once by
            ``core/attack_options.check_options``), or a call inside ``torch.inference_mode()``;
            each message names the value and the fix.
    Example:
        >>> x_adv = autoattack_official(model, x, y, eps=8 / 255)
    """
    return run_official(model, x, y, eps=eps, norm=norm, version=version, seed=seed, eval_mode=eval_mode)
